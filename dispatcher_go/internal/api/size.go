package api

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The transport accepts messages up to TransportRecvLimit (twice the
// announced limit). The commander services check each message against the
// announced limit themselves (a result over it fails its call, a packet over
// it stops its session); every other request over it is refused here with
// RESOURCE_EXHAUSTED, as the transport refused it before.

// sizeLimit is not inlined: Config returns the dispatcher's whole
// configuration by value, ~450 bytes that would otherwise be in the frame
// of every interceptor that calls it, streamSize's included, which stays
// on an idle ChatStream's stack (see chatStream).
//
//go:noinline
func (s *Server) sizeLimit() int { return s.d.Config().GRPC.MaxRecvMsgBytes }

// tooLarge is the error for a request of n bytes over limit, or nil.
func tooLarge(m any, limit int) error {
	pm, ok := m.(proto.Message)
	if !ok || limit <= 0 {
		return nil
	}
	if n := proto.Size(pm); n > limit {
		return status.Error(codes.ResourceExhausted, fmt.Sprintf("request of %d bytes exceeds the limit of %d bytes", n, limit))
	}
	return nil
}

func (s *Server) unarySize(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := tooLarge(req, s.sizeLimit()); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) streamSize(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if hasAnyPrefix(info.FullMethod, commanderServices) {
		return handler(srv, ss) // checked per message by session and broker
	}
	return handler(srv, &sizedStream{ServerStream: ss, limit: s.sizeLimit()})
}

// sizedStream refuses a received message that did not decode
// (INVALID_ARGUMENT, decodeerr.go) or is over limit.
type sizedStream struct {
	grpc.ServerStream
	limit int
}

func (s *sizedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if err := decodeFailure(m); err != nil {
		return err
	}
	return tooLarge(m, s.limit)
}

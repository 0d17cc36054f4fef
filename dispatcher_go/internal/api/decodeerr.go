package api

import (
	"context"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// A request that does not decode (a string that is not UTF-8, bytes that
// are not protobuf) is the caller's mistake: INVALID_ARGUMENT. grpc-go
// words a codec's error as INTERNAL whatever it is, and for a unary call
// before any interceptor runs, so the codec does not fail: it notes the
// error against the message it was decoding into (failedDecodes) and
// returns nil, and the first interceptor, which every received message
// passes right after its decode, turns the note into the status. The
// message text stays grpc-go's ("grpc: failed to unmarshal the received
// message: …"), which the session's undecodable recognises.

// failedDecodes maps a message the codec failed to decode into to its
// error; failedCount is its size, so that a message that decoded costs an
// atomic load, not a map lookup.
var (
	failedDecodes sync.Map
	failedCount   atomic.Int64
)

// noteDecodeFailure records err as the decode failure of v.
func noteDecodeFailure(v any, err error) {
	failedDecodes.Store(v, err)
	failedCount.Add(1)
}

// decodeFailure returns, and forgets, the decode failure of v as an
// INVALID_ARGUMENT status; nil if v decoded.
func decodeFailure(v any) error {
	if failedCount.Load() == 0 {
		return nil
	}
	err, ok := failedDecodes.LoadAndDelete(v)
	if !ok {
		return nil
	}
	failedCount.Add(-1)
	return status.Errorf(codes.InvalidArgument, "grpc: failed to unmarshal the received message: %v", err)
}

// unaryDecode is the first unary interceptor: a request that did not
// decode gets INVALID_ARGUMENT.
func unaryDecode(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := decodeFailure(req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

// streamDecode is the first stream interceptor: a received message that
// did not decode fails its RecvMsg with INVALID_ARGUMENT.
func streamDecode(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	return handler(srv, decodedStream{ss})
}

// decodedStream turns a decode failure of a received message into its
// RecvMsg's error.
type decodedStream struct{ grpc.ServerStream }

func (s decodedStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return decodeFailure(m)
}

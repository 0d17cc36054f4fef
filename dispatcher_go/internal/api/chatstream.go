package api

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/session"
)

// A ChatStream is aborted from outside its RPC's goroutine (session.WithAbort)
// in two steps: its status is written first (grpc's transport stream, which
// the handler's context carries), then its context — the one grpc's tap
// handle gave it, which the transport's reads and writes wait on — is
// cancelled, so that the Recv the session's goroutine waits in returns. In
// that order the commander gets the session's status (UNAVAILABLE on
// shutdown, ABORTED for a stop not acknowledged), not the CANCELLED grpc
// writes when a Recv fails first. This lets an idle slot cost one goroutine
// instead of two (docs/benchmarks.md, idle slots).

// chatStreamMethod is the full name of AgentInteraction.ChatStream.
var chatStreamMethod = "/" + dispatchv1.AgentInteraction_ServiceDesc.ServiceName + "/ChatStream"

type tapCancelKey struct{}

// chatStreamTap is the server's tap handle: it gives each ChatStream a
// context of its own to cancel. Other RPCs pass untouched. grpc runs it on
// the connection's reader goroutine: it must stay cheap.
func chatStreamTap(ctx context.Context, info *tap.Info) (context.Context, error) {
	if info.FullMethodName != chatStreamMethod {
		return ctx, nil
	}
	ctx, cancel := context.WithCancelCause(ctx)
	return context.WithValue(ctx, tapCancelKey{}, cancel), nil
}

// statusWriter is grpc's transport stream (grpc.ServerTransportStream) as
// far as ending it with a status goes.
type statusWriter interface {
	WriteStatus(*status.Status) error
}

// chatStream is a ChatStream as the session sees it: a packet that did not
// decode fails its receive with INVALID_ARGUMENT (decodeerr.go), and its
// context carries session.WithAbort's abort when the stream can be aborted.
// The check is made here, in the receive the session makes anyway, rather
// than by a stream interceptor of its own: each interceptor and wrapper is
// a few hundred bytes more under the hello's decode, the deepest point of
// an idle slot's life, and crossing 8 KiB there doubles the goroutine's
// stack to 16 KiB for as long as the slot lives (docs/benchmarks.md, idle
// slots).
type chatStream struct {
	grpc.BidiStreamingServer[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]
	ctx context.Context
}

func (c *chatStream) Context() context.Context { return c.ctx }

func (c *chatStream) Recv() (*dispatchv1.UpstreamPacket, error) {
	p := new(dispatchv1.UpstreamPacket)
	if err := c.RecvMsg(p); err != nil {
		return nil, err
	}
	return p, nil
}

func (c *chatStream) RecvMsg(m any) error {
	if err := c.BidiStreamingServer.RecvMsg(m); err != nil {
		return err
	}
	return decodeFailure(m)
}

// withAbort returns stream as a chatStream, with an abort in its context
// unless it cannot be aborted (no tap context, or a grpc whose transport
// stream does not write a status): the session then receives in a goroutine
// of its own.
func (s *Server) withAbort(stream grpc.BidiStreamingServer[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]) session.Stream {
	ctx := stream.Context()
	if !canAbort(ctx) {
		return &chatStream{stream, ctx}
	}
	return &chatStream{stream, session.WithAbort(ctx, func(cause error) { s.abortStream(ctx, cause) })}
}

func canAbort(ctx context.Context) bool {
	_, ok := ctx.Value(tapCancelKey{}).(context.CancelCauseFunc)
	_, sw := grpc.ServerTransportStreamFromContext(ctx).(statusWriter)
	return ok && sw
}

// abortStream ends the ChatStream whose context is ctx with the status of
// cause (see above); a no-op for other streams.
func (s *Server) abortStream(ctx context.Context, cause error) {
	cancel, ok := ctx.Value(tapCancelKey{}).(context.CancelCauseFunc)
	sw, sok := grpc.ServerTransportStreamFromContext(ctx).(statusWriter)
	if !ok || !sok {
		return
	}
	_ = sw.WriteStatus(status.Convert(toStatus(s.d.Logger(), cause)))
	cancel(cause)
}

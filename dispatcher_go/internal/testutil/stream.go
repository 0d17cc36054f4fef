package testutil

import (
	"context"
	"io"
)

// ServerStream is the server's end of a bidi stream without gRPC, for code
// that is handed a stream interface (Context, Send, Recv): the code under
// test sends into Out and receives from In; the test, playing the peer,
// reads Out and writes In, and closes In for the peer's end of stream.
// With an unbuffered Out a Send waits until the test reads, as HTTP/2 flow
// control with a zero window would (Blocked finds it parked in
// "testutil.(*ServerStream[...]).Send").
type ServerStream[Req, Resp any] struct {
	Ctx context.Context
	In  chan Req
	Out chan Resp
}

// NewServerStream returns a stream whose Out holds outBuf messages.
func NewServerStream[Req, Resp any](ctx context.Context, outBuf int) *ServerStream[Req, Resp] {
	return &ServerStream[Req, Resp]{Ctx: ctx, In: make(chan Req), Out: make(chan Resp, outBuf)}
}

// Context is the stream's context: the RPC's, ended when the call ends.
func (s *ServerStream[Req, Resp]) Context() context.Context { return s.Ctx }

// Send hands m to the peer, waiting while Out is full.
func (s *ServerStream[Req, Resp]) Send(m Resp) error {
	select {
	case s.Out <- m:
		return nil
	case <-s.Ctx.Done():
		return s.Ctx.Err()
	}
}

// Recv returns the peer's next message, io.EOF once In is closed.
func (s *ServerStream[Req, Resp]) Recv() (Req, error) {
	select {
	case m, ok := <-s.In:
		if !ok {
			var zero Req
			return zero, io.EOF
		}
		return m, nil
	case <-s.Ctx.Done():
		var zero Req
		return zero, s.Ctx.Err()
	}
}

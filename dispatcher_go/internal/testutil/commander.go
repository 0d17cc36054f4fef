package testutil

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// ChatStream is the commander's end of AgentInteraction.ChatStream.
type ChatStream = grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]

// ErrStopped is returned by a Session's Next, Play and Closed when the
// dispatcher stopped the session (the stop was answered with stopped).
var ErrStopped = errors.New("session stopped by the dispatcher")

// Commander is a stub commander slot: the client end of one ChatStream over
// real gRPC. A goroutine receives downstream packets into a buffer; the
// methods below read it. The t-taking methods (Recv, Start, Ended, ...) fail
// the test and must run on its goroutine; Session methods and Serve return
// errors and may run anywhere. One goroutine at a time may send (one sender
// per stream).
type Commander struct {
	// Timeout bounds every wait of the t-taking methods (default Wait).
	Timeout time.Duration

	t      testing.TB
	stream ChatStream
	cancel context.CancelFunc
	in     chan *dispatchv1.DownstreamPacket // closed when the stream ends
	end    error                             // the stream's end; read after in is closed
}

// OpenChat opens a ChatStream on conn without saying hello. ctx carries the
// call's metadata (a bearer token); the stream ends when ctx does, when
// Cancel is called, or when the test ends.
func OpenChat(t testing.TB, ctx context.Context, conn grpc.ClientConnInterface) *Commander {
	t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	stream, err := dispatchv1.NewAgentInteractionClient(conn).ChatStream(ctx)
	if err != nil {
		cancel()
		t.Fatalf("ChatStream: %v", err)
	}
	c := &Commander{Timeout: Wait, t: t, stream: stream, cancel: cancel, in: make(chan *dispatchv1.DownstreamPacket, 256)}
	received := make(chan struct{})
	go func() {
		defer close(received)
		defer close(c.in)
		for {
			p, err := stream.Recv()
			if err != nil {
				c.end = err
				return
			}
			select {
			case c.in <- p:
			case <-ctx.Done():
				c.end = ctx.Err()
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		<-received
	})
	return c
}

// Connect opens a ChatStream on conn and registers a slot offering caps
// (hello, then its ack). It returns the commander and the slot id.
func Connect(t testing.TB, ctx context.Context, conn grpc.ClientConnInterface, caps ...string) *Commander {
	t.Helper()
	c := OpenChat(t, ctx, conn)
	c.Hello(&dispatchv1.Hello{CommanderId: "test-commander", Version: "test", Capabilities: caps})
	return c
}

// Hello sends h and waits for its ack; it returns the slot id.
func (c *Commander) Hello(h *dispatchv1.Hello) string {
	c.t.Helper()
	c.Send(Up("", h))
	a := c.Recv().GetAck()
	if a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		c.t.Fatalf("hello answered with %v, want a hello ack", a)
	}
	return a.GetSlotId()
}

// Stream is the underlying gRPC stream.
func (c *Commander) Stream() ChatStream { return c.stream }

// Packets is the buffer of received downstream packets, closed when the
// stream ends, for tests that select on it.
func (c *Commander) Packets() <-chan *dispatchv1.DownstreamPacket { return c.in }

// Send sends p. A stream the dispatcher already ended (io.EOF) is not an
// error here: Recv and Ended report how it ended.
func (c *Commander) Send(p *dispatchv1.UpstreamPacket) {
	c.t.Helper()
	if err := c.stream.Send(p); err != nil && !errors.Is(err, io.EOF) {
		c.t.Fatalf("send: %v", err)
	}
}

// Close half-closes the stream: the commander sends nothing more.
func (c *Commander) Close() {
	c.t.Helper()
	if err := c.stream.CloseSend(); err != nil {
		c.t.Fatalf("close send: %v", err)
	}
}

// Cancel ends the stream from the commander's side (the RPC is cancelled).
func (c *Commander) Cancel() { c.cancel() }

// Recv returns the next downstream packet; the test fails if none comes
// within Timeout or the stream ends.
func (c *Commander) Recv() *dispatchv1.DownstreamPacket {
	c.t.Helper()
	p, ok := RecvOK(c.t, c.in, c.Timeout, "a downstream packet")
	if !ok {
		c.t.Fatalf("stream ended while waiting for a downstream packet: %v", c.end)
	}
	return p
}

// RecvUntil skips downstream packets until ok accepts one, and returns it.
func (c *Commander) RecvUntil(ok func(*dispatchv1.DownstreamPacket) bool) *dispatchv1.DownstreamPacket {
	c.t.Helper()
	for {
		if p := c.Recv(); ok(p) {
			return p
		}
	}
}

// NoRecv fails the test if a downstream packet arrives within d.
func (c *Commander) NoRecv(d time.Duration) {
	c.t.Helper()
	NoRecv(c.t, c.in, d, "no downstream packet")
}

// Start waits for the next packet, which must start a session, and returns
// the session's id and start.
func (c *Commander) Start() (string, *dispatchv1.StartSession) {
	c.t.Helper()
	p := c.Recv()
	if p.GetStart() == nil || p.GetSessionId() == "" {
		c.t.Fatalf("want a start, got %v", p)
	}
	return p.GetSessionId(), p.GetStart()
}

// Ended skips packets until the stream ends and returns its status (io.EOF
// when the dispatcher ended it with OK).
func (c *Commander) Ended() error {
	c.t.Helper()
	deadline := time.Now().Add(c.Timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			c.t.Fatalf("stream did not end within %s", c.Timeout)
		}
		if _, ok := RecvOK(c.t, c.in, left, "the end of the stream"); !ok {
			return c.end
		}
	}
}

// Session is one session on a stub commander, from its start on.
type Session struct {
	// ID is the session id of the start.
	ID string
	// Start is what the dispatcher asked for.
	Start *dispatchv1.StartSession

	c *Commander
}

// NextSession waits for the next start, skipping other packets (a late
// SESSION_CLOSED ack, a stray tool result). It fails if ctx ends or the
// stream ends first.
func (c *Commander) NextSession(ctx context.Context) (*Session, error) {
	for {
		p, err := c.next(ctx)
		if err != nil {
			return nil, err
		}
		if p.GetStart() != nil {
			return &Session{ID: p.GetSessionId(), Start: p.GetStart(), c: c}, nil
		}
	}
}

// next is the next downstream packet, or why there is none: ctx's error
// once ctx has ended (also when the stream ended with it, as it does when
// ctx is the stream's), else the stream's end.
func (c *Commander) next(ctx context.Context) (*dispatchv1.DownstreamPacket, error) {
	select {
	case p, ok := <-c.in:
		if !ok {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			return nil, fmt.Errorf("stream ended: %w", c.end)
		}
		return p, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Send sends payload (any UpstreamPacket payload, see Up) on the session.
func (s *Session) Send(payload any) error {
	if err := s.c.stream.Send(Up(s.ID, payload)); err != nil {
		return fmt.Errorf("send %T: %w", payload, err)
	}
	return nil
}

// Next returns the session's next downstream packet. A stop of this session
// is answered with stopped (its reason echoed) and returned with ErrStopped.
func (s *Session) Next(ctx context.Context) (*dispatchv1.DownstreamPacket, error) {
	p, err := s.c.next(ctx)
	if err != nil {
		return nil, err
	}
	if stop := p.GetStop(); stop != nil && (p.GetSessionId() == "" || p.GetSessionId() == s.ID) {
		if err := s.Send(&dispatchv1.Stopped{Reason: stop.GetReason()}); err != nil {
			return p, err
		}
		return p, ErrStopped
	}
	return p, nil
}

// Pause is a Play step: the planner thinks for that long (a stop ends the
// pause at once).
type Pause time.Duration

// Play plays script on the session, as a planner would: each step is an
// upstream payload (see Up) sent in turn, or a Pause. After a
// *dispatchv1.ToolCallRequest it waits for the call's result, as a planner
// must. A stop on the way is answered and ends Play with ErrStopped. Play
// does not wait for the session's closing ack (see Closed).
func (s *Session) Play(ctx context.Context, script ...any) error {
	for _, step := range script {
		switch v := step.(type) {
		case Pause:
			if err := s.pause(ctx, time.Duration(v)); err != nil {
				return err
			}
		case *dispatchv1.ToolCallRequest:
			if err := s.Send(v); err != nil {
				return err
			}
			if _, err := s.ToolResult(ctx, v.GetCallId()); err != nil {
				return err
			}
		default:
			if err := s.Send(step); err != nil {
				return err
			}
		}
	}
	return nil
}

// ToolResult waits for the result of tool call callID, skipping other
// packets; a stop is answered and returned as ErrStopped.
func (s *Session) ToolResult(ctx context.Context, callID string) (*dispatchv1.ToolCallResult, error) {
	for {
		p, err := s.Next(ctx)
		if err != nil {
			return nil, err
		}
		if r := p.GetToolResult(); r != nil && r.GetCallId() == callID {
			return r, nil
		}
	}
}

// errPauseOver ends a Pause that ran its course.
var errPauseOver = errors.New("pause over")

// pause waits d unless a stop (answered: ErrStopped) or the end of ctx
// comes first; other packets are dropped.
func (s *Session) pause(ctx context.Context, d time.Duration) error {
	pctx, cancel := context.WithTimeoutCause(ctx, d, errPauseOver)
	defer cancel()
	for {
		if _, err := s.Next(pctx); err != nil {
			if errors.Is(context.Cause(pctx), errPauseOver) && ctx.Err() == nil {
				return nil
			}
			return err
		}
	}
}

// Closed waits for the dispatcher's SESSION_CLOSED ack of the session; a
// stop on the way is answered (and does not end the wait).
func (s *Session) Closed(ctx context.Context) error {
	for {
		p, err := s.Next(ctx)
		if err != nil && !errors.Is(err, ErrStopped) {
			return err
		}
		if a := p.GetAck(); a.GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED && p.GetSessionId() == s.ID {
			return nil
		}
	}
}

// Serve runs sessions until ctx ends: for each start it plays script(start)
// and waits for the session's closing ack. A stopped session is not an
// error. It returns nil when ctx ends, or why the stream broke.
func (c *Commander) Serve(ctx context.Context, script func(*dispatchv1.StartSession) []any) error {
	for {
		s, err := c.NextSession(ctx)
		if err != nil {
			return ignoreEnd(ctx, err)
		}
		if err := s.Play(ctx, script(s.Start)...); err != nil && !errors.Is(err, ErrStopped) {
			return ignoreEnd(ctx, err)
		}
		if err := s.Closed(ctx); err != nil {
			return ignoreEnd(ctx, err)
		}
	}
}

// ignoreEnd drops the error of a Serve whose ctx ended: whatever broke
// then (a send on the stream ctx cancelled) is the end that was asked for.
func ignoreEnd(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

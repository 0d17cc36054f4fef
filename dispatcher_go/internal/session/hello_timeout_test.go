package session

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// A stream that never says hello is ended after Options.HelloTimeout
// (ErrHelloTimeout), with the stream's abort and without it; before, it was
// held until its client closed it. A hello in time keeps the stream past
// the timeout.
func TestHelloTimeout(t *testing.T) {
	// Generous enough that a hello sent at once is never late under -race on
	// a loaded machine.
	const timeout = 250 * time.Millisecond
	openWithoutAbort := func(t *testing.T, e *env) *commander {
		ctx, cancel := context.WithCancel(context.Background())
		c := &commander{ServerStream: testutil.NewServerStream[*dispatchv1.UpstreamPacket, *dispatchv1.DownstreamPacket](ctx, 64), t: t, cancel: cancel, served: make(chan struct{})}
		go func() {
			defer close(c.served)
			c.err = e.srv.Serve(c)
			cancel()
		}()
		t.Cleanup(func() {
			cancel()
			testutil.Done(t, c.served, testutil.Wait, "Serve to return")
		})
		return c
	}
	for _, tc := range []struct {
		name string
		open func(t *testing.T, e *env) *commander
	}{
		{"with abort", func(t *testing.T, e *env) *commander { return e.open(t, 64) }},
		{"without abort", openWithoutAbort},
	} {
		t.Run(tc.name+"/no hello", func(t *testing.T) {
			e := newEnv(t, Options{HelloTimeout: timeout}, eventlog.Limits{})
			c := tc.open(t, e)
			if err := c.ended(); !errors.Is(err, ErrHelloTimeout) {
				t.Fatalf("Serve = %v, want %v", err, ErrHelloTimeout)
			}
		})
		t.Run(tc.name+"/hello in time", func(t *testing.T) {
			e := newEnv(t, Options{HelloTimeout: timeout}, eventlog.Limits{})
			c := tc.open(t, e)
			c.send(testutil.Hello("cmd-1", "planner:chat"))
			if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
				t.Fatalf("hello ack: %v", a)
			}
			// Nothing may end the stream once the hello is in: wait past
			// the timeout, watching for the stream's end.
			select {
			case <-c.served:
				t.Fatalf("stream ended after its hello: %v", c.err)
			case <-time.After(2 * timeout):
			}
		})
	}
}

package session

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// goroutinesIn counts the goroutines whose stack holds fn, and of those,
// the ones whose stack also holds also.
func goroutinesIn(fn, also string) (n, both int) {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, fn) {
			n++
			if strings.Contains(g, also) {
				both++
			}
		}
	}
	return n, both
}

// An idle slot costs one goroutine: Serve's, which receives; no sender
// waits while nothing is queued, and a session's packets start one again.
func TestIdleSlotIsOneGoroutine(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	testutil.WaitFor(t, testutil.Wait, func() bool {
		senders, _ := goroutinesIn("(*slot).sendLoop", "")
		recv, inServe := goroutinesIn("(*slot).recvLoop", "(*Server).Serve")
		return senders == 0 && recv == 1 && inServe == 1
	}, "the idle slot to be Serve's goroutine alone, receiving")
	// The sender comes back for a session and goes once it is sent.
	e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "42"}))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
		t.Fatalf("want session-closed ack, got %v", a)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool {
		senders, _ := goroutinesIn("(*slot).sendLoop", "")
		return senders == 0
	}, "no sender once the outbox is empty")
}

// A stream without WithAbort's abort (Recv cannot be interrupted) still
// ends when the slot ends from the dispatcher's side: Serve receives in a
// goroutine of its own then.
func TestServeWithoutAbort(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(t *testing.T, e *env, c *commander, tk *task.Task)
		want error
	}{
		{"shutdown", func(_ *testing.T, e *env, _ *commander, _ *task.Task) { e.srv.Shutdown() }, ErrShutdown},
		{"stop not acknowledged", func(t *testing.T, e *env, c *commander, tk *task.Task) {
			c.start()
			if _, err := e.mgr.Cancel(context.Background(), tk.ID(), "", true); err != nil {
				t.Error(err)
			}
			if c.recv().GetStop() == nil {
				t.Error("no stop")
			}
		}, ErrStopNotAcknowledged},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Options{StopGrace: 50 * time.Millisecond}, eventlog.Limits{})
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
			c.send(testutil.Hello("cmd-1", "planner:chat"))
			if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
				t.Fatalf("hello ack: %v", a)
			}
			var tk *task.Task
			if tc.want == ErrStopNotAcknowledged {
				tk = e.submit(t, task.Spec{})
			}
			tc.end(t, e, c, tk)
			if err := c.ended(); !errors.Is(err, tc.want) {
				t.Fatalf("Serve = %v, want %v", err, tc.want)
			}
		})
	}
}

// Capabilities are matched from the hello's list, by scanning up to
// capScan of them and through a map beyond; duplicates count once.
func TestManyCapabilities(t *testing.T) {
	for _, n := range []int{3, capScan + 4} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			caps := []string{"planner:chat", "planner:chat"}
			for i := range n {
				caps = append(caps, fmt.Sprintf("cap-%d", i))
			}
			e := newEnv(t, Options{}, eventlog.Limits{})
			c := e.connect(t, caps...)
			var sl *slot
			e.srv.slotsMu.Lock()
			for s := range e.srv.slots {
				sl = s
			}
			e.srv.slotsMu.Unlock()
			if (sl.capSet != nil) != (len(caps) > capScan) {
				t.Fatalf("%d capabilities: map %v", len(caps), sl.capSet != nil)
			}
			if got := sl.PlannerCapabilities(); len(got) != 1 || got[0] != "planner:chat" {
				t.Fatalf("planners %v", got)
			}
			if !sl.HasCapability(fmt.Sprintf("cap-%d", n-1)) || sl.HasCapability("cap-x") {
				t.Fatal("HasCapability")
			}
			tk := e.submit(t, task.Spec{RequiredCapabilities: []string{fmt.Sprintf("cap-%d", n-1)}})
			if _, st := c.start(); st.GetTaskId() != tk.ID() {
				t.Fatal("wrong task")
			}
		})
	}
}

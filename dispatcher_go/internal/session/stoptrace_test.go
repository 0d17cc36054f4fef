package session

import (
	"context"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// traceStops turns the stop trace on (no file: lines are dropped) for one
// test, before its env starts, so that it is off again after the server's
// shutdown.
func traceStops(t *testing.T) *stopTracer {
	t.Helper()
	tr := &stopTracer{recs: make(map[string]*stopRec)}
	stopTrace = tr
	t.Cleanup(func() { stopTrace = nil })
	return tr
}

// A stop's entry lives until its stopped, or until its session ends
// without one: no stop leaves it behind.
func TestStopTraceForgetsStopsWithoutStopped(t *testing.T) {
	t.Run("stopped", func(t *testing.T) {
		tr := traceStops(t)
		e := newEnv(t, Options{StopGrace: time.Second}, eventlog.Limits{})
		c := e.connect(t, "planner:chat")
		tk := e.submit(t, task.Spec{})
		sid, _ := c.start()
		go func() { _, _ = e.mgr.Cancel(context.Background(), tk.ID(), "", true) }()
		if c.recv().GetStop() == nil {
			t.Fatal("no stop")
		}
		if n := tr.pending(); n != 1 {
			t.Fatalf("%d stops traced, want 1", n)
		}
		c.send(testutil.Up(sid, &dispatchv1.Stopped{}))
		waitDone(t, tk)
		if n := tr.pending(); n != 0 {
			t.Fatalf("%d stops left after the stopped", n)
		}
	})
	t.Run("withdrawn", func(t *testing.T) {
		tr := traceStops(t)
		e := newEnv(t, Options{}, eventlog.Limits{})
		c := e.open(t, 0)
		c.send(testutil.Hello("c", "planner:chat"))
		testutil.WaitFor(t, testutil.Wait, func() bool { return testutil.Blocked(sending) },
			"the hello ack to wait in the stream's Send")
		tk := e.submit(t, task.Spec{})
		if out, _ := e.mgr.Cancel(context.Background(), tk.ID(), "", true); !out.Cancelled {
			t.Fatalf("outcome %+v", out)
		}
		waitDone(t, tk)
		if n := tr.pending(); n != 0 {
			t.Fatalf("%d stops left after a withdrawn stop", n)
		}
	})
	t.Run("grace", func(t *testing.T) {
		tr := traceStops(t)
		e := newEnv(t, Options{StopGrace: 50 * time.Millisecond}, eventlog.Limits{})
		c := e.connect(t, "planner:chat")
		tk := e.submit(t, task.Spec{})
		c.start()
		go func() { _, _ = e.mgr.Cancel(context.Background(), tk.ID(), "", true) }()
		if c.recv().GetStop() == nil {
			t.Fatal("no stop")
		}
		_ = c.ended()
		waitDone(t, tk)
		if n := tr.pending(); n != 0 {
			t.Fatalf("%d stops left after the grace", n)
		}
	})
}

package session

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// hookTracer gives every "session" span a SpanContext that runs hook the
// first time it is asked for. Slot.Deliver asks for it when it builds the
// start packet (telemetry.Inject): after Task.Start made the task RUNNING
// on the session, before the start is queued.
type hookTracer struct {
	noop.Tracer
	hook func()
}

func (tr hookTracer) Start(ctx context.Context, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	ctx, sp := tr.Tracer.Start(ctx, name, opts...)
	if name != "session" {
		return ctx, sp
	}
	h := &hookSpan{Span: sp, hook: tr.hook}
	return trace.ContextWithSpan(ctx, h), h
}

type hookSpan struct {
	trace.Span
	fired atomic.Bool
	hook  func()
}

func (s *hookSpan) SpanContext() trace.SpanContext {
	if s.fired.CompareAndSwap(false, true) {
		s.hook()
	}
	return s.Span.SpanContext()
}

type hookProvider struct {
	noop.TracerProvider
	hook func()
}

func (p hookProvider) Tracer(string, ...trace.TracerOption) trace.Tracer {
	return hookTracer{hook: p.hook}
}

// TestCancelWhileDeliveringWithdrawsTheStart: a cancel that finds the task
// RUNNING in the instant between Task.Start and the queueing of its start
// packet (Deliver, on the goroutine of whoever freed the slot or submitted
// the task) must not put a stop for a session the commander never heard of
// ahead of that session's start: the commander ignores a stop for an
// unknown session, then runs the start, never acknowledges the stop, and
// the dispatcher aborts its whole stream at the end of the stop grace. Like
// a stop before the start was sent (TestStopBeforeStartWasSentWithdrawsIt),
// it must withdraw the start (neither the start nor a stop goes out), or
// at least send the stop after the start.
func TestCancelWhileDeliveringWithdrawsTheStart(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	tk := e.submit(t, task.Spec{}) // queued: no slot yet

	var cancelled atomic.Bool
	cancelDone := make(chan struct{})
	otel.SetTracerProvider(hookProvider{hook: func() {
		if tk.Status() != agentpb.TaskStatus_RUNNING || !cancelled.CompareAndSwap(false, true) {
			return
		}
		// The cancel runs beside Deliver, as a client's would. Deliver goes
		// on once the cancel returned, or waits for Deliver (fixed code).
		go func() {
			defer close(cancelDone)
			if _, err := e.mgr.Cancel(context.Background(), tk.ID(), "", false); err != nil {
				t.Error(err)
			}
		}()
		testutil.WaitFor(t, testutil.Wait, func() bool {
			select {
			case <-cancelDone:
				return true
			default:
				return testutil.Blocked("session.(*run).stopWith")
			}
		}, "the cancel to return or to wait for Deliver")
	}})
	t.Cleanup(func() { otel.SetTracerProvider(noop.NewTracerProvider()) })

	c := e.open(t, 64)
	c.send(testutil.Hello("cmd-1", "planner:chat")) // AddSlot hands it tk
	testutil.Done(t, cancelDone, testutil.Wait, "the cancel to return")
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("task %+v", info)
	}
	// The hello ack is queued before AddSlot, but its sender may not have
	// run yet on a loaded machine: wait for it, then for the rest (a start
	// and a stop, if any, follow at once).
	got := []*dispatchv1.DownstreamPacket{testutil.Recv(t, c.Out, testutil.Wait, "the hello ack")}
	for {
		select {
		case p := <-c.Out:
			got = append(got, p)
			continue
		case <-time.After(100 * time.Millisecond):
		}
		break
	}
	if len(got) == 0 || got[0].GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		t.Fatalf("downstream %v, want the hello ack first", got)
	}
	started := map[string]bool{}
	for _, p := range got {
		switch {
		case p.GetStart() != nil:
			started[p.GetSessionId()] = true
		case p.GetStop() != nil && !started[p.GetSessionId()]:
			t.Fatalf("downstream %v: a stop for a session whose start was not sent before it", got)
		}
	}
}

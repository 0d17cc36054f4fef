package fleet

import (
	"context"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// closeSettle is how long the racing cancel below waits after the fleet's
// stop began: its loops have all returned by then (they end with their
// context; the Redis reads abort with it), so Close's Wait is over or
// about to be, with nothing left in its WaitGroup.
const closeSettle = 2 * time.Second

// A client's cancel of a task nobody holds that reaches a replica while it
// stops: the dispatcher's drain closes the fleet (Dispatcher.stop) before
// the gRPC server's graceful stop, so its API still serves. The cancel
// claims the task and ends it there (takeFree → Take → watchOwned). Before,
// watchOwned added its goroutine to the fleet's WaitGroup unguarded: an Add
// from zero after (or racing) Close's Wait, a goroutine running past Close
// (on a closed Redis client and, in the dispatcher, a closed store writer);
// the race detector reports the Add against the Wait (run with -race). Now
// a watch asked for while the fleet closes starts nothing (as KeepCancel):
// the cancel still ends the task CANCELLED, stored.
//
// The cancel runs in a goroutine of its own that learns of the stop only
// through the fleet's context (cancelled before Close waits) and a sleep:
// nothing orders Close's Wait before it but the fleet's own guard.
func TestCancelWhileTheFleetClosesStartsNoGoroutinePastClose(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := startReplica(t, pg, url, "closing", &testSlot{planner: "other"})
	tk, err := r.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	if err := r.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := storedStatus(t, r, id); st != agentpb.TaskStatus_PENDING {
		t.Fatalf("stored %s, want PENDING (queued, nobody serves its planner)", st)
	}

	type result struct {
		out task.CancelOutcome
		err error
	}
	got := make(chan result, 1)
	go func() {
		for r.f.ctx.Err() == nil {
			time.Sleep(time.Millisecond)
		}
		time.Sleep(closeSettle)
		// Redis unreachable meanwhile: the cancel's announcement is
		// skipped (with it, the closed Redis client orders Close before
		// the cancel for the race detector, and the Add is not reported).
		r.f.busOK.Store(false)
		out, err := r.f.Cancel(ctx, nil, id, "stopped by the test", false)
		got <- result{out, err}
	}()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		r.f.Close()
	}()
	res := <-got
	<-closed
	if res.err != nil || !res.out.Cancelled || res.out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel while the fleet closes: %+v %v; want carried out here", res.out, res.err)
	}
	if st, msg := storedStatus(t, r, id); st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" {
		t.Fatalf("stored %s %q, want CANCELLED with the cancel's reason", st, msg)
	}
}

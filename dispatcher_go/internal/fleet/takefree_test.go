package fleet

import (
	"context"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// A client's cancel of a task nobody holds claims it (takeFree → Take);
// if that claim is overtaken on this replica before Take adopts the task
// (a session re-attaching here took the task with a newer attempt:
// task.ErrNewerCopy; or the claim's attempt was lost: task.ErrLeaseLost),
// the cancel goes through the task's holder as when another replica holds
// it: a cancel command row, which this replica's own newer copy carries
// out. Before, Cancel returned the unmapped error while the task ran on.
// The overtaking is simulated with a hook between Take's claim and its
// adoption (what ClaimSession does to the fence: it holds the next
// attempt; what lost does: it holds none).
func TestCancelWhoseClaimIsOvertakenGoesThroughTheCommandRow(t *testing.T) {
	for _, tc := range []struct {
		name     string
		overtake func(f *Fleet, id string, attempt int64)
	}{
		{"newer copy", func(f *Fleet, id string, attempt int64) { f.fenced.own(id, attempt+1) }},
		{"lease lost", func(f *Fleet, id string, attempt int64) { f.fenced.disown(id, attempt) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pg, url := openStore(t), redisURL(t)
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			var f *Fleet
			var overtook string
			r := startReplicaHooked(t, pg, url, "cancelling", &testSlot{planner: "other"}, requeueHooks{taken: func(id string, attempt int64) {
				if overtook == "" {
					overtook = id
					tc.overtake(f, id, attempt)
				}
			}})
			f = r.f
			tk, err := r.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
			if err != nil {
				t.Fatal(err)
			}
			id := tk.ID()
			if err := r.w.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			out, err := r.f.Cancel(ctx, nil, id, "stopped by the test", false)
			if overtook != id {
				t.Fatalf("the cancel did not take the task (hook saw %q)", overtook)
			}
			if err != nil || !out.Cancelled {
				t.Fatalf("cancel whose claim was overtaken: %+v %v; want sent as a command", out, err)
			}
			cmds, err := r.f.leases.OpenCommands(ctx, []string{id})
			if err != nil {
				t.Fatal(err)
			}
			if len(cmds) != 1 || cmds[0].Kind != "cancel" {
				t.Fatalf("open commands %+v; want the cancel", cmds)
			}
			if st, _ := storedStatus(t, r, id); st == agentpb.TaskStatus_CANCELLED {
				t.Fatal("the overtaken claim's copy ended the task itself")
			}
		})
	}
}

// A claim overtaken by a newer one of this replica's (own with a lower
// attempt after a higher one) never lowers the attempt held: the newer
// copy's records would be refused. Once disowned, any attempt is held.
func TestFenceOwnNeverLowersTheAttemptHeld(t *testing.T) {
	s := &fencedStore{owned: map[string]int64{}}
	s.own("t", 3)
	s.own("t", 2)
	if a := s.attempt("t"); a != 3 {
		t.Fatalf("held %d after own(3), own(2); want 3", a)
	}
	if !s.disown("t", 3) {
		t.Fatal("disown of the attempt held")
	}
	s.own("t", 1)
	if a := s.attempt("t"); a != 1 {
		t.Fatalf("held %d after disown, own(1); want 1", a)
	}
}

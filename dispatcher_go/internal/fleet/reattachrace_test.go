package fleet

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Races between a session re-attaching to the replica that holds its
// task (Manager.Reattach, Fleet.ClaimSession) and what ends or drops the
// copy meanwhile (issue 13). The hooks put the other party at the point of
// the claim where it hurt, instead of a store stall timed against the
// lease (TestReattachToTheSameReplicaWaitsForASlowStore's old form).

// hookedOwner starts replica "owner" with hooks, runs a task on it and
// breaks its session's link (the copy waits for the session), its records
// stored: the owner, the task's id, the copy, the attempt the owner holds
// and a context for the test. hooks get the owner through *owner, set
// before the task starts.
func hookedOwner(t *testing.T, hooks func(owner **replica) requeueHooks) (*replica, string, *task.Task, int64, context.Context) {
	t.Helper()
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	var owner *replica
	owner = startReplicaHooked(t, pg, url, "owner", &testSlot{upstream: true, stops: true}, hooks(&owner))
	tk, err := owner.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	waitFor(t, "the task to start on its owner", 10*time.Second, func() bool {
		lt := owner.mgr.Registry().Get(id)
		return owner.slot.started.Load() == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_RUNNING
	})
	lt := owner.mgr.Registry().Get(id)
	first := owner.f.fenced.attempt(id)
	if first == 0 {
		t.Fatal("the owner holds no lease of the running task")
	}
	if !lt.DetachLinkLost(stopRunner{t: lt}, 1, time.Minute) {
		t.Fatal("the session did not detach")
	}
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return owner, id, lt, first, ctx
}

// heldLease is the lease row of task id: its owner, attempt, whether it is
// released, and whether it is still live (not expired).
func heldLease(t *testing.T, ctx context.Context, r *replica, id string) (owner string, attempt int64, released, live bool) {
	t.Helper()
	err := r.f.pg.Pool().QueryRow(ctx, `SELECT owner, attempt, released, expires_at > clock_timestamp() FROM fleet_leases WHERE task_id = $1`, id).
		Scan(&owner, &attempt, &released, &live)
	if err != nil {
		t.Fatal(err)
	}
	return owner, attempt, released, live
}

// Race 1: the replica loses the task's lease (a store stall longer than
// the lease: renewLoop's Fleet.lost, whose Manager.Drop abandons the copy
// waiting for its session) while the session re-attaches to it. Before,
// the re-attach claimed the next attempt and answered success on the
// dropped copy: no longer in the registry, the claimed attempt not held
// (so never renewed, every write of the session fenced) — the session ran
// for nothing until the sweep ended the task FAILURE. Now the re-attach
// takes the task afresh (TakeSession, as a re-attach to another replica
// does): a new copy, held with a new attempt, renewed and watched.
func TestReattachToTheSameReplicaWhileItLosesTheLeaseTakesTheTaskAfresh(t *testing.T) {
	var armed atomic.Bool
	owner, id, lt, first, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{beforeSessionClaim: func(id string) {
			if !armed.Swap(false) {
				return
			}
			r := *owner
			r.f.lost(id, r.f.fenced.attempt(id), "test: this replica could not renew the task's lease")
			// Manager.Drop runs in its own goroutine: the copy is
			// abandoned and forgotten before the claim goes on.
			deadline := time.Now().Add(5 * time.Second)
			for r.mgr.Registry().Get(id) != nil && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
		}}
	})
	armed.Store(true)
	var runner *stopRunner
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		runner = &stopRunner{t: tk}
		return runner
	})
	if armed.Load() {
		t.Fatal("the hook did not run")
	}
	if err != nil {
		t.Fatalf("re-attach refused: %v", err)
	}
	if got := owner.mgr.Registry().Get(id); got != info.Task || got == nil {
		t.Fatalf("re-attached on a copy the registry does not hold (registry %p, re-attached %p, dropped copy %p)", got, info.Task, lt)
	}
	if info.Task == lt {
		t.Fatal("re-attached on the dropped copy")
	}
	if a := owner.f.fenced.attempt(id); a != info.Attempt || a <= first {
		t.Fatalf("the owner holds attempt %d; re-attached with %d (first %d)", a, info.Attempt, first)
	}
	owner.f.watchMu.Lock()
	w := owner.f.watches[id]
	owner.f.watchMu.Unlock()
	if w == nil || w.t != info.Task {
		t.Fatal("no watch follows the re-attached copy")
	}
	// Renewed: live after two leases.
	time.Sleep(2 * testLease)
	if o, a, released, live := heldLease(t, ctx, owner, id); o != "owner" || a != info.Attempt || released || !live {
		t.Fatalf("lease %s/%d released=%v live=%v; want the owner's, attempt %d, renewed", o, a, released, live, info.Attempt)
	}
	if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored %s %q, want RUNNING", st, msg)
	}
	if n := owner.f.Fenced(); n != 0 {
		t.Fatalf("%d write(s) of the re-attached session fenced", n)
	}
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	if !runner.t.Finish(agentpb.TaskStatus_SUCCESS, "done", "") {
		t.Fatal("the task did not end")
	}
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_SUCCESS, ch)
}

// Race 2: a client's cancel of the copy waiting for its session lands
// while the session's re-attach to the same replica claims the lease (the
// row moved to the next attempt, this replica not yet holding it). Before,
// the copy ended CANCELLED at once and its records, written with the
// attempt before, were fenced: the replica dropped the task as lost to
// another replica, the re-attach was refused ("ended while the claim
// ran"), and PostgreSQL kept the task RUNNING under a lease nobody renewed
// until the sweep. Now the stop is kept for the claim's outcome: the
// re-attached session is stopped with it (as a stop decided before the
// hand-over), and the task's end, CANCELLED, is stored under the new
// attempt, which is then released.
func TestCancelWhileAReattachToTheSameReplicaClaimsEndsTheTaskCancelled(t *testing.T) {
	var armed atomic.Bool
	owner, id, _, first, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{sessionClaimed: func(id string) {
			if !armed.Swap(false) {
				return
			}
			r := *owner
			out, err := r.mgr.CancelAs(ctx0, tenant.Caller{Admin: true}, id, "stopped by the test", false)
			if err != nil || !out.Cancelled {
				t.Errorf("cancel during the claim: %+v %v", out, err)
			}
			// What the cancel wrote goes to the store now, before this
			// replica holds the new attempt.
			if err := r.w.Flush(ctx0); err != nil {
				t.Error(err)
			}
		}}
	})
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	armed.Store(true)
	var runner *stopRunner
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		runner = &stopRunner{t: tk}
		return runner
	})
	if armed.Load() {
		t.Fatal("the hook did not run")
	}
	if err != nil {
		t.Fatalf("re-attach refused: %v (stored: %v)", err, fmtStored(t, owner, id))
	}
	if info.Attempt <= first {
		t.Fatalf("re-attached with attempt %d (first %d)", info.Attempt, first)
	}
	if info.Stop == nil || info.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || info.Stop.GetReason() != "stopped by the test" {
		t.Fatalf("re-attached with stop %v, want the cancel", info.Stop)
	}
	// The session server stops the re-attached session with it (restop);
	// the commander acknowledges.
	runner.Stop(info.Stop.GetReason(), info.Stop.GetCode())
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_CANCELLED, ch)
	if n := owner.f.Fenced(); n != 0 {
		t.Fatalf("%d write(s) of the owner fenced", n)
	}
}

// ctx0 is a context for the hooks (they run inside the test's calls).
var ctx0 = context.Background()

// fmtStored is task id's stored status and lease, now and two leases
// later, for a failure message.
func fmtStored(t *testing.T, r *replica, id string) string {
	out := ""
	for i := range 2 {
		if i > 0 {
			time.Sleep(2 * testLease)
			out += "; two leases later: "
		}
		st, msg := storedStatus(t, r, id)
		o, a, released, live := heldLease(t, context.Background(), r, id)
		out += fmt.Sprintf("%s %q, lease %s/%d released=%v live=%v, held attempt %d, fenced writes %d", st, msg, o, a, released, live, r.f.fenced.attempt(id), r.f.Fenced())
	}
	return out
}

// Race 1 with a real stall, as it was found: a second transaction holds
// the task tables for 2 s, longer than the tests' lease (0.9 s), while the
// session re-attaches to the same replica; the waiting write holds the
// lease row, so the renewals fail and the replica drops the copy. Before,
// the re-attach answered success on the dropped copy in 6 runs of 6: the
// claimed attempt held by nobody, the lease expired, and the sweep ended
// the task FAILURE although its session ran. Now either the re-attach
// succeeds and the task is this replica's (held, renewed, in the
// registry, its end stored), or the sweep ended the task first (the stall
// outlived lease and grace) and the re-attach is refused as ended.
func TestReattachToTheSameReplicaThroughAStallLongerThanTheLease(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplica(t, pg, url, "owner", &testSlot{upstream: true, stops: true})
	tk, err := owner.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	waitFor(t, "the task to start on its owner", 10*time.Second, func() bool {
		lt := owner.mgr.Registry().Get(id)
		return owner.slot.started.Load() == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_RUNNING
	})
	lt := owner.mgr.Registry().Get(id)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	tx, err := owner.f.pg.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `LOCK TABLE events, tasks IN EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	unlocked := make(chan struct{})
	go func() {
		defer close(unlocked)
		time.Sleep(2 * time.Second)
		_ = tx.Rollback(ctx)
	}()
	defer func() { <-unlocked }()
	if !lt.DetachLinkLost(stopRunner{t: lt}, 1, time.Minute) {
		t.Fatal("no detach")
	}
	var runner *stopRunner
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		runner = &stopRunner{t: tk}
		return runner
	})
	<-unlocked
	if err != nil {
		st, msg := storedStatus(t, owner, id)
		if !task.Terminal(st) {
			t.Fatalf("re-attach refused (%v), the task stored %s %q", err, st, msg)
		}
		t.Logf("the sweep ended the task first (%s %q): re-attach refused: %v", st, msg, err)
		return
	}
	time.Sleep(2 * testLease)
	if a := owner.f.fenced.attempt(id); a != info.Attempt || owner.mgr.Registry().Get(id) != info.Task {
		t.Fatalf("re-attached with attempt %d on copy %p; held %d, registry %p", info.Attempt, info.Task, a, owner.mgr.Registry().Get(id))
	}
	if o, a, released, live := heldLease(t, ctx, owner, id); o != "owner" || a != info.Attempt || released || !live {
		t.Fatalf("lease %s/%d released=%v live=%v; want the owner's, attempt %d, renewed", o, a, released, live, info.Attempt)
	}
	if !runner.t.Finish(agentpb.TaskStatus_SUCCESS, "done", "") {
		t.Fatalf("the re-attached task did not end: %s %q", runner.t.Status(), runner.t.Info().Message)
	}
	waitFor(t, "the task's end to be stored", 10*time.Second, func() bool {
		st, _ := storedStatus(t, owner, id)
		return task.Terminal(st)
	})
	if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("stored %s %q, want SUCCESS", st, msg)
	}
}

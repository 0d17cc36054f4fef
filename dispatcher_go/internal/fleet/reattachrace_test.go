package fleet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
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
	id := submitRunning(t, owner)
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
// outlived lease and grace) and the re-attach is refused (the sweep's copy
// here ends the task; a run where the renewals outlast the stall hits no
// race and is skipped).
//
// Not in the default run (FLEET_STALL_RACE=1 runs it): which of the
// outcomes a run hits depends on the machine's timing against the 2 s
// lock (about half the runs skip: the renewals outlast it), and it holds
// the task tables for 2 s. The race it once lost (the replica's own
// sweeper, which claimed the expired lease and stalled loading the task,
// adopted its copy after the re-attach took the task afresh and stored
// its FAILURE) is closed by the per-copy fence and is covered
// deterministically by TestSweepAdoptAfterAReattachToTheSameReplicaLeavesTheReattachedCopy.
func TestReattachToTheSameReplicaThroughAStallLongerThanTheLease(t *testing.T) {
	if os.Getenv("FLEET_STALL_RACE") == "" {
		t.Skip("a 2 s stall whose outcome depends on timing (the race is covered by a hook test); FLEET_STALL_RACE=1 runs this")
	}
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplica(t, pg, url, "owner", &testSlot{upstream: true, stops: true})
	id := submitRunning(t, owner)
	lt := owner.mgr.Registry().Get(id)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	unlocked := lockTaskTables(t, ctx, owner, 2*time.Second)
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
		// The sweep's copy, ending the task, is registered here already
		// (the re-attach found it: ended, or not waiting for the session);
		// its end is stored shortly.
		deadline := time.Now().Add(10 * time.Second)
		st, msg := storedStatus(t, owner, id)
		for !task.Terminal(st) && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
			st, msg = storedStatus(t, owner, id)
		}
		if !task.Terminal(st) || st == agentpb.TaskStatus_SUCCESS {
			t.Fatalf("re-attach refused (%v), the task stored %s %q", err, st, msg)
		}
		t.Logf("the sweep ended the task first (%s %q): re-attach refused: %v", st, msg, err)
		return
	}
	if info.Task == lt {
		if lt.Disowned() {
			t.Fatal("re-attached on the copy this replica dropped")
		}
		// The renewals outlasted the stall: the race was not hit.
		t.Skip("this replica kept the lease through the stall: no drop to race with")
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

// Two re-attaches of the same session (the commander's second stream)
// while the replica loses the task's lease: re-attach A claims the copy
// waiting here; the replica loses the lease (its copy dropped) and
// re-attach B takes the task afresh (a new copy, the next attempt) before
// A's claim moves the lease row on. Before, A's claim held its attempt for
// B's copy, A then took the task afresh again and forgot B's copy without
// disowning it: both re-attaches succeeded, two sessions ran the task, and
// the end B's copy recorded was stored under A's attempt. Now A is refused
// (the session is attached to another stream) and no write of a copy that
// does not hold the lease row's attempt is stored.
func TestTwoReattachesOfASessionWhileTheReplicaLosesTheLeaseLeaveOneCopy(t *testing.T) {
	var armed atomic.Bool
	var bInfo task.Reattached
	var bErr error
	owner, id, lt, _, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{beforeSessionClaim: func(id string) {
			if !armed.Swap(false) {
				return
			}
			r := *owner
			r.f.lost(id, r.f.fenced.attempt(id), "test: this replica could not renew the task's lease")
			waitFor(t, "the dropped copy to be forgotten", 5*time.Second, func() bool { return r.mgr.Registry().Get(id) == nil })
			bInfo, bErr = r.mgr.Reattach(ctx0, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner { return stopRunner{t: tk} })
		}}
	})
	armed.Store(true)
	aInfo, aErr := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner { return stopRunner{t: tk} })
	if armed.Load() {
		t.Fatal("the hook did not run")
	}
	if bErr != nil {
		t.Fatalf("re-attach B (the first to take the task afresh) refused: %v", bErr)
	}
	if aErr == nil {
		// The other order: B's first write after A's claim moved the lease
		// row past B's attempt was fenced, and B's copy was dropped (its
		// session stopped) before A's retry looked: A took the task afresh.
		// Still one session: A's holds the lease, B's copy ends and its end
		// is not stored.
		t.Logf("B's copy (attempt %d) was fenced before A's retry: A took the task afresh (attempt %d)", bInfo.Attempt, aInfo.Attempt)
		reattachedAfresh(t, owner, id, lt, bInfo.Attempt, aInfo, aErr)
		select {
		case <-bInfo.Task.Done():
		case <-time.After(10 * time.Second):
			t.Fatalf("both re-attaches run: A on %p attempt %d, B on %p attempt %d (dropped copy %p)", aInfo.Task, aInfo.Attempt, bInfo.Task, bInfo.Attempt, lt)
		}
		if err := owner.w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_RUNNING {
			t.Fatalf("stored %s %q while A's session runs: B's dropped copy wrote past the fence", st, msg)
		}
		return
	}
	if !strings.Contains(aErr.Error(), "attached to another stream") {
		t.Fatalf("re-attach A refused with %v, want: attached to another stream", aErr)
	}
	if got := owner.mgr.Registry().Get(id); got != bInfo.Task {
		t.Fatalf("the registry holds %p, not B's copy %p", got, bInfo.Task)
	}
	// B's copy ends; its end is stored only if it holds the lease row's
	// attempt (A's claim moved the row past B's: then it is fenced).
	bInfo.Task.Finish(agentpb.TaskStatus_FAILURE, "B's end", "")
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	_, row, _, _ := heldLease(t, ctx, owner, id)
	if st, msg := storedStatus(t, owner, id); st == agentpb.TaskStatus_FAILURE && msg == "B's end" && row != bInfo.Attempt {
		t.Fatalf("stored B's end, written by a copy holding attempt %d while the lease row is at %d", bInfo.Attempt, row)
	}
}

// heldDrop is a beforeDrop hook that holds lost's DropCopy of the copy
// until release (or the test's end): the copy stays registered, disowned.
type heldDrop struct {
	release chan struct{}
	once    sync.Once
}

// newHeldDrop is a heldDrop; letAtEnd, called once the replica started
// (its Close, a cleanup too, waits for the drop), lets it go at the
// test's end.
func newHeldDrop() *heldDrop {
	return &heldDrop{release: make(chan struct{})}
}

func (d *heldDrop) letAtEnd(t *testing.T) { t.Cleanup(d.let) }

func (d *heldDrop) hook(string) { <-d.release }
func (d *heldDrop) let()        { d.once.Do(func() { close(d.release) }) }

// reattachedAfresh checks that a re-attach (info, err) took the task
// afresh: a copy other than the dropped lt, the registry's, held with
// attempt info.Attempt (> first) and watched.
func reattachedAfresh(t *testing.T, owner *replica, id string, lt *task.Task, first int64, info task.Reattached, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("re-attach refused: %v", err)
	}
	if info.Task == lt {
		t.Fatal("re-attached on the dropped copy")
	}
	if got := owner.mgr.Registry().Get(id); got != info.Task || got == nil {
		t.Fatalf("re-attached on a copy the registry does not hold (registry %p, re-attached %p, dropped copy %p)", got, info.Task, lt)
	}
	if a := owner.f.fenced.attempt(id); a != info.Attempt || a <= first {
		t.Fatalf("the owner holds attempt %d; re-attached with %d (first %d)", a, info.Attempt, first)
	}
	owner.f.watchMu.Lock()
	w := owner.f.watches[id]
	owner.f.watchMu.Unlock()
	if w == nil || w.t != info.Task || w.attempt != info.Attempt {
		t.Fatal("no watch follows the re-attached copy with its attempt")
	}
}

// Race 1 with the loss after the claim moved the lease row, the copy
// still registered (lost's DropCopy not run yet) but disowned: the
// re-attach takes the task afresh, the dropped copy in the registry
// replaced.
func TestReattachWhileTheLeaseIsLostAfterTheClaimTakesTheTaskAfresh(t *testing.T) {
	var armed atomic.Bool
	var held atomic.Int64
	drop := newHeldDrop()
	owner, id, lt, first, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{beforeDrop: drop.hook, sessionClaimed: func(id string) {
			if !armed.Swap(false) {
				return
			}
			r := *owner
			// The attempt held before the claim (the row moved past it).
			r.f.lost(id, held.Load(), "test: this replica could not renew the task's lease")
			if c := r.mgr.Registry().Get(id); c == nil || !c.Disowned() {
				t.Error("the lost copy is not registered and disowned")
			}
		}}
	})
	drop.letAtEnd(t)
	held.Store(first)
	armed.Store(true)
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner { return stopRunner{t: tk} })
	if armed.Load() {
		t.Fatal("the hook did not run")
	}
	drop.let()
	reattachedAfresh(t, owner, id, lt, first, info, err)
	if lt.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the dropped copy ended: %s %q", lt.Status(), lt.Info().Message)
	}
}

// Race 1 with the loss of the attempt the claim just took, once this
// replica holds it for the copy (a renewal of it failed at once): the
// re-attach finds its copy dropped and takes the task afresh. Without the
// re-attach's own check (Manager.reattach: w.gone, disowned) it succeeded
// on the dropped copy.
func TestReattachWhileTheClaimedLeaseIsLostTakesTheTaskAfresh(t *testing.T) {
	var armed atomic.Bool
	owner, id, lt, first, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{sessionHeld: func(id string) {
			if !armed.Swap(false) {
				return
			}
			r := *owner
			r.f.lost(id, r.f.fenced.attempt(id), "test: this replica could not renew the task's lease")
		}}
	})
	armed.Store(true)
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner { return stopRunner{t: tk} })
	if armed.Load() {
		t.Fatal("the hook did not run")
	}
	reattachedAfresh(t, owner, id, lt, first, info, err)
}

// ClaimSession for a copy this replica just lost the lease of (disowned,
// still registered: lost's DropCopy not run yet) holds nothing: no
// attempt, no watch of the dropped copy (which nothing would end: its
// watch goroutine stayed until Close).
func TestClaimSessionForADisownedCopyHoldsNothing(t *testing.T) {
	drop := newHeldDrop()
	owner, id, lt, first, ctx := hookedOwner(t, func(**replica) requeueHooks {
		return requeueHooks{beforeDrop: drop.hook}
	})
	drop.letAtEnd(t)
	owner.f.lost(id, first, "test: this replica could not renew the task's lease")
	if owner.mgr.Registry().Get(id) != lt || !lt.Disowned() {
		t.Fatal("the lost copy is not registered and disowned")
	}
	_, _, err := owner.f.ClaimSession(ctx, lt, "session-1")
	if !errors.Is(err, task.ErrLeaseLost) {
		t.Fatalf("ClaimSession of a disowned copy: %v, want ErrLeaseLost", err)
	}
	if a := owner.f.fenced.attempt(id); a != 0 {
		t.Fatalf("the owner holds attempt %d for the disowned copy", a)
	}
	owner.f.watchMu.Lock()
	w := owner.f.watches[id]
	owner.f.watchMu.Unlock()
	if w != nil {
		t.Fatalf("a watch of attempt %d follows the disowned copy", w.attempt)
	}
}

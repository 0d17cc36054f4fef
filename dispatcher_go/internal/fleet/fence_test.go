package fleet

import (
	"context"
	"errors"
	"fmt"
	"github.com/agentdispatch/dispatcher/internal/testutil"
	"sync/atomic"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// The fence is per copy of a task, not per task per replica: a record is
// stored only if it carries the attempt of the task's lease, the one its
// own copy was given (issue 13's two known races, docs/operations.md).

// A record of an older copy of this replica's (attempt a1) is refused
// once the replica holds the task with a newer attempt (a2), and reported
// with the attempt it carries; the newer copy's records pass. Before, the
// fence took the attempt the replica held when the record was written
// (a2): the older copy's record was stored.
func TestFencedRecordOfAnOlderCopyOfTheSameReplicaIsRefused(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", agentpb.TaskStatus_RUNNING)
	var fenced []int64
	r1 := &fencedStore{Store: st, pool: st.Pool(), replica: "r1", owned: map[string]int64{},
		onFenced: func(_ string, a int64) { fenced = append(fenced, a) }}
	a1, err := l.Claim(ctx, "t1", "r1")
	if err != nil {
		t.Fatal(err)
	}
	r1.own("t1", a1)
	// The copy of a1 is handed back (released); this replica claims the
	// task again (a2) for a new copy.
	if err := l.Release(ctx, "t1", a1); err != nil {
		t.Fatal(err)
	}
	a2, err := l.Claim(ctx, "t1", "r1")
	if err != nil || a2 <= a1 {
		t.Fatalf("second claim: %d %v", a2, err)
	}
	r1.own("t1", a2)
	err = r1.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("older copy"), Token: a1}},
		Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_FAILURE), CreatedAt: time.Now(), Body: []byte("{}"), Token: a1}}})
	if err != nil {
		t.Fatal(err)
	}
	if rec, err := st.GetTask(ctx, "t1"); err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the older copy's record was stored: %v %v", agentpb.TaskStatus(rec.Status), err)
	}
	if len(fenced) != 1 || fenced[0] != a1 {
		t.Fatalf("fenced reports %v, want [%d] (once, with the attempt the records carry)", fenced, a1)
	}
	if err := r1.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("newer copy"), Token: a2}}}); err != nil {
		t.Fatal(err)
	}
	if evs, err := st.ReadEvents(ctx, "t1", 0, 10); err != nil || len(evs) != 1 || string(evs[0].Data) != "newer copy" {
		t.Fatalf("stored %v %v, want the newer copy's event alone", evs, err)
	}
}

// Known race 1 (docs/operations.md), put in place with a hook instead of
// a store stall timed against the lease: this replica lost the task's
// lease (its copy, waiting for its session, dropped), its own sweeper
// claimed the expired lease, and, before the sweeper loaded the task, the
// session re-attached to this replica and took the task afresh (the next
// attempt). Before, the sweeper's adopt then replaced the re-attached copy
// and its FAILURE was stored with the re-attach's attempt: the task ended
// although its session ran. Now the sweeper adopts nothing (its attempt
// is not the newest held here): the re-attached copy stays, holds the
// lease and stores its own end.
func TestSweepAdoptAfterAReattachToTheSameReplicaLeavesTheReattachedCopy(t *testing.T) {
	var armed atomic.Bool
	var info task.Reattached
	var rerr error
	hookDone := make(chan struct{})
	owner, id, lt, first, ctx := hookedOwner(t, func(owner **replica) requeueHooks {
		return requeueHooks{claimed: func(tid string) {
			if !armed.Swap(false) {
				return
			}
			defer close(hookDone)
			r := *owner
			// The sweep holds the expired lease's next attempt; the
			// session re-attaches here before the sweep loads the task.
			info, rerr = r.mgr.Reattach(ctx0, tid, "session-1", "commander", nil, func(tk *task.Task) task.Runner { return stopRunner{t: tk} })
		}}
	})
	armed.Store(true)
	owner.f.lost(id, first, "test: this replica could not renew the task's lease")
	waitFor(t, "the dropped copy to be forgotten", 5*time.Second, func() bool { return owner.mgr.Registry().Get(id) == nil })
	select {
	case <-hookDone:
	case <-time.After(20 * time.Second):
		t.Fatal("the sweeper did not claim the expired lease")
	}
	if rerr != nil {
		t.Fatalf("re-attach refused: %v", rerr)
	}
	if info.Task == lt {
		t.Fatal("re-attached on the dropped copy")
	}
	// The sweep goes on from its claim meanwhile (it reads the task,
	// adopts it and ends it FAILURE, before); then the re-attached
	// session holds the lease for two more leases.
	time.Sleep(2 * testLease)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored %s %q while the re-attached session runs", st, msg)
	}
	if st := info.Task.Status(); st != agentpb.TaskStatus_RUNNING || info.Task.Disowned() {
		t.Fatalf("the re-attached copy is %s %q (disowned %v)", st, info.Task.Info().Message, info.Task.Disowned())
	}
	if got := owner.mgr.Registry().Get(id); got != info.Task {
		t.Fatalf("the registry holds %p, not the re-attached copy %p", got, info.Task)
	}
	if o, a, released, live := heldLease(t, ctx, owner, id); o != "owner" || a != info.Attempt || released || !live {
		t.Fatalf("lease %s/%d released=%v live=%v; want the owner's, attempt %d, renewed", o, a, released, live, info.Attempt)
	}
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	if !info.Task.Finish(agentpb.TaskStatus_SUCCESS, "done", "") {
		t.Fatal("the re-attached task did not end")
	}
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_SUCCESS, ch)
}

// Known race 2 (docs/operations.md): a copy this replica forgot (handed
// back to the queue) that ends afterwards — the end of a client's cancel
// that checked the copy just before the hand-back and stalled — while the
// same replica holds the task again with a newer attempt (claimed from
// the queue, running on its slot). Before, its CANCELLED was stored under
// the new claim's attempt, over the task running there. Now it is
// refused: the forgotten copy carries its own attempt.
func TestForgottenCopyEndingAfterTheReplicaReclaimedTheTaskStoresNothing(t *testing.T) {
	d := newDeadTask(t, false)
	var live atomic.Pointer[replica]
	var forgotten atomic.Pointer[task.Task]
	hooks := requeueHooks{handBack: func(tid string) {
		if tid == d.id && forgotten.Load() == nil {
			forgotten.Store(live.Load().mgr.Registry().Get(tid))
		}
	}}
	live.Store(startReplicaHooked(t, d.pg, d.url, "live", &testSlot{upstream: true}, hooks))
	r := live.Load()
	waitFor(t, "the task handed back and run again on the same replica", 20*time.Second, func() bool {
		c := forgotten.Load()
		now := r.mgr.Registry().Get(d.id)
		return c != nil && now != nil && now != c && r.slot.started.Load() == 1 && now.Status() == agentpb.TaskStatus_RUNNING
	})
	old := forgotten.Load()
	now := r.mgr.Registry().Get(d.id)
	if err := r.w.Flush(d.ctx); err != nil {
		t.Fatal(err)
	}
	// The stalled cancel ends the forgotten copy now.
	if !old.Finish(agentpb.TaskStatus_CANCELLED, "a cancel that checked the copy before its hand-back", "") {
		t.Fatalf("the forgotten copy did not end: %s", old.Status())
	}
	if err := r.w.Flush(d.ctx); err != nil {
		t.Fatal(err)
	}
	if st, msg := storedStatus(t, r, d.id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored %s %q while the task runs on the replica's new copy: the forgotten copy wrote past the fence", st, msg)
	}
	if got := r.mgr.Registry().Get(d.id); got != now || now.Status() != agentpb.TaskStatus_RUNNING || now.Disowned() {
		t.Fatalf("the running copy was dropped or replaced: registry %p (was %p), %s", got, now, now.Status())
	}
	if a, fa := r.f.fenced.attempt(d.id), now.FenceToken(); a == 0 || a != fa || old.FenceToken() >= a {
		t.Fatalf("held attempt %d, running copy's %d, forgotten copy's %d", a, fa, old.FenceToken())
	}
}

// A re-attach's take (TakeSession) that fails after its claim (here a
// hook; in production a failed read of the task) hands the lease back:
// this replica gives it up, not released (the sweep still sees it). With
// a client's cancel open for the task it expires at once, so the cancel
// (or another claim) takes the task now, not after the lease and the
// grace. Without one it is left to run out: the session may still
// re-attach, and expired at once the sweeper would end the task after the
// grace alone.
func TestSessionTakeThatFailsAfterItsClaimHandsTheLeaseBack(t *testing.T) {
	for _, cancelOpen := range []bool{false, true} {
		t.Run(fmt.Sprintf("cancel open %v", cancelOpen), func(t *testing.T) {
			pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
			if err := owner.w.Flush(ctx); err != nil { // RUNNING in session-1, stored
				t.Fatal(err)
			}
			var armed atomic.Bool
			armed.Store(true)
			other := startReplicaHooked(t, pg, url, "other", &testSlot{planner: "other"}, requeueHooks{sessionTaken: func(string) error {
				if armed.Swap(false) {
					return errors.New("test: the task's read after the claim failed")
				}
				return nil
			}})
			if cancelOpen {
				if _, err := other.f.leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: "test: a client's cancel"}); err != nil {
					t.Fatal(err)
				}
			}
			err := other.f.TakeSession(ctx, id, "session-1", nil)
			if err == nil || armed.Load() {
				t.Fatalf("take with a failing read: %v (hook ran: %v)", err, !armed.Load())
			}
			if a := other.f.fenced.attempt(id); a != 0 {
				t.Fatalf("the failed take still holds attempt %d", a)
			}
			o, a, released, live := heldLease(t, ctx, other, id)
			if o != "other" || released || live == cancelOpen {
				t.Fatalf("lease %s/%d released=%v live=%v; want other's, handed back: not released, live %v", o, a, released, live, !cancelOpen)
			}
			_, err = other.f.leases.Claim(ctx, id, "third")
			if cancelOpen && err != nil {
				t.Fatalf("a claim right after the failed take, a cancel open: %v", err)
			}
			if !cancelOpen && !errors.Is(err, ErrLeaseHeld) {
				t.Fatalf("a claim right after the failed take, no cancel open: %v, want %v", err, ErrLeaseHeld)
			}
		})
	}
}

// Close waits for the drop of a copy whose lease this replica lost
// (lost's Manager.DropCopy, in a goroutine of its own): nothing of the
// fleet runs past Close. Before, that goroutine was outside the fleet's
// WaitGroup and Close returned while it ran.
func TestCloseWaitsForTheDropOfALostCopy(t *testing.T) {
	drop := newHeldDrop()
	entered := make(chan struct{}, 1)
	owner, id, lt, first, _ := hookedOwner(t, func(**replica) requeueHooks {
		return requeueHooks{beforeDrop: func(tid string) {
			entered <- struct{}{}
			drop.hook(tid)
		}}
	})
	drop.letAtEnd(t)
	owner.f.lost(id, first, "test: this replica could not renew the task's lease")
	select {
	case <-entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the drop did not start")
	}
	closed := make(chan struct{})
	go func() {
		owner.kill()
		close(closed)
	}()
	select {
	case <-closed:
		t.Fatal("Close returned while the drop of the lost copy ran")
	case <-time.After(2 * time.Second): // Close takes about 0.5 s here
	}
	drop.let()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return once the drop ended")
	}
	if owner.mgr.Registry().Get(id) == lt {
		t.Fatal("the lost copy was not dropped")
	}
}

// A client's cancel whose take of a dead replica's RUNNING task fails after
// its claim (the read of the task) expires the lease it claimed at once:
// its own cancel row is written only after the take, so no cancel is open
// yet, and a lease left live made the client's retry see this replica as
// the task's owner and send a command nobody carries out (the task ran on
// until the lease and the grace ran out). The retry takes the task and
// ends it CANCELLED.
func TestCancelWhoseTakeFailsAfterItsClaimExpiresTheLease(t *testing.T) {
	pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	owner.kill()
	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	var armed atomic.Bool
	armed.Store(true)
	r := startReplicaHooked(t, pg, url, "cancelling", &testSlot{planner: "other"}, requeueHooks{taken: func(string, int64) {
		if armed.Swap(false) {
			ccancel() // the read after the claim fails
		}
	}})
	// The dead owner's lease runs out (no cancel asked meanwhile: a row
	// open would make any hand-back expire the lease).
	testutil.WaitFor(t, 20*time.Second, func() bool {
		_, _, released, live := heldLease(t, ctx, r, id)
		return released || !live
	}, "the dead owner's lease to expire")
	if _, err := r.f.Cancel(cctx, nil, id, "stopped by the test", false); err == nil || armed.Load() {
		t.Fatalf("the cancel whose take failed: %v (took the task: %v)", err, !armed.Load())
	}
	if cmds, err := r.f.leases.OpenCommands(ctx, []string{id}); err != nil || len(cmds) != 0 {
		t.Fatalf("open commands %+v %v; want none (the failed take wrote no row)", cmds, err)
	}
	if o, a, released, live := heldLease(t, ctx, r, id); o != "cancelling" || released || live {
		t.Fatalf("lease %s/%d released=%v live=%v; want cancelling's, expired, not released", o, a, released, live)
	}
	out, err := r.f.Cancel(ctx, nil, id, "stopped by the test", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("the retry: %+v %v", out, err)
	}
	if err := r.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if st, msg := storedStatus(t, r, id); st != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("after the retry the task is %s (%q), want CANCELLED", st, msg)
	}
}

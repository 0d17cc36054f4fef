package fleet

import (
	"context"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// A session whose stream broke re-attaches to the replica that holds its
// task (the copy there waits for it: DetachLinkLost), which claims the
// lease again for it with the next attempt (ClaimSession). The task's end
// then releases the lease with that attempt and is announced, as for a
// task that never lost its link. Before, the copy's watch (watchOwned)
// released with the attempt it started with: once the re-attach moved the
// lease on, nothing released it — no "ended" announcement (a cancel
// waiting for the end on another replica waited for its poll), the task
// held here for good (its lease renewed until the replica stopped, never
// deleted by the GC, which deletes released leases only).

// reattachedHere runs a task on replica "owner", breaks its session's
// link and re-attaches the session there, times times: the owner, the
// task, the runner of its last session, the attempt that session runs
// with and a context for the test. flush: the owner's writer is flushed
// before each re-attach (else the detach's record may still be on its
// way to PostgreSQL when the re-attach claims the lease).
func reattachedHere(t *testing.T, times int, flush bool) (*replica, string, *stopRunner, int64, context.Context) {
	t.Helper()
	_, _, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
	first := owner.f.fenced.attempt(id)
	if first == 0 {
		t.Fatal("the owner holds no lease of the running task")
	}
	lt := owner.mgr.Registry().Get(id)
	var r *stopRunner
	var runner task.Runner = stopRunner{t: lt}
	var attempt int64
	for i := range times {
		if !lt.DetachLinkLost(runner, uint64(i+1), time.Minute) {
			t.Fatalf("re-attach %d: the session did not detach (%s %q)", i+1, lt.Status(), lt.Info().Message)
		}
		if flush {
			if err := owner.w.Flush(ctx); err != nil {
				t.Fatal(err)
			}
		}
		info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
			r = &stopRunner{t: tk}
			return r
		})
		if err != nil {
			t.Fatalf("re-attach %d: %v", i+1, err)
		}
		if info.Stop != nil {
			t.Fatalf("re-attach %d: stopped with %v", i+1, info.Stop)
		}
		runner, attempt = r, info.Attempt
	}
	if attempt != first+int64(times) || owner.f.fenced.attempt(id) != attempt {
		t.Fatalf("attempt: re-attached with %d, held with %d; want %d (first %d)", attempt, owner.f.fenced.attempt(id), first+int64(times), first)
	}
	return owner, id, r, attempt, ctx
}

// endsReleasedAndAnnounced waits for task id's end (want) to be stored, and
// then for its lease to be released and forgotten by owner, and for the
// end to be announced (once) on the command channel, which ch hears.
func endsReleasedAndAnnounced(t *testing.T, ctx context.Context, owner *replica, id string, want agentpb.TaskStatus, ch chan agentpb.TaskStatus) {
	t.Helper()
	waitFor(t, "the task's end to be stored", 10*time.Second, func() bool {
		st, _ := storedStatus(t, owner, id)
		return task.Terminal(st)
	})
	if st, msg := storedStatus(t, owner, id); st != want {
		t.Fatalf("ended %s %q, want %s", st, msg, want)
	}
	select {
	case st := <-ch:
		if st != want {
			t.Fatalf("the end was announced as %s, want %s", st, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the task's end was not announced within 5 s of its storing")
	}
	// The watch announces the end, then releases the lease.
	var released bool
	waitFor(t, "the lease to be released after the end's announcement", 5*time.Second, func() bool {
		if err := owner.f.pg.Pool().QueryRow(ctx, `SELECT released FROM fleet_leases WHERE task_id = $1`, id).Scan(&released); err != nil {
			t.Fatal(err)
		}
		return released
	})
	if a := owner.f.fenced.attempt(id); a != 0 {
		t.Fatalf("once the end is stored, announced and the lease released: attempt held here %d, want none", a)
	}
	// One watch, one release: no second announcement.
	select {
	case st := <-ch:
		t.Fatalf("the end was announced again (%s)", st)
	case <-time.After(300 * time.Millisecond):
	}
}

// The reviewer's probe: cancelled (through the owner's API) after a
// re-attach to the same replica.
func TestCancelAfterAReattachToTheSameReplicaReleasesTheLease(t *testing.T) {
	owner, id, _, _, ctx := reattachedHere(t, 1, true)
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	out, err := owner.mgr.CancelAs(ctx, tenant.Caller{Admin: true}, id, "stopped by the test", true)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_CANCELLED, ch)
}

// A task that ends on its own (SUCCESS) after two re-attaches to the same
// replica (the watch follows each).
func TestSuccessAfterReattachesToTheSameReplicaReleasesTheLease(t *testing.T) {
	owner, id, r, _, ctx := reattachedHere(t, 2, true)
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	if !r.t.Finish(agentpb.TaskStatus_SUCCESS, "done", "") {
		t.Fatal("the task did not end")
	}
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_SUCCESS, ch)
}

// Sessions that re-attach to the replica holding their task right after
// their link broke, while the record the detach wrote (and those the
// session wrote before) are still on their way to PostgreSQL: the claim
// (ClaimSession) moved the lease to the next attempt under them, so the
// store refused them (fenced: written with the attempt before), and the
// replica dropped its own session as if another replica had taken the
// task ("task fenced"), which then ended FAILURE at the sweep (2 runs of
// 3 with two re-attaches). The claim now stores the task's records
// written before it first.
func TestQuickReattachesToTheSameReplicaKeepTheSession(t *testing.T) {
	owner, id, r, _, ctx := reattachedHere(t, 3, false)
	ch := owner.f.ends.add(id)
	defer owner.f.ends.remove(id, ch)
	time.Sleep(testLease) // the renewals and sweeps of a lease
	if n := owner.f.Fenced(); n != 0 {
		t.Fatalf("%d write(s) of the owner fenced", n)
	}
	if !r.t.Finish(agentpb.TaskStatus_SUCCESS, "done", "") {
		t.Fatalf("the task did not end: it is %s %q", r.t.Status(), r.t.Info().Message)
	}
	endsReleasedAndAnnounced(t, ctx, owner, id, agentpb.TaskStatus_SUCCESS, ch)
}

// A session that re-attaches to another replica takes its task from the
// replica it left, whose copy (waiting for the session) is dropped
// without ending (Manager.Drop's abandon). The copy's watch there ends
// with the lost lease. Before, it waited for the copy's end, which never
// comes, until the fleet closed: a goroutine per task handed away.
func TestWatchOfATaskWhoseSessionMovedToAnotherReplicaEnds(t *testing.T) {
	pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
	lt := owner.mgr.Registry().Get(id)
	if !lt.DetachLinkLost(stopRunner{t: lt}, 1, time.Minute) {
		t.Fatal("the session did not detach")
	}
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	watched := func() bool {
		owner.f.watchMu.Lock()
		defer owner.f.watchMu.Unlock()
		return owner.f.watches[id] != nil
	}
	if !watched() {
		t.Fatal("the owner does not watch its copy")
	}
	other := startReplica(t, pg, url, "other", &testSlot{})
	if _, err := other.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return stopRunner{t: tk}
	}); err != nil {
		t.Fatalf("re-attach to the other replica: %v", err)
	}
	waitFor(t, "the owner to drop its copy", 5*time.Second, func() bool {
		return owner.f.fenced.attempt(id) == 0 && owner.mgr.Registry().Get(id) != lt
	})
	waitFor(t, "the owner's watch of the dropped copy to end", 2*time.Second, func() bool { return !watched() })
	select {
	case <-lt.Done():
		t.Fatal("the dropped copy ended: the test needs one abandoned (dropped without ending)")
	default:
	}
}

// lockTaskTables holds the task tables (events, tasks) for d in a second
// transaction of owner's PostgreSQL: the store stalls, and the write that
// waits holds its tasks' lease rows. The test waits for the unlock before
// its replicas stop; the channel closes at the unlock.
func lockTaskTables(t *testing.T, ctx context.Context, owner *replica, d time.Duration) <-chan struct{} {
	t.Helper()
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
		time.Sleep(d)
		_ = tx.Rollback(ctx)
	}()
	t.Cleanup(func() { <-unlocked })
	return unlocked
}

// A store that is slow, not down, when a session re-attaches to the same
// replica: the re-attach waits for the records before the claim (as the
// claim's lock on the lease row would) instead of being refused
// UNAVAILABLE — a refusal makes the commander give the session up. Here a
// second transaction holds the task tables for 2 s, past the writer's
// "stuck" mark (1 s), but within the replica's lease: the write that
// waits holds the task's lease row (FOR SHARE), so the lease is not renewed
// meanwhile, and with the tests' 0.9 s lease the replica lost the task
// during the stall (its copy dropped, now and then the task swept FAILURE
// before the claim: this test failed in CI under load).
func TestReattachToTheSameReplicaWaitsForASlowStore(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplicaLeased(t, pg, url, "owner", &testSlot{upstream: true, stops: true}, 8*time.Second, time.Second, func(*Fleet) {})
	id := submitRunning(t, owner)
	lt := owner.mgr.Registry().Get(id)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	lockTaskTables(t, ctx, owner, 2*time.Second)
	if !lt.DetachLinkLost(stopRunner{t: lt}, 1, time.Minute) {
		t.Fatal("no detach")
	}
	info, err := owner.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return &stopRunner{t: tk}
	})
	if err != nil {
		t.Fatalf("the re-attach was refused on a slow store: %v", err)
	}
	if info.Attempt < 2 {
		t.Fatalf("re-attached with attempt %d, want a new one", info.Attempt)
	}
	if n := owner.f.Fenced(); n != 0 {
		t.Fatalf("%d of the replica's own writes were fenced", n)
	}
	if a := owner.f.fenced.attempt(id); a != info.Attempt || owner.mgr.Registry().Get(id) != lt || info.Task != lt {
		t.Fatalf("the replica holds attempt %d of the task (re-attached with %d) or dropped its copy: the stall cost the lease", a, info.Attempt)
	}
}

package fleet

import (
	"context"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// A cancel sent from another replica to a task's owner, which carries it
// out and is killed (kill -9) before the task's end is stored: the cancel
// is not lost. Its command row stays open until the end is stored, so the
// task's next owner ends it CANCELLED (the row was marked done when the
// owner took it, and the next owner ended the task FAILURE, or a session
// re-attached elsewhere ran on, the client having been told "cancelled").

// cancelledOnAKilledOwner runs a task on replica "owner" (started: its
// session recorded an upstream packet; its commander acknowledges a stop at
// once) and cancels it from replica "sender" (a bystander: it never sweeps)
// while PostgreSQL refuses the task's writes: the owner carries the cancel
// out (its copy ends CANCELLED, not stored) and stores the command's
// result; then it is killed as kill -9 would: the fleet's stop can write no
// command row either (keepCancelOpen, the graceful drain's cover, is
// refused), and its writer closes with the end unstored. It returns the
// task's set-up (the task stored RUNNING, its lease expiring) and sender.
//
// local: the client's cancel reaches the owner's own API instead
// (Manager.CancelAs there, which writes no command row to send): the
// cancel is made durable in the background once the stop is decided
// (Fleet.KeepCancel), its row open with no result; this waits for that
// row before the kill.
func cancelledOnAKilledOwner(t *testing.T, local bool) (*deadTask, *replica) {
	t.Helper()
	pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
	sender := startBystander(t, pg, url, "sender")
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	d := &deadTask{pg: pg, url: url, id: id, ctx: ctx, leases: leases}
	allow := refuseTaskWrites(t, d)
	var out task.CancelOutcome
	if local {
		out, err = owner.mgr.CancelAs(ctx, tenant.Caller{Admin: true}, id, "stopped by the test", false)
	} else {
		out, err = sender.f.Cancel(ctx, nil, id, "stopped by the test", false)
	}
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	row := `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND kind = 'cancel' AND NOT done AND result IS NOT NULL`
	if local {
		row = `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND kind = 'cancel' AND NOT done`
	}
	waitFor(t, "the owner to carry the cancel out and its row to be open", 10*time.Second, func() bool {
		lt := owner.mgr.Registry().Get(id)
		var n int
		err := pg.Pool().QueryRow(ctx, row, id).Scan(&n)
		return err == nil && n == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_CANCELLED
	})
	killRefusingCommands(t, d, owner)
	allow()
	if st, _ := storedStatus(t, sender, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored %s: the test needs the end lost with the owner", st)
	}
	return d, sender
}

// killRefusingCommands kills r as kill -9 would (see replica.kill), with
// PostgreSQL refusing any command row for d's task meanwhile: a killed
// process writes none (the fleet's stop would, keepCancelOpen). It needs
// refuseTaskWrites' function.
func killRefusingCommands(t *testing.T, d *deadTask, r *replica) {
	t.Helper()
	d.exec(t, `CREATE TRIGGER refuse_task_commands BEFORE INSERT ON fleet_commands
		FOR EACH ROW WHEN (NEW.task_id = '%[1]s') EXECUTE FUNCTION refuse_task_writes()`)
	r.kill()
	d.exec(t, `DROP TRIGGER refuse_task_commands ON fleet_commands`)
}

// The owner killed, its lease expires and another replica's sweep takes
// the task over: CANCELLED with the cancel's reason (before: FAILURE, "its
// dispatcher replica owner stopped renewing the task's lease…").
func TestCancelOfAnOwnerKilledBeforeTheEndIsStoredEndsCancelledOnTakeover(t *testing.T) {
	endsCancelledOnTakeover(t, false)
}

// The same with the client's cancel received by the owner's own API: it
// wrote no command row (the owner stopped the session itself), so the
// sweep ended the task FAILURE; now the cancel's row is written once the
// stop is decided, and the task ends CANCELLED.
func TestLocalCancelOfAnOwnerKilledBeforeTheEndIsStoredEndsCancelledOnTakeover(t *testing.T) {
	endsCancelledOnTakeover(t, true)
}

func endsCancelledOnTakeover(t *testing.T, local bool) {
	d, _ := cancelledOnAKilledOwner(t, local)
	other := startReplica(t, d.pg, d.url, "other", &testSlot{finish: true})
	st, msg := d.ended(t, other, 20*time.Second)
	if st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" || other.slot.started.Load() != 0 {
		t.Fatalf("ended %s %q, started %d times on the next owner; want CANCELLED with the cancel's reason, never started", st, msg, other.slot.started.Load())
	}
}

// The owner killed, the task's commander re-attaches its session to
// another replica (the session hand-over: TakeSession claims the task at
// once): the re-attached session is stopped with the cancel's reason and
// the task ends CANCELLED (before: no stop, the session ran on).
func TestCancelOfAnOwnerKilledBeforeTheEndIsStoredStopsTheReattachedSession(t *testing.T) {
	stopsTheReattachedSession(t, false, false)
}

// The same with the client's cancel received by the owner's own API.
func TestLocalCancelOfAnOwnerKilledBeforeTheEndIsStoredStopsTheReattachedSession(t *testing.T) {
	stopsTheReattachedSession(t, true, false)
}

// The new owner's reconcile running between the take-over (TakeSession,
// which adopts the task with the open cancel as its stop) and the
// re-attach does not carry the cancel out again: the adopted copy has it
// recorded, so the session re-attaches and is stopped with it. (Before,
// the reconcile stopped the copy waiting for its session: the task ended
// CANCELLED "(while its session was being handed over)" and the re-attach
// was refused.)
func TestOpenCancelIsNotCarriedOutAgainBetweenTheTakeOverAndTheReattach(t *testing.T) {
	stopsTheReattachedSession(t, false, true)
}

// stopsTheReattachedSession: see cancelledOnAKilledOwner for local;
// reconcile runs the new owner's commands between its take-over and the
// re-attach.
func stopsTheReattachedSession(t *testing.T, local, reconcile bool) {
	d, sender := cancelledOnAKilledOwner(t, local)
	if reconcile {
		if err := sender.f.TakeSession(d.ctx, d.id, "session-1", nil); err != nil {
			t.Fatal(err)
		}
		sender.f.runCommands(d.ctx, []string{d.id})
	}
	reattachStoppedByTheCancel(t, d.ctx, sender.mgr, d.id, "the cancel is lost and the task runs on")
	st, msg := d.ended(t, sender, 10*time.Second)
	if st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" {
		t.Fatalf("ended %s %q, want CANCELLED with the cancel's reason", st, msg)
	}
}

// A cancel of a task nobody holds (its replica died) is carried out by the
// replica that received it (takeFree: it claims the task and ends it);
// that replica is killed before the end is stored (PostgreSQL refused it
// until then): the task's next owner ends it CANCELLED with the cancel's
// reason (before: no row was written, and the sweep ended it FAILURE).
func TestCancelOfAFreeTaskWhoseTakerIsKilledBeforeTheEndIsStoredEndsCancelled(t *testing.T) {
	d := newDeadTask(t, true)
	sender := startBystander(t, d.pg, d.url, "sender")
	waitFor(t, "the dead replica's lease to expire", 10*time.Second, func() bool {
		h, err := d.leases.Holder(d.ctx, d.id)
		return err == nil && h.Owner == ""
	})
	allow := refuseTaskWrites(t, d)
	ctx, cancel := context.WithTimeout(d.ctx, 2*time.Second)
	out, err := sender.f.Cancel(ctx, nil, d.id, "stopped by the test", false)
	cancel()
	if err != nil || !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v; want carried out here", out, err)
	}
	killRefusingCommands(t, d, sender)
	allow()
	if st, _ := storedStatus(t, sender, d.id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored %s: the test needs the end lost with the replica", st)
	}
	other := startReplica(t, d.pg, d.url, "other", &testSlot{finish: true})
	st, msg := d.ended(t, other, 20*time.Second)
	if st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" || other.slot.started.Load() != 0 {
		t.Fatalf("ended %s %q, started %d times on the next owner; want CANCELLED with the cancel's reason, never started", st, msg, other.slot.started.Load())
	}
}

// A task whose owner stopped its session for a client's cancel received by
// its own API, and stored that stop (its commander had not acknowledged it
// yet), then was killed before the cancel's row was written (PostgreSQL
// refused it) and before the task's end: the sweep's takeover ends it
// CANCELLED with the cancel's reason (before: FAILURE, "its dispatcher
// replica owner stopped renewing the task's lease…": the takeover looked
// only for open cancel rows, never at the stored stop).
func TestStoredClientCancelStopOfAKilledOwnerEndsCancelledOnTakeover(t *testing.T) {
	pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, fences: true})
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	d := &deadTask{pg: pg, url: url, id: id, ctx: ctx, leases: leases}
	d.exec(t, `
		CREATE FUNCTION refuse_cancel_rows() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			RAISE EXCEPTION 'the test refuses this write';
		END $$;
		CREATE TRIGGER refuse_task_commands BEFORE INSERT ON fleet_commands
			FOR EACH ROW WHEN (NEW.task_id = '%[1]s') EXECUTE FUNCTION refuse_cancel_rows();`)
	out, err := owner.mgr.CancelAs(ctx, tenant.Caller{Admin: true}, id, "stopped by the test", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	owner.kill()
	d.exec(t, `DROP TRIGGER refuse_task_commands ON fleet_commands`)
	snap, err := owner.ts.Load(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Status != agentpb.TaskStatus_RUNNING || snap.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Fatalf("stored %s with stop %v: the test needs the cancel's stop stored, not the end", snap.Status, snap.Stop)
	}
	var rows int
	if err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE task_id = $1`, id).Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("%d command rows (%v): the test needs none", rows, err)
	}
	other := startReplica(t, pg, url, "other", &testSlot{finish: true})
	st, msg := d.ended(t, other, 20*time.Second)
	if st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" || other.slot.started.Load() != 0 {
		t.Fatalf("ended %s %q, started %d times on the next owner; want CANCELLED with the cancel's reason, never started", st, msg, other.slot.started.Load())
	}
}

// The stop of a cancel received by the owner's own API never waits for
// its command row (KeepCancel writes it in the background): with each
// insert of the task's command rows taking 2 s in PostgreSQL, CancelAs
// (waiting for the task's end, as the API does) returns with the task
// CANCELLED well within that, and the row is written afterwards.
func TestLocalCancelsStopDoesNotWaitForItsRow(t *testing.T) {
	pg, url, ctx, owner, id := runningOnOwner(t, &testSlot{upstream: true, stops: true})
	d := &deadTask{pg: pg, url: url, id: id, ctx: ctx}
	d.exec(t, `
		CREATE FUNCTION slow_commands() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			PERFORM pg_sleep(2);
			RETURN NEW;
		END $$;
		CREATE TRIGGER slow_task_commands BEFORE INSERT ON fleet_commands
			FOR EACH ROW WHEN (NEW.task_id = '%[1]s') EXECUTE FUNCTION slow_commands();`)
	began := time.Now()
	out, err := owner.mgr.CancelAs(ctx, tenant.Caller{Admin: true}, id, "stopped by the test", true)
	took := time.Since(began)
	if err != nil || !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	if took >= 2*time.Second {
		// The insert alone takes 2 s: any wait for it shows here, and a
		// loaded machine's slow cancel (well under that) does not.
		t.Fatalf("the cancel took %s: its stop waited for the command row's 2 s insert", took)
	}
	waitFor(t, "the cancel's row", 10*time.Second, func() bool {
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND kind = 'cancel'`, id).Scan(&n)
		return err == nil && n == 1
	})
	t.Logf("cancelled in %s; the row written after %s", took, time.Since(began))
}

// submitRunning submits a chat task to owner and waits until it runs
// there (its slot's first session): the task's id.
func submitRunning(t *testing.T, owner *replica) string {
	t.Helper()
	tk, err := owner.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	waitFor(t, "the task to start on its owner", 10*time.Second, func() bool {
		lt := owner.mgr.Registry().Get(id)
		return owner.slot.started.Load() == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_RUNNING
	})
	return id
}

// runningOnOwner starts a replica "owner" with slot and a task running on
// it: the store, the Redis URL, a context for the test, the owner and the
// task's id.
func runningOnOwner(t *testing.T, slot *testSlot) (*postgres.Store, string, context.Context, *replica, string) {
	t.Helper()
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplica(t, pg, url, "owner", slot)
	id := submitRunning(t, owner)
	return pg, url, ctx, owner, id
}

// A session whose stream to its replica broke (the copy there waits for it
// to re-attach: DetachLinkLost) re-attaches to that same replica, which
// still holds the task's lease, while a cancel of the task is open in
// fleet_commands that the replica has not carried out: its announcement
// was lost (the row is written here without one), and the reconcile that
// would find it runs only every hour on this replica. The re-attach
// honours the cancel at once, as a take-over does (TakeSession): the
// session re-attaches with the cancel as its stop, and the task ends
// CANCELLED with the cancel's reason. (Before, the re-attach's claim
// (ClaimSession) read the open cancel and dropped it: the session
// re-attached with no stop and ran on until the next reconcile.)
func TestOpenCancelStopsASessionReattachingToTheReplicaItWaitsOn(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplicaWith(t, pg, url, "owner", &testSlot{upstream: true, stops: true},
		func(f *Fleet) { f.reconcileEvery = time.Hour })
	tk, err := owner.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	var lt *task.Task
	waitFor(t, "the task to start on its owner", 10*time.Second, func() bool {
		lt = owner.mgr.Registry().Get(id)
		return owner.slot.started.Load() == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_RUNNING
	})
	if !lt.DetachLinkLost(stopRunner{t: lt}, 1, time.Minute) {
		t.Fatal("the session did not detach")
	}
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: "stopped by the test"}); err != nil {
		t.Fatal(err)
	}
	if !lt.HandingOver() || lt.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the copy is %s (handing over: %v): the test needs it waiting for its session", lt.Status(), lt.HandingOver())
	}
	r, info := reattachWithTheCancelsStop(t, ctx, owner.mgr, id, "the open cancel waits for the reconcile and the session runs on")
	if reason, ok := lt.CancelRequested(); !ok || reason != "stopped by the test" {
		t.Fatalf("cancel recorded on the copy: %q %v; want the open cancel's (so the reconcile does not carry it out again)", reason, ok)
	}
	// What the session server does with it (restop); the commander
	// acknowledges at once.
	r.Stop(info.Stop.GetReason(), info.Stop.GetCode())
	waitFor(t, "the task's end to be stored", 10*time.Second, func() bool {
		st, _ := storedStatus(t, owner, id)
		return task.Terminal(st)
	})
	if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" {
		t.Fatalf("ended %s %q, want CANCELLED with the cancel's reason", st, msg)
	}
}

// reattachWithTheCancelsStop re-attaches session-1 to task id on mgr and
// fails the test unless the session comes back with the test's client
// cancel as its stop (lost: what it means if there is none).
func reattachWithTheCancelsStop(t *testing.T, ctx context.Context, mgr *task.Manager, id, lost string) (*stopRunner, task.Reattached) {
	t.Helper()
	var r *stopRunner
	info, err := mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		r = &stopRunner{t: tk}
		return r
	})
	switch {
	case err != nil:
		t.Fatalf("re-attach: %v", err)
	case info.Stop == nil:
		t.Fatal("the session re-attached with no stop: " + lost)
	case info.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || info.Stop.GetReason() != "stopped by the test":
		t.Fatalf("re-attached with stop %v, want the client's cancel with its reason", info.Stop)
	}
	return r, info
}

// reattachStoppedByTheCancel is reattachWithTheCancelsStop, then the
// session server's restop with the commander acknowledging at once.
func reattachStoppedByTheCancel(t *testing.T, ctx context.Context, mgr *task.Manager, id, lost string) {
	t.Helper()
	r, info := reattachWithTheCancelsStop(t, ctx, mgr, id, lost)
	r.Stop(info.Stop.GetReason(), info.Stop.GetCode())
}

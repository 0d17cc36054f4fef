package fleet

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// The hand-back of a task to the fleet's queue (giveBack, the requeue of a
// dead replica's unstarted task) and the bus's claim: no task may stay
// PENDING or RUNNING for good, run twice, or run after a client's cancel.

// endsWith waits for task id to end (stored) and checks its status and
// how often live's slot started it.
func endsWith(t *testing.T, live *replica, id string, want agentpb.TaskStatus, starts int32, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, msg := storedStatus(t, live, id)
		if task.Terminal(st) {
			if st != want || live.slot.started.Load() != starts {
				t.Fatalf("ended %s %q, started %d times on the live replica; want %s, %d starts", st, msg, live.slot.started.Load(), want, starts)
			}
			return msg
		}
		if time.Now().After(deadline) {
			t.Fatalf("task still %s %q after %s (started %d times on the live replica); want %s", st, msg, d, live.slot.started.Load(), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startBystander starts a replica whose slot serves another planner and
// that never sweeps (it is marked draining: no takeover, no pull), so that
// the takeover under test is the hooked replica's; it still sends cancels
// and takes sessions over.
func startBystander(t *testing.T, pg *postgres.Store, url, id string) *replica {
	t.Helper()
	r := startReplica(t, pg, url, id, &testSlot{planner: "other"})
	r.f.draining.Store(true)
	return r
}

// A client's cancel on the replica that is requeueing a dead replica's
// unstarted task, after the takeover looked for cancels and stored the
// task PENDING but before the task is back in the queue: the task ends
// CANCELLED and never runs again. (The cancel ended the local copy
// CANCELLED, whose record the release then fenced: the task went back to
// the queue and ran.)
func TestCancelWhileTheRequeueHandsTheTaskBackEndsCancelled(t *testing.T) {
	cancelInHandBack(t, func(h *requeueHooks, cancel func(string)) { h.stored = cancel })
}

// cancelInHandBack runs a live replica taking over a dead replica's
// unstarted task, with a hook (set by pick) that cancels the task there
// once, as a client would (cancelInHook): the task ends CANCELLED with the
// cancel's reason, never started, and the client is told "cancelled".
func cancelInHandBack(t *testing.T, pick func(h *requeueHooks, cancel func(string))) {
	t.Helper()
	d := newDeadTask(t, false)
	var live atomic.Pointer[replica]
	var out atomic.Pointer[task.CancelOutcome]
	var hooks requeueHooks
	pick(&hooks, cancelInHook(t, d.id, &live, &out))
	live.Store(startReplicaHooked(t, d.pg, d.url, "live", &testSlot{finish: true}, hooks))
	msg := endsWith(t, live.Load(), d.id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second)
	wantCancelledInHook(t, msg, &out)
}

// The same cancel sent from another replica (a command for the task's
// owner, announced on the bus): CANCELLED, never run again.
func TestCancelFromAnotherReplicaWhileTheRequeueHandsTheTaskBackEndsCancelled(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	front := startBystander(t, pg, url, "front")
	var sent atomic.Bool
	hooks := requeueHooks{stored: func(tid string) {
		if tid != id || sent.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// The owner's command listener acts on it while the requeue goes
		// on: on the local copy, or once it is forgotten.
		if _, err := front.f.Cancel(ctx, nil, id, "stopped by the test", false); err != nil {
			t.Errorf("cancel: %v", err)
		}
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	endsWith(t, live, id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second)
	if !sent.Load() {
		t.Fatal("the hook did not run")
	}
}

// failOnce makes PostgreSQL refuse, once, the first write that a trigger
// named name sees (on: when and on what table it runs, e.g. "BEFORE
// UPDATE ON fleet_commands"; when: its row condition, %[1]s the task's
// id): a real error of the statement, as when the database fails at that
// moment. The trigger counts with a sequence of the same name, which a
// failed transaction does not roll back (failures reads it).
func (d *deadTask) failOnce(t *testing.T, name, on, when string) {
	t.Helper()
	d.exec(t, strings.NewReplacer("NAME", name, "ON_WHAT", on, "WHEN_ROW", when).Replace(`
		CREATE SEQUENCE NAME;
		CREATE FUNCTION NAME() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			IF nextval('NAME') = 1 THEN
				RAISE EXCEPTION 'the test refuses this write (NAME)';
			END IF;
			RETURN NEW;
		END $$;
		CREATE TRIGGER NAME ON_WHAT
			FOR EACH ROW WHEN (WHEN_ROW) EXECUTE FUNCTION NAME();`))
}

// failures is how often failOnce's trigger name ran.
func (d *deadTask) failures(t *testing.T, name string) int64 {
	t.Helper()
	var n int64
	var called bool
	if err := d.pg.Pool().QueryRow(d.ctx, `SELECT last_value, is_called FROM `+name).Scan(&n, &called); err != nil {
		t.Fatal(err)
	}
	if !called {
		return 0
	}
	return n
}

// A requeue whose queue row PostgreSQL refuses (the task is stored PENDING
// but not queued) is not left PENDING for good: the lease is not released
// then, so it expires, is swept again and the task queued; it runs.
func TestRequeueWhoseQueueRowFailsIsQueuedLater(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	d.failOnce(t, "queue_fail_once", "BEFORE INSERT OR UPDATE ON fleet_queue", "NEW.task_id = '%[1]s'")
	live := startReplica(t, pg, url, "live", &testSlot{finish: true})
	endsWith(t, live, id, agentpb.TaskStatus_SUCCESS, 1, 20*time.Second)
	if n := d.failures(t, "queue_fail_once"); n < 1 {
		t.Fatalf("the queue row was never refused (%d)", n)
	}
}

// A requeue whose bus entry Redis refuses (the queue row is stored) is
// written again by the reconcile (after --fleet-requeue-after, 1 s here):
// the task runs.
func TestRequeueWhoseBusEntryFailsIsWrittenAgain(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	key := queuePrefix + queueName("chat", nil)
	var broke atomic.Bool
	hooks := requeueHooks{stored: func(tid string) {
		if tid != id || broke.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// The stream is a string now: the requeue's XADD fails
		// (WRONGTYPE); it is a stream again 300 ms later.
		if err := rdb.Del(ctx, key).Err(); err != nil {
			t.Error(err)
		}
		if err := rdb.Set(ctx, key, "not a stream", 0).Err(); err != nil {
			t.Error(err)
		}
		time.AfterFunc(300*time.Millisecond, func() { rdb.Del(context.Background(), key) })
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	endsWith(t, live, id, agentpb.TaskStatus_SUCCESS, 1, 20*time.Second)
	if !broke.Load() {
		t.Fatal("the hook did not run")
	}
}

// A stale bus entry of a task that is RUNNING (an entry written again by
// the reconcile while the task waited, read after its replica died and its
// lease expired) is not a task to run: the entry is dropped and the task
// is taken over by the sweep as usual (FAILURE: it had started). The bus's
// claim used to take it, find it not PENDING and hand it back released,
// for ever: RUNNING for good, never swept, its entry going round.
func TestStaleBusEntryOfADeadReplicasRunningTaskIsNotRunAgain(t *testing.T) {
	d := newDeadTask(t, true)
	pg, url, id := d.pg, d.url, d.id
	ctx, leases := d.ctx, d.leases
	waitFor(t, "the dead replica's lease to expire", 10*time.Second, func() bool {
		l, ok, err := leases.Lease(ctx, id)
		return err == nil && ok && l.Expired
	})
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	q := queueName("chat", nil)
	if err := ensureGroup(ctx, rdb, queuePrefix+q); err != nil {
		t.Fatal(err)
	}
	if err := rdb.XAdd(ctx, &redis.XAddArgs{Stream: queuePrefix + q, Values: []any{"task", id}}).Err(); err != nil {
		t.Fatal(err)
	}
	if err := rdb.SAdd(ctx, queuesKey, q).Err(); err != nil {
		t.Fatal(err)
	}
	live := startReplica(t, pg, url, "live", &testSlot{finish: true})
	msg := endsWith(t, live, id, agentpb.TaskStatus_FAILURE, 0, 20*time.Second)
	if !strings.Contains(msg, "stopped renewing the task's lease") {
		t.Fatalf("message %q, want the takeover's", msg)
	}
}

// A takeover that claimed an expired lease and then cannot read the task
// (PostgreSQL answers with an error: here the tasks table is renamed away
// for a second) does not release the lease — a released lease is never
// swept again, and the task stayed RUNNING for good — but leaves it to
// expire: the next sweep takes the task over.
func TestTakeOverThatCannotReadTheTaskLeavesTheLeaseToExpire(t *testing.T) {
	d := newDeadTask(t, true)
	pg, url, id := d.pg, d.url, d.id
	var renamed atomic.Bool
	back := make(chan error, 1)
	hooks := requeueHooks{claimed: func(tid string) {
		if tid != id || renamed.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pg.Pool().Exec(ctx, `ALTER TABLE tasks RENAME TO tasks_away`); err != nil {
			t.Error(err)
			back <- err
			return
		}
		time.AfterFunc(time.Second, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := pg.Pool().Exec(ctx, `ALTER TABLE tasks_away RENAME TO tasks`)
			back <- err
		})
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	select {
	case err := <-back:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the hook did not run")
	}
	msg := endsWith(t, live, id, agentpb.TaskStatus_FAILURE, 0, 30*time.Second)
	if !renamed.Load() || !strings.Contains(msg, "stopped renewing the task's lease") {
		t.Fatalf("renamed %v, message %q; want the takeover's FAILURE after the rename", renamed.Load(), msg)
	}
}

// A session re-attaching after its task was requeued (its replica died
// before the commander sent anything, nobody re-attached within the lease
// and the grace) is refused with a reason that says so: the commander ends
// its planner (docs/protocol.md), and the task runs once, in a new session.
func TestLateReattachAfterTheRequeueIsRefusedSayingSo(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	other := startBystander(t, pg, url, "other")
	refused := make(chan error, 1)
	var once atomic.Bool
	hooks := requeueHooks{stored: func(tid string) {
		if tid != id || once.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		refused <- other.f.TakeSession(ctx, id, "session-1", nil)
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	endsWith(t, live, id, agentpb.TaskStatus_SUCCESS, 1, 20*time.Second)
	err := <-refused
	if !errors.Is(err, task.ErrNotRunning) || !strings.Contains(err.Error(), "requeued") {
		t.Fatalf("late re-attach: %v; want ErrNotRunning saying the task was requeued", err)
	}
	// Once it ran again in a new session, the old one is still refused.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = other.f.TakeSession(ctx, id, "session-1", nil)
	if !errors.Is(err, task.ErrNotRunning) {
		t.Fatalf("re-attach after the end: %v; want ErrNotRunning", err)
	}
}

// A client's cancel on the replica handing a task back to the queue, after
// the hand-back decided that no cancel was asked and before the copy is
// forgotten: the cancel goes through the fleet (a durable command for the
// task's next owner) and the task ends CANCELLED, never run. (Manager.Cancel
// ended the copy here, whose record the release then fenced, and told the
// client "cancelled"; the task went back to the queue without a cancel row
// and ran to SUCCESS.)
func TestCancelAfterTheHandBackDecidedEndsCancelled(t *testing.T) {
	cancelInHandBack(t, func(h *requeueHooks, cancel func(string)) { h.handBack = cancel })
}

// A cancel left for a task handed back to the queue, whose row's first
// marking done fails (a PostgreSQL error of that statement, once: the
// claimer's close once the task's end is stored, or an earlier claimer's
// take): the task is not run, ends CANCELLED, and its cancel's row is
// closed later (the reconcile closes the commands of ended tasks). (A
// claimer that took the row first ran the task: SUCCESS, the cancel
// lost.)
func TestQueuedCancelWhoseTakeFailsIsNotRun(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id, ctx, leases := d.pg, d.url, d.id, d.ctx, d.leases
	d.failOnce(t, "take_fail_once", "BEFORE UPDATE ON fleet_commands", "NEW.task_id = '%[1]s' AND NEW.done AND NOT OLD.done")
	var added atomic.Bool
	hooks := requeueHooks{handBack: func(tid string) {
		if tid != id || added.Swap(true) {
			return
		}
		// A cancel for the task's next owner (as Manager.Cancel sends one
		// that reaches the copy now), without its announcement.
		if _, err := leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: "stopped by the test"}); err != nil {
			t.Error(err)
		}
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	msg := endsWith(t, live, id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second)
	if msg != "stopped by the test" {
		t.Fatalf("message %q, want the cancel's reason", msg)
	}
	// The row's first close runs after the end is stored (closeCancel,
	// or the reconcile's CloseEnded): waited for.
	waitFor(t, "the cancel row's first close to be refused", 10*time.Second, func() bool {
		return d.failures(t, "take_fail_once") >= 1
	})
	waitFor(t, "the cancel's row to be closed", 10*time.Second, func() bool {
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND (NOT done OR result IS NULL)`, id).Scan(&n)
		return err == nil && n == 0
	})
}

// A cancel left for a task handed back to the queue, whose claimer cannot
// adopt the task to end it (here: once) — and, with the claimer that took
// the cancel's row first, could not open the row again either (PostgreSQL
// refuses that here) — is not lost: the task is not run and ends
// CANCELLED, and the cancel's row is closed with a result. (The claimer
// took the row (done), left the lease to expire; the sweep queued the task
// again and the next claim, finding no cancel not done, ran it: SUCCESS.)
func TestQueuedCancelWhoseAdoptionFailsIsNotLost(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id, ctx, leases := d.pg, d.url, d.id, d.ctx, d.leases
	d.exec(t, `
		CREATE FUNCTION refuse_reopen() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			RAISE EXCEPTION 'the test refuses to open a command again';
		END $$;
		CREATE TRIGGER refuse_reopen BEFORE UPDATE ON fleet_commands
			FOR EACH ROW WHEN (NEW.task_id = '%[1]s' AND OLD.done AND NOT NEW.done) EXECUTE FUNCTION refuse_reopen();`)
	var added, failed atomic.Bool
	hooks := requeueHooks{
		handBack: func(tid string) {
			if tid != id || added.Swap(true) {
				return
			}
			// A cancel for the task's next owner, without its announcement.
			if _, err := leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: "stopped by the test"}); err != nil {
				t.Error(err)
			}
		},
		adopt: func(tid string) error {
			if tid != id || !added.Load() || failed.Swap(true) {
				return nil
			}
			return errors.New("the test fails this adoption")
		},
	}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	msg := endsWith(t, live, id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second)
	if !failed.Load() {
		t.Fatal("the adoption was never failed")
	}
	if msg != "stopped by the test" {
		t.Fatalf("message %q, want the cancel's reason", msg)
	}
	waitFor(t, "the cancel's row to be closed", 10*time.Second, func() bool {
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND (NOT done OR result IS NULL)`, id).Scan(&n)
		return err == nil && n == 0
	})
}

// cancelInHook is a requeue hook that cancels task id on the live replica
// once, synchronously, as a client would, and keeps the outcome in out.
func cancelInHook(t *testing.T, id string, live *atomic.Pointer[replica], out *atomic.Pointer[task.CancelOutcome]) func(string) {
	return func(tid string) {
		if tid != id || out.Load() != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		o, err := live.Load().mgr.Cancel(ctx, id, "stopped by the test", false)
		if err != nil {
			t.Errorf("cancel: %v", err)
		}
		out.Store(&o)
	}
}

// wantCancelledInHook checks the client was told "cancelled" by the
// cancel of cancelInHook and the task ended with its reason.
func wantCancelledInHook(t *testing.T, msg string, out *atomic.Pointer[task.CancelOutcome]) {
	t.Helper()
	if o := out.Load(); o == nil || !o.Cancelled {
		t.Fatalf("cancel outcome %+v, want cancelled (the hook did not run if nil)", o)
	}
	if msg != "stopped by the test" {
		t.Fatalf("message %q, want the cancel's reason", msg)
	}
}

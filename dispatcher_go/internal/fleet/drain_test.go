package fleet

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// refuseTaskWrites makes PostgreSQL refuse every write of d's task's
// record and events (a real error of the statement, which the store writer
// retries, as when the database fails then) until the returned func is
// called.
func refuseTaskWrites(t *testing.T, d *deadTask) (allow func()) {
	t.Helper()
	d.exec(t, `
		CREATE FUNCTION refuse_task_writes() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN
			RAISE EXCEPTION 'the test refuses this write';
		END $$;
		CREATE TRIGGER refuse_task_record BEFORE INSERT OR UPDATE ON tasks
			FOR EACH ROW WHEN (NEW.id = '%[1]s') EXECUTE FUNCTION refuse_task_writes();
		CREATE TRIGGER refuse_task_events BEFORE INSERT ON events
			FOR EACH ROW WHEN (NEW.task_id = '%[1]s') EXECUTE FUNCTION refuse_task_writes();`)
	return func() {
		d.exec(t, `DROP TRIGGER refuse_task_record ON tasks; DROP TRIGGER refuse_task_events ON events`)
	}
}

// A task cancelled on the replica handing it back to the queue is kept
// there, ended CANCELLED (keepCancelled); that replica then drains
// (SIGTERM: its fleet stops, then its store writer closes) before the end
// could be stored (PostgreSQL refused the task's writes until then). The
// task ends CANCELLED with the cancel's reason and is never run elsewhere:
// the kept cancel is a durable command, which the task's next owner
// carries out. (The end was lost with the writer, and the lease, never
// released, expired: another replica's sweep found the task PENDING, queued
// it and ran it to SUCCESS.)
func TestDrainThatClosesItsWriterBeforeAKeptCancelIsStoredEndsCancelled(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	var live atomic.Pointer[replica]
	var out atomic.Pointer[task.CancelOutcome]
	cancelLocally := cancelInHook(t, id, &live, &out)
	refused := make(chan func(), 1)
	hooks := requeueHooks{stored: func(tid string) {
		if tid != id || out.Load() != nil {
			return
		}
		refused <- refuseTaskWrites(t, d)
		cancelLocally(tid)
	}}
	live.Store(startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks))
	var allow func()
	select {
	case allow = <-refused:
	case <-time.After(20 * time.Second):
		t.Fatal("the hook did not run")
	}
	l := live.Load()
	waitFor(t, "the kept copy to end CANCELLED here", 10*time.Second, func() bool {
		c := l.mgr.Registry().Get(id)
		return c != nil && !c.IsView() && c.Status() == agentpb.TaskStatus_CANCELLED
	})
	l.f.Drain(d.ctx)
	l.kill() // the drain's end: the fleet stops, then the writer closes
	allow()
	if st, _ := storedStatus(t, l, id); task.Terminal(st) {
		t.Fatalf("the end was stored (%s): the test needs it lost with the writer", st)
	}
	other := startReplica(t, pg, url, "other", &testSlot{finish: true})
	msg := endsWith(t, other, id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second)
	wantCancelledInHook(t, msg, &out)
}

// A task queued on a replica (claimed from the bus, waiting for a slot)
// that a client cancels there while PostgreSQL refuses the task's writes;
// the replica then drains (its fleet stops, then its store writer closes)
// with the CANCELLED end not stored. The task ends CANCELLED with the
// cancel's reason, never run elsewhere: the stopping replica writes the
// cancel as a durable command for the task's next owner. (The end was lost
// with the writer; the lease expired and another replica's sweep found
// the task PENDING, queued it and ran it to SUCCESS.)
func TestDrainThatClosesItsWriterBeforeALocalCancelIsStoredEndsCancelled(t *testing.T) {
	pg := openStore(t)
	url := redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// Its slot serves another planner: the task waits in its queue.
	live := startBystander(t, pg, url, "live")
	tk, err := live.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	d := &deadTask{pg: pg, url: url, id: tk.ID(), ctx: ctx, leases: live.f.leases}
	if err := live.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	attempt, cmd, err := live.f.leases.ClaimQueued(ctx, d.id, live.f.id)
	if err != nil || cmd != nil {
		t.Fatalf("claim: %v (cancel %v)", err, cmd)
	}
	live.f.fenced.own(d.id, attempt)
	if err := live.f.adopt(ctx, d.id, attempt, true); err != nil {
		t.Fatal(err)
	}
	allow := refuseTaskWrites(t, d)
	out, err := live.mgr.Cancel(ctx, d.id, "stopped by the test", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	live.f.Drain(ctx)
	live.kill() // the drain's end: the fleet stops, then the writer closes
	allow()
	if st, _ := storedStatus(t, live, d.id); st != agentpb.TaskStatus_PENDING {
		t.Fatalf("stored %s: the test needs the end lost with the writer", st)
	}
	other := startReplica(t, pg, url, "other", &testSlot{finish: true})
	if msg := endsWith(t, other, d.id, agentpb.TaskStatus_CANCELLED, 0, 20*time.Second); msg != "stopped by the test" {
		t.Fatalf("message %q, want the cancel's reason", msg)
	}
}

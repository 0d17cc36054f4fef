package task

import (
	"context"
	"errors"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
)

// TestStoreUnavailable: once the store writer is unhealthy, Submit is
// refused at once, Get answers from memory (UNAVAILABLE for a task not
// there), List answers live tasks from memory and refuses a listing that
// needs the store; a submission accepted just before the store failed keeps
// its id. All is back to normal once the store recovers.
func TestStoreUnavailable(t *testing.T) {
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	f := storetest.NewFaulty(st)
	m, _, w := durableManager(t, f)
	t.Cleanup(f.Heal) // before the writer is closed (cleanups run last first)
	ctx := context.Background()

	f.Fail(time.Minute)
	accepted, err := m.Submit(Spec{Instruction: "accepted as the store fails"})
	if err != nil {
		t.Fatalf("submission accepted while the writer was healthy: %v", err)
	}
	if w.Health() == nil {
		t.Fatal("writer healthy after its write failed")
	}
	if _, err := m.Submit(Spec{Instruction: "refused"}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Submit while unavailable: %v", err)
	}
	if got, err := m.Get(accepted.ID()); err != nil || got != accepted {
		t.Fatalf("Get of a task in memory: %v %v", got, err)
	}
	if _, err := m.Get(NewID()); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Get of a task not in memory: %v, want unavailable", err)
	}
	if _, _, err := m.List(ctx, nil, 10, nil); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("List of all tasks: %v, want unavailable", err)
	}
	if _, _, err := m.List(ctx, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, 10, nil); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("List of finished tasks: %v, want unavailable", err)
	}
	live, _, err := m.List(ctx, []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING}, 10, nil)
	if err != nil || len(live) != 1 || live[0].ID != accepted.ID() {
		t.Fatalf("List of live tasks: %v %v", live, err)
	}
	out, err := m.Cancel(ctx, accepted.ID(), "", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("Cancel while unavailable: %+v %v", out, err)
	}

	changed := w.HealthChanged()
	f.Heal()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("writer not healthy again after the store recovered")
	}
	if _, err := m.Submit(Spec{Instruction: "accepted again"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if rec, err := st.GetTask(ctx, accepted.ID()); err != nil || rec.Status != int32(agentpb.TaskStatus_CANCELLED) {
		t.Fatalf("record written after the outage: %v %v", rec.Status, err)
	}
}

// TestShutdownEndsATaskBeingHandedOver: a task out of the queue but not
// started yet (the scheduler starts it after its lock) is ended by the
// drain, and its start then fails.
func TestShutdownEndsATaskBeingHandedOver(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	q.take(tk) // handed out; Deliver not yet called
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m.Shutdown(ctx)
	if st := tk.Status(); st != agentpb.TaskStatus_FAILURE {
		t.Fatalf("task in hand-over after the drain: %v", st)
	}
	if err := tk.Start(&fakeRunner{t: tk}, "c", "s"); !errors.Is(err, ErrNotPending) {
		t.Fatalf("start after the drain: %v", err)
	}
}

// givingBackQueue is a queue whose slot dies exactly while a cancel looks
// for the task: the first Remove misses it, and the task is put back.
type givingBackQueue struct {
	fakeQueue
	missed bool
}

func (q *givingBackQueue) Remove(t *Task) bool {
	if !q.missed {
		q.missed = true
		_ = q.Enqueue(t) // the scheduler gives the task back just now
		return false
	}
	return q.fakeQueue.Remove(t)
}

// TestCancelRemovesATaskGivenBackDuringHandOver: a cancel that misses the
// task in the queue (it was being handed over) ends it and takes it out of
// the queue again, in case its slot died and it was put back meanwhile.
func TestCancelRemovesATaskGivenBackDuringHandOver(t *testing.T) {
	m, _ := newManager(t, ManagerOptions{})
	q := &givingBackQueue{}
	m.SetQueue(q)
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	q.take(tk)
	out, err := m.Cancel(context.Background(), tk.ID(), "", false)
	if err != nil || !out.Cancelled || tk.Status() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v, status %v", out, err, tk.Status())
	}
	if len(q.tasks) != 0 {
		t.Fatalf("cancelled task left in the queue: %v", q.tasks)
	}
}

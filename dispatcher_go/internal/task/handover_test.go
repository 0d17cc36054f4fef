package task

import (
	"context"
	"errors"
	"testing"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

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

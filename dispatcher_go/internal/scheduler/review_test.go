package scheduler

import (
	"slices"
	"testing"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestTaskEndedAfterSlotGoneIsNotPutBack: a slot dies during the hand-over
// (Deliver answers SlotGone) and a cancel ends the task just after deliver
// looked at its status but before it placed the task again. The cancel's
// second Remove (see task.Manager.Cancel) comes before the placement, so it
// does not find the task; the placement must then see the task ended and
// not queue it, or a terminal task sits in the queue (counted against its
// bound, pinned in memory) until some slot that matches it comes along.
//
// Not parallel: it waits for "a goroutine blocked in deliver", which must be
// this test's own.
func TestTaskEndedAfterSlotGoneIsNotPutBack(t *testing.T) {
	s, m := setup(t, 10)
	tk := submit(t, m, "chat", "gpu") // only the dying slot can run it
	dying := &hookSlot{fakeSlot: newSlot("dying", "planner:chat", "gpu")}
	delivering, locked := make(chan struct{}), make(chan struct{})
	dying.hook = func(*task.Task) Delivery {
		close(delivering)
		<-locked
		return SlotGone
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.AddSlot(dying)
	}()
	// Hold the scheduler's lock as a concurrent Remove (a cancel) would:
	// deliver stops at its s.mu.Lock.
	testutil.Done(t, delivering, testutil.Wait, "Deliver to be called")
	s.mu.Lock()
	close(locked)
	testutil.WaitFor(t, testutil.Wait, func() bool { return testutil.Blocked("scheduler.(*Scheduler).deliver") },
		"deliver to wait for the scheduler's lock after SlotGone")
	// What task.Manager.Cancel does while deliver waits: its Remove does not
	// find the task (not queued), it ends the task, its second Remove does
	// not find it either (still not queued).
	if slices.ContainsFunc(s.queue, func(q queued) bool { return q.t == tk }) {
		t.Fatal("task queued during its hand-over")
	}
	if !tk.Finish(agentpb.TaskStatus_CANCELLED, "cancelled", "") {
		t.Fatal("finish")
	}
	if slices.ContainsFunc(s.queue, func(q queued) bool { return q.t == tk }) {
		t.Fatal("task queued during its hand-over")
	}
	s.mu.Unlock()
	testutil.Done(t, done, testutil.Wait, "AddSlot to return")
	if st := s.Stats(); st.Queued != 0 {
		t.Fatalf("a cancelled task was put back in the queue: %+v", st)
	}
}

package task

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// stallQueue is fakeQueue whose Remove of one task waits until released:
// a Manager.Cancel stalled after its checks, before it ends the copy.
type stallQueue struct {
	fakeQueue
	stall   atomic.Pointer[Task]
	reached chan struct{}
	release chan struct{}
}

func (q *stallQueue) Remove(t *Task) bool {
	if q.stall.CompareAndSwap(t, nil) {
		close(q.reached)
		<-q.release
	}
	return q.fakeQueue.Remove(t)
}

// countSink makes every event durable at once and counts them by task.
type countSink struct {
	mu sync.Mutex
	n  map[string]int
}

func (*countSink) WaitRoom(<-chan struct{}) {}
func (s *countSink) Persist(c eventlog.Committer, id string, ev *dispatchv1.TaskEvent) {
	s.mu.Lock()
	s.n[id]++
	s.mu.Unlock()
	go c.Commit(ev.GetSeq())
}
func (*countSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}
func (s *countSink) count(id string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n[id]
}

// A client's cancel of a fleet task's copy stalls (here in the queue's
// Remove, after its checks: the copy was still registered, not handed
// back) while the fleet forgets that copy (a requeue whose record could
// not be flushed) and the same replica claims the task again (a new
// copy, a new lease attempt). When the cancel goes on, the forgotten copy
// records nothing (its end would be written under the new attempt: the
// fence checks the attempt this replica holds when the write runs, not
// the one the copy was claimed with); the cancel goes through the fleet.
// (The stale copy's CANCELLED event and record went to the store.)
func TestFleetForgottenCopyRecordsNothingForAStalledCancel(t *testing.T) {
	p := &memPersist{saved: map[string]Snapshot{}}
	sink := &countSink{n: map[string]int{}}
	m := NewManager(eventlog.NewDurable(eventlog.Limits{}, sink), NewConfigStore(nil),
		ManagerOptions{DefaultPlanner: "chat", StopGrace: 100 * time.Millisecond, Persistence: p})
	q := &stallQueue{reached: make(chan struct{}), release: make(chan struct{})}
	m.SetQueue(q)
	f := &fakeFleet{p: p, requests: map[string]string{}}
	m.SetFleet(f)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
	old, err := m.Adopt(s, 4, false)
	if err != nil {
		t.Fatal(err)
	}
	q.stall.Store(old)
	type result struct {
		out CancelOutcome
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := m.Cancel(context.Background(), s.ID, "stopped by the test", false)
		done <- result{out, err}
	}()
	select {
	case <-q.reached:
	case <-time.After(5 * time.Second):
		t.Fatal("the cancel did not reach the queue")
	}
	m.Forget(s.ID)
	again, err := m.Adopt(s, 4, false)
	if err != nil {
		t.Fatal(err)
	}
	close(q.release)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if n := sink.count(s.ID); n != 0 || p.last(s.ID).ID != "" {
		t.Fatalf("the forgotten copy recorded %d events and saved %q (%s) after the re-claim", n, p.last(s.ID).ID, p.last(s.ID).Status)
	}
	f.mu.Lock()
	sent := len(f.cancelled)
	f.mu.Unlock()
	if sent != 1 || !r.out.Cancelled || again.Status() != agentpb.TaskStatus_PENDING {
		t.Fatalf("cancels sent through the fleet %d, outcome %+v, new copy %s; want 1, cancelled, PENDING", sent, r.out, again.Status())
	}
}

package scheduler

import (
	"context"
	"testing"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// hookSlot is a slot whose Deliver runs hook (if set) and answers with its
// result; without a hook it starts the task like a real slot would.
type hookSlot struct {
	*fakeSlot
	hook func(t *task.Task) Delivery
}

func (s *hookSlot) Deliver(t *task.Task) Delivery {
	if s.hook != nil {
		return s.hook(t)
	}
	return s.fakeSlot.Deliver(t)
}

// stubRunner lets a test start a task (Task.Start needs a Runner).
type stubRunner struct{}

func (stubRunner) Stop(string, dispatchv1.StopCode) bool { return true }
func (stubRunner) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, nil
}

// start moves t to RUNNING as a session would, or reports TaskGone.
func start(t *task.Task) Delivery {
	if t.Start(stubRunner{}, "c", "s") != nil {
		return TaskGone
	}
	return Started
}

// within fails the test if f does not return in time: a Deliver called
// under the scheduler's lock deadlocks when it calls back in.
func within(t *testing.T, what string, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	testutil.Done(t, done, testutil.Wait, "%s to return (a Deliver under the scheduler's lock deadlocks)", what)
}

// reentrant makes sl's Deliver call back into s (Stats) and note what it
// saw in seen, then answer with then (nil: start the task like a real slot).
func reentrant(s *Scheduler, sl *hookSlot, seen *[]Stats, then func(*task.Task) Delivery) {
	sl.hook = func(tk *task.Task) Delivery {
		*seen = append(*seen, s.Stats())
		if then != nil {
			return then(tk)
		}
		return sl.fakeSlot.Deliver(tk)
	}
}

// TestDeliverRunsWithoutTheSchedulerLock: every path that hands a task
// over (Enqueue, AddSlot, Release, Requeue, a dead slot's task placed again,
// a slot whose task is gone taking the next) calls Deliver after releasing
// the lock, so a Deliver that calls back into the scheduler (Stats) does not
// deadlock, and sees the hand-out already done.
func TestDeliverRunsWithoutTheSchedulerLock(t *testing.T) {
	t.Parallel()
	t.Run("Enqueue and Release", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		var seen []Stats
		a := &hookSlot{fakeSlot: newSlot("a", "planner:chat")}
		reentrant(s, a, &seen, nil)
		within(t, "AddSlot", func() { s.AddSlot(a) })
		var t1 *task.Task
		within(t, "Enqueue to an idle slot", func() { t1, _ = m.Submit(task.Spec{Instruction: "x", Planner: "chat"}) })
		t2 := submit(t, m, "chat") // queued: a is busy
		within(t, "Release", func() { s.Release(a) })
		if got := a.got(); len(got) != 2 || got[0] != t1 || got[1] != t2 {
			t.Fatalf("a got %v", got)
		}
		if len(seen) != 2 || seen[0].Idle != 0 || seen[0].Queued != 0 || seen[1].Queued != 0 {
			t.Fatalf("stats seen from Deliver: %+v", seen)
		}
	})
	t.Run("Requeue to an idle slot", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		var seen []Stats
		a := &hookSlot{fakeSlot: newSlot("a", "planner:chat")}
		reentrant(s, a, &seen, nil)
		s.AddSlot(a)
		var t1 *task.Task
		within(t, "Enqueue to an idle slot", func() { t1, _ = m.Submit(task.Spec{Instruction: "x", Planner: "chat"}) })
		within(t, "Release to idle", func() { s.Release(a) })
		within(t, "Requeue", func() {
			if err := s.Requeue(t1, func() error { return nil }); err != nil {
				t.Error(err)
			}
		})
		if got := a.got(); len(got) != 2 || got[1] != t1 {
			t.Fatalf("requeued task not handed to the idle slot: %v", got)
		}
		if len(seen) != 2 || seen[1].Idle != 0 || seen[1].Queued != 0 {
			t.Fatalf("stats seen from Deliver: %+v", seen)
		}
	})
	// A slot that dies during the hand-over: its task is placed again from
	// the same call, still without the lock.
	t.Run("slot dies, task queued again", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		var seen []Stats
		b := &hookSlot{fakeSlot: newSlot("b", "planner:chat")}
		reentrant(s, b, &seen, nil)
		s.AddSlot(b)
		dying := &hookSlot{fakeSlot: newSlot("dying", "planner:chat", "gpu")}
		reentrant(s, dying, &seen, func(*task.Task) Delivery { return SlotGone })
		s.AddSlot(dying)
		var t3 *task.Task
		within(t, "Enqueue to a dying slot", func() {
			t3, _ = m.Submit(task.Spec{Instruction: "x", Planner: "chat", RequiredCapabilities: []string{"gpu"}})
		})
		// b cannot run it: it waits in the queue.
		if t3 == nil || s.Stats().Queued != 1 || s.SlotCount() != 1 || len(b.got()) != 0 {
			t.Fatalf("dead slot's task not queued again: %+v", s.Stats())
		}
	})
	t.Run("slot dies, task to another slot", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		var seen []Stats
		dying := &hookSlot{fakeSlot: newSlot("dying", "planner:chat")}
		reentrant(s, dying, &seen, func(*task.Task) Delivery { return SlotGone })
		s.AddSlot(dying) // idle longest: handed the task first
		b := &hookSlot{fakeSlot: newSlot("b", "planner:chat")}
		reentrant(s, b, &seen, nil)
		s.AddSlot(b)
		var tk *task.Task
		within(t, "Enqueue to a dying slot", func() { tk, _ = m.Submit(task.Spec{Instruction: "x", Planner: "chat"}) })
		if got := b.got(); len(got) != 1 || got[0] != tk || s.SlotCount() != 1 || s.Stats().Queued != 0 {
			t.Fatalf("b got %v, stats %+v", got, s.Stats())
		}
		if len(seen) != 2 || seen[1].Slots != 1 {
			t.Fatalf("stats seen from Deliver: %+v (the dead slot is dropped before the task goes on)", seen)
		}
	})
	// A slot whose task is gone (cancelled during the hand-over) takes the
	// next one in the same call.
	t.Run("task gone, slot takes the next", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		var seen []Stats
		t3 := submit(t, m, "chat", "gpu")
		t4 := submit(t, m, "chat", "gpu") // queued behind t3
		gone := &hookSlot{fakeSlot: newSlot("gone", "planner:chat", "gpu")}
		reentrant(s, gone, &seen, func(tk *task.Task) Delivery {
			if tk == t3 {
				return TaskGone
			}
			return gone.fakeSlot.Deliver(tk)
		})
		within(t, "AddSlot with a task gone", func() { s.AddSlot(gone) })
		if got := gone.got(); len(got) != 1 || got[0] != t4 {
			t.Fatalf("after TaskGone the slot got %v, want the next task", got)
		}
		if len(seen) != 2 || seen[0].Queued != 1 || seen[1].Queued != 0 {
			t.Fatalf("stats seen from Deliver: %+v", seen)
		}
	})
}

// TestGivenBackTaskKeepsItsPlace: a task whose slot died during the
// hand-over goes back where it was in the line, even if tasks were queued
// meanwhile (FIFO by admission); a requeued task stays first.
func TestGivenBackTaskKeepsItsPlace(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	t1 := submit(t, m, "chat")
	t2 := submit(t, m, "chat")
	var t3 *task.Task
	dying := &hookSlot{fakeSlot: newSlot("dying", "planner:chat")}
	dying.hook = func(tk *task.Task) Delivery {
		if tk != t1 {
			t.Errorf("handed %v, want the oldest", tk)
		}
		var err error
		if t3, err = m.Submit(task.Spec{Instruction: "x", Planner: "chat"}); err != nil { // queued during the hand-over
			t.Error(err)
		}
		return SlotGone
	}
	within(t, "AddSlot", func() { s.AddSlot(dying) })
	live := newSlot("live", "planner:chat")
	s.AddSlot(live)
	s.Release(live)
	s.Release(live)
	if got := live.got(); len(got) != 3 || got[0] != t1 || got[1] != t2 || got[2] != t3 {
		t.Fatalf("order %v, want t1 t2 t3", got)
	}
}

// TestCancelDuringHandOver: a cancel that comes between the hand-out and the
// start does not find the task queued; it ends the task itself, the start
// then fails and the slot takes the next task. A task whose slot died in
// the same window is not put back in the queue.
func TestCancelDuringHandOver(t *testing.T) {
	t.Parallel()
	t.Run("start fails, slot takes the next", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		victim := submit(t, m, "chat")
		next := submit(t, m, "chat")
		var out task.CancelOutcome
		sl := &hookSlot{fakeSlot: newSlot("a", "planner:chat")}
		sl.hook = func(tk *task.Task) Delivery {
			if tk == victim {
				var err error
				out, err = m.Cancel(context.Background(), victim.ID(), "", false)
				if err != nil {
					t.Error(err)
				}
			}
			if d := start(tk); d != Started {
				return d
			}
			return sl.fakeSlot.Deliver(tk)
		}
		within(t, "AddSlot", func() { s.AddSlot(sl) })
		if !out.Cancelled || victim.Status() != agentpb.TaskStatus_CANCELLED {
			t.Fatalf("cancel during the hand-over: %+v, status %v", out, victim.Status())
		}
		if got := sl.got(); len(got) != 1 || got[0] != next || next.Status() != agentpb.TaskStatus_RUNNING {
			t.Fatalf("slot got %v (next %v), want the next task running", got, next.Status())
		}
	})
	t.Run("slot dies, task not queued again", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 10)
		other := submit(t, m, "chat")
		dying := &hookSlot{fakeSlot: newSlot("dying", "planner:chat")}
		dying.hook = func(tk *task.Task) Delivery {
			if _, err := m.Cancel(context.Background(), tk.ID(), "", false); err != nil {
				t.Error(err)
			}
			return SlotGone
		}
		within(t, "AddSlot", func() { s.AddSlot(dying) })
		if st := s.Stats(); st.Queued != 0 || other.Status() != agentpb.TaskStatus_CANCELLED {
			t.Fatalf("cancelled task put back: %+v, %v", st, other.Status())
		}
	})
}

package scheduler

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeSlot records deliveries; dead makes Deliver fail.
type fakeSlot struct {
	name    string
	caps    map[string]bool
	tenants []string // empty: every tenant
	dead    bool
	mu      sync.Mutex
	tasks   []*task.Task
}

func newSlot(name string, caps ...string) *fakeSlot {
	s := &fakeSlot{name: name, caps: map[string]bool{}}
	for _, c := range caps {
		s.caps[c] = true
	}
	return s
}

func (s *fakeSlot) HasCapability(c string) bool { return s.caps[c] }

func (s *fakeSlot) ServesTenant(t string) bool {
	return len(s.tenants) == 0 || slices.Contains(s.tenants, t)
}

func (s *fakeSlot) PlannerCapabilities() []string {
	var out []string
	for c := range s.caps {
		if strings.HasPrefix(c, "planner:") {
			out = append(out, c)
		}
	}
	return out
}

func (s *fakeSlot) Deliver(t *task.Task) Delivery {
	if s.dead {
		return SlotGone
	}
	s.mu.Lock()
	s.tasks = append(s.tasks, t)
	s.mu.Unlock()
	return Started
}

func (s *fakeSlot) got() []*task.Task {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*task.Task(nil), s.tasks...)
}

func setup(t *testing.T, queue int) (*Scheduler, *task.Manager) {
	t.Helper()
	s := New(queue)
	m := task.NewManager(eventlog.NewMemory(eventlog.Limits{}), task.NewConfigStore(nil), task.ManagerOptions{})
	m.SetQueue(s)
	return s, m
}

func submit(t *testing.T, m *task.Manager, planner string, caps ...string) *task.Task {
	t.Helper()
	tk, err := m.Submit(task.Spec{Instruction: "x", Planner: planner, RequiredCapabilities: caps})
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

func TestPendingUntilASlotMatches(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	tk := submit(t, m, "gui", "os:linux")
	if st := s.Stats(); st.Queued != 1 {
		t.Fatalf("stats %+v", st)
	}
	chat := newSlot("chat", "planner:chat", "os:linux")
	s.AddSlot(chat)
	guiWin := newSlot("gui-win", "planner:gui", "os:windows")
	s.AddSlot(guiWin)
	if len(chat.got())+len(guiWin.got()) != 0 {
		t.Fatal("task went to a slot without the capabilities")
	}
	guiLinux := newSlot("gui-linux", "planner:gui", "os:linux")
	s.AddSlot(guiLinux)
	if got := guiLinux.got(); len(got) != 1 || got[0] != tk {
		t.Fatalf("matching slot got %v", got)
	}
	st := s.Stats()
	if st.Slots != 3 || st.Idle != 2 || st.Queued != 0 || s.SlotCount() != 3 {
		t.Fatalf("stats %+v", st)
	}
}

func TestIdleSlotTakesTaskAtOnceAndBusySlotDoesNot(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	sl := newSlot("a", "planner:chat")
	s.AddSlot(sl)
	t1 := submit(t, m, "chat")
	t2 := submit(t, m, "chat")
	if got := sl.got(); len(got) != 1 || got[0] != t1 {
		t.Fatalf("got %v", got)
	}
	if s.Stats().Queued != 1 {
		t.Fatal("second task should wait")
	}
	s.Release(sl)
	if got := sl.got(); len(got) != 2 || got[1] != t2 {
		t.Fatalf("after release: %v", got)
	}
	s.Release(sl)
	if st := s.Stats(); st.Idle != 1 {
		t.Fatalf("slot should be idle: %+v", st)
	}
}

func TestQueueFull(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 2)
	submit(t, m, "chat")
	submit(t, m, "chat")
	if _, err := m.Submit(task.Spec{Instruction: "x"}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("err = %v, want ErrQueueFull", err)
	}
	if s.Stats().Queued != 2 {
		t.Fatal("queue changed")
	}
}

func TestFIFOAndSkipOfUnmatchable(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	gui := submit(t, m, "gui")
	c1 := submit(t, m, "chat")
	c2 := submit(t, m, "chat")
	sl := newSlot("chat", "planner:chat")
	s.AddSlot(sl)
	s.Release(sl)
	if got := sl.got(); len(got) != 2 || got[0] != c1 || got[1] != c2 {
		t.Fatalf("order %v", got)
	}
	if !s.Remove(gui) || s.Remove(gui) {
		t.Fatal("Remove must succeed once")
	}
}

func TestDeadSlotIsDroppedAndTaskKept(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	dead := newSlot("dead", "planner:chat")
	s.AddSlot(dead)
	dead.dead = true
	tk := submit(t, m, "chat")
	if s.SlotCount() != 0 || s.Stats().Queued != 1 {
		t.Fatalf("stats %+v", s.Stats())
	}
	if tk.Status() != agentpb.TaskStatus_PENDING {
		t.Fatal("task must stay pending")
	}
	live := newSlot("live", "planner:chat")
	s.AddSlot(live)
	if len(live.got()) != 1 {
		t.Fatal("task not given to the live slot")
	}
}

func TestRemoveSlot(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	sl := newSlot("a", "planner:chat")
	s.AddSlot(sl)
	s.RemoveSlot(sl)
	submit(t, m, "chat")
	if len(sl.got()) != 0 || s.SlotCount() != 0 {
		t.Fatal("removed slot got a task")
	}
	s.Release(sl) // unknown slot: ignored
	if s.SlotCount() != 0 {
		t.Fatal("Release re-registered a removed slot")
	}
}

func TestConcurrentSubmitAndSlots(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10000)
	var wg sync.WaitGroup
	slots := make([]*fakeSlot, 8)
	for i := range slots {
		slots[i] = newSlot("s", "planner:chat")
		s.AddSlot(slots[i])
	}
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				if _, err := m.Submit(task.Spec{Instruction: "x"}); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for _, sl := range slots {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				s.Release(sl)
			}
		}()
	}
	testutil.Done(t, waitGroup(&wg), testutil.Wait, "the submitters and releasers to finish")
	total := 0
	for _, sl := range slots {
		total += len(sl.got())
	}
	if total+s.Stats().Queued != 800 {
		t.Fatalf("delivered %d + queued %d != 800", total, s.Stats().Queued)
	}
}

// waitGroup is closed once wg's goroutines are done.
func waitGroup(wg *sync.WaitGroup) <-chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		wg.Wait()
	}()
	return done
}

// A task whose slot died before the commander heard of it goes back to the
// head of the queue (beyond the bound: it was admitted already), or straight
// to an idle slot; a failing reset queues nothing.
func TestRequeueAtTheHead(t *testing.T) {
	t.Parallel()
	t.Run("queued first", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 2)
		a := newSlot("a", "planner:chat")
		s.AddSlot(a)
		t0 := submit(t, m, "chat") // to a
		t1 := submit(t, m, "chat")
		t2 := submit(t, m, "chat")
		s.RemoveSlot(a) // a's stream died with t0's start unsent

		errNo := errors.New("no")
		if err := s.Requeue(t0, func() error { return errNo }); !errors.Is(err, errNo) {
			t.Fatalf("failing reset: %v", err)
		}
		if s.Stats().Queued != 2 {
			t.Fatal("a failed requeue queued the task")
		}
		resets := 0
		if err := s.Requeue(t0, func() error { resets++; return nil }); err != nil || resets != 1 {
			t.Fatalf("requeue: %v (resets %d)", err, resets)
		}
		if s.Stats().Queued != 3 {
			t.Fatalf("stats %+v", s.Stats())
		}
		b := newSlot("b", "planner:chat")
		s.AddSlot(b)
		s.Release(b)
		s.Release(b)
		if got := b.got(); len(got) != 3 || got[0] != t0 || got[1] != t1 || got[2] != t2 {
			t.Fatalf("order after requeue: %v", got)
		}
	})
	t.Run("to an idle slot at once", func(t *testing.T) {
		t.Parallel()
		s, m := setup(t, 2)
		b := newSlot("b", "planner:chat")
		s.AddSlot(b)
		tk := submit(t, m, "chat") // to b
		s.Release(b)
		if err := s.Requeue(tk, func() error { return nil }); err != nil {
			t.Fatal(err)
		}
		if got := b.got(); len(got) != 2 || got[1] != tk || s.Stats().Queued != 0 {
			t.Fatalf("idle slot: %v, stats %+v", got, s.Stats())
		}
	})
}

// TestTakeUnserved: only tasks that waited long enough and that no slot,
// idle or busy, could run are taken out; a busy matching slot keeps its
// tasks waiting, and taken tasks are no longer handed to a slot.
func TestTakeUnserved(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	busy := newSlot("chat", "planner:chat")
	s.AddSlot(busy)
	running := submit(t, m, "chat") // takes the only chat slot
	waiting := submit(t, m, "chat") // waits for it
	gui := submit(t, m, "gui")
	capped := submit(t, m, "chat", "os:windows")
	if got := busy.got(); len(got) != 1 || got[0] != running {
		t.Fatalf("busy slot got %v", got)
	}
	now := time.Now()
	if got := s.TakeUnserved(now, time.Minute); len(got) != 0 {
		t.Fatalf("taken before the wait: %v", got)
	}
	got := s.TakeUnserved(now.Add(time.Minute), time.Minute)
	if len(got) != 2 || got[0] != gui || got[1] != capped {
		t.Fatalf("taken %v, want the gui and the windows task", got)
	}
	if st := s.Stats(); st.Queued != 1 {
		t.Fatalf("stats %+v: the waiting chat task must stay", st)
	}
	s.AddSlot(newSlot("gui", "planner:gui"))
	if gui.Status() != agentpb.TaskStatus_PENDING {
		t.Fatalf("a taken task was started: %v", gui.Status())
	}
	_ = waiting
}

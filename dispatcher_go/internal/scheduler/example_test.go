package scheduler_test

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// slot is a commander slot as the scheduler sees it: the capabilities of
// its hello, and a Deliver that starts a task on it.
type slot struct {
	name  string
	caps  []string
	sched *scheduler.Scheduler
}

func (s *slot) HasCapability(c string) bool { return slices.Contains(s.caps, c) }

func (s *slot) ServesTenant(string) bool { return true }

func (s *slot) PlannerCapabilities() []string {
	var out []string
	for _, c := range s.caps {
		if strings.HasPrefix(c, "planner:") {
			out = append(out, c)
		}
	}
	return out
}

// Deliver runs after the scheduler released its lock: it may call back into
// the scheduler (Stats here; under the lock it would deadlock), and it sees
// the hand-out done: the task is out of the queue, the slot is busy.
func (s *slot) Deliver(t *task.Task) scheduler.Delivery {
	st := s.sched.Stats()
	fmt.Printf("%s starts %q (queued %d, idle %d)\n", s.name, t.Instruction(), st.Queued, st.Idle)
	if err := t.Start(session{}, "commander-1", "session-of-"+s.name); err != nil {
		return scheduler.TaskGone // cancelled during the hand-over
	}
	return scheduler.Started
}

// session stands for the commander session a real slot runs the task in.
type session struct{}

func (session) Stop(string, dispatchv1.StopCode) bool { return true }
func (session) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, nil
}

// A task goes to an idle slot that offers its planner at once; while the
// slot is busy the next one waits in the queue, and the slot takes it when
// it is released. Each Deliver is called outside the scheduler's lock.
func Example() {
	sched := scheduler.New(16)
	tasks := task.NewManager(eventlog.NewMemory(eventlog.DefaultLimits), task.NewConfigStore(nil), task.ManagerOptions{})
	tasks.SetQueue(sched) // Submit hands each new task to sched.Enqueue

	sl := &slot{name: "slot-1", caps: []string{scheduler.PlannerCapability("chat"), "os:linux"}, sched: sched}
	sched.AddSlot(sl) // idle; nothing queued yet

	first, err := tasks.Submit(task.Spec{Instruction: "write a haiku", Planner: "chat"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("first:", first.Status())

	second, err := tasks.Submit(task.Spec{Instruction: "translate it", Planner: "chat"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("second:", second.Status(), "queued:", sched.Stats().Queued)

	// The first session ends; the slot is idle again and takes the next task.
	first.Finish(agentpb.TaskStatus_SUCCESS, "completed", "an old silent pond")
	sched.Release(sl)
	fmt.Println("second:", second.Status())

	// Output:
	// slot-1 starts "write a haiku" (queued 0, idle 0)
	// first: RUNNING
	// second: PENDING queued: 1
	// slot-1 starts "translate it" (queued 0, idle 0)
	// second: RUNNING
}

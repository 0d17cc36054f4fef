package api

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// TestPlannerNobodyServes: with Tasks.Planners, a planner outside the list
// is refused at submit; a task whose planner no connected commander serves
// ends FAILURE with the reason after the queue timeout, on TaskService and
// on seed 000 alike — never pending forever.
func TestPlannerNobodyServes(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{
		Planners: []string{"chat", "gui"}, QueueTimeout: 200 * time.Millisecond,
	}})
	_, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "no-such-planner"})
	wantCode(t, err, codes.InvalidArgument)
	if !strings.Contains(err.Error(), `planner "no-such-planner"`) || !strings.Contains(err.Error(), "chat, gui") {
		t.Fatalf("refusal does not say why: %v", err)
	}
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "gui"})
	if err != nil {
		t.Fatal(err)
	}
	tk := waitTerminal(t, h, sub.GetTaskId())
	if tk.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(tk.GetMessage(), "no connected commander serves planner:gui") ||
		!strings.Contains(tk.GetMessage(), "--queue-timeout") {
		t.Fatalf("task %v: %s", tk.GetStatus(), tk.GetMessage())
	}
	st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: sub.GetTaskId()})
	if err != nil || st.GetStatus() != agentpb.TaskStatus_FAILURE || st.GetMessage() != tk.GetMessage() {
		t.Fatalf("seed 000 status %v %v", st, err)
	}
}

// TestNoQueueTimeoutWaits: a negative QueueTimeout (--queue-timeout 0)
// leaves the task pending (the scheduler's TestTakeUnserved covers which
// tasks the timeout takes).
func TestNoQueueTimeoutWaits(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{QueueTimeout: -1}})
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // what is checked is that nothing happens meanwhile
	r, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: sub.GetTaskId()})
	if err != nil || r.GetTask().GetStatus() != agentpb.TaskStatus_PENDING {
		t.Fatalf("with no queue timeout: %v %v", r, err)
	}
}

package api

import (
	"testing"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestPreviousTaskContinuesTheSandbox: the sandbox a session reports
// (SandboxInUse) is the task's sandbox in QueryTaskStatus, and a task that
// continues it (previousTaskId) without a sandbox of its own starts on it;
// one with its own sandbox keeps its own; a sandbox destroyed at the end of
// its task (kept=false) is not handed on.
func TestPreviousTaskContinuesTheSandbox(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")

	run := func(req *dispatchv1.SubmitTaskRequest, report *dispatchv1.SandboxInUse) (string, *dispatchv1.StartSession) {
		t.Helper()
		r, err := h.tasks.SubmitTask(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		sid, start := c.Start()
		if report != nil {
			c.Send(testutil.Up(sid, report))
		}
		c.Send(testutil.Up(sid, testutil.Success("ok")))
		if a := c.Recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
			t.Fatalf("close ack %v", a)
		}
		waitStatus(t, h, r.GetTaskId(), agentpb.TaskStatus_SUCCESS)
		return r.GetTaskId(), start
	}

	first, start := run(&dispatchv1.SubmitTaskRequest{Instruction: "open the terminal"},
		&dispatchv1.SandboxInUse{Sandbox: &agentpb.Sandbox{Id: "SBX-kept"}, Kept: true})
	if start.GetSandbox() != nil {
		t.Fatalf("first task had no sandbox, got %v", start.GetSandbox())
	}
	st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: first})
	if err != nil || st.GetSandbox().GetId() != "SBX-kept" {
		t.Fatalf("QueryTaskStatus sandbox %v (%v)", st.GetSandbox(), err)
	}

	second, start := run(&dispatchv1.SubmitTaskRequest{Instruction: "type in it", PreviousTaskId: first}, nil)
	if start.GetSandbox().GetId() != "SBX-kept" || start.GetPreviousTaskId() != first {
		t.Fatalf("continuing task starts on %v, previous %q", start.GetSandbox(), start.GetPreviousTaskId())
	}
	if len(start.GetHistory()) == 0 {
		t.Fatal("the conversation did not continue")
	}
	// The continuing task's own status shows the sandbox it ran on.
	if st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: second}); st.GetSandbox().GetId() != "SBX-kept" {
		t.Fatalf("second task's sandbox %v", st.GetSandbox())
	}

	_, start = run(&dispatchv1.SubmitTaskRequest{Instruction: "elsewhere", PreviousTaskId: first, Sandbox: &agentpb.Sandbox{Id: "SBX-own"}}, nil)
	if start.GetSandbox().GetId() != "SBX-own" {
		t.Fatalf("a task's own sandbox wins, got %v", start.GetSandbox())
	}

	destroyed, _ := run(&dispatchv1.SubmitTaskRequest{Instruction: "throwaway", DestroySandbox: true},
		&dispatchv1.SandboxInUse{Sandbox: &agentpb.Sandbox{Id: "SBX-gone"}, Kept: false})
	_, start = run(&dispatchv1.SubmitTaskRequest{Instruction: "again", PreviousTaskId: destroyed}, nil)
	if start.GetSandbox() != nil {
		t.Fatalf("a destroyed sandbox was handed on: %v", start.GetSandbox())
	}
}

package api

import (
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// No response is larger than a default client receives (4 MiB): a ListTasks
// page of tasks with long instructions ends early and goes on on the next
// page, and a task's instruction is cut for display (issue 12, class 5).
// Before, the page was ~6 MB and the client failed with RESOURCE_EXHAUSTED.
func TestResponsesFitADefaultClient(t *testing.T) {
	h, _ := newHarness(t, dispatcher.Config{})
	// Megabytes submitted and listed back under -race: took more than
	// testTimeout at load ~30 on 2 cores (SubmitTask DeadlineExceeded).
	ctx := testutil.Context(t, heavyTimeout)
	long := strings.Repeat("答", 400_000) // 1.2 MB, 3-byte characters
	ids := map[string]bool{}
	for range 5 {
		sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: long, Planner: "nobody"})
		if err != nil {
			t.Fatal(err)
		}
		ids[sub.GetTaskId()] = true
	}
	got, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: sub0(ids)})
	if err != nil {
		t.Fatal(err)
	}
	if in := got.GetTask().GetInstruction(); len(in) > maxInstructionBytes || !utf8.ValidString(in) || !strings.HasPrefix(long, in) {
		t.Fatalf("instruction of %d bytes", len(in))
	}
	seen := map[string]bool{}
	token := ""
	pages := 0
	for {
		page, err := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageSize: 100, PageToken: token})
		if err != nil {
			t.Fatalf("page %d: %v", pages, err)
		}
		pages++
		for _, tk := range page.GetTasks() {
			if seen[tk.GetTaskId()] {
				t.Fatalf("task %s listed twice", tk.GetTaskId())
			}
			seen[tk.GetTaskId()] = true
		}
		if token = page.GetNextPageToken(); token == "" {
			break
		}
	}
	for id := range ids {
		if !seen[id] {
			t.Fatalf("task %s never listed (%d pages)", id, pages)
		}
	}
	if pages < 2 {
		t.Fatalf("%d pages: the page was not bounded", pages)
	}
}

// An oversized terminal packet ends its session FAILURE with the reason at
// once (no stopped could follow a stop); the stream takes the next task.
func TestOversizedResultPacketEndsOnlyItsSession(t *testing.T) {
	h, ctx := newHarness(t, dispatcher.Config{GRPC: dispatcher.GRPC{MaxRecvMsgBytes: 64 << 10}})
	c := testutil.Connect(t, ctx, h.conn, "planner:big")
	sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "big"})
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, testutil.Success(strings.Repeat("r", 100<<10))))
	c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool {
		return p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED
	})
	got := waitTerminal(t, h, sub.GetTaskId())
	if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(got.GetMessage(), "a result packet of ") {
		t.Fatalf("task %v", got)
	}
	sub2, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "big"})
	sid2, _ := c.Start()
	c.Send(testutil.Up(sid2, testutil.Success("ok")))
	if got := waitTerminal(t, h, sub2.GetTaskId()); got.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("next task on the same stream %v", got)
	}
}

func sub0(ids map[string]bool) string {
	for id := range ids {
		return id
	}
	return ""
}

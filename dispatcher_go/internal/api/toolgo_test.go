package api

import (
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// A provider call in flight has no goroutine waiting for it (broker.Go):
// a stop still cancels it — the provider is told, the commander gets
// CANCELLED, the log has the result — and the end of the commander's
// stream does too.
func TestProviderCallInFlightIsCancelled(t *testing.T) {
	t.Parallel()
	// The commander acknowledges the stop itself once it has the CANCELLED
	// result; a grace longer than the harness's 500 ms keeps a loaded -race
	// run from ending the stream first.
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{StopGrace: 10 * time.Second}})
	prov, err := h.tools.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "never", Tools: []*dispatchv1.ToolSpec{{Name: "never.answers"}},
	}}}); err != nil {
		t.Fatal(err)
	}
	if w, err := prov.Recv(); err != nil || w.GetWelcome() == nil {
		t.Fatalf("welcome %v %v", w, err)
	}
	nextCancel := func(invocationID string) {
		t.Helper()
		m, err := prov.Recv()
		if err != nil || m.GetCancel().GetInvocationId() != invocationID || m.GetCancel().GetReason() != "cancelled" {
			t.Fatalf("want the cancel of %s, got %v %v", invocationID, m, err)
		}
	}

	// A stop.
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "n1", ToolName: "never.answers", ArgumentsJson: `{}`}))
	inv, err := prov.Recv()
	if err != nil || inv.GetInvoke().GetCallId() != "n1" {
		t.Fatalf("invoke %v %v", inv, err)
	}
	done := testutil.Async(func() (*dispatchv1.CancelTaskResponse, error) {
		return h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId()})
	})
	// The stop and the CANCELLED result, in either order.
	var r *dispatchv1.ToolCallResult
	for stopped := false; !stopped || r == nil; {
		switch p := c.Recv(); {
		case isStop(p):
			stopped = true
		case p.GetToolResult() != nil:
			r = p.GetToolResult()
		}
	}
	if r.GetCallId() != "n1" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED {
		t.Fatalf("result %v", r)
	}
	nextCancel(inv.GetInvoke().GetInvocationId())
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{}))
	if r := testutil.Recv(t, done, testutil.Wait, "CancelTask to return"); r.Err != nil || !r.V.GetCancelled() {
		t.Fatalf("cancel %v %v", r.V, r.Err)
	}
	var results []string
	for _, ev := range watchAll(t, h, sub.GetTaskId(), 0) {
		if tr := ev.GetToolResult(); tr != nil {
			results = append(results, tr.GetResult().GetCallId()+"@"+tr.GetExecutor()+":"+tr.GetResult().GetError().GetCode().String())
		}
	}
	if len(results) != 1 || results[0] != "n1@never:TOOL_ERROR_CODE_CANCELLED" {
		t.Fatalf("tool results in the log: %v", results)
	}

	// The commander's stream ends mid-call (the same slot takes the next
	// task: a second commander could lose it to this one's idle slot).
	if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "y"}); err != nil {
		t.Fatal(err)
	}
	sid2 := c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStart() != nil }).GetSessionId()
	c.Send(testutil.Up(sid2, &dispatchv1.ToolCallRequest{CallId: "n2", ToolName: "never.answers", ArgumentsJson: `{}`}))
	inv, err = prov.Recv()
	if err != nil || inv.GetInvoke().GetCallId() != "n2" {
		t.Fatalf("invoke %v %v", inv, err)
	}
	c.Cancel()
	nextCancel(inv.GetInvoke().GetInvocationId())
	_ = prov.CloseSend()
}

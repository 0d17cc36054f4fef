package api

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// A call of a tool not declared idempotent is invoked only once its
// tool_call event is durable (docs/protocol.md, "Tool calls in flight"):
// a dispatcher that died before the commit would leave a call that ran
// but was not recorded, so the commander would resend it and the next
// dispatcher run it a second time. These tests hold the store's writes
// back (storetest.Faulty) and watch what the provider is sent; the
// provider's queue is FIFO, so an idempotent call sent after a held one
// and invoked before it shows that the held one was not invoked yet.

// actTimeout is world.act's timeout.
const actTimeout = time.Minute

// durProvider connects a provider serving world.act (not idempotent) and
// world.read (idempotent).
func durProvider(t *testing.T, ctx context.Context, h *harness) grpc.BidiStreamingClient[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse] {
	t.Helper()
	prov, err := h.tools.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "world", Tools: []*dispatchv1.ToolSpec{
			{Name: "world.act", TimeoutMs: actTimeout.Milliseconds()},
			{Name: "world.read", Idempotent: true},
		},
	}}}); err != nil {
		t.Fatal(err)
	}
	if w, err := prov.Recv(); err != nil || w.GetWelcome() == nil {
		t.Fatalf("welcome %v %v", w, err)
	}
	t.Cleanup(func() { _ = prov.CloseSend() })
	return prov
}

// nextInvoke is the provider's next message, which must invoke callID.
func nextInvoke(t *testing.T, prov grpc.BidiStreamingClient[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse], callID string) *dispatchv1.Invocation {
	t.Helper()
	m, err := prov.Recv()
	if err != nil || m.GetInvoke().GetCallId() != callID {
		t.Fatalf("want the invocation of %s, got %v %v", callID, m, err)
	}
	return m.GetInvoke()
}

func answer(t *testing.T, prov grpc.BidiStreamingClient[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse], inv *dispatchv1.Invocation) {
	t.Helper()
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), ResultJson: `{"ok":true}`,
	}}}); err != nil {
		t.Fatal(err)
	}
}

// finish ends session sid with a success and waits for its closing ack.
func finish(c *testutil.Commander, sid string) {
	c.Send(testutil.Up(sid, testutil.Success("done")))
	c.RecvUntil(isClosed)
}

// toolCallSeq is the seq of callID's tool_call event in the task's log.
func toolCallSeq(t *testing.T, h *harness, taskID, callID string) uint64 {
	t.Helper()
	for _, ev := range watchAll(t, h, taskID, 0) {
		if ev.GetToolCall().GetCallId() == callID {
			return ev.GetSeq()
		}
	}
	t.Fatalf("no tool_call event of %s", callID)
	return 0
}

// A non-idempotent call waits for its record while the store holds it
// back, and is invoked once it is committed; an idempotent call sent
// after it is invoked (and answered) at once meanwhile.
func TestNonIdempotentCallWaitsForItsRecord(t *testing.T) {
	t.Parallel()
	f := storetest.NewFaulty(openSQLite(t, t.TempDir()))
	h, ctx := newHarness(t, dispatcher.Config{Store: dispatcher.Store{Backend: f}})
	t.Cleanup(f.Heal) // before the harness's cleanup closes the writer
	prov := durProvider(t, ctx, h)
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()

	f.Block(testutil.Wait)
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "a1", ToolName: "world.act", ArgumentsJson: `{}`}))
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "r1", ToolName: "world.read", ArgumentsJson: `{}`}))
	// The idempotent call goes at once, ahead of the held one.
	answer(t, prov, nextInvoke(t, prov, "r1"))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "r1" || r.GetError() != nil {
		t.Fatalf("result %v", r)
	}
	// The store was blocked before the calls were sent, so none of their
	// events is durable yet; the writer meets the block soon.
	testutil.WaitFor(t, testutil.Wait, func() bool { return f.Met() > 0 }, "the writer to meet the blocked store")

	healedAt := time.Now()
	f.Heal()
	inv := nextInvoke(t, prov, "a1")
	stored, err := f.LastSeq(ctx, sub.GetTaskId())
	if err != nil {
		t.Fatal(err)
	}
	answer(t, prov, inv)
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "a1" || r.GetError() != nil {
		t.Fatalf("result %v", r)
	}
	finish(c, sid)
	if seq := toolCallSeq(t, h, sub.GetTaskId(), "a1"); stored < seq {
		t.Fatalf("a1 (event %d) was invoked with the store holding events up to %d", seq, stored)
	}
	// The deadline counts from the call's arrival, not from its release.
	if d := inv.GetDeadline().AsTime(); !d.Before(healedAt.Add(actTimeout)) {
		t.Fatalf("deadline %v, healed at %v: counted from the release", d, healedAt)
	}
}

// An idempotent provider tool is invoked while its record is still held
// back by the store.
func TestIdempotentCallDoesNotWaitForItsRecord(t *testing.T) {
	t.Parallel()
	f := storetest.NewFaulty(openSQLite(t, t.TempDir()))
	h, ctx := newHarness(t, dispatcher.Config{Store: dispatcher.Store{Backend: f}})
	t.Cleanup(f.Heal)
	prov := durProvider(t, ctx, h)
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"}); err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()

	f.Block(testutil.Wait)
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "r1", ToolName: "world.read", ArgumentsJson: `{}`}))
	answer(t, prov, nextInvoke(t, prov, "r1"))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "r1" || r.GetError() != nil {
		t.Fatalf("result %v", r)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool { return f.Met() > 0 }, "the writer to meet the blocked store")
	f.Heal()
	finish(c, sid)
}

// A stop that lands while a non-idempotent call waits for its record ends
// the call CANCELLED, and the call is never invoked, not even once the
// record is durable.
func TestStopWhileWaitingForTheRecordNeverInvokes(t *testing.T) {
	t.Parallel()
	f := storetest.NewFaulty(openSQLite(t, t.TempDir()))
	h, ctx := newHarness(t, dispatcher.Config{
		Store: dispatcher.Store{Backend: f},
		Tasks: dispatcher.Tasks{StopGrace: 10 * time.Second}, // the test acknowledges the stop itself
	})
	t.Cleanup(f.Heal)
	prov := durProvider(t, ctx, h)
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()

	f.Block(testutil.Wait)
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "a1", ToolName: "world.act", ArgumentsJson: `{}`}))
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "r1", ToolName: "world.read", ArgumentsJson: `{}`}))
	// r1's invocation: a1 was received before it and is waiting.
	answer(t, prov, nextInvoke(t, prov, "r1"))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "r1" {
		t.Fatalf("result %v", r)
	}

	done := testutil.Async(func() (*dispatchv1.CancelTaskResponse, error) {
		return h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId()})
	})
	var r *dispatchv1.ToolCallResult
	for stopped := false; !stopped || r == nil; {
		switch p := c.Recv(); {
		case isStop(p):
			stopped = true
		case p.GetToolResult() != nil:
			r = p.GetToolResult()
		}
	}
	if r.GetCallId() != "a1" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED {
		t.Fatalf("result %v", r)
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{}))
	f.Heal()
	if r := testutil.Recv(t, done, testutil.Wait, "CancelTask to return"); r.Err != nil || !r.V.GetCancelled() {
		t.Fatalf("cancel %v %v", r.V, r.Err)
	}
	// The task's end is committed after a1's record, so a1 was released
	// (and dropped) by now; an invocation queued then would come before
	// the next one.
	var results []string
	for _, ev := range watchAll(t, h, sub.GetTaskId(), 0) {
		if tr := ev.GetToolResult(); tr != nil {
			results = append(results, tr.GetResult().GetCallId()+":"+tr.GetResult().GetError().GetCode().String())
		}
	}
	if len(results) != 2 || results[1] != "a1:TOOL_ERROR_CODE_CANCELLED" {
		t.Fatalf("tool results in the log: %v", results)
	}
	if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "y"}); err != nil {
		t.Fatal(err)
	}
	sid2 := c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStart() != nil }).GetSessionId()
	c.Send(testutil.Up(sid2, &dispatchv1.ToolCallRequest{CallId: "r2", ToolName: "world.read", ArgumentsJson: `{}`}))
	answer(t, prov, nextInvoke(t, prov, "r2"))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "r2" {
		t.Fatalf("result %v", r)
	}
	finish(c, sid2)
}

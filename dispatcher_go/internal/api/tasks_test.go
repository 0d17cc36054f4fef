package api

import (
	"encoding/base64"
	"errors"
	"io"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestSubmitWatchResumeGet(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "add", Labels: map[string]string{"team": "a"}})
	if err != nil {
		t.Fatal(err)
	}
	// A live watcher from the start, concurrently with the session.
	live := watchEvents(t, h, sub.GetTaskId(), 0)
	playChat(t, c, "2")
	var liveSeqs []uint64
	for _, ev := range awaitEvents(t, live) {
		liveSeqs = append(liveSeqs, ev.GetSeq())
	}
	all := watchAll(t, h, sub.GetTaskId(), 0)
	if len(all) != len(liveSeqs) {
		t.Fatalf("replay %d events, live %d", len(all), len(liveSeqs))
	}
	for i, ev := range all {
		if ev.GetSeq() != uint64(i+1) || liveSeqs[i] != ev.GetSeq() || ev.GetTaskId() != sub.GetTaskId() {
			t.Fatalf("seq %d at %d", ev.GetSeq(), i)
		}
	}
	last := all[len(all)-1]
	if last.GetState().GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("terminal %v", last)
	}
	var sawToolResult bool
	for _, ev := range all {
		if tr := ev.GetToolResult(); tr != nil {
			sawToolResult = tr.GetExecutor() == "builtin" && tr.GetResult().GetCallId() == "k1"
		}
	}
	if !sawToolResult {
		t.Fatal("tool result event missing executor or call_id")
	}
	// Resume after seq 3: exactly the rest, no gap, no duplicate.
	rest := watchAll(t, h, sub.GetTaskId(), 3)
	if len(rest) != len(all)-3 || rest[0].GetSeq() != 4 {
		t.Fatalf("resume: %d events from %d", len(rest), rest[0].GetSeq())
	}
	if n := len(watchAll(t, h, sub.GetTaskId(), last.GetSeq())); n != 0 {
		t.Fatalf("resume at the end: %d events", n)
	}

	got, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: sub.GetTaskId()})
	if err != nil {
		t.Fatal(err)
	}
	tk := got.GetTask()
	if tk.GetStatus() != agentpb.TaskStatus_SUCCESS || tk.GetResult() != "2" || tk.GetLastSeq() != last.GetSeq() || tk.GetCommanderId() != "test-commander" ||
		tk.GetLabels()["team"] != "a" || tk.GetStartedAt() == nil || tk.GetEndedAt() == nil || tk.GetStatistics().GetTotalTokens() != 120 {
		t.Fatalf("task %v", tk)
	}
}

func TestListTasksNewestFirstFilterPaging(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	var ids []string
	for range 5 {
		r, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.GetTaskId())
	}
	if _, err := h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: ids[1]}); err != nil {
		t.Fatal(err)
	}
	page1, err := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageSize: 2})
	if err != nil || len(page1.GetTasks()) != 2 || page1.GetTasks()[0].GetTaskId() != ids[4] || page1.GetNextPageToken() == "" {
		t.Fatalf("page1 %v %v", page1, err)
	}
	page2, _ := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageSize: 2, PageToken: page1.GetNextPageToken()})
	page3, _ := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageSize: 2, PageToken: page2.GetNextPageToken()})
	if page2.GetTasks()[0].GetTaskId() != ids[2] || len(page3.GetTasks()) != 1 || page3.GetTasks()[0].GetTaskId() != ids[0] || page3.GetNextPageToken() != "" {
		t.Fatalf("paging %v / %v", page2, page3)
	}
	cancelled, _ := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{Statuses: []agentpb.TaskStatus{agentpb.TaskStatus_CANCELLED}})
	if len(cancelled.GetTasks()) != 1 || cancelled.GetTasks()[0].GetTaskId() != ids[1] {
		t.Fatalf("filter %v", cancelled)
	}
	_, err = h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageToken: "!!"})
	wantCode(t, err, codes.InvalidArgument)
	// The token of earlier versions (an 8-byte sequence number) is refused,
	// not read as a place in 1970 that would end the listing.
	_, err = h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageToken: base64.RawURLEncoding.EncodeToString([]byte{0, 0, 0, 0, 0, 0, 0, 9})})
	wantCode(t, err, codes.InvalidArgument)
	// An id with a NUL byte is no task id (PostgreSQL cannot hold it as
	// text): the token is invalid, not a "not found".
	_, err = h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageToken: base64.RawURLEncoding.EncodeToString([]byte{0, 0, 0, 0, 0, 0, 0, 9, 'a', 0})})
	wantCode(t, err, codes.InvalidArgument)
}

func TestInterjectAndCancelNative(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	_, err := h.tasks.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: sub.GetTaskId(), Text: "hi"})
	wantCode(t, err, codes.FailedPrecondition)

	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sid, _ := c.Start()
	ij, err := h.tasks.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: sub.GetTaskId(), Text: "and also Y"})
	if err != nil || ij.GetMessageId() == "" || ij.GetSeq() == 0 {
		t.Fatalf("interject %v %v", ij, err)
	}
	if ui := c.Recv().GetUserInput(); ui.GetText() != "and also Y" || ui.GetMessageId() != ij.GetMessageId() {
		t.Fatalf("user input %v", ui)
	}
	done := testutil.Async(func() (*dispatchv1.CancelTaskResponse, error) {
		return h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId(), Reason: "changed my mind"})
	})
	stop := c.RecvUntil(isStop).GetStop()
	if stop.GetReason() != "changed my mind" {
		t.Fatalf("stop %v", stop)
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{}))
	r := testutil.Recv(t, done, testutil.Wait, "CancelTask to return")
	if r.Err != nil || !r.V.GetCancelled() || r.V.GetStatus() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel %v %v", r.V, r.Err)
	}
	_, err = h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: "nope"})
	wantCode(t, err, codes.NotFound)
}

// A tool provider over gRPC: registration, ListTools, a commander's call
// routed to it and answered by call_id, and unregistration.
func TestToolProviderEndToEnd(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	prov, err := h.tools.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "sandbox-7",
		Tools: []*dispatchv1.ToolSpec{{Name: "computer.screenshot", Description: "takes a screenshot",
			ParametersJsonSchema: `{"type":"object","properties":{"scale":{"type":"number"}}}`}},
	}}}); err != nil {
		t.Fatal(err)
	}
	w, err := prov.Recv()
	if err != nil || len(w.GetWelcome().GetRegisteredTools()) != 1 {
		t.Fatalf("welcome %v %v", w, err)
	}
	tools, _ := h.tasks.ListTools(ctx, &dispatchv1.ListToolsRequest{})
	found := false
	for i, s := range tools.GetTools() {
		if s.GetName() == "computer.screenshot" {
			found = tools.GetExecutors()[i] == "sandbox-7"
		}
	}
	if !found || len(tools.GetTools()) != 5 {
		t.Fatalf("tools %v", tools)
	}

	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "look"})
	sid, st := c.Start()
	if len(st.GetTools()) != 5 {
		t.Fatalf("start lists %d tools", len(st.GetTools()))
	}
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "shot-1", ToolName: "computer.screenshot", ArgumentsJson: `{"scale":0.5}`}))
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "calc-1", ToolName: "calculator", ArgumentsJson: `{"expression":"2*3"}`}))
	inv, err := prov.Recv()
	if err != nil || inv.GetInvoke().GetCallId() != "shot-1" || inv.GetInvoke().GetTaskId() != sub.GetTaskId() || inv.GetInvoke().GetSessionId() != sid {
		t.Fatalf("invoke %v %v", inv, err)
	}
	// The built-in answers first; the provider's result comes later, by call_id.
	if r := c.Recv().GetToolResult(); r.GetCallId() != "calc-1" {
		t.Fatalf("first result %v", r)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvoke().GetInvocationId(), ResultJson: `{"uri":"mem://shot.png"}`,
	}}}); err != nil {
		t.Fatal(err)
	}
	if r := c.Recv().GetToolResult(); r.GetCallId() != "shot-1" || r.GetResultJson() != `{"uri":"mem://shot.png"}` {
		t.Fatalf("provider result %v", r)
	}
	c.Send(testutil.Up(sid, testutil.Success("")))
	c.Recv()
	var executors []string
	for _, ev := range watchAll(t, h, sub.GetTaskId(), 0) {
		if tr := ev.GetToolResult(); tr != nil {
			executors = append(executors, tr.GetResult().GetCallId()+"@"+tr.GetExecutor())
		}
	}
	if strings.Join(executors, ",") != "calc-1@builtin,shot-1@sandbox-7" {
		t.Fatalf("executors %v", executors)
	}

	// A second provider claiming the same tool is refused; the first stays.
	dup, _ := h.tools.Connect(ctx)
	_ = dup.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "other", Tools: []*dispatchv1.ToolSpec{{Name: "computer.screenshot"}},
	}}})
	_, err = dup.Recv()
	wantCode(t, err, codes.AlreadyExists)

	// Provider gone: its tools disappear.
	_ = prov.CloseSend()
	if _, err := prov.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("provider stream end: %v", err)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool {
		tools, err := h.tasks.ListTools(ctx, &dispatchv1.ListToolsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return len(tools.GetTools()) == 4
	}, "the provider's tools unregistered")
}

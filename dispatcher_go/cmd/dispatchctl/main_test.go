package main

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeTasks is an in-memory TaskService: one task whose events are scripted
// and which, once cancelled, emits stop, stopped and CANCELLED.
type fakeTasks struct {
	dispatchv1.UnimplementedTaskServiceServer

	mu        sync.Mutex
	submitted *dispatchv1.SubmitTaskRequest
	token     string
	feed      testutil.Feed
	status    agentpb.TaskStatus
	// cutOnce makes the first WatchTask fail with UNAVAILABLE after this
	// many events, to exercise the resume.
	cutOnce int
	watches []uint64 // after_seq of each WatchTask
	batches []uint32 // max_batch of each WatchTask
	// legacyWatch answers as a dispatcher older than max_batch does: one
	// event per response in event. Otherwise a watch that asks for
	// batches gets its events in events (one per response: the feed
	// hands them over one by one).
	legacyWatch bool
	sent        uint64 // the seq last sent to a watcher
	// ignoreCancel makes CancelTask accept and then do nothing.
	ignoreCancel bool
	// approvals are the ApproveToolCall requests received; held is the
	// call_id the fake holds (resolved once).
	approvals []*dispatchv1.ApproveToolCallRequest
	held      string
}

func newFake() *fakeTasks {
	return &fakeTasks{status: agentpb.TaskStatus_PENDING}
}

// emit appends events to the task's feed.
func (f *fakeTasks) emit(evs ...*dispatchv1.TaskEvent) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range evs {
		ev.TaskId = "t1"
		ev.Time = timestamppb.Now()
		if st := ev.GetState(); st != nil {
			f.status = st.GetStatus()
		}
	}
	f.feed.Append(evs...)
}

func state(s agentpb.TaskStatus, msg string) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: s, Message: msg}}}
}
func thought(s string) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Thought{Thought: &dispatchv1.ThoughtChain{Delta: s}}}
}
func content(s string, finish bool) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: s, IsFinish: finish}}}
}

func (f *fakeTasks) SubmitTask(ctx context.Context, req *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	f.mu.Lock()
	f.submitted = req
	f.token = strings.Join(md.Get("authorization"), ",")
	f.mu.Unlock()
	f.emit(state(agentpb.TaskStatus_PENDING, "queued"))
	return &dispatchv1.SubmitTaskResponse{TaskId: "t1"}, nil
}

func (f *fakeTasks) WatchTask(req *dispatchv1.WatchTaskRequest, stream dispatchv1.TaskService_WatchTaskServer) error {
	if req.GetTaskId() != "t1" {
		return status.Error(codes.NotFound, "no such task")
	}
	f.mu.Lock()
	f.watches = append(f.watches, req.GetAfterSeq())
	f.batches = append(f.batches, req.GetMaxBatch())
	batched := req.GetMaxBatch() > 0 && !f.legacyWatch
	cut := f.cutOnce
	f.cutOnce = 0
	f.mu.Unlock()
	sent := 0
	return f.feed.Follow(stream.Context(), req.GetAfterSeq(), func(ev *dispatchv1.TaskEvent) error {
		if cut > 0 && sent == cut {
			return status.Error(codes.Unavailable, "connection reset")
		}
		resp := &dispatchv1.WatchTaskResponse{Event: ev}
		if batched {
			resp = &dispatchv1.WatchTaskResponse{Events: []*dispatchv1.TaskEvent{ev}}
		}
		if err := stream.Send(resp); err != nil {
			return err
		}
		f.mu.Lock()
		f.sent = ev.GetSeq()
		f.mu.Unlock()
		sent++
		return nil
	})
}

// delivered is the seq of the event last sent to a watcher: the client has
// what came before, and the fake may go on.
func (f *fakeTasks) delivered() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent
}

// waitDelivered waits until a watcher was sent the event of seq.
func (f *fakeTasks) waitDelivered(t *testing.T, seq uint64) {
	t.Helper()
	testutil.WaitFor(t, testutil.Wait, func() bool { return f.delivered() == seq }, "event %d sent to the watcher", seq)
}

func (f *fakeTasks) CancelTask(_ context.Context, req *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error) {
	f.mu.Lock()
	st := f.status
	f.mu.Unlock()
	if terminal(st) {
		return &dispatchv1.CancelTaskResponse{Status: st, Message: "already ended"}, nil
	}
	if f.ignoreCancel {
		return &dispatchv1.CancelTaskResponse{Cancelled: true, Status: st}, nil
	}
	f.emit(
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{Reason: req.GetReason(), Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}}},
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stopped{Stopped: &dispatchv1.Stopped{Reason: "planner cancelled"}}},
		state(agentpb.TaskStatus_CANCELLED, req.GetReason()),
	)
	return &dispatchv1.CancelTaskResponse{Cancelled: true, Status: agentpb.TaskStatus_CANCELLED}, nil
}

// ApproveToolCall resolves the one held call, as the dispatcher does: a
// second resolution of the same call is NOT_FOUND.
func (f *fakeTasks) ApproveToolCall(_ context.Context, req *dispatchv1.ApproveToolCallRequest) (*dispatchv1.ApproveToolCallResponse, error) {
	f.mu.Lock()
	f.approvals = append(f.approvals, req)
	held := f.held
	if req.GetTaskId() == "t1" && req.GetCallId() == held {
		f.held = ""
	}
	f.mu.Unlock()
	if req.GetTaskId() != "t1" {
		return nil, status.Error(codes.NotFound, "no such task")
	}
	if held == "" || req.GetCallId() != held {
		return nil, status.Error(codes.NotFound, "no tool call with that call_id is held")
	}
	outcome, action := dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED, dispatchv1.PolicyAction_POLICY_ACTION_ALLOW
	if !req.GetApprove() {
		outcome, action = dispatchv1.HoldOutcome_HOLD_OUTCOME_REJECTED, dispatchv1.PolicyAction_POLICY_ACTION_DENY
	}
	f.emit(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Policy{Policy: &dispatchv1.PolicyDecision{
		Action: action, RuleId: "gui-needs-approval", CallId: req.GetCallId(), ToolName: "computer.click",
		HoldOutcome: outcome, Reason: req.GetReason(),
	}}})
	return &dispatchv1.ApproveToolCallResponse{Outcome: outcome, Seq: uint64(f.feed.Len())}, nil
}

func (f *fakeTasks) GetTask(_ context.Context, req *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error) {
	if req.GetTaskId() != "t1" {
		return nil, status.Error(codes.NotFound, "no such task")
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return &dispatchv1.GetTaskResponse{Task: &dispatchv1.Task{
		TaskId: "t1", Status: f.status, Result: "Hello world", LastSeq: uint64(f.feed.Len()),
		Statistics: &agentpb.ExecutionStatistics{Steps: 2, DurationSeconds: 3, InputTokens: 10, OutputTokens: 5, TotalTokens: 15},
	}}, nil
}

// fakeAgent serves GetAgentInfo of the seed-000 API.
type fakeAgent struct {
	agentpb.UnimplementedAgentServer
}

func (fakeAgent) GetAgentInfo(context.Context, *agentpb.GetAgentInfoRequest) (*agentpb.AgentInfo, error) {
	return &agentpb.AgentInfo{Version: "test", MaxConcurrentTasks: 2, LogLevel: "info"}, nil
}

// harness runs dispatchctl against the fake over an in-memory connection.
type harness struct {
	fake       *fakeTasks
	g          *testutil.GRPC
	interrupts chan os.Signal
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{fake: newFake(), interrupts: make(chan os.Signal, 2)}
	h.g = testutil.ServeGRPC(t, func(s *grpc.Server) {
		dispatchv1.RegisterTaskServiceServer(s, h.fake)
		agentpb.RegisterAgentServer(s, fakeAgent{})
	})
	return h
}

// start runs one dispatchctl command beside the test; read the buffers,
// which hold its output, once its exit code came.
func (h *harness) start(t *testing.T, args ...string) (code <-chan testutil.Result[int], stdout, stderr *bytes.Buffer) {
	t.Helper()
	stdout, stderr = &bytes.Buffer{}, &bytes.Buffer{}
	e := env{
		stdout: stdout, stderr: stderr, interrupts: h.interrupts,
		getenv: func(k string) string {
			if k == "DISPATCHER_CLIENT_TOKEN" {
				return "secret"
			}
			return ""
		},
		dialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return h.g.Listener().DialContext(ctx)
		})},
	}
	code = testutil.Async(func() (int, error) {
		return realMain(t.Context(), append([]string{"--addr", "passthrough:///bufnet"}, args...), e), nil
	})
	return code, stdout, stderr
}

// exit waits for a started command's exit code.
func exit(t *testing.T, code <-chan testutil.Result[int]) int {
	t.Helper()
	return testutil.Recv(t, code, testutil.Wait, "dispatchctl to exit").V
}

// run runs one dispatchctl command; the returned buffers hold its output.
func (h *harness) run(t *testing.T, args ...string) (code int, stdout, stderr *bytes.Buffer) {
	t.Helper()
	done, stdout, stderr := h.start(t, args...)
	return exit(t, done), stdout, stderr
}

// script plays a successful task once the client is watching.
func (f *fakeTasks) playSuccess() {
	f.emit(
		state(agentpb.TaskStatus_RUNNING, "on slot 1"),
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stage{Stage: &dispatchv1.StageChange{Stage: "planning"}}},
		thought("I should"), thought(" greet.\nThen add."),
		content("Hello", false), content(" world", true),
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{ToolName: "calculator", ArgumentsJson: `{"expression":"2+2"}`, CallId: "c1"}}},
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_ToolResult{ToolResult: &dispatchv1.ToolResultEvent{
			Result: &dispatchv1.ToolCallResult{ToolName: "calculator", ResultJson: "4", CallId: "c1"}, DurationMs: 2, Executor: "builtin"}}},
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_ToolResult{ToolResult: &dispatchv1.ToolResultEvent{
			Result: &dispatchv1.ToolCallResult{ToolName: "nope", CallId: "c2", Error: &dispatchv1.ToolError{
				Code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL, Message: "no tool named nope"}}, Executor: "builtin"}}},
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Usage{Usage: &dispatchv1.Usage{InputTokens: 10}}},
		&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Result{Result: &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "Hello world"}}},
		state(agentpb.TaskStatus_SUCCESS, ""),
	)
}

func TestRunStreamsReadably(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	done, out, errOut := h.start(t, "run", "--model", "smollm2", "--base-url", "http://127.0.0.1:9/v1",
		"--planner", "chat", "--timeout", "90s", "--label", "team=a", "say hello")
	// The task plays out once the client watches it (it got PENDING).
	h.fake.waitDelivered(t, 1)
	h.fake.playSuccess()
	if code := exit(t, done); code != exitOK {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	want := `-- PENDING: queued
-- RUNNING: on slot 1
== planning
thought: I should greet.
thought: Then add.
Hello world
-> calculator({"expression":"2+2"})  [call c1]
<- calculator = 4  [call c1, 2 ms, builtin]
<- nope failed UNKNOWN_TOOL: no tool named nope  [call c2, 0 ms, builtin]
== result SUCCESS
-- SUCCESS
status: SUCCESS
steps 2 · 3s · tokens 10 in / 5 out / 15 total
task: t1
`
	if out.String() != want {
		t.Fatalf("stdout:\n%s\nwant:\n%s", out, want)
	}
	if !strings.Contains(errOut.String(), "task t1 submitted") {
		t.Fatalf("stderr %q", errOut)
	}
	req := h.fake.submitted
	llm := req.GetRunningConfig().GetStageModelConfig().GetActionGeneratorModel()
	if req.GetInstruction() != "say hello" || req.GetPlanner() != "chat" || req.GetTimeoutSeconds() != 90 ||
		req.GetLabels()["team"] != "a" || llm.GetModelName() != "smollm2" || llm.GetApiEndpoint() != "http://127.0.0.1:9/v1" {
		t.Fatalf("submitted %v", req)
	}
	if h.fake.token != "Bearer secret" {
		t.Fatalf("authorization %q", h.fake.token)
	}
}

func TestRunCtrlCCancelsAndKeepsPrinting(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	done, out, errOut := h.start(t, "run", "write forever")
	// Ctrl-C once the client is watching and has been sent some content.
	h.fake.waitDelivered(t, 1)
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""), content("partial", false))
	h.fake.waitDelivered(t, 3)
	h.interrupts <- os.Interrupt
	if code := exit(t, done); code != exitCancelled {
		t.Fatalf("exit %d, stdout %s stderr %s", code, out, errOut)
	}
	for _, want := range []string{"partial\n## stop (client cancel): cancelled from dispatchctl (Ctrl-C)\n", "## stopped: planner cancelled\n", "-- CANCELLED", "status: CANCELLED"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("stdout lacks %q:\n%s", want, out)
		}
	}
	if !strings.Contains(errOut.String(), "cancelling task t1") {
		t.Errorf("stderr %q", errOut)
	}
}

func TestRunCancelAfter(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""))
	code, out, _ := h.run(t, "run", "--cancel-after", "30ms", "long task")
	if code != exitCancelled || !strings.Contains(out.String(), "--cancel-after") {
		t.Fatalf("exit %d, stdout %s", code, out)
	}
}

func TestSecondCtrlCQuits(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""))
	// A commander that ignores the stop: only the second Ctrl-C ends the watch.
	h.fake.ignoreCancel = true
	h.interrupts <- os.Interrupt
	h.interrupts <- os.Interrupt
	code, _, errOut := h.run(t, "watch", "t1")
	if code != exitInterrupted {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
}

func TestWatchResumesAfterUnavailable(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.cutOnce = 3
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""), content("a", false), content("b", false), content("c", false))
	done, out, errOut := h.start(t, "watch", "t1")
	// The rest comes once the resumed watch has caught up.
	h.fake.waitDelivered(t, 4)
	h.fake.emit(content("d", true), state(agentpb.TaskStatus_FAILURE, "model error"))
	if code := exit(t, done); code != exitFailure {
		t.Fatalf("exit %d, stderr %s", code, errOut)
	}
	if !strings.Contains(out.String(), "-- RUNNING\nabcd\n-- FAILURE: model error\n") {
		t.Fatalf("stdout (want each event once):\n%s", out)
	}
	if len(h.fake.watches) != 2 || h.fake.watches[1] != 3 {
		t.Fatalf("watches after_seq %v, want [0 3]", h.fake.watches)
	}
	if fmt.Sprint(h.fake.batches) != fmt.Sprint([]uint32{watchBatch, watchBatch}) {
		t.Fatalf("watches max_batch %v, want %d", h.fake.batches, watchBatch)
	}
	if !strings.Contains(errOut.String(), "resuming after seq 3") {
		t.Fatalf("stderr %q", errOut)
	}
}

// A dispatcher older than max_batch answers in event: watch reads that too.
func TestWatchAnOlderDispatcher(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.legacyWatch = true
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""), content("a", false), content("b", true), state(agentpb.TaskStatus_SUCCESS, ""))
	code, out, errOut := h.run(t, "watch", "t1")
	if code != exitOK || !strings.Contains(out.String(), "-- RUNNING\nab\n-- SUCCESS") {
		t.Fatalf("exit %d, stdout:\n%s\nstderr %s", code, out, errOut)
	}
}

func TestWatchJSONAndAfterSeq(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""), content("x", false), state(agentpb.TaskStatus_SUCCESS, ""))
	code, out, _ := h.run(t, "watch", "t1", "--after-seq", "1", "--json")
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if code != exitOK || len(lines) != 3 || !strings.Contains(lines[0], `"seq":"2"`) || !strings.Contains(lines[2], `"taskId":"t1"`) {
		t.Fatalf("exit %d, stdout:\n%s", code, out)
	}
}

func TestOtherCommands(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	if code, out, _ := h.run(t, "submit", "x"); code != exitOK || out.String() != "t1\n" {
		t.Fatalf("submit: %d %q", code, out)
	}
	if code, out, _ := h.run(t, "status", "t1"); code != exitOK || !strings.Contains(out.String(), "status:") || !strings.Contains(out.String(), "PENDING") {
		t.Fatalf("status: %d %q", code, out)
	}
	if code, _, errOut := h.run(t, "status", "nope"); code != exitFailure || !strings.Contains(errOut.String(), "NotFound") {
		t.Fatalf("status nope: %d %q", code, errOut)
	}
	if code, out, _ := h.run(t, "cancel", "t1"); code != exitOK || !strings.Contains(out.String(), "cancelled: task is CANCELLED") {
		t.Fatalf("cancel: %d %q", code, out)
	}
	if code, out, _ := h.run(t, "cancel", "t1"); code != exitFailure || !strings.Contains(out.String(), "not cancelled") {
		t.Fatalf("second cancel: %d %q", code, out)
	}
	if code, out, _ := h.run(t, "info"); code != exitOK || !strings.Contains(out.String(), "slots:      2") {
		t.Fatalf("info: %d %q", code, out)
	}
	if code, _, _ := h.run(t, "info", "--min-slots", "3"); code != exitFailure {
		t.Fatalf("info --min-slots 3: %d", code)
	}
	if code, _, errOut := h.run(t, "list"); code != exitFailure || !strings.Contains(errOut.String(), "Unimplemented") {
		t.Fatalf("list against a server without it: %d %q", code, errOut)
	}
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	for _, args := range [][]string{
		{}, {"frobnicate"}, {"run"}, {"run", "a", "b"}, {"watch"}, {"run", "--label", "novalue", "x"},
		{"list", "--status", "BOGUS"}, {"run", "--bogus-flag", "x"},
	} {
		t.Run(fmt.Sprintf("%q", args), func(t *testing.T) {
			t.Parallel()
			if code, _, _ := h.run(t, args...); code != exitUsage {
				t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
			}
		})
	}
}

func TestRendererColorAndThoughtBlocks(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	r := &renderer{w: &b, color: true}
	r.event(thought("think"))
	r.event(content("answer", false))
	r.event(thought("more"))
	r.endLine()
	got := b.String()
	want := styleThought + "thought: " + styleReset + styleThought + "think" + styleReset + "\n" +
		"answer\n" +
		styleThought + "thought: " + styleReset + styleThought + "more" + styleReset + "\n"
	if got != want {
		t.Fatalf("got  %q\nwant %q", got, want)
	}
}

func TestWatchPastTheEndOfAFinishedTask(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.emit(state(agentpb.TaskStatus_RUNNING, ""), state(agentpb.TaskStatus_SUCCESS, ""))
	// The fake, like the dispatcher, ends the stream at once: nothing is
	// after seq 2. dispatchctl asks GetTask and reports the real outcome.
	code, out, errOut := h.run(t, "watch", "t1", "--after-seq", "2")
	if code != exitOK || !strings.Contains(out.String(), "status: SUCCESS") {
		t.Fatalf("exit %d\nstdout %s\nstderr %s", code, out, errOut)
	}
}

func TestRendererShowsKindsItDoesNotKnow(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	r := &renderer{w: &b}
	// An event with no kind, and one whose kind is rendered generically:
	// every kind the switch names is handled, so use the fallback directly
	// through an empty event.
	r.event(&dispatchv1.TaskEvent{Seq: 7})
	if got := b.String(); got != "-- event 7 (no kind)\n" {
		t.Fatalf("got %q", got)
	}
}

func TestApprove(t *testing.T) {
	t.Parallel()
	h := newHarness(t)
	h.fake.held = "c7"
	code, out, errOut := h.run(t, "approve", "t1", "c7", "--reason", "looks fine")
	if code != exitOK || out.String() != "approved: call c7 of task t1 (event 1)\n" {
		t.Fatalf("approve: exit %d\nstdout %q\nstderr %q", code, out, errOut)
	}
	// Already resolved: the dispatcher's NOT_FOUND is reported, exit 1.
	code, _, errOut = h.run(t, "approve", "t1", "c7")
	if code != exitFailure || !strings.Contains(errOut.String(), "NotFound") {
		t.Fatalf("second approve: exit %d, stderr %q", code, errOut)
	}
	h.fake.held = "c8"
	code, out, _ = h.run(t, "approve", "--reject", "t1", "c8", "--reason", "no clicking")
	if code != exitOK || !strings.HasPrefix(out.String(), "rejected: call c8 of task t1") {
		t.Fatalf("reject: exit %d, stdout %q", code, out)
	}
	h.fake.mu.Lock()
	got := h.fake.approvals
	h.fake.mu.Unlock()
	if len(got) != 3 || !got[0].GetApprove() || got[0].GetReason() != "looks fine" ||
		got[2].GetApprove() || got[2].GetCallId() != "c8" || got[2].GetReason() != "no clicking" {
		t.Fatalf("requests: %v", got)
	}
	for _, args := range [][]string{{"approve"}, {"approve", "t1"}, {"approve", "t1", "c1", "extra"}} {
		if code, _, _ := h.run(t, args...); code != exitUsage {
			t.Errorf("%q: exit %d, want %d", args, code, exitUsage)
		}
	}
}

func policyEvent(pd *dispatchv1.PolicyDecision) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Policy{Policy: pd}}
}

func TestRendererPolicyDecisions(t *testing.T) {
	t.Parallel()
	var b bytes.Buffer
	r := &renderer{w: &b}
	r.event(content("The launch", false))
	r.event(policyEvent(&dispatchv1.PolicyDecision{
		Action: dispatchv1.PolicyAction_POLICY_ACTION_STOP, RuleId: "no-launch-codes", Reason: "forbidden phrase", PacketKind: "content",
	}))
	r.event(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{
		Reason: "forbidden phrase", Code: dispatchv1.StopCode_STOP_CODE_POLICY, RuleId: "no-launch-codes",
	}}})
	r.event(policyEvent(&dispatchv1.PolicyDecision{
		Action: dispatchv1.PolicyAction_POLICY_ACTION_DENY, RuleId: "no-gui", Reason: "no clicks", PacketKind: "tool_call",
		CallId: "c1", ToolName: "computer.click",
	}))
	deadline := time.Date(2026, 1, 2, 3, 4, 5, 0, time.Local)
	hold := policyEvent(&dispatchv1.PolicyDecision{
		Action: dispatchv1.PolicyAction_POLICY_ACTION_HOLD, RuleId: "gui-needs-approval", PacketKind: "tool_call",
		CallId: "c2", ToolName: "computer.click", HoldDeadline: timestamppb.New(deadline),
	})
	hold.TaskId = "t1"
	r.event(hold)
	r.event(policyEvent(&dispatchv1.PolicyDecision{
		Action: dispatchv1.PolicyAction_POLICY_ACTION_DENY, RuleId: "gui-needs-approval", Reason: "approval timed out",
		CallId: "c2", ToolName: "computer.click", HoldOutcome: dispatchv1.HoldOutcome_HOLD_OUTCOME_TIMED_OUT,
	}))
	want := "The launch\n" +
		"!! policy stop [no-launch-codes]: forbidden phrase (on content)\n" +
		"## stop (policy): forbidden phrase rule no-launch-codes\n" +
		"!! policy deny [no-gui]: computer.click [call c1]: no clicks\n" +
		"!! policy hold [gui-needs-approval]: computer.click [call c2] — held until 03:04:05; dispatchctl approve t1 c2 [--reject]\n" +
		"!! policy timed out [gui-needs-approval]: computer.click [call c2]: approval timed out\n"
	if got := b.String(); got != want {
		t.Fatalf("got\n%s\nwant\n%s", got, want)
	}
}

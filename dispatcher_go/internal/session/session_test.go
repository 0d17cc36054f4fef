package session

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type env struct {
	srv   *Server
	sched *scheduler.Scheduler
	mgr   *task.Manager
}

func newEnv(t *testing.T, opts Options, limits eventlog.Limits) *env {
	t.Helper()
	b, err := broker.New(broker.Options{DefaultTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sched := scheduler.New(16)
	if opts.StopGrace == 0 {
		opts.StopGrace = 300 * time.Millisecond
	}
	mgr := task.NewManager(eventlog.NewMemory(limits), task.NewConfigStore(nil), task.ManagerOptions{DefaultPlanner: "chat", StopGrace: opts.StopGrace})
	mgr.SetQueue(sched)
	srv := NewServer(sched, b, opts)
	t.Cleanup(srv.Shutdown)
	return &env{srv: srv, sched: sched, mgr: mgr}
}

// commander is the commander's end of a fake ChatStream: the stream Serve
// is given directly, without gRPC. Send blocks until the test reads (like
// HTTP/2 flow control with a zero window) when down is unbuffered.
type commander struct {
	*testutil.ServerStream[*dispatchv1.UpstreamPacket, *dispatchv1.DownstreamPacket]
	t      *testing.T
	cancel context.CancelFunc
	served chan struct{} // closed when Serve returned
	err    error         // what Serve returned; read after served is closed
}

// sending is where the dispatcher's sender waits while the fake commander
// does not read (for testutil.Blocked). Tests of this package run one at a
// time, so a sender found there is the test's own.
const sending = "testutil.(*ServerStream[...]).Send"

// open starts Serve on a new fake stream without sending anything.
func (e *env) open(t *testing.T, downBuf int) *commander {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	// Like internal/api's tap handle: the session may end the fake
	// stream's Recv and Send (the fallback without it: TestServeWithoutAbort).
	sctx, abort := context.WithCancelCause(ctx)
	sctx = WithAbort(sctx, abort)
	c := &commander{ServerStream: testutil.NewServerStream[*dispatchv1.UpstreamPacket, *dispatchv1.DownstreamPacket](sctx, downBuf), t: t, cancel: cancel, served: make(chan struct{})}
	go func() {
		defer close(c.served)
		c.err = e.srv.Serve(c)
		cancel() // grpc ends the RPC when the handler returns
	}()
	t.Cleanup(func() {
		cancel()
		testutil.Done(t, c.served, testutil.Wait, "Serve to return once its stream is cancelled")
	})
	return c
}

// connect opens a stream and says hello with caps.
func (e *env) connect(t *testing.T, caps ...string) *commander {
	t.Helper()
	c := e.open(t, 64)
	c.send(testutil.Hello("cmd-1", caps...))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || a.GetSlotId() == "" {
		t.Fatalf("hello ack: %v", a)
	}
	return c
}

func (c *commander) send(p *dispatchv1.UpstreamPacket) {
	c.t.Helper()
	testutil.Send(c.t, c.In, p, testutil.Wait, "the dispatcher to read an upstream packet")
}

func (c *commander) recv() *dispatchv1.DownstreamPacket {
	c.t.Helper()
	return testutil.Recv(c.t, c.Out, testutil.Wait, "a downstream packet")
}

func (c *commander) noPacket(d time.Duration) {
	c.t.Helper()
	testutil.NoRecv(c.t, c.Out, d, "no downstream packet")
}

// ended waits for Serve to return and returns its error.
func (c *commander) ended() error {
	c.t.Helper()
	testutil.Done(c.t, c.served, testutil.Wait, "the stream to end")
	return c.err
}

func (c *commander) start() (string, *dispatchv1.StartSession) {
	c.t.Helper()
	p := c.recv()
	if p.GetStart() == nil || p.GetSessionId() == "" {
		c.t.Fatalf("want start, got %v", p)
	}
	return p.GetSessionId(), p.GetStart()
}

func (e *env) submit(t *testing.T, spec task.Spec) *task.Task {
	t.Helper()
	if spec.Instruction == "" {
		spec.Instruction = "do it"
	}
	tk, err := e.mgr.Submit(spec)
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

func waitDone(t *testing.T, tk *task.Task) task.Info {
	t.Helper()
	testutil.Done(t, tk.Done(), testutil.Wait, "the task to end (it is %v)", statusOf{tk})
	return tk.Info()
}

// statusOf prints a task's status as of when a failure is reported.
type statusOf struct{ tk *task.Task }

func (s statusOf) String() string { return s.tk.Status().String() }

func allEvents(t *testing.T, tk *task.Task) []*dispatchv1.TaskEvent {
	t.Helper()
	ctx := testutil.Context(t, testutil.Wait)
	var out []*dispatchv1.TaskEvent
	var after uint64
	for {
		evs, err := tk.Log().Read(ctx, after, nil)
		out = append(out, evs...)
		if len(evs) > 0 {
			after = evs[len(evs)-1].GetSeq()
		}
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

func kinds(evs []*dispatchv1.TaskEvent) string {
	var s []string
	for _, ev := range evs {
		m := ev.ProtoReflect()
		name := string(m.WhichOneof(m.Descriptor().Oneofs().ByName("kind")).Name())
		if st := ev.GetState(); st != nil {
			name += ":" + st.GetStatus().String()
		}
		s = append(s, name)
	}
	return strings.Join(s, " ")
}

func TestHelloMustComeFirst(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.open(t, 8)
	c.send(testutil.Up("", &dispatchv1.ContentChunk{Text: "hi"}))
	if err := c.ended(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("Serve = %v, want ErrProtocol", err)
	}
	// Everyone else is still served.
	e.connect(t, "planner:chat")
	if e.sched.SlotCount() != 1 {
		t.Fatal("second stream not registered")
	}
}

func TestSessionLifecycle(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{Labels: map[string]string{"k": "v"}})
	sid, st := c.start()
	if st.GetTaskId() != tk.ID() || st.GetInstruction() != "do it" || st.GetPlanner() != "chat" || st.GetDeadline() == nil || len(st.GetTools()) != 4 || st.GetLabels()["k"] != "v" {
		t.Fatalf("start %v", st)
	}
	c.send(testutil.Up(sid, &dispatchv1.ThoughtChain{StepName: "Planning", Delta: "hmm"}))
	c.send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "The answer is "}))
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "call-1", ToolName: "calculator", ArgumentsJson: `{"expression":"6*7"}`}))
	tr := c.recv()
	if tr.GetSessionId() != sid || tr.GetToolResult().GetCallId() != "call-1" || !strings.Contains(tr.GetToolResult().GetResultJson(), `"result":42`) {
		t.Fatalf("tool result %v", tr)
	}
	c.send(testutil.Up(sid, &dispatchv1.Usage{InputTokens: 10, OutputTokens: 20, Cost: 0.01, Currency: "USD", Steps: 1}))
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "42"}))
	if a := c.recv(); a.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED || a.GetSessionId() != sid {
		t.Fatalf("close ack %v", a)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_SUCCESS || info.Result != "42" || info.Stats.OutputTokens != 20 || info.CommanderID != "cmd-1" {
		t.Fatalf("info %+v", info)
	}
	evs := allEvents(t, tk)
	if got := kinds(evs); got != "state:PENDING state:RUNNING thought content tool_call tool_result usage result state:SUCCESS" {
		t.Fatalf("events: %s", got)
	}
	for i, ev := range evs {
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("seq gap at %d", i)
		}
	}
	if evs[2].GetEmittedAtUs() == 0 || evs[5].GetToolResult().GetExecutor() != broker.ExecutorBuiltin {
		t.Fatal("emit time or executor missing")
	}
	// The slot is idle again and takes the next task.
	tk2 := e.submit(t, task.Spec{})
	if _, st := c.start(); st.GetTaskId() != tk2.ID() {
		t.Fatal("slot did not take the next task")
	}
}

func TestBadPacketsAreRejectedAndTheStreamGoesOn(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	c.send(testutil.Up("", nil))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || !strings.Contains(a.GetDetail(), "no payload") {
		t.Fatalf("no payload: %v", a)
	}
	c.send(testutil.Up("ses-unknown", &dispatchv1.ContentChunk{Text: "late"}))
	if a := c.recv(); a.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || a.GetSessionId() != "ses-unknown" {
		t.Fatalf("unknown session: %v", a)
	}
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(testutil.Up("ses-other", &dispatchv1.ContentChunk{Text: "wrong"}))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED {
		t.Fatalf("wrong session: %v", a)
	}
	// Tool errors are results, the session goes on.
	for _, tc := range []struct {
		tool, args string
		code       dispatchv1.ToolErrorCode
	}{
		{"nope", `{}`, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL},
		{"echo", `{not json`, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS},
	} {
		c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: tc.tool, ToolName: tc.tool, ArgumentsJson: tc.args}))
		if r := c.recv().GetToolResult(); r.GetError().GetCode() != tc.code || r.GetCallId() != tc.tool {
			t.Fatalf("%s: %v", tc.tool, r)
		}
	}
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "echo", ToolName: "echo", ArgumentsJson: `{}`}))
	if r := c.recv().GetToolResult(); r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
		t.Fatalf("duplicate call_id: %v", r)
	}
	// A call_id longer than ApproveToolCall takes was run (black-box
	// attack run): held by a policy, it could never have been approved.
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: strings.Repeat("c", 257), ToolName: "echo", ArgumentsJson: `{}`}))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || !strings.Contains(a.GetDetail(), "call_id of 257 bytes") {
		t.Fatalf("long call_id: %v", a)
	}
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: strings.Repeat("c", 256), ToolName: "echo", ArgumentsJson: `{}`}))
	if r := c.recv().GetToolResult(); r.GetError() != nil {
		t.Fatalf("256-byte call_id: %v", r)
	}
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_FAILURE, Message: "gave up"}))
	c.recv()
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_FAILURE || info.Message != "gave up" {
		t.Fatalf("info %+v", info)
	}
}

// An outcome SessionOutcome does not define fails the task with a message
// that names it: it was "the planner ended without an outcome" (black-box
// attack run). The stream takes the next task.
func TestUnknownOutcomeIsNamed(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: 99, Result: "weird"}))
	c.recv()
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_FAILURE || info.Message != "the planner ended with outcome 99, which this dispatcher does not know" {
		t.Fatalf("info %+v", info)
	}
	tk = e.submit(t, task.Spec{})
	sid, _ = c.start()
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{}))
	c.recv()
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_FAILURE || info.Message != "the planner ended without an outcome" {
		t.Fatalf("info %+v", info)
	}
}

// Instant built-ins run on the receiving goroutine, other calls on their
// own: an echo sent behind a long sleep is answered while the sleep runs,
// and the log keeps each call before its result.
func TestInstantCallDoesNotWaitBehindARunningCall(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "slow", ToolName: "sleep", ArgumentsJson: `{"ms":60000}`}))
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "fast", ToolName: "echo", ArgumentsJson: ` {"a":[1]} `}))
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "now", ToolName: "time_now", ArgumentsJson: `{"timezone":"Europe/Paris"}`}))
	if r := c.recv().GetToolResult(); r.GetCallId() != "fast" || r.GetResultJson() != ` {"a":[1]} ` || r.GetError() != nil {
		t.Fatalf("first result %v, want the echo's", r)
	}
	if r := c.recv().GetToolResult(); r.GetCallId() != "now" || !strings.Contains(r.GetResultJson(), `"timezone":"Europe/Paris"`) {
		t.Fatalf("second result %v, want time_now's", r)
	}
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS}))
	for p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED; p = c.recv() {
		if r := p.GetToolResult(); r.GetCallId() != "slow" {
			t.Fatalf("unexpected packet %v", p)
		}
	}
	waitDone(t, tk)
	var order []string
	for _, ev := range allEvents(t, tk) {
		switch {
		case ev.GetToolCall() != nil:
			order = append(order, "call:"+ev.GetToolCall().GetCallId())
		case ev.GetToolResult() != nil:
			order = append(order, "result:"+ev.GetToolResult().GetResult().GetCallId())
		}
	}
	// The sleep, cancelled by the end of the session, may have recorded
	// its result before the log was sealed.
	got := strings.TrimSuffix(strings.Join(order, " "), " result:slow")
	if got != "call:slow call:fast result:fast call:now result:now" {
		t.Fatalf("log order: %s", got)
	}
}

func TestSecondHelloEndsStreamAndFailsTask(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	c.start()
	c.send(testutil.Hello("again"))
	if err := c.ended(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("Serve = %v", err)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(info.Message, "commander connection lost: ") {
		t.Fatalf("info %+v", info)
	}
}

func TestCommanderLostFailsTaskAtOnce(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	c.start()
	c.cancel() // the connection breaks
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(info.Message, "commander connection lost: ") {
		t.Fatalf("info %+v", info)
	}
	if e.sched.SlotCount() != 0 {
		t.Fatal("slot still registered")
	}
}

// A connection lost in the instant after the start's Send returned (the
// commander has it; the run has not noted it yet) fails the task as one
// that started — it may be running — not as "lost before the task
// started" (TestCommanderLostFailsTaskAtOnce failed so under load).
func TestCommanderLostJustAfterTheStartWasSent(t *testing.T) {
	release := make(chan struct{})
	afterStartSend = func() {
		select {
		case <-release:
		case <-time.After(testutil.Wait):
		}
	}
	t.Cleanup(func() { afterStartSend = nil })
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	c.start()
	c.cancel() // the connection breaks while the sender is held after the start's Send
	info := waitDone(t, tk)
	close(release)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(info.Message, "commander connection lost: ") {
		t.Fatalf("info %+v", info)
	}
}

// The stop overtakes queued packets; after it, planner output is dropped and
// tool calls are refused by the dispatcher itself.
func TestStopOvertakesQueueAndFencesOutput(t *testing.T) {
	e := newEnv(t, Options{StopGrace: 2 * time.Second}, eventlog.Limits{})
	c := e.open(t, 0) // unbuffered: nothing is sent until the test reads
	c.send(testutil.Hello("c", "planner:chat"))
	c.recv() // hello ack
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	// Three tool results pile up because the commander does not read.
	for _, id := range []string{"a", "b", "c"} {
		c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: id, ToolName: "echo", ArgumentsJson: `{}`}))
	}
	testutil.WaitFor(t, testutil.Wait, func() bool { return len(allEventsNow(tk, "tool_result")) == 3 },
		"the results of the three tool calls in the log")
	out, err := e.mgr.Cancel(context.Background(), tk.ID(), "user pressed stop", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	// At most one result was already in Send; the stop comes next.
	var sawStop bool
	for range 2 {
		p := c.recv()
		if p.GetStop() != nil {
			sawStop = true
			if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || p.GetSessionId() != sid {
				t.Fatalf("stop %v", p)
			}
			break
		}
	}
	if !sawStop {
		t.Fatal("stop did not overtake the queued tool results")
	}
	// Output after the stop decision is dropped; tool calls are denied.
	c.send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "LEAK"}))
	c.send(testutil.Up(sid, &dispatchv1.ThoughtChain{Delta: "LEAK"}))
	c.send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "late", ToolName: "echo", ArgumentsJson: `{}`}))
	for {
		p := c.recv()
		if r := p.GetToolResult(); r.GetCallId() == "late" {
			if r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
				t.Fatalf("late call: %v", r)
			}
			break
		}
	}
	c.send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok", FinalUsage: &dispatchv1.Usage{OutputTokens: 3}}))
	for c.recv().GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_CANCELLED || info.Stats.OutputTokens != 3 {
		t.Fatalf("info %+v", info)
	}
	evs := allEvents(t, tk)
	stopAt := -1
	for i, ev := range evs {
		if ev.GetStop() != nil {
			stopAt = i
		}
		if strings.Contains(ev.GetContent().GetText()+ev.GetThought().GetDelta(), "LEAK") {
			t.Fatal("content after the stop reached the log")
		}
		if ev.GetToolCall().GetCallId() == "late" {
			t.Fatal("refused call logged as accepted")
		}
	}
	if stopAt < 0 || evs[len(evs)-2].GetStopped() == nil {
		t.Fatalf("events: %s", kinds(evs))
	}
	st := e.srv.Stats()
	if st.StopsAcked.Load() != 1 || st.StopLatency.Snapshot().Count != 1 || st.DroppedAfterStop.Load() != 2 || st.DeniedAfterStop.Load() != 1 {
		t.Fatalf("stats acked=%d lat=%d dropped=%d denied=%d", st.StopsAcked.Load(), st.StopLatency.Snapshot().Count, st.DroppedAfterStop.Load(), st.DeniedAfterStop.Load())
	}
}

// allEventsNow returns the events of kind so far without waiting for the end.
func allEventsNow(tk *task.Task, kind string) []*dispatchv1.TaskEvent {
	evs, _ := tk.Log().Read(context.Background(), 0, make([]*dispatchv1.TaskEvent, 0, 1024))
	var out []*dispatchv1.TaskEvent
	for _, ev := range evs {
		if strings.HasPrefix(kinds([]*dispatchv1.TaskEvent{ev}), kind) {
			out = append(out, ev)
		}
	}
	return out
}

func TestNoStoppedWithinGraceAbortsStream(t *testing.T) {
	e := newEnv(t, Options{StopGrace: 100 * time.Millisecond}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	c.start()
	start := time.Now()
	out, _ := e.mgr.Cancel(context.Background(), tk.ID(), "", true)
	if c.recv().GetStop() == nil {
		t.Fatal("no stop")
	}
	if err := c.ended(); !errors.Is(err, ErrStopNotAcknowledged) {
		t.Fatalf("Serve = %v", err)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_CANCELLED || !strings.Contains(info.Message, "did not acknowledge") {
		t.Fatalf("info %+v", info)
	}
	if !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel outcome %+v", out)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("abort took %s", d)
	}
	if e.srv.Stats().StopsAborted.Load() != 1 {
		t.Fatal("abort not counted")
	}
}

func TestDeadlineStopsSession(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{TimeoutSeconds: 1})
	sid, _ := c.start()
	p := c.recv()
	if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_DEADLINE {
		t.Fatalf("want deadline stop, got %v", p)
	}
	c.send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "deadline"}))
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "deadline") {
		t.Fatalf("info %+v", info)
	}
}

func TestResultAfterStopKeepsTheRealOutcome(t *testing.T) {
	e := newEnv(t, Options{StopGrace: time.Second}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	done := make(chan task.CancelOutcome, 1)
	go func() {
		out, _ := e.mgr.Cancel(context.Background(), tk.ID(), "", true)
		done <- out
	}()
	c.recv() // stop
	c.send(testutil.Up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "done anyway"}))
	out := testutil.Recv(t, done, testutil.Wait, "Cancel to return")
	if out.Cancelled || out.Status != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("cancel must say it came too late: %+v", out)
	}
}

func TestStopBeforeStartWasSentWithdrawsIt(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.open(t, 0)
	c.send(testutil.Hello("c", "planner:chat"))
	// The hello ack sits in Send (nobody reads), so the start stays queued.
	// The slot is registered before its ack can go out.
	testutil.WaitFor(t, testutil.Wait, func() bool { return testutil.Blocked(sending) },
		"the hello ack to wait in the stream's Send")
	tk := e.submit(t, task.Spec{})
	if tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("status %v", tk.Status())
	}
	out, _ := e.mgr.Cancel(context.Background(), tk.ID(), "", true)
	if !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("outcome %+v", out)
	}
	if c.recv().GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		t.Fatal("hello ack")
	}
	c.noPacket(50 * time.Millisecond) // neither the start nor a stop
	// The slot is free for the next task.
	tk2 := e.submit(t, task.Spec{})
	if _, st := c.start(); st.GetTaskId() != tk2.ID() {
		t.Fatal("slot not reused")
	}
}

func TestEventLimitStopsWithBudget(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{MaxEvents: 3})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	for range 3 {
		c.send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "x"}))
	}
	c.send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "one too many"}))
	var stop, rejected bool
	for !stop || !rejected {
		p := c.recv()
		stop = stop || p.GetStop().GetCode() == dispatchv1.StopCode_STOP_CODE_BUDGET
		rejected = rejected || p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_REJECTED
	}
	c.send(testutil.Up(sid, &dispatchv1.Stopped{}))
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "event log limit") {
		t.Fatalf("info %+v", info)
	}
}

func TestInterjectReachesPlanner(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	id, seq, err := e.mgr.Interject(context.Background(), tk.ID(), "also do Y")
	if err != nil || id == "" || seq != 3 {
		t.Fatalf("interject %q %d %v", id, seq, err)
	}
	p := c.recv()
	if p.GetUserInput().GetText() != "also do Y" || p.GetUserInput().GetMessageId() != id || p.GetSessionId() != sid {
		t.Fatalf("user input %v", p)
	}
	e.mgr.Cancel(context.Background(), tk.ID(), "", false)
	if _, _, err := e.mgr.Interject(context.Background(), tk.ID(), "too late"); !errors.Is(err, task.ErrNotRunning) {
		t.Fatalf("interject after stop: %v", err)
	}
}

func TestCapabilityMatching(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	chat := e.connect(t, "planner:chat")
	gui := e.connect(t, "planner:gui", "os:linux")
	tk := e.submit(t, task.Spec{Planner: "gui", RequiredCapabilities: []string{"os:linux"}})
	if _, st := gui.start(); st.GetTaskId() != tk.ID() {
		t.Fatal("wrong task")
	}
	chat.noPacket(30 * time.Millisecond)
}

func TestShutdownEndsStreams(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	e.srv.Shutdown()
	if err := c.ended(); !errors.Is(err, ErrShutdown) {
		t.Fatalf("Serve = %v", err)
	}
}

func TestHistogramQuantiles(t *testing.T) {
	var h Histogram
	for range 90 {
		h.Observe(3 * time.Millisecond)
	}
	for range 10 {
		h.Observe(400 * time.Millisecond)
	}
	s := h.Snapshot()
	if s.Count != 100 || s.Quantile(0.5) != 5*time.Millisecond || s.Quantile(0.99) != 500*time.Millisecond {
		t.Fatalf("p50=%s p99=%s", s.Quantile(0.5), s.Quantile(0.99))
	}
	h.Observe(time.Minute)
	if h.Snapshot().Counts[len(latencyBounds)] != 1 {
		t.Fatal("overflow bucket")
	}
}

package api

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// replaceFile replaces path with src at once, as an editor saving it would.
func replaceFile(path, src string) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(src), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func writePolicy(t *testing.T, path, src string) {
	t.Helper()
	if err := replaceFile(path, src); err != nil {
		t.Fatal(err)
	}
}

// policyHarness is a harness whose policy file, at path, holds src. Its
// tests answer every stop themselves, so the stop grace is a hang guard, not
// the harness's 500 ms: at load ~30 on 2 cores (-race) that ran out before
// the test's commander had read the stop, and the stream ended ABORTED
// (TestPolicyPhraseStopsMidSentence).
func policyHarness(t *testing.T, src string) (h *harness, ctx context.Context, path string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, path, src)
	h, ctx = newHarness(t, dispatcher.Config{Policy: dispatcher.Policy{File: path, Poll: 5 * time.Millisecond},
		Tasks: dispatcher.Tasks{StopGrace: testTimeout}})
	return h, ctx, path
}

func submit(t *testing.T, h *harness, req *dispatchv1.SubmitTaskRequest) string {
	t.Helper()
	r, err := h.tasks.SubmitTask(testutil.Context(t, testTimeout), req)
	if err != nil {
		t.Fatal(err)
	}
	return r.GetTaskId()
}

// TestPolicyPhraseStopsMidSentence: the phrase arrives split over three
// chunks; the client sees the chunks before the completing one, then the
// policy decision and the stop with the rule id, then nothing but the end.
func TestPolicyPhraseStopsMidSentence(t *testing.T) {
	t.Parallel()
	h, ctx, _ := policyHarness(t, `
version: 1
rules:
  - id: no-launch-codes
    phrases: ["launch codes"]
    action: stop
    reason: forbidden phrase
`)
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "tell me"})
	watched := watchEvents(t, h, id, 0)
	sid, _ := c.Start()
	chunks := []string{"Sure. The ", "laun", "ch co", "des are 0000", " and more"}
	for _, ch := range chunks {
		c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: ch}))
	}
	stop := c.RecvUntil(isStop).GetStop()
	if stop.GetRuleId() != "no-launch-codes" || stop.GetCode() != dispatchv1.StopCode_STOP_CODE_POLICY {
		t.Fatalf("stop %v", stop)
	}
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "late"}))
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "stopped"}))
	c.RecvUntil(isClosed)

	evs := awaitEvents(t, watched)
	var texts []string
	stopAt, policyAt := -1, -1
	for i, ev := range evs {
		switch {
		case ev.GetContent() != nil:
			if stopAt >= 0 {
				t.Fatalf("content after the stop: %v", ev)
			}
			texts = append(texts, ev.GetContent().GetText())
		case ev.GetPolicy() != nil:
			policyAt = i
			if p := ev.GetPolicy(); p.GetAction() != dispatchv1.PolicyAction_POLICY_ACTION_STOP || p.GetRuleId() != "no-launch-codes" || p.GetPacketKind() != "content" {
				t.Fatalf("policy event %v", p)
			}
		case ev.GetStop() != nil:
			stopAt = i
			if ev.GetStop().GetRuleId() != "no-launch-codes" {
				t.Fatalf("stop event %v", ev.GetStop())
			}
		}
	}
	if got := strings.Join(texts, "|"); got != "Sure. The |laun|ch co" {
		t.Fatalf("client saw %q", got)
	}
	// pending, running, three chunks, then the decision and the stop.
	if policyAt != 5 || stopAt != 6 {
		t.Fatalf("policy event at %d, stop at %d", policyAt, stopAt)
	}
	last := evs[len(evs)-1]
	if last.GetState().GetStatus() != agentpb.TaskStatus_FAILURE {
		t.Fatalf("terminal %v", last)
	}
	// The seed-000 projection shows the decision.
	stage, msg, ok := events.Seed000(evs[policyAt])
	if !ok || stage != "policy" || !strings.Contains(msg, "no-launch-codes") {
		t.Fatalf("projection %q %q", stage, msg)
	}
	if n := h.d.Policy().Stats().RuleCount("no-launch-codes"); n != 1 {
		t.Fatalf("rule count %d", n)
	}
}

// TestPolicyDenyGUIActionTaskGoesOn: a deny rule refuses a GUI action with
// DENIED naming the rule; the session goes on and succeeds.
func TestPolicyDenyGUIActionTaskGoesOn(t *testing.T) {
	t.Parallel()
	h, ctx, _ := policyHarness(t, `
rules:
  - id: no-gui-clicks
    when: tool_name.startsWith("computer.") && tool_args.button == "right"
    action: deny
    reason: right clicks are not allowed
`)
	c := testutil.Connect(t, ctx, h.conn, "planner:gui")
	id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "click", Planner: "gui"})
	watched := watchEvents(t, h, id, 0)
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "g1", ToolName: "computer.click", ArgumentsJson: `{"x":10,"y":20,"button":"right"}`}))
	r := c.RecvUntil(isToolResult).GetToolResult()
	if r.GetCallId() != "g1" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED || !strings.Contains(r.GetError().GetMessage(), "no-gui-clicks") {
		t.Fatalf("result %v", r)
	}
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"2*3"}`}))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetError() != nil {
		t.Fatalf("calculator %v", r)
	}
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "done"}))
	c.Send(testutil.Up(sid, testutil.Success("6")))
	c.RecvUntil(isClosed)
	evs := awaitEvents(t, watched)
	var order []string
	for _, ev := range evs {
		switch {
		case ev.GetToolCall() != nil:
			order = append(order, "call:"+ev.GetToolCall().GetCallId())
		case ev.GetPolicy() != nil:
			order = append(order, "policy:"+ev.GetPolicy().GetAction().String()+":"+ev.GetPolicy().GetCallId())
		case ev.GetToolResult() != nil:
			order = append(order, "result:"+ev.GetToolResult().GetResult().GetCallId())
		}
	}
	want := "call:g1 policy:POLICY_ACTION_DENY:g1 result:g1 call:k1 result:k1"
	if got := strings.Join(order, " "); got != want {
		t.Fatalf("events %q, want %q", got, want)
	}
	if st := evs[len(evs)-1].GetState().GetStatus(); st != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("status %v", st)
	}
}

// waitPolicyEvent follows a task until a PolicyDecision matching ok.
func waitPolicyEvent(t *testing.T, h *harness, id string, ok func(*dispatchv1.PolicyDecision) bool) *dispatchv1.PolicyDecision {
	t.Helper()
	ctx := testutil.Context(t, testutil.Wait)
	s, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: id})
	if err != nil {
		t.Fatal(err)
	}
	for {
		r, err := s.Recv()
		if err != nil {
			t.Fatalf("no matching policy event: %v", err)
		}
		if p := r.GetEvent().GetPolicy(); p != nil && ok(p) {
			return p
		}
	}
}

// TestPolicyHoldApproveRejectTimeout: held calls wait for the API; an
// approval runs the call, a rejection and the timeout deny it, while the
// session's other calls go on.
func TestPolicyHoldApproveRejectTimeout(t *testing.T) {
	t.Parallel()
	h, ctx, _ := policyHarness(t, `
rules:
  - id: echo-needs-approval
    when: tool_name == "echo"
    action: hold
    hold_timeout: 20s
  - id: clock-needs-approval
    when: tool_name == "time_now"
    action: hold
    hold_timeout: 200ms
`)
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	watched := watchEvents(t, h, id, 0)
	sid, _ := c.Start()

	// Nothing is held yet.
	_, err := h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: id, CallId: "e1", Approve: true})
	wantCode(t, err, codes.NotFound)

	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "e1", ToolName: "echo", ArgumentsJson: `{"v":1}`}))
	hold := waitPolicyEvent(t, h, id, func(p *dispatchv1.PolicyDecision) bool { return p.GetCallId() == "e1" })
	if hold.GetAction() != dispatchv1.PolicyAction_POLICY_ACTION_HOLD || hold.GetRuleId() != "echo-needs-approval" || hold.GetHoldDeadline() == nil {
		t.Fatalf("hold %v", hold)
	}
	// While e1 waits the session goes on: an unheld call is answered.
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"1+1"}`}))
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "k1" {
		t.Fatalf("first result %v (the held call must wait)", r)
	}
	resp, err := h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: id, CallId: "e1", Approve: true, Reason: "looks fine"})
	if err != nil || resp.GetOutcome() != dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED || resp.GetSeq() == 0 {
		t.Fatalf("approve %v %v", resp, err)
	}
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "e1" || r.GetError() != nil || r.GetResultJson() != `{"v":1}` {
		t.Fatalf("approved result %v", r)
	}
	// Twice: the hold is gone.
	_, err = h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: id, CallId: "e1", Approve: true})
	wantCode(t, err, codes.NotFound)

	// Rejected.
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "e2", ToolName: "echo", ArgumentsJson: `{}`}))
	waitPolicyEvent(t, h, id, func(p *dispatchv1.PolicyDecision) bool { return p.GetCallId() == "e2" })
	resp, err = h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: id, CallId: "e2", Approve: false, Reason: "no"})
	if err != nil || resp.GetOutcome() != dispatchv1.HoldOutcome_HOLD_OUTCOME_REJECTED {
		t.Fatalf("reject %v %v", resp, err)
	}
	if r := c.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "e2" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
		t.Fatalf("rejected result %v", r)
	}

	// Nobody answers: the timeout denies.
	start := time.Now()
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "t1", ToolName: "time_now", ArgumentsJson: `{}`}))
	r := c.RecvUntil(isToolResult).GetToolResult()
	if r.GetCallId() != "t1" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED || !strings.Contains(r.GetError().GetMessage(), "timed out") {
		t.Fatalf("timeout result %v", r)
	}
	if el := time.Since(start); el < 200*time.Millisecond {
		t.Fatalf("denied after %v, before the hold timeout", el)
	}

	c.Send(testutil.Up(sid, testutil.Success("ok")))
	c.RecvUntil(isClosed)
	var outcomes []string
	for _, ev := range awaitEvents(t, watched) {
		if p := ev.GetPolicy(); p != nil {
			outcomes = append(outcomes, p.GetCallId()+":"+strings.TrimPrefix(p.GetAction().String(), "POLICY_ACTION_")+":"+strings.TrimPrefix(p.GetHoldOutcome().String(), "HOLD_OUTCOME_"))
		}
	}
	want := "e1:HOLD:UNSPECIFIED e1:ALLOW:APPROVED e2:HOLD:UNSPECIFIED e2:DENY:REJECTED t1:HOLD:UNSPECIFIED t1:DENY:TIMED_OUT"
	if got := strings.Join(outcomes, " "); got != want {
		t.Fatalf("decisions %q\nwant      %q", got, want)
	}
	st := h.d.Policy().Stats()
	if st.Holds.Load() != 3 || st.HoldsApproved.Load() != 1 || st.HoldsRejected.Load() != 1 || st.HoldsTimedOut.Load() != 1 {
		t.Fatalf("counters holds %d approved %d rejected %d timed out %d", st.Holds.Load(), st.HoldsApproved.Load(), st.HoldsRejected.Load(), st.HoldsTimedOut.Load())
	}
}

// TestPolicyHeldCallCancelledByStop: a client cancel while a call is held
// ends the hold (CANCELLED) and the task.
func TestPolicyHeldCallCancelledByStop(t *testing.T) {
	t.Parallel()
	h, ctx, _ := policyHarness(t, "rules:\n  - {id: hold-all, when: 'true', action: hold}\n")
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "e1", ToolName: "echo", ArgumentsJson: `{}`}))
	waitPolicyEvent(t, h, id, func(p *dispatchv1.PolicyDecision) bool { return p.GetCallId() == "e1" })
	cancelled := testutil.Async(func() (*dispatchv1.CancelTaskResponse, error) {
		return h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: id})
	})
	c.RecvUntil(isStop)
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	if out := testutil.Recv(t, cancelled, testutil.Wait, "CancelTask to return"); out.Err != nil || out.V.GetStatus() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel %v %v", out.V, out.Err)
	}
	p := waitPolicyEvent(t, h, id, func(p *dispatchv1.PolicyDecision) bool { return p.GetHoldOutcome() != 0 })
	if p.GetHoldOutcome() != dispatchv1.HoldOutcome_HOLD_OUTCOME_CANCELLED {
		t.Fatalf("outcome %v", p)
	}
}

// TestTaskPolicyTightens: a task's policy_yaml adds a rule for that task
// only; a broken one is INVALID_ARGUMENT with the reason.
func TestTaskPolicyTightens(t *testing.T) {
	t.Parallel()
	h, ctx, _ := policyHarness(t, "limits: {max_tokens: 1000}\n")
	_, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", PolicyYaml: "rules:\n  - {id: a, when: 'nope(', action: stop}\n"})
	wantCode(t, err, codes.InvalidArgument)
	if !strings.Contains(err.Error(), "rule a") {
		t.Fatalf("error %v does not name the rule", err)
	}
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "x", PolicyYaml: "limits: {max_tokens: 100000, max_steps: 1}\n"})
	watched := watchEvents(t, h, id, 0)
	sid, _ := c.Start()
	// Within the task's looser token limit but over the global one: stopped.
	c.Send(testutil.Up(sid, &dispatchv1.Usage{InputTokens: 800, OutputTokens: 300, Steps: 1}))
	stop := c.RecvUntil(isStop).GetStop()
	if stop.GetRuleId() != "limit.max_tokens" || stop.GetCode() != dispatchv1.StopCode_STOP_CODE_BUDGET {
		t.Fatalf("stop %v", stop)
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	evs := awaitEvents(t, watched)
	var usage bool
	for _, ev := range evs {
		usage = usage || ev.GetUsage() != nil
	}
	if !usage {
		t.Fatal("the usage that crossed the budget is not recorded")
	}
}

// TestPolicyReloadUnderLoad: the policy file is rewritten (good and broken
// versions) while sessions stream; no stream drops, no event is lost, and a
// rule added by a reload applies to sessions already running.
func TestPolicyReloadUnderLoad(t *testing.T) {
	t.Parallel()
	const v1 = "rules:\n  - {id: never1, phrases: [zzz-never-1], action: stop}\n"
	const v2 = "rules:\n  - {id: never2, phrases: [zzz-never-2], action: stop}\n  - {id: no-echo, when: 'tool_name == \"echo\"', action: deny}\n"
	const broken = "rules:\n  - {id: x, when: 'tool_name ==', action: stop}\n"
	h, _, path := policyHarness(t, v1)
	ctx := testutil.Context(t, heavyTimeout) // 2 400 chunks relayed and checked
	const sessions, chunks = 8, 300

	stopWriting := make(chan struct{})
	written := testutil.Async(func() (struct{}, error) {
		for i := 0; ; i++ {
			select {
			case <-stopWriting:
				return struct{}{}, nil
			case <-time.After(3 * time.Millisecond):
			}
			var err error
			switch i % 3 {
			case 0:
				err = replaceFile(path, v1+fmt.Sprintf("# %d\n", i))
			case 1:
				err = replaceFile(path, broken+fmt.Sprintf("# %d\n", i))
			default:
				err = replaceFile(path, v1+fmt.Sprintf("# again %d\n", i))
			}
			if err != nil {
				return struct{}{}, err
			}
		}
	})

	// All sessions start before any streams, so that each task lands on
	// the slot registered for it (a finished slot would take the next one).
	type started struct {
		s       *testutil.Session
		watched <-chan testutil.Result[[]*dispatchv1.TaskEvent]
	}
	var all []started
	for range sessions {
		c := testutil.Connect(t, ctx, h.conn, "planner:chat")
		id := submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "stream"})
		watched := watchEventsWithin(t, h, id, 0, heavyTimeout)
		s, err := c.NextSession(ctx)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, started{s, watched})
	}
	played := make(chan error, sessions)
	for n, st := range all {
		script := make([]any, 0, chunks+1)
		for i := range chunks {
			script = append(script, &dispatchv1.ContentChunk{Text: fmt.Sprintf("s%d-c%d ", n, i)})
		}
		go func() { played <- st.s.Play(ctx, append(script, testutil.Success("ok"))...) }()
	}
	for range all {
		if err := testutil.Recv(t, played, heavyTimeout, "the sessions to stream"); err != nil {
			t.Fatal(err)
		}
	}
	for n, st := range all {
		evs := awaitEventsWithin(t, st.watched, heavyTimeout)
		chunk := 0
		for i, ev := range evs {
			if ev.GetSeq() != uint64(i+1) {
				t.Fatalf("session %d: seq %d at %d", n, ev.GetSeq(), i)
			}
			if ct := ev.GetContent(); ct != nil {
				if ct.GetText() != fmt.Sprintf("s%d-c%d ", n, chunk) {
					t.Fatalf("session %d: chunk %d is %q", n, chunk, ct.GetText())
				}
				chunk++
			}
		}
		if chunk != chunks || evs[len(evs)-1].GetState().GetStatus() != agentpb.TaskStatus_SUCCESS {
			t.Errorf("session %d: %d chunks, end %v", n, chunk, evs[len(evs)-1])
		}
	}
	close(stopWriting)
	if w := testutil.Recv(t, written, testutil.Wait, "the policy writer to stop"); w.Err != nil {
		t.Fatal(w.Err)
	}
	st := h.d.Policy().Stats()
	if st.Reloads.Load() == 0 || st.ReloadFailures.Load() == 0 {
		t.Fatalf("reloads %d failures %d: the test did not exercise reloading", st.Reloads.Load(), st.ReloadFailures.Load())
	}

	// A reload applies to a session that is already running.
	c := testutil.Connect(t, ctx, h.conn, "planner:late")
	submit(t, h, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "late"})
	sid, _ := c.Start()
	writePolicy(t, path, v2)
	testutil.WaitFor(t, testutil.Wait, func() bool { return h.d.Policy().Current().NumRules() == 2 }, "v2 loaded")
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "e1", ToolName: "echo", ArgumentsJson: `{}`}))
	r := c.RecvUntil(isToolResult).GetToolResult()
	if r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
		t.Fatalf("after reload %v", r)
	}
	c.Send(testutil.Up(sid, testutil.Success("")))
}

// BenchmarkPolicyStopLatency measures, in memory, the time from the
// commander sending the chunk that completes a forbidden phrase to it
// receiving the stop (p50/p99 "µs-to-stop"), and to the dispatcher's
// SESSION_CLOSED after its immediate stopped ("µs-to-closed"), while 4 other
// sessions each stream a content chunk every 250 µs (about 16 000 packets/s
// in all, each relayed to a watcher) over the same connection.
func BenchmarkPolicyStopLatency(b *testing.B) {
	path := filepath.Join(b.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte("rules:\n  - {id: no-phrase, phrases: [forbidden phrase], action: stop}\n"), 0o600); err != nil {
		b.Fatal(err)
	}
	h, _ := newHarness(b, dispatcher.Config{Policy: dispatcher.Policy{File: path}, Tasks: dispatcher.Tasks{StopGrace: 5 * time.Second}})
	ctx, cancelLoad := context.WithCancel(b.Context())
	const load = 4
	var loadWG sync.WaitGroup
	for range load {
		c, sid, watch := watchedSession(b, ctx, h, "load")
		loadWG.Add(2)
		go func() {
			defer loadWG.Done()
			for {
				if _, err := watch.Recv(); err != nil {
					return
				}
			}
		}()
		go func() {
			defer loadWG.Done()
			chunk := testutil.Up(sid, &dispatchv1.ContentChunk{Text: "token "})
			tick := time.NewTicker(250 * time.Microsecond)
			defer tick.Stop()
			for ctx.Err() == nil {
				if c.Stream().Send(chunk) != nil {
					return
				}
				<-tick.C
			}
		}()
	}
	victim := testutil.Connect(b, b.Context(), h.conn, "planner:victim")
	var toStop, toClosed []time.Duration
	b.ResetTimer()
	for range b.N {
		if _, err := h.tasks.SubmitTask(b.Context(), &dispatchv1.SubmitTaskRequest{Instruction: "v", Planner: "victim"}); err != nil {
			b.Fatal(err)
		}
		sid, _ := victim.Start()
		for _, ch := range []string{"some ", "text ", "then a forb"} {
			victim.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: ch}))
		}
		t0 := time.Now()
		victim.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "idden phrase"}))
		victim.RecvUntil(isStop)
		toStop = append(toStop, time.Since(t0))
		victim.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
		victim.RecvUntil(isClosed)
		toClosed = append(toClosed, time.Since(t0))
	}
	b.StopTimer()
	cancelLoad()
	testutil.Done(b, testutil.Waited(&loadWG), testutil.Wait, "the load to stop")
	q := func(d []time.Duration, p float64) float64 {
		s := append([]time.Duration(nil), d...)
		slices.Sort(s)
		return float64(s[min(len(s)-1, int(p*float64(len(s))))].Microseconds())
	}
	b.ReportMetric(q(toStop, 0.5), "p50-µs-to-stop")
	b.ReportMetric(q(toStop, 0.99), "p99-µs-to-stop")
	b.ReportMetric(q(toClosed, 0.5), "p50-µs-to-closed")
	b.ReportMetric(q(toClosed, 0.99), "p99-µs-to-closed")
}

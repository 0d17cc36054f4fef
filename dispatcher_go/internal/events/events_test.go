package events_test

import (
	"encoding/json"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const output = eventlog.Capped | eventlog.Fenceable

// row is what the vocabulary must say about one sample event of a kind.
type row struct {
	kind     events.Kind
	ev       *dispatchv1.TaskEvent
	name     string
	upstream bool
	class    eventlog.Class
	policy   *policy.Packet // nil: not evaluated
	stage    string         // seed 000; "-" for no row
	message  string
	sse      string // seed 001 as JSON; "" for none
}

// ev is a task event of t1 whose kind is m (the oneof field of m's type).
func ev(m proto.Message) *dispatchv1.TaskEvent {
	e := &dispatchv1.TaskEvent{TaskId: "t1", Seq: 7}
	r := e.ProtoReflect()
	fields := r.Descriptor().Oneofs().ByName("kind").Fields()
	for i := range fields.Len() {
		if fd := fields.Get(i); fd.Message().FullName() == m.ProtoReflect().Descriptor().FullName() {
			r.Set(fd, protoreflect.ValueOfMessage(m.ProtoReflect()))
			return e
		}
	}
	panic("no kind of type " + m.ProtoReflect().Descriptor().FullName())
}

// rows is the table, as the clients see it today (the projections must not
// change: seed-000 and seed-001 clients depend on them byte for byte).
func rows() []row {
	return []row{
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_PENDING, Message: "queued"}),
			name: "state", class: eventlog.Control, stage: "pending", message: "queued",
			sse: `{"type":"status","content":"queued","task_id":"t1","seq":7,"status":"pending"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING, Message: "on slot s1"}),
			name: "state", class: eventlog.Control, stage: "running", message: "on slot s1",
			sse: `{"type":"status","content":"on slot s1","task_id":"t1","seq":7,"status":"running"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_SUCCESS, Message: "completed"}),
			name: "state", class: eventlog.Control, stage: "-",
			sse: `{"type":"finished","content":"completed","output":"the answer","task_id":"t1","seq":7,"status":"finished"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_FAILURE, Message: "boom"}),
			name: "state", class: eventlog.Control, stage: "failure", message: "boom",
			sse: `{"type":"error","content":"boom","task_id":"t1","seq":7,"status":"error"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_CANCELLED, Message: "by client"}),
			name: "state", class: eventlog.Control, stage: "cancelled", message: "by client",
			sse: `{"type":"cancelled","content":"by client","task_id":"t1","seq":7,"status":"cancelled"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: agentpb.TaskStatus_NOT_FOUND}),
			name: "state", class: eventlog.Control, stage: "-",
			sse: `{"type":"status","task_id":"t1","seq":7,"status":"not_found"}`},
		{kind: events.State, ev: ev(&dispatchv1.TaskState{Status: 99}),
			name: "state", class: eventlog.Control, stage: "-",
			sse: `{"type":"status","task_id":"t1","seq":7,"status":"unknown"}`},

		{kind: events.Thought, ev: ev(&dispatchv1.ThoughtChain{Delta: "hmm", StepName: "plan"}),
			name: "thought", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindThought, Text: "hmm", Stage: "plan"},
			stage:  "thought", message: "hmm",
			sse: `{"type":"thinking","content":"hmm","task_id":"t1","seq":7,"stage":"plan"}`},

		{kind: events.Content, ev: ev(&dispatchv1.ContentChunk{Text: "hello"}),
			name: "content", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindContent, Text: "hello"},
			stage:  "content", message: "hello",
			sse: `{"type":"message","content":"hello","task_id":"t1","seq":7}`},

		{kind: events.ToolCall, ev: ev(&dispatchv1.ToolCallRequest{CallId: "c1", ToolName: "calculator", ArgumentsJson: `{"e":"1+1"}`}),
			name: "tool_call", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindToolCall, ToolName: "calculator", ToolArgsJSON: `{"e":"1+1"}`},
			stage:  "tool_call", message: `calculator({"e":"1+1"})`,
			sse: `{"type":"action","content":"calculator({\"e\":\"1+1\"})","task_id":"t1","seq":7,"tool":"calculator","call_id":"c1"}`},

		{kind: events.ToolResult, ev: ev(&dispatchv1.ToolResultEvent{Result: &dispatchv1.ToolCallResult{CallId: "c1", ToolName: "calculator", ResultJson: `{"value":2}`}, DurationMs: 3}),
			name: "tool_result", class: eventlog.Control, stage: "tool_result", message: `{"value":2}`,
			sse: `{"type":"observation","content":"{\"value\":2}","task_id":"t1","seq":7,"tool":"calculator","call_id":"c1"}`},
		{kind: events.ToolResult, ev: ev(&dispatchv1.ToolResultEvent{Result: &dispatchv1.ToolCallResult{CallId: "c2", ToolName: "sleep",
			Error: &dispatchv1.ToolError{Code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL, Message: "no such tool"}}}),
			name: "tool_result", class: eventlog.Control, stage: "tool_result", message: "error: UNKNOWN_TOOL: no such tool",
			sse: `{"type":"observation","content":"error: UNKNOWN_TOOL: no such tool","task_id":"t1","seq":7,"tool":"sleep","call_id":"c2"}`},
		{kind: events.ToolResult, ev: ev(&dispatchv1.ToolResultEvent{Result: &dispatchv1.ToolCallResult{CallId: "c3", ToolName: "x",
			Error: &dispatchv1.ToolError{Code: 42, Message: "new code"}}}),
			name: "tool_result", class: eventlog.Control, stage: "tool_result", message: "error: 42: new code",
			sse: `{"type":"observation","content":"error: 42: new code","task_id":"t1","seq":7,"tool":"x","call_id":"c3"}`},

		{kind: events.Error, ev: ev(&dispatchv1.ErrorSignal{Code: "E", Message: "model down"}),
			name: "error", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindError, Text: "model down"},
			stage:  "error", message: "model down",
			sse: `{"type":"error","content":"model down","task_id":"t1","seq":7}`},

		{kind: events.Usage, ev: ev(&dispatchv1.Usage{InputTokens: 10, OutputTokens: 5, Cost: 0.25}),
			name: "usage", upstream: true, class: eventlog.Capped,
			policy: &policy.Packet{Kind: policy.KindUsage}, stage: "-",
			sse: `{"type":"usage","task_id":"t1","seq":7,"input_tokens":10,"output_tokens":5,"cost":0.25}`},

		{kind: events.Stage, ev: ev(&dispatchv1.StageChange{Stage: "call_user", Message: "need a password"}),
			name: "stage", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindStage, Text: "need a password", Stage: "call_user"},
			stage:  "call_user", message: "need a password",
			sse: `{"type":"stage","content":"need a password","task_id":"t1","seq":7,"stage":"call_user"}`},

		{kind: events.Artifact, ev: ev(&dispatchv1.Artifact{Kind: "screenshot", MimeType: "image/png", Data: []byte{1, 2, 3}, Uri: "ignored", Description: "the screen"}),
			name: "artifact", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindArtifact, Text: "the screen"}, stage: "-",
			sse: `{"type":"screenshot","content":"the screen","task_id":"t1","seq":7,"stage":"screenshot","mime_type":"image/png","url":"data:image/png;base64,AQID"}`},
		{kind: events.Artifact, ev: ev(&dispatchv1.Artifact{Kind: "file", MimeType: "text/plain", Uri: "s3://b/k"}),
			name: "artifact", upstream: true, class: output,
			policy: &policy.Packet{Kind: policy.KindArtifact}, stage: "-",
			sse: `{"type":"artifact","task_id":"t1","seq":7,"stage":"file","mime_type":"text/plain","url":"s3://b/k"}`},

		{kind: events.Result, ev: ev(&dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "42", Message: "done"}),
			name: "result", upstream: true, class: eventlog.Control, stage: "final", message: "42",
			sse: `{"type":"result","content":"42","task_id":"t1","seq":7}`},
		{kind: events.Result, ev: ev(&dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_FAILURE, Message: "gave up"}),
			name: "result", upstream: true, class: eventlog.Control, stage: "-",
			sse: `{"type":"result","task_id":"t1","seq":7}`},

		{kind: events.Stop, ev: ev(&dispatchv1.StopSignal{Reason: "cancelled by client", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}),
			name: "stop", class: eventlog.Control, stage: "stop", message: "cancelled by client",
			sse: `{"type":"stop","content":"cancelled by client","task_id":"t1","seq":7}`},

		{kind: events.Stopped, ev: ev(&dispatchv1.Stopped{Reason: "asked"}),
			name: "stopped", upstream: true, class: eventlog.Control, stage: "-"},

		{kind: events.UserInput, ev: ev(&dispatchv1.UserInput{MessageId: "m1", Text: "go on"}),
			name: "user_input", class: output, stage: "-",
			sse: `{"type":"user_input","content":"go on","task_id":"t1","seq":7}`},

		{kind: events.Policy, ev: ev(&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_HOLD, RuleId: "gui", Reason: "needs approval", CallId: "c1", ToolName: "computer.click", PacketKind: "tool_call"}),
			name: "policy", class: eventlog.Control, stage: "policy", message: "hold computer.click (call c1) by rule gui: needs approval",
			sse: `{"type":"policy","content":"hold by rule gui: needs approval","task_id":"t1","seq":7,"tool":"computer.click","call_id":"c1"}`},
		{kind: events.Policy, ev: ev(&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_DENY, RuleId: "gui", Reason: "approval timed out", CallId: "c1", ToolName: "computer.click", HoldOutcome: dispatchv1.HoldOutcome_HOLD_OUTCOME_TIMED_OUT}),
			name: "policy", class: eventlog.Control, stage: "policy", message: "timed_out computer.click (call c1) by rule gui: approval timed out",
			sse: `{"type":"policy","content":"deny by rule gui: approval timed out","task_id":"t1","seq":7,"tool":"computer.click","call_id":"c1"}`},
		{kind: events.Policy, ev: ev(&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_STOP, RuleId: "no-secrets", PacketKind: "content"}),
			name: "policy", class: eventlog.Control, stage: "policy", message: "stop on content by rule no-secrets",
			sse: `{"type":"policy","content":"stop by rule no-secrets: ","task_id":"t1","seq":7}`},
	}
}

func TestTable(t *testing.T) {
	seen := map[events.Kind]bool{}
	for _, r := range rows() {
		seen[r.kind] = true
		t.Run(r.name, func(t *testing.T) {
			if k := events.Of(r.ev); k != r.kind {
				t.Fatalf("Of = %v, want %v", k, r.kind)
			}
			s := r.kind.Spec()
			if s.Name != r.name || s.Upstream != r.upstream || s.Class != r.class {
				t.Errorf("spec = %q upstream %v class %v, want %q %v %v", s.Name, s.Upstream, s.Class, r.name, r.upstream, r.class)
			}
			if l := events.Label(r.ev); l != r.name {
				t.Errorf("Label = %q, want %q", l, r.name)
			}
			p, ok := events.PolicyPacket(r.ev)
			switch {
			case r.policy == nil && ok:
				t.Errorf("PolicyPacket = %+v, want none", p)
			case r.policy != nil && (!ok || p != *r.policy):
				t.Errorf("PolicyPacket = %+v %v, want %+v", p, ok, *r.policy)
			case ok && s.PolicyKind != p.Kind:
				t.Errorf("PolicyKind %q, packet kind %q", s.PolicyKind, p.Kind)
			}
			stage, msg, ok := events.Seed000(r.ev)
			if r.stage == "-" {
				if ok {
					t.Errorf("Seed000 = %q %q, want none", stage, msg)
				}
			} else if !ok || stage != r.stage || msg != r.message {
				t.Errorf("Seed000 = %q %q %v, want %q %q", stage, msg, ok, r.stage, r.message)
			}
			e, ok := events.Seed001(r.ev, "the answer")
			var got string
			if ok {
				b, err := json.Marshal(e)
				if err != nil {
					t.Fatal(err)
				}
				got = string(b)
			}
			if got != r.sse {
				t.Errorf("Seed001 =\n %s\nwant\n %s", got, r.sse)
			}
		})
	}
	for _, k := range events.Kinds() {
		if !seen[k] {
			t.Errorf("kind %v has no row in the test table", k)
		}
	}
}

// Every field of the TaskEvent kind oneof is a Kind of the same name, and
// every kind is one field: a new field fails here until it has a row.
func TestKindsAreTheOneof(t *testing.T) {
	fields := (&dispatchv1.TaskEvent{}).ProtoReflect().Descriptor().Oneofs().ByName("kind").Fields()
	if fields.Len() != len(events.Kinds()) {
		t.Errorf("the oneof has %d fields, the table %d kinds", fields.Len(), len(events.Kinds()))
	}
	for i := range fields.Len() {
		fd := fields.Get(i)
		m := &dispatchv1.TaskEvent{}
		r := m.ProtoReflect()
		r.Set(fd, r.NewField(fd))
		k := events.Of(m)
		if k == events.None || k.Spec().Name != string(fd.Name()) {
			t.Errorf("field %s: kind %v (%q)", fd.Name(), k, k.Spec().Name)
		}
		if k.Spec().Class&^output != 0 {
			t.Errorf("field %s: class %v is not a combination of Capped and Fenceable", fd.Name(), k.Spec().Class)
		}
	}
	policyKinds := map[string]bool{}
	for _, k := range events.Kinds() {
		if pk := k.Spec().PolicyKind; pk != "" {
			policyKinds[pk] = true
		}
	}
	for _, pk := range []string{policy.KindThought, policy.KindContent, policy.KindToolCall, policy.KindUsage, policy.KindStage, policy.KindArtifact, policy.KindError} {
		if !policyKinds[pk] {
			t.Errorf("no kind is the policy's %q", pk)
		}
	}
	if len(policyKinds) != 7 {
		t.Errorf("policy kinds: %v", policyKinds)
	}
	if l := events.Label(&dispatchv1.TaskEvent{}); l != "other" {
		t.Errorf("Label(no kind) = %q", l)
	}
	if _, _, ok := events.Seed000(&dispatchv1.TaskEvent{}); ok {
		t.Error("Seed000(no kind) projected")
	}
	if _, ok := events.Seed001(&dispatchv1.TaskEvent{}, ""); ok {
		t.Error("Seed001(no kind) projected")
	}
}

// Every upstream payload either records the event of the same name, with
// the payload and the packet's timestamp, or (hello, sandbox, and batch,
// whose packets the session handles one by one) none.
func TestFromUpstream(t *testing.T) {
	fields := (&dispatchv1.UpstreamPacket{}).ProtoReflect().Descriptor().Oneofs().ByName("payload").Fields()
	upstream := 0
	for i := range fields.Len() {
		fd := fields.Get(i)
		pkt := &dispatchv1.UpstreamPacket{Timestamp: 1234}
		r := pkt.ProtoReflect()
		r.Set(fd, r.NewField(fd))
		ev, k := events.FromUpstream(pkt)
		switch fd.Name() {
		case "hello", "sandbox", "batch":
			if ev != nil || k != events.None {
				t.Errorf("%s records %v", fd.Name(), k)
			}
			continue
		}
		upstream++
		if k.Spec().Name != string(fd.Name()) || !k.Spec().Upstream || events.Of(ev) != k {
			t.Errorf("%s: kind %v", fd.Name(), k)
			continue
		}
		if ev.GetEmittedAtUs() != 1234 {
			t.Errorf("%s: emitted_at_us %d", fd.Name(), ev.GetEmittedAtUs())
		}
		evr := ev.ProtoReflect()
		efd := evr.Descriptor().Fields().ByName(fd.Name())
		if evr.Get(efd).Message().Interface() != r.Get(fd).Message().Interface() {
			t.Errorf("%s: the payload was not moved into the event", fd.Name())
		}
	}
	n := 0
	for _, k := range events.Kinds() {
		if k.Spec().Upstream {
			n++
		}
	}
	if n != upstream {
		t.Errorf("%d kinds say Upstream, %d payloads record one", n, upstream)
	}
	if ev, k := events.FromUpstream(&dispatchv1.UpstreamPacket{}); ev != nil || k != events.None {
		t.Errorf("no payload: %v", k)
	}
}

func TestPolicyAction(t *testing.T) {
	for a, want := range map[policy.Action]string{policy.Allow: "allow", policy.Hold: "hold", policy.Deny: "deny", policy.Stop: "stop"} {
		if got := protoenum.Name(events.PolicyAction(a)); got != want || a.String() != want {
			t.Errorf("%v: %q", a, got)
		}
	}
	if got := events.PolicyAction(policy.Action(99)); got != dispatchv1.PolicyAction_POLICY_ACTION_UNSPECIFIED {
		t.Errorf("unknown action: %v", got)
	}
}

func TestSeed001Status(t *testing.T) {
	for s, want := range map[agentpb.TaskStatus]string{
		agentpb.TaskStatus_PENDING: "pending", agentpb.TaskStatus_RUNNING: "running", agentpb.TaskStatus_SUCCESS: "finished",
		agentpb.TaskStatus_FAILURE: "error", agentpb.TaskStatus_CANCELLED: "cancelled", agentpb.TaskStatus_NOT_FOUND: "not_found",
		agentpb.TaskStatus_TASKSTATUSUNDEFINED: "unknown",
	} {
		if got := events.Seed001Status(s); got != want {
			t.Errorf("%v: %q, want %q", s, got, want)
		}
	}
}

// FromUpstream makes each event in one allocation (the event and its
// kind's oneof wrapper together): it runs once per packet of every flood.
func TestFromUpstreamAllocatesOnce(t *testing.T) {
	pkt := &dispatchv1.UpstreamPacket{Timestamp: 7, Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: "x"}}}
	var ev *dispatchv1.TaskEvent
	if n := testing.AllocsPerRun(100, func() { ev, _ = events.FromUpstream(pkt) }); n != 1 {
		t.Fatalf("%v allocations per event, want 1", n)
	}
	if ev.GetContent() != pkt.GetContent() || ev.GetEmittedAtUs() != 7 {
		t.Fatalf("event %v", ev)
	}
}

// FromUpstreamAt stamps the event with the time given, in the same one
// allocation; a zero time leaves the event without one (the task stamps it).
func TestFromUpstreamAtStampsInTheSameAllocation(t *testing.T) {
	pkt := &dispatchv1.UpstreamPacket{Timestamp: 7, Payload: &dispatchv1.UpstreamPacket_Thought{Thought: &dispatchv1.ThoughtChain{Delta: "x"}}}
	at := time.Date(2026, 12, 6, 12, 0, 0, 123456789, time.UTC)
	var ev *dispatchv1.TaskEvent
	if n := testing.AllocsPerRun(100, func() { ev, _ = events.FromUpstreamAt(pkt, at) }); n != 1 {
		t.Fatalf("%v allocations per event, want 1", n)
	}
	if !ev.GetTime().AsTime().Equal(at) || ev.GetThought() != pkt.GetThought() || ev.GetEmittedAtUs() != 7 {
		t.Fatalf("event %v", ev)
	}
	if ev, _ := events.FromUpstreamAt(pkt, time.Time{}); ev.GetTime() != nil {
		t.Fatalf("zero time stamped: %v", ev.GetTime())
	}
	if ev, _ := events.FromUpstream(pkt); ev.GetTime() != nil {
		t.Fatalf("FromUpstream stamped: %v", ev.GetTime())
	}
}

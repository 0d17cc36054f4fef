package events

import (
	"encoding/base64"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
)

// Spec is one row of the vocabulary: everything the dispatcher says about
// one kind of task event. The projections are reached through PolicyPacket,
// Seed000 and Seed001.
type Spec struct {
	// Name is the oneof field's name, e.g. "tool_call". It is the metric
	// label of the kind.
	Name string
	// Upstream says the commander sends the kind (the UpstreamPacket
	// payload of the same name); the others the dispatcher makes itself.
	Upstream bool
	// Class is how the event log polices an append of the kind.
	Class eventlog.Class
	// PolicyKind is the kind as policy rules see it (a policy.Kind*); ""
	// for kinds no policy evaluates.
	PolicyKind string

	// policy fills what a policy sees of the event besides its kind (nil:
	// only the kind).
	policy func(ev *event, p *policy.Packet)
	// seed000 is the seed-000 TaskStream{stage, message}; ok false when
	// this event has no row (nil: the kind never has one).
	seed000 func(ev *event) (stage, message string, ok bool)
	// seed001 fills the seed-001 SSE event (nil: the kind has none). result
	// is the task's result so far.
	seed001 func(ev *event, result string, e *Seed001Event)
}

type event = dispatchv1.TaskEvent

// plannerOutput is the class of what a planner says: counted toward the
// log's limits and refused once the stop is decided (the fence).
const plannerOutput = eventlog.Capped | eventlog.Fenceable

// table is the vocabulary, one row per kind. docs/protocol.md shows the
// seed-000 column as a table; docs/http.md the seed-001 one.
var table = [numKinds]Spec{
	// A task's status change. Made by the task; never refused.
	State: {
		Name: "state", Class: eventlog.Control,
		seed000: func(ev *event) (string, string, bool) {
			st := ev.GetState()
			switch st.GetStatus() {
			case agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_CANCELLED:
				return protoenum.Name(st.GetStatus()), st.GetMessage(), true
			}
			return "", "", false // SUCCESS: "final" said it
		},
		seed001: func(ev *event, result string, e *Seed001Event) {
			st := ev.GetState()
			e.Type, e.Status, e.Content = "status", Seed001Status(st.GetStatus()), st.GetMessage()
			// The terminal event is named as seed 001's clients end on
			// it: "finished" (with the output), "error", "cancelled".
			switch st.GetStatus() {
			case agentpb.TaskStatus_SUCCESS:
				e.Type, e.Output = "finished", result
			case agentpb.TaskStatus_FAILURE:
				e.Type = "error"
			case agentpb.TaskStatus_CANCELLED:
				e.Type = "cancelled"
			}
		},
	},
	Thought: {
		Name: "thought", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindThought,
		policy: func(ev *event, p *policy.Packet) {
			p.Text, p.Stage = ev.GetThought().GetDelta(), ev.GetThought().GetStepName()
		},
		seed000: func(ev *event) (string, string, bool) { return "thought", ev.GetThought().GetDelta(), true },
		seed001: func(ev *event, _ string, e *Seed001Event) {
			e.Type, e.Content, e.Stage = "thinking", ev.GetThought().GetDelta(), ev.GetThought().GetStepName()
		},
	},
	Content: {
		Name: "content", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindContent,
		policy:  func(ev *event, p *policy.Packet) { p.Text = ev.GetContent().GetText() },
		seed000: func(ev *event) (string, string, bool) { return "content", ev.GetContent().GetText(), true },
		seed001: func(ev *event, _ string, e *Seed001Event) { e.Type, e.Content = "message", ev.GetContent().GetText() },
	},
	// Recorded before it runs: the append is the check against the fence.
	ToolCall: {
		Name: "tool_call", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindToolCall,
		policy: func(ev *event, p *policy.Packet) {
			p.ToolName, p.ToolArgsJSON = ev.GetToolCall().GetToolName(), ev.GetToolCall().GetArgumentsJson()
		},
		seed000: func(ev *event) (string, string, bool) { return "tool_call", callText(ev.GetToolCall()), true },
		seed001: func(ev *event, _ string, e *Seed001Event) {
			tc := ev.GetToolCall()
			e.Type, e.Tool, e.CallID, e.Content = "action", tc.GetToolName(), tc.GetCallId(), callText(tc)
		},
	},
	// The outcome of an accepted call: recorded even after a stop
	// (a cancelled call shows as CANCELLED).
	ToolResult: {
		Name: "tool_result", Class: eventlog.Control,
		seed000: func(ev *event) (string, string, bool) {
			return "tool_result", resultText(ev.GetToolResult().GetResult()), true
		},
		seed001: func(ev *event, _ string, e *Seed001Event) {
			res := ev.GetToolResult().GetResult()
			e.Type, e.Tool, e.CallID, e.Content = "observation", res.GetToolName(), res.GetCallId(), resultText(res)
		},
	},
	Error: {
		Name: "error", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindError,
		policy:  func(ev *event, p *policy.Packet) { p.Text = ev.GetError().GetMessage() },
		seed000: func(ev *event) (string, string, bool) { return "error", ev.GetError().GetMessage(), true },
		seed001: func(ev *event, _ string, e *Seed001Event) { e.Type, e.Content = "error", ev.GetError().GetMessage() },
	},
	// Spending is real even after a stop: capped, never fenced.
	Usage: {
		Name: "usage", Upstream: true, Class: eventlog.Capped, PolicyKind: policy.KindUsage,
		seed001: func(ev *event, _ string, e *Seed001Event) {
			u := ev.GetUsage()
			e.Type, e.InputTokens, e.OutputTokens, e.Cost, e.Model = "usage", u.GetInputTokens(), u.GetOutputTokens(), u.GetCost(), u.GetModel()
		},
	},
	Stage: {
		Name: "stage", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindStage,
		policy: func(ev *event, p *policy.Packet) {
			p.Text, p.Stage = ev.GetStage().GetMessage(), ev.GetStage().GetStage()
		},
		seed000: func(ev *event) (string, string, bool) {
			return ev.GetStage().GetStage(), ev.GetStage().GetMessage(), true
		},
		seed001: func(ev *event, _ string, e *Seed001Event) {
			e.Type, e.Stage, e.Content = "stage", ev.GetStage().GetStage(), ev.GetStage().GetMessage()
		},
	},
	Artifact: {
		Name: "artifact", Upstream: true, Class: plannerOutput, PolicyKind: policy.KindArtifact,
		policy: func(ev *event, p *policy.Packet) { p.Text = ev.GetArtifact().GetDescription() },
		seed001: func(ev *event, _ string, e *Seed001Event) {
			a := ev.GetArtifact()
			e.Type, e.Stage, e.Content, e.MimeType = "artifact", a.GetKind(), a.GetDescription(), a.GetMimeType()
			if a.GetKind() == "screenshot" {
				e.Type = "screenshot"
			}
			e.URL = a.GetUri()
			if len(a.GetData()) > 0 {
				e.URL = "data:" + a.GetMimeType() + ";base64," + base64.StdEncoding.EncodeToString(a.GetData())
			}
		},
	},
	// The planner's end (terminal packet): recorded even after a stop,
	// so a task keeps the planner's real outcome.
	Result: {
		Name: "result", Upstream: true, Class: eventlog.Control,
		seed000: func(ev *event) (string, string, bool) {
			if ev.GetResult().GetOutcome() == dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS {
				return "final", ev.GetResult().GetResult(), true
			}
			return "", "", false // the FAILURE state that follows says why
		},
		seed001: func(ev *event, _ string, e *Seed001Event) { e.Type, e.Content = "result", ev.GetResult().GetResult() },
	},
	// The stop decision: the fence itself (eventlog Fence appends it).
	Stop: {
		Name: "stop", Class: eventlog.Control,
		seed000: func(ev *event) (string, string, bool) { return "stop", ev.GetStop().GetReason(), true },
		seed001: func(ev *event, _ string, e *Seed001Event) { e.Type, e.Content = "stop", ev.GetStop().GetReason() },
	},
	// The commander's answer to a stop (terminal packet).
	Stopped: {
		Name: "stopped", Upstream: true, Class: eventlog.Control,
	},
	// A client's message into the session: refused once the stop is decided.
	UserInput: {
		Name: "user_input", Class: plannerOutput,
		seed001: func(ev *event, _ string, e *Seed001Event) {
			e.Type, e.Content = "user_input", ev.GetUserInput().GetText()
		},
	},
	// A policy decision: bounded by the packets that caused it, and visible
	// even when it is the stop itself.
	Policy: {
		Name: "policy", Class: eventlog.Control,
		seed000: func(ev *event) (string, string, bool) { return "policy", policyText(ev.GetPolicy()), true },
		seed001: func(ev *event, _ string, e *Seed001Event) {
			pd := ev.GetPolicy()
			e.Type, e.CallID, e.Tool = "policy", pd.GetCallId(), pd.GetToolName()
			e.Content = protoenum.Name(pd.GetAction()) + " by rule " + pd.GetRuleId() + ": " + pd.GetReason()
		},
	},
}

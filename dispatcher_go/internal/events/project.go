package events

import (
	"strings"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
)

// PolicyPacket is what a policy sees of ev; false for kinds that policies
// do not evaluate (results, stops, and what the dispatcher makes itself).
func PolicyPacket(ev *dispatchv1.TaskEvent) (policy.Packet, bool) {
	s := Of(ev).Spec()
	if s.PolicyKind == "" {
		return policy.Packet{}, false
	}
	p := policy.Packet{Kind: s.PolicyKind}
	if s.policy != nil {
		s.policy(ev, &p)
	}
	return p, true
}

// PolicyAction is a policy's action as a PolicyDecision event records it.
func PolicyAction(a policy.Action) dispatchv1.PolicyAction {
	switch a {
	case policy.Allow:
		return dispatchv1.PolicyAction_POLICY_ACTION_ALLOW
	case policy.Hold:
		return dispatchv1.PolicyAction_POLICY_ACTION_HOLD
	case policy.Deny:
		return dispatchv1.PolicyAction_POLICY_ACTION_DENY
	case policy.Stop:
		return dispatchv1.PolicyAction_POLICY_ACTION_STOP
	}
	return dispatchv1.PolicyAction_POLICY_ACTION_UNSPECIFIED
}

// Seed000 projects ev onto the seed-000 TaskStream{stage, message} (the
// table in docs/protocol.md). Events without a row (usage, artifact,
// stopped, user input, a failed result, the SUCCESS state that follows
// "final") are not projected.
func Seed000(ev *dispatchv1.TaskEvent) (stage, message string, ok bool) {
	if f := Of(ev).Spec().seed000; f != nil {
		return f(ev)
	}
	return "", "", false
}

// Seed001Event is one SSE event of seed 001's /api/agent/run,
// {"type": "thinking"|"action"|"result"|"finished", "content"|"output": …}
// with the dispatcher's extra fields.
type Seed001Event struct {
	Type    string `json:"type"`
	Content string `json:"content,omitempty"`
	Output  string `json:"output,omitempty"`
	TaskID  string `json:"task_id"`
	Seq     uint64 `json:"seq"`
	// Status is set on "status" and on the terminal event ("finished",
	// "error", "cancelled"): pending, running, finished, error, cancelled.
	Status string `json:"status,omitempty"`
	// Tool calls and results.
	Tool   string `json:"tool,omitempty"`
	CallID string `json:"call_id,omitempty"`
	// Stage events (e.g. call_user).
	Stage string `json:"stage,omitempty"`
	// Artifacts (screenshots): inline data as a data: URL, or a URI.
	MimeType string `json:"mime_type,omitempty"`
	URL      string `json:"url,omitempty"`
	// Usage; Model is the model the tokens were spent on.
	Model        string  `json:"model,omitempty"`
	InputTokens  int64   `json:"input_tokens,omitempty"`
	OutputTokens int64   `json:"output_tokens,omitempty"`
	Cost         float64 `json:"cost,omitempty"`
}

// Seed001 projects ev onto a seed-001 SSE event; false for events without
// one (stopped, and kinds this build does not know). result is the task's
// result so far (the "output" of "finished").
func Seed001(ev *dispatchv1.TaskEvent, result string) (Seed001Event, bool) {
	e := Seed001Event{TaskID: ev.GetTaskId(), Seq: ev.GetSeq()}
	f := Of(ev).Spec().seed001
	if f == nil {
		return e, false
	}
	f(ev, result, &e)
	return e, true
}

// Seed001Status names a task status as seed 001 does ("finished" for
// success, "error" for failure: the names its poll loops end on).
func Seed001Status(s agentpb.TaskStatus) string {
	switch s {
	case agentpb.TaskStatus_PENDING:
		return "pending"
	case agentpb.TaskStatus_RUNNING:
		return "running"
	case agentpb.TaskStatus_SUCCESS:
		return "finished"
	case agentpb.TaskStatus_FAILURE:
		return "error"
	case agentpb.TaskStatus_CANCELLED:
		return "cancelled"
	case agentpb.TaskStatus_NOT_FOUND:
		return "not_found"
	}
	return "unknown"
}

// callText words a tool call: name(arguments_json).
func callText(tc *dispatchv1.ToolCallRequest) string {
	return tc.GetToolName() + "(" + tc.GetArgumentsJson() + ")"
}

// resultText words a tool call's result: its JSON, or
// "error: TIMEOUT: message".
func resultText(res *dispatchv1.ToolCallResult) string {
	if e := res.GetError(); e != nil {
		return "error: " + strings.ToUpper(protoenum.Name(e.GetCode())) + ": " + e.GetMessage()
	}
	return res.GetResultJson()
}

// policyText words a policy decision for the seed-000 stream, e.g.
// "hold computer.click (call c1) by rule gui-needs-approval: ..." or
// "approved computer.click (call c1) by rule gui-needs-approval: ...".
func policyText(pd *dispatchv1.PolicyDecision) string {
	verb := protoenum.Name(pd.GetAction())
	if o := pd.GetHoldOutcome(); o != dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED {
		verb = protoenum.Name(o)
	}
	var b strings.Builder
	b.WriteString(verb)
	if pd.GetToolName() != "" {
		b.WriteString(" " + pd.GetToolName() + " (call " + pd.GetCallId() + ")")
	} else if pd.GetPacketKind() != "" {
		b.WriteString(" on " + pd.GetPacketKind())
	}
	b.WriteString(" by rule " + pd.GetRuleId())
	if pd.GetReason() != "" {
		b.WriteString(": " + pd.GetReason())
	}
	return b.String()
}

// Package policy decides, packet by packet, whether a session may go on: it
// evaluates the rules of a policy file (docs/policies.md) against each
// upstream packet and the session's running state, and answers stop, deny,
// hold or allow.
//
// A Policy is compiled once (cel-go Env → Compile → Program; programs are
// thread-safe) and checked against its own inline test cases before it is
// used; an Engine holds the policy in force and swaps it atomically on
// reload, so a reload never touches a running stream. Each evaluation runs
// under a CEL cost limit, so no expression can stall a stream.
//
// Rules only ever restrict: there is no "allow" rule. The decision for a
// packet is the most severe one of all rules that match (stop > deny > hold
// > allow), which is what lets a task add rules of its own (tighten) without
// any way to loosen the global policy. A stop decision carries its stop
// code (budget for the built-in spending limits, policy for rules).
//
// A task's own policy is a client's text: CompileTask bounds what it may
// cost to compile and its static cost estimate, and on every packet its
// rules are charged their actual cost against a budget, past which the
// decision is a stop (budget.go). The operator's file has no such budget.
//
// It only decides: it must not act on a decision (stopping, denying,
// holding and recording are internal/session's), and it sees a packet only
// as a Packet, never the stream or the event log.
package policy

import (
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Action is a policy decision, ordered by severity.
type Action int

// Actions, least severe first.
const (
	// Allow lets the packet through.
	Allow Action = iota
	// Hold makes a tool call wait for a client's approval (or its timeout,
	// which denies).
	Hold
	// Deny refuses a tool call (error DENIED); the session goes on.
	Deny
	// Stop stops the session before the packet is recorded or forwarded.
	Stop
)

// String is the action's name as written in policy files.
func (a Action) String() string {
	switch a {
	case Allow:
		return "allow"
	case Hold:
		return "hold"
	case Deny:
		return "deny"
	case Stop:
		return "stop"
	}
	return "unknown"
}

func parseAction(s string) (Action, bool) {
	switch s {
	case "allow":
		return Allow, true
	case "hold":
		return Hold, true
	case "deny":
		return Deny, true
	case "stop":
		return Stop, true
	}
	return Allow, false
}

// Packet kinds, as the CEL variable kind sees them.
const (
	KindThought  = "thought"
	KindContent  = "content"
	KindToolCall = "tool_call"
	KindUsage    = "usage"
	KindStage    = "stage"
	KindArtifact = "artifact"
	KindError    = "error"
)

var kinds = []string{KindThought, KindContent, KindToolCall, KindUsage, KindStage, KindArtifact, KindError}

// Packet is what a policy sees of one upstream packet.
type Packet struct {
	// Kind is one of the Kind constants.
	Kind string
	// Text is the content text, the thought delta, the stage or error
	// message, or the artifact description.
	Text string
	// Stage is the stage name of a stage packet.
	Stage string
	// ToolName and ToolArgsJSON describe a tool call.
	ToolName     string
	ToolArgsJSON string
}

// State is the session's running state when the packet arrives (usage
// already includes a usage packet being evaluated).
type State struct {
	TaskID       string
	Planner      string
	Tenant       string
	Labels       map[string]string
	InputTokens  int64
	OutputTokens int64
	Cost         float64
	Steps        int64
	Elapsed      time.Duration
	// ToolCalls is the number of tool calls the session made so far.
	ToolCalls int64
}

// Decision is the outcome of evaluating one packet.
type Decision struct {
	Action Action
	// RuleID is the rule that decided ("" for allow). Built-in limits are
	// "limit.max_tokens", "limit.max_cost", "limit.max_steps",
	// "limit.max_tool_calls_per_minute", and "limit.policy_cost" (a task's
	// policy over its evaluation budget).
	RuleID string
	// Reason explains the decision in words for people.
	Reason string
	// StopCode is the code of the stop a Stop decision makes:
	// STOP_CODE_BUDGET for the built-in spending limits (tokens, cost,
	// steps, a task policy's evaluation budget), STOP_CODE_POLICY for rules. Unspecified for other actions.
	StopCode dispatchv1.StopCode
	// HoldTimeout is how long a Hold waits before it denies.
	HoldTimeout time.Duration
	// PolicyVersion identifies the policy that decided (content hash).
	PolicyVersion string
}

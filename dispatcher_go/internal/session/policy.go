package session

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/policy"
)

// Policy hooks. Every upstream packet of a running session is evaluated on
// the receiving goroutine before it is recorded: a stop decided on a packet
// fences the log first, so that packet (e.g. the chunk completing a
// forbidden phrase) and everything after it never reach a client; a deny
// answers the tool call DENIED; a hold parks it until ResolveHold or its
// timeout (which denies; holds.go). Each non-allow decision is a
// PolicyDecision event.

// policyState is the session's running state for the policy.
func (r *run) policyState() policy.State {
	st := r.t.Stats()
	labels := r.t.Labels()
	return policy.State{
		TaskID:       r.t.ID(),
		Planner:      r.t.Planner(),
		Tenant:       labels["tenant"],
		Labels:       labels,
		InputTokens:  st.InputTokens,
		OutputTokens: st.OutputTokens,
		Cost:         st.Cost,
		Steps:        int64(st.Steps),
		Elapsed:      time.Since(r.begun),
		ToolCalls:    r.toolCalls,
	}
}

// evaluate runs the policy on ev, the event of an upstream packet not yet
// recorded (receiving goroutine only). A stop is carried out here, before
// the event is recorded; deny and hold are returned for the tool-call path.
func (r *run) evaluate(ev *dispatchv1.TaskEvent) policy.Decision {
	if r.pol == nil || r.stopped.Load() {
		return policy.Decision{}
	}
	kind := events.Of(ev).Spec().PolicyKind
	if kind == "" {
		return policy.Decision{} // a kind policies do not see
	}
	// With no rules and no limits in force (the default) the policy only
	// keeps the text: building its view of the packet and the session's
	// state would cost several allocations per packet, a large part of a
	// content packet's ingest under a flood.
	if r.pol.Skip(kind, policyText(ev)) {
		return policy.Decision{}
	}
	pp, _ := events.PolicyPacket(ev)
	// The slot's context, not the run's: the run's is cancelled by a stop
	// decided concurrently, which must not turn into evaluation errors.
	d := r.pol.Evaluate(r.sl.ctx, pp, r.policyState())
	if d.Action == policy.Stop {
		r.recordDecision(d, pp.Kind, ev.GetToolCall(), nil, dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED)
		// The rule id goes into the reason because the reason becomes the
		// task's message: a client that only polls status (seed 000) must
		// still learn which rule ended the task.
		r.stopWith(fmt.Sprintf("policy rule %s: %s", d.RuleID, d.Reason), d.StopCode, d.RuleID)
	}
	return d
}

// policyText is the text of a content or thought event ("" for others):
// what policy.Session.Skip keeps (events.PolicyPacket's Text for these).
func policyText(ev *dispatchv1.TaskEvent) string {
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_Content:
		return k.Content.GetText()
	case *dispatchv1.TaskEvent_Thought:
		return k.Thought.GetDelta()
	}
	return ""
}

// recordDecision appends a PolicyDecision event (Control class: see
// internal/events).
func (r *run) recordDecision(d policy.Decision, kind string, tc *dispatchv1.ToolCallRequest, deadline *time.Time, outcome dispatchv1.HoldOutcome) uint64 {
	pd := &dispatchv1.PolicyDecision{
		Action:        events.PolicyAction(d.Action),
		RuleId:        d.RuleID,
		Reason:        d.Reason,
		PacketKind:    kind,
		CallId:        tc.GetCallId(),
		ToolName:      tc.GetToolName(),
		PolicyVersion: d.PolicyVersion,
		HoldOutcome:   outcome,
	}
	if deadline != nil {
		pd.HoldDeadline = timestamppb.New(*deadline)
	}
	seq, _ := r.t.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Policy{Policy: pd}}, events.Policy.Spec().Class)
	if d.Action != policy.Allow || outcome == dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED {
		r.log.Info("policy decision", "action", d.Action.String(), "rule_id", d.RuleID, "kind", kind,
			"call_id", tc.GetCallId(), "hold_outcome", outcome.String())
	}
	return seq
}

// policyDeny refuses a recorded tool call by policy.
func (r *run) policyDeny(tc *dispatchv1.ToolCallRequest, d policy.Decision) error {
	r.recordDecision(d, policy.KindToolCall, tc, nil, dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED)
	return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED,
		fmt.Sprintf("denied by policy rule %s: %s", d.RuleID, d.Reason), true)
}

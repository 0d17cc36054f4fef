package session

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Policy hooks. Every upstream packet of a running session is evaluated on
// the receiving goroutine before it is recorded: a stop decided on a packet
// fences the log first, so that packet (e.g. the chunk completing a
// forbidden phrase) and everything after it never reach a client; a deny
// answers the tool call DENIED; a hold parks it until ResolveHold or its
// timeout (which denies). Each non-allow decision is a PolicyDecision event.

// hold is a tool call waiting for approval.
type hold struct {
	decision policy.Decision
	call     *dispatchv1.ToolCallRequest
	res      chan holdResolution // capacity 1; written by ResolveHold
}

type holdResolution struct {
	approve bool
	reason  string
}

// policyPacket is what a policy sees of pkt; false for packets that are
// not evaluated (result, stopped: they end the session).
func policyPacket(pkt *dispatchv1.UpstreamPacket) (policy.Packet, bool) {
	switch p := pkt.GetPayload().(type) {
	case *dispatchv1.UpstreamPacket_Thought:
		return policy.Packet{Kind: policy.KindThought, Text: p.Thought.GetDelta(), Stage: p.Thought.GetStepName()}, true
	case *dispatchv1.UpstreamPacket_Content:
		return policy.Packet{Kind: policy.KindContent, Text: p.Content.GetText()}, true
	case *dispatchv1.UpstreamPacket_ToolCall:
		return policy.Packet{Kind: policy.KindToolCall, ToolName: p.ToolCall.GetToolName(), ToolArgsJSON: p.ToolCall.GetArgumentsJson()}, true
	case *dispatchv1.UpstreamPacket_Usage:
		return policy.Packet{Kind: policy.KindUsage}, true
	case *dispatchv1.UpstreamPacket_Stage:
		return policy.Packet{Kind: policy.KindStage, Text: p.Stage.GetMessage(), Stage: p.Stage.GetStage()}, true
	case *dispatchv1.UpstreamPacket_Artifact:
		return policy.Packet{Kind: policy.KindArtifact, Text: p.Artifact.GetDescription()}, true
	case *dispatchv1.UpstreamPacket_Error:
		return policy.Packet{Kind: policy.KindError, Text: p.Error.GetMessage()}, true
	}
	return policy.Packet{}, false
}

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

// evaluate runs the policy on pkt (receiving goroutine only). A stop is
// carried out here, before the packet is recorded; deny and hold are
// returned for the tool-call path.
func (r *run) evaluate(pkt *dispatchv1.UpstreamPacket) policy.Decision {
	if r.pol == nil || r.stopped.Load() {
		return policy.Decision{}
	}
	pp, ok := policyPacket(pkt)
	if !ok {
		return policy.Decision{}
	}
	// The slot's context, not the run's: the run's is cancelled by a stop
	// decided concurrently, which must not turn into evaluation errors.
	d := r.pol.Evaluate(r.sl.ctx, pp, r.policyState())
	if d.Action == policy.Stop {
		r.recordDecision(d, pp.Kind, pkt.GetToolCall(), nil, dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED)
		// The rule id goes into the reason because the reason becomes the
		// task's message: a client that only polls status (seed 000) must
		// still learn which rule ended the task.
		r.stopWith(fmt.Sprintf("policy rule %s: %s", d.RuleID, d.Reason), d.StopCode, d.RuleID)
	}
	return d
}

var actionProto = map[policy.Action]dispatchv1.PolicyAction{
	policy.Allow: dispatchv1.PolicyAction_POLICY_ACTION_ALLOW,
	policy.Hold:  dispatchv1.PolicyAction_POLICY_ACTION_HOLD,
	policy.Deny:  dispatchv1.PolicyAction_POLICY_ACTION_DENY,
	policy.Stop:  dispatchv1.PolicyAction_POLICY_ACTION_STOP,
}

// recordDecision appends a PolicyDecision event. Control class: a decision
// is bounded by the packets that caused it, and must be visible even when
// it is the stop itself.
func (r *run) recordDecision(d policy.Decision, kind string, tc *dispatchv1.ToolCallRequest, deadline *time.Time, outcome dispatchv1.HoldOutcome) uint64 {
	pd := &dispatchv1.PolicyDecision{
		Action:        actionProto[d.Action],
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
	seq, _ := r.t.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Policy{Policy: pd}}, eventlog.Control)
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

// policyHold parks a recorded tool call until ResolveHold, its timeout or
// the end of the session, in its own goroutine: the stream goes on.
func (r *run) policyHold(tc *dispatchv1.ToolCallRequest, call broker.Call, d policy.Decision) {
	h := &hold{decision: d, call: tc, res: make(chan holdResolution, 1)}
	r.mu.Lock()
	if r.holds == nil {
		r.holds = make(map[string]*hold)
	}
	r.holds[tc.GetCallId()] = h
	r.mu.Unlock()
	deadline := time.Now().Add(d.HoldTimeout)
	r.recordDecision(d, policy.KindToolCall, tc, &deadline, dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED)

	r.inflight.Add(1)
	if !r.sl.goTool(func() {
		defer r.inflight.Add(-1)
		timer := time.NewTimer(d.HoldTimeout)
		defer timer.Stop()
		var res holdResolution
		select {
		case res = <-h.res:
		case <-timer.C:
			if !r.takeHold(tc.GetCallId()) {
				res = <-h.res // ResolveHold won the race
				break
			}
			r.policyStats().HoldsTimedOut.Add(1)
			r.recordDecision(policy.Decision{Action: policy.Deny, RuleID: d.RuleID, Reason: "approval timed out", PolicyVersion: d.PolicyVersion},
				policy.KindToolCall, tc, nil, dispatchv1.HoldOutcome_HOLD_OUTCOME_TIMED_OUT)
			r.deliverResult(broker.Result{Result: deniedResult(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED,
				fmt.Sprintf("denied by policy rule %s: approval timed out after %s", d.RuleID, d.HoldTimeout))})
			return
		case <-r.ctx.Done():
			if !r.takeHold(tc.GetCallId()) {
				res = <-h.res
				break
			}
			r.recordDecision(policy.Decision{Action: policy.Deny, RuleID: d.RuleID, Reason: "the session ended while the call was held", PolicyVersion: d.PolicyVersion},
				policy.KindToolCall, tc, nil, dispatchv1.HoldOutcome_HOLD_OUTCOME_CANCELLED)
			r.deliverResult(broker.Result{Result: deniedResult(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED, "the session stopped while the call was held")})
			return
		}
		if !res.approve {
			msg := fmt.Sprintf("denied by policy rule %s: rejected by a client", d.RuleID)
			if res.reason != "" {
				msg += ": " + res.reason
			}
			r.deliverResult(broker.Result{Result: deniedResult(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED, msg)})
			return
		}
		r.deliverResult(r.sl.srv.broker.Call(r.ctx, call))
	}) {
		r.inflight.Add(-1)
	}
}

// takeHold removes the hold of callID; false if someone else took it.
func (r *run) takeHold(callID string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.holds[callID]; !ok {
		return false
	}
	delete(r.holds, callID)
	return true
}

func deniedResult(tc *dispatchv1.ToolCallRequest, code dispatchv1.ToolErrorCode, msg string) *dispatchv1.ToolCallResult {
	return &dispatchv1.ToolCallResult{
		ToolName: tc.GetToolName(),
		CallId:   tc.GetCallId(),
		Error:    &dispatchv1.ToolError{Code: code, Message: msg},
	}
}

func (r *run) policyStats() *policy.Stats { return r.sl.srv.opts.Policy.Stats() }

// ResolveHold implements task.Approver.
func (r *run) ResolveHold(callID string, approve bool, reason string) (dispatchv1.HoldOutcome, uint64, error) {
	r.mu.Lock()
	h, ok := r.holds[callID]
	if ok {
		delete(r.holds, callID)
	}
	r.mu.Unlock()
	if !ok {
		return 0, 0, fmt.Errorf("%w: no tool call with that call_id is held (never held, already resolved or timed out)", task.ErrNotFound)
	}
	outcome := dispatchv1.HoldOutcome_HOLD_OUTCOME_REJECTED
	d := policy.Decision{Action: policy.Deny, RuleID: h.decision.RuleID, Reason: "rejected by a client", PolicyVersion: h.decision.PolicyVersion}
	if approve {
		outcome = dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED
		d.Action, d.Reason = policy.Allow, "approved by a client"
		r.policyStats().HoldsApproved.Add(1)
	} else {
		r.policyStats().HoldsRejected.Add(1)
	}
	if reason != "" {
		d.Reason += ": " + reason
	}
	seq := r.recordDecision(d, policy.KindToolCall, h.call, nil, outcome)
	h.res <- holdResolution{approve: approve, reason: reason}
	return outcome, seq, nil
}

var _ task.Approver = (*run)(nil)

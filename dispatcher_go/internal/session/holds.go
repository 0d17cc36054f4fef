package session

import (
	"fmt"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Holds. A tool call a policy holds is recorded, then waits in its own
// goroutine (the stream goes on) for the first of: a client's approval or
// rejection (ResolveHold, from the API), the hold's timeout (deny), or the
// end of the session (cancelled). Whoever takes the hold out of run.holds
// resolves it; each resolution is a PolicyDecision event with its
// hold_outcome, and an approved call then runs like any other (tools.go).

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
		return 0, 0, errNotHeld{}
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

// errNotHeld is ResolveHold's NotFound: about a call of a task that does
// exist, so its text is not task.ErrNotFound's "task not found: …" (the
// answer said the task was not found). It is task.ErrNotFound for errors.Is.
type errNotHeld struct{}

func (errNotHeld) Error() string {
	return "no tool call with that call_id is held (never held, already resolved or timed out)"
}

func (errNotHeld) Unwrap() error { return task.ErrNotFound }

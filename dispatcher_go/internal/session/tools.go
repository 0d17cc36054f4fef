package session

import (
	"context"
	"errors"
	"fmt"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/policy"
)

// Tool calls. A tool call is recorded before anything else happens to it:
// the append is the check against the stop fence, so a call is either
// accepted before the stop (then it runs, or is cancelled by the stop, and
// its result is recorded) or, after it, answered DENIED and not recorded.
// An accepted call runs on the broker in its own goroutine (slot.goTool),
// except an instant built-in (broker.Instant: echo), which runs
// on the receiving goroutine: a goroutine of its own would cost more than
// the call and add a hand-off to its round trip; and a provider's tool,
// which the broker starts without a goroutine waiting for it (broker.Go):
// its result is recorded and pushed by the broker goroutine that completes
// it (finishStarted), which must not block, so a full outbox is waited for
// by a goroutine of its own. Either way the slot tracks the call (its
// tools WaitGroup) until its result is pushed. The result is recorded and
// sent downstream. A policy can deny a call (policy.go) or hold it
// (holds.go).
//
// The append never waits for a commit (eventlog.Log.Append is in-memory),
// but a call of a tool not declared idempotent is invoked only once its
// event is durable (broker.Call.Recorded: the log's WhenDurable, told by
// the store's writer after the commit): a dispatcher that died before that
// would leave a call that ran unrecorded, which its commander resends after
// re-attaching and the next dispatcher runs again. That costs such a call
// the store's flush interval plus a commit; a stop or the call's deadline
// (counted from its arrival) that comes first ends it uninvoked. Calls of
// idempotent tools (every built-in) run at once, and no result waits for
// the store: it goes to the commander while being written. The log still
// has the call before the result (appended in that order), watchers see
// both only once durable, and a store that fails is handled by the log and
// the store (the acker then holds back acks, so the commander keeps its
// packets; held-back calls time out uninvoked).

// maxCallIDBytes bounds a tool call's call_id: what ApproveToolCall
// accepts (task.Manager.Approve's bound).
const maxCallIDBytes = 256

// toolCall records a tool call and starts it, or refuses it.
func (r *run) toolCall(ev *dispatchv1.TaskEvent, d policy.Decision) error {
	lg := toolLegs{emitted: ev.GetEmittedAtUs(), received: toolStamp()}
	tc := ev.GetToolCall()
	if tc.GetCallId() == "" {
		return r.sl.reject(r.sessionID, "tool_call without call_id")
	}
	if len(tc.GetCallId()) > maxCallIDBytes {
		// ApproveToolCall takes call_ids up to this long: a longer one
		// held by a policy could never be approved, only time out.
		return r.sl.reject(r.sessionID, fmt.Sprintf("tool_call call_id of %d bytes, over the %d allowed", len(tc.GetCallId()), maxCallIDBytes))
	}
	if r.stopped.Load() {
		r.sl.srv.stats.DeniedAfterStop.Add(1)
		return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED, "the session is stopped", false)
	}
	if _, dup := r.calls[tc.GetCallId()]; dup {
		return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED, "duplicate call_id in this session", false)
	}
	// The append is the check against the stop fence: a call recorded
	// before the fence was accepted before the stop (and is cancelled by it).
	seq, err := r.t.Record(ev, events.ToolCall.Spec().Class)
	switch {
	case errors.Is(err, eventlog.ErrFenced):
		r.sl.srv.stats.DeniedAfterStop.Add(1)
		return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED, "the session is stopped", false)
	case errors.Is(err, eventlog.ErrFull):
		r.Stop("event log limit reached", dispatchv1.StopCode_STOP_CODE_BUDGET)
		return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED, "event log limit reached; the session is stopped", false)
	case err != nil:
		return r.sl.reject(r.sessionID, "session closed")
	}
	r.calls[tc.GetCallId()] = struct{}{}
	r.toolCalls++
	if d.Action == policy.Deny {
		return r.policyDeny(tc, d)
	}
	if int(r.inflight.Load()) >= r.sl.srv.opts.MaxToolCalls {
		return r.deny(tc, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED,
			fmt.Sprintf("too many tool calls in flight (limit %d)", r.sl.srv.opts.MaxToolCalls), true)
	}
	call := broker.Call{
		TaskID:        r.t.ID(),
		SessionID:     r.sessionID,
		CallID:        tc.GetCallId(),
		ToolName:      tc.GetToolName(),
		ArgumentsJSON: tc.GetArgumentsJson(),
		TraceContext:  tc.GetTraceContext(),
		SandboxIDs:    r.t.SandboxIDs(),
		Tenant:        r.t.Tenant(),
		// A tool not declared idempotent runs once this record is durable.
		Recorded: r.t.Log(),
		Seq:      seq,
	}
	if d.Action == policy.Hold {
		r.policyHold(tc, call, d)
		return nil
	}
	r.inflight.Add(1)
	b := r.sl.srv.broker
	if b.Instant(call.ToolName) {
		res := b.Call(r.ctx, call)
		lg.dispatched = toolStamp()
		lg.resulted = lg.dispatched
		r.deliverResultLegs(res, lg)
		r.inflight.Add(-1)
		return nil
	}
	if r.sl.addTool() {
		done := r.finishStarted
		if toolTrace != nil {
			lg.dispatched = toolStamp()
			done = func(res broker.Result) {
				lg.resulted = toolStamp()
				r.finishStartedLegs(res, lg)
			}
		}
		if b.Go(r.ctx, call, done) {
			return nil
		}
		r.sl.tools.Done() // not a provider's tool: it gets a goroutine
	}
	if !r.sl.goTool(func() {
		defer r.inflight.Add(-1)
		r.deliverResult(b.Call(r.ctx, call))
	}) {
		r.inflight.Add(-1) // the stream is over; nobody will read a result
	}
	return nil
}

// deny answers a tool call with an error result without running it. logged
// says whether the call is in the event log (then so is its result).
func (r *run) deny(tc *dispatchv1.ToolCallRequest, code dispatchv1.ToolErrorCode, msg string, logged bool) error {
	res := deniedResult(tc, code, msg)
	if logged {
		r.recordResult(broker.Result{Result: res})
	}
	return r.sendResult(res)
}

// deliverResult records a finished call and sends its result downstream.
func (r *run) deliverResult(res broker.Result) { r.deliverResultLegs(res, toolLegs{}) }

// toolLegs are a call's trace timestamps (tooltrace.go); zero when off.
type toolLegs struct{ emitted, received, dispatched, resulted int64 }

func (r *run) deliverResultLegs(res broker.Result, lg toolLegs) {
	r.recordResult(res)
	if r.ended.Load() {
		return // the session is over; nobody waits for this call
	}
	_ = r.sendResultLegs(res.Result, lg)
}

// finishStarted is deliverResult for a call started with broker.Go: it
// runs on the broker goroutine that completed the call and must not block,
// so when the outbox is full a goroutine waits for room. It ends the
// call's tracking (addTool) once the result is pushed.
func (r *run) finishStarted(res broker.Result) { r.finishStartedLegs(res, toolLegs{}) }

func (r *run) finishStartedLegs(res broker.Result, lg toolLegs) {
	r.recordResult(res)
	if r.ended.Load() {
		r.inflight.Add(-1)
		r.sl.tools.Done()
		return // the session is over; nobody waits for this call
	}
	p := &dispatchv1.DownstreamPacket{
		SessionId: r.sessionID,
		Signal:    &dispatchv1.DownstreamPacket_ToolResult{ToolResult: res.Result},
	}
	toolTrace.pushing(p, lg.emitted, lg.received, lg.dispatched, lg.resulted)
	if err := r.sl.out.tryPush(p); !errors.Is(err, errOutboxFull) {
		r.inflight.Add(-1)
		r.sl.tools.Done()
		return
	}
	go func() {
		defer r.sl.tools.Done()
		defer r.inflight.Add(-1)
		_ = r.sl.out.push(r.sl.ctx, p) // fails only when the slot ends
	}()
}

func (r *run) recordResult(res broker.Result) {
	// Control: the call was accepted, so its outcome is recorded even
	// after a stop (cancelled calls show as CANCELLED).
	_, _ = r.t.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_ToolResult{ToolResult: &dispatchv1.ToolResultEvent{
		Result:     res.Result,
		DurationMs: res.Duration.Milliseconds(),
		Executor:   res.Executor,
	}}}, events.ToolResult.Spec().Class)
}

func (r *run) sendResult(res *dispatchv1.ToolCallResult) error {
	return r.sendResultLegs(res, toolLegs{})
}

func (r *run) sendResultLegs(res *dispatchv1.ToolCallResult, lg toolLegs) error {
	p := &dispatchv1.DownstreamPacket{
		SessionId: r.sessionID,
		Signal:    &dispatchv1.DownstreamPacket_ToolResult{ToolResult: res},
	}
	if lg.received != 0 {
		toolTrace.pushing(p, lg.emitted, lg.received, lg.dispatched, lg.resulted)
	}
	if err := r.sl.out.push(r.sl.ctx, p); err != nil {
		return context.Cause(r.sl.ctx)
	}
	return nil
}

// deniedResult is the error result of a call that did not run.
func deniedResult(tc *dispatchv1.ToolCallRequest, code dispatchv1.ToolErrorCode, msg string) *dispatchv1.ToolCallResult {
	return &dispatchv1.ToolCallResult{
		ToolName: tc.GetToolName(),
		CallId:   tc.GetCallId(),
		Error:    &dispatchv1.ToolError{Code: code, Message: msg},
	}
}

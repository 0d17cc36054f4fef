package session

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

// A session's code is split by what it handles, all on the one run value:
//
//   - run.go: the run's lifecycle — start, the packets of the commander
//     (handle), the stop (decision, fence, grace), interjections and the end;
//   - tools.go: tool calls — recording, refusing, running on the broker and
//     answering them;
//   - holds.go: tool calls held by a policy, until a client approves or
//     rejects them (ResolveHold), their timeout, or the end of the session;
//   - policy.go: the policy's evaluation of each packet, and its decisions;
//   - ingest.go: the checks of the numbers a commander sends (usage), which
//     protobuf does not make (it does check that strings are UTF-8).
//
// What the dispatcher calls each kind of event, how the log polices it and
// how clients see it is in internal/events.

// run is one session: one task on one slot. It implements task.Runner and
// task.Approver.
type run struct {
	sl        *slot
	t         *task.Task
	sessionID string
	log       *slog.Logger
	// ctx is cancelled at the stop decision and at the end: it cancels the
	// session's tool calls. It carries span.
	ctx    context.Context
	cancel context.CancelFunc
	// span covers the session from its delivery to a slot to its end; its
	// context goes to the commander in the start packet.
	span trace.Span

	// upSeq is the highest upstream seq handled (receiving goroutine, and
	// reattach before it runs); ackedSeq the highest acknowledged (acker).
	upSeq    atomic.Uint64
	ackedSeq atomic.Uint64
	// ackMu orders ackedSeq's advance with the ack it queues (the acker
	// and early acks, handover.go: ackUpTo).
	ackMu sync.Mutex
	// early counts what the receiving goroutine recorded since the last
	// ack it asked for (handover.go: noteRecorded).
	early earlyCount

	stopped   atomic.Bool // the stop is decided (fast check on the packet path)
	ended     atomic.Bool // finish ran
	startSent atomic.Bool // the start packet went out

	mu       sync.Mutex // guards the fields below
	stop     stopInfo
	decided  bool
	deadline *time.Timer
	grace    *time.Timer
	holds    map[string]*hold // tool calls held by a policy, by call_id (holds.go)

	// pol is the session's policy state (nil: no policy engine).
	pol   *policy.Session
	begun time.Time

	// Tool calls (tools.go). Only the receiving goroutine touches calls
	// and toolCalls.
	calls     map[string]struct{}
	toolCalls int64
	inflight  atomic.Int32 // running and held calls
}

type stopInfo struct {
	reason string
	code   dispatchv1.StopCode
	at     time.Time
	sentAt time.Time
}

func newRun(sl *slot, t *task.Task) *run { return newRunWithID(sl, t, newSessionID()) }

// newRunWithID is newRun for session id (a re-attached session keeps its id).
func newRunWithID(sl *slot, t *task.Task, id string) *run {
	ctx, span := telemetry.Tracer().Start(trace.ContextWithSpanContext(sl.ctx, t.SpanContext()), "session",
		trace.WithAttributes(attribute.String("task.id", t.ID()), attribute.String("session.id", id),
			attribute.String("commander.id", sl.commanderID), attribute.String("slot.id", sl.id)))
	ctx, cancel := context.WithCancel(ctx)
	r := &run{
		span:      span,
		sl:        sl,
		t:         t,
		sessionID: id,
		log:       sl.log.With("task_id", t.ID(), "session_id", id),
		ctx:       ctx,
		cancel:    cancel,
		calls:     make(map[string]struct{}),
		begun:     time.Now(),
	}
	if eng := sl.srv.opts.Policy; eng != nil {
		r.pol = policy.NewSession(eng, t.Policy())
	}
	return r
}

func newSessionID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return "ses-" + hex.EncodeToString(b[:])
}

// startPacket hands the task to the commander.
func (r *run) startPacket() *dispatchv1.DownstreamPacket {
	t := r.t
	tools, _ := r.sl.srv.broker.Tools()
	return &dispatchv1.DownstreamPacket{
		SessionId: r.sessionID,
		Signal: &dispatchv1.DownstreamPacket_Start{Start: &dispatchv1.StartSession{
			TaskId:           t.ID(),
			Instruction:      t.Instruction(),
			Config:           t.Config(),
			Sandbox:          t.Sandbox(),
			DestroySandbox:   t.DestroySandbox(),
			PreviousTaskId:   t.PreviousTaskID(),
			History:          t.History(),
			Deadline:         timestamppb.New(time.Now().Add(t.Timeout())),
			Planner:          t.Planner(),
			Tools:            tools,
			Labels:           t.Labels(),
			TraceContext:     telemetry.Inject(r.ctx),
			Attempt:          t.Attempt(),
			UserSystemPrompt: t.UserSystemPrompt(),
		}},
	}
}

// endSpan ends the session's span with the task's outcome.
func (r *run) endSpan(status agentpb.TaskStatus, msg string) {
	r.span.SetAttributes(attribute.String("task.status", status.String()))
	if status != agentpb.TaskStatus_SUCCESS {
		r.span.SetStatus(codes.Error, msg)
	}
	r.span.End()
}

// armDeadline stops the session with STOP_CODE_DEADLINE when its time is up.
func (r *run) armDeadline() { r.armDeadlineAt(time.Now().Add(r.t.Timeout())) }

// armDeadlineAt is armDeadline with the end given (a re-attached session
// keeps its task's).
func (r *run) armDeadlineAt(at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deadline = time.AfterFunc(time.Until(at), func() {
		r.Stop(fmt.Sprintf("deadline exceeded (%s)", r.t.Timeout()), dispatchv1.StopCode_STOP_CODE_DEADLINE)
	})
}

// disarm stops the timers at the end of the session.
func (r *run) disarm() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.deadline != nil {
		r.deadline.Stop()
	}
	if r.grace != nil {
		r.grace.Stop()
	}
}

func (r *run) stopState() (stopInfo, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stop, r.decided
}

func (r *run) startWasSent() bool { return r.startSent.Load() }

// stopSent records when the stop packet went out (called by the sender).
func (r *run) stopSent() {
	r.mu.Lock()
	if r.decided && r.stop.sentAt.IsZero() {
		r.stop.sentAt = time.Now()
	}
	r.mu.Unlock()
}

// Stop implements task.Runner. The decision is the fence in the task's log:
// from then on the dispatcher records no planner output of this session and
// runs none of its tool calls; pending calls are cancelled; the stop goes
// out ahead of every queued packet; the grace timer starts.
func (r *run) Stop(reason string, code dispatchv1.StopCode) bool {
	return r.stopWith(reason, code, "")
}

// stopWith is Stop with the id of the policy rule that decided, if any.
func (r *run) stopWith(reason string, code dispatchv1.StopCode, ruleID string) bool {
	r.mu.Lock()
	if r.decided || r.ended.Load() {
		r.mu.Unlock()
		return false
	}
	r.decided = true
	r.stop = stopInfo{reason: reason, code: code, at: time.Now()}
	r.mu.Unlock()
	tDecided := stopStamp()
	r.stopped.Store(true)
	r.sl.srv.stats.StopsDecided.Add(1)
	r.span.AddEvent("stop decided", trace.WithAttributes(attribute.String("stop.code", code.String()),
		attribute.String("stop.reason", reason), attribute.String("policy.rule_id", ruleID)))

	stop := &dispatchv1.StopSignal{Reason: reason, Code: code, RuleId: ruleID}
	// The fence first: no planner output is recorded after it. The task's
	// record with the stop is queued once the stop is on its way (saveStop:
	// building it is the costliest step here, and the store gets it queued
	// either way).
	_, saveStop, _ := r.t.FenceSaveLater(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: stop}})
	tFenced := stopStamp()
	r.cancel()
	stopTrace.decided(r.sessionID, tDecided, tFenced)
	if stopTrace != nil && r.ended.Load() {
		stopTrace.forget(r.sessionID) // ended meanwhile: endRun's forget may have run before
	}

	pkt := &dispatchv1.DownstreamPacket{SessionId: r.sessionID, Signal: &dispatchv1.DownstreamPacket_Stop{Stop: stop}}
	if r.sl.out.setStop(pkt) {
		saveStop()
		// The commander never heard of this session: nothing to wait for.
		r.sl.finish(r, stopStatus(code), reason+" (before the commander started it)", "", false)
		return true
	}
	// setStop started the slot's sender if none ran: the new goroutine
	// waits in this P's run queue until this one blocks, and this one has
	// the record, the grace timer and the log line (and, for a client's
	// cancel, the RPC's answer) still to do. Yield, so that the stop is
	// written first.
	runtime.Gosched()
	saveStop()
	r.mu.Lock()
	if !r.ended.Load() {
		r.grace = time.AfterFunc(r.sl.srv.opts.StopGrace, r.graceExpired)
	}
	r.mu.Unlock()
	r.log.Info("stop decided", "code", code.String(), "reason", reason, "rule_id", ruleID)
	return true
}

// graceExpired aborts the stream of a session that did not send stopped.
func (r *run) graceExpired() {
	if r.ended.Load() {
		return
	}
	r.log.Warn("no stopped within the grace; aborting the stream", "grace", r.sl.srv.opts.StopGrace)
	r.sl.cancel(ErrStopNotAcknowledged)
}

// Interject implements task.Runner.
func (r *run) Interject(ctx context.Context, text string) (string, uint64, error) {
	if r.ended.Load() || r.stopped.Load() {
		return "", 0, fmt.Errorf("%w: the task is stopping", task.ErrNotRunning)
	}
	ui := &dispatchv1.UserInput{MessageId: "msg-" + newSessionID()[4:], Text: text}
	seq, err := r.t.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_UserInput{UserInput: ui}}, events.UserInput.Spec().Class)
	switch {
	case errors.Is(err, eventlog.ErrFenced), errors.Is(err, eventlog.ErrSealed):
		return "", 0, fmt.Errorf("%w: the task is stopping", task.ErrNotRunning)
	case err != nil:
		return "", 0, err
	}
	pkt := &dispatchv1.DownstreamPacket{SessionId: r.sessionID, Signal: &dispatchv1.DownstreamPacket_UserInput{UserInput: ui}}
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopWithRun := context.AfterFunc(r.ctx, cancel)
	defer stopWithRun()
	if err := r.sl.out.push(pctx, pkt); err != nil {
		if ctx.Err() != nil {
			return "", 0, ctx.Err()
		}
		return "", 0, fmt.Errorf("%w: the session ended before the message was delivered", task.ErrNotRunning)
	}
	return ui.GetMessageId(), seq, nil
}

// handle processes one packet of this session (receiving goroutine only).
func (r *run) handle(pkt *dispatchv1.UpstreamPacket) error {
	if u := pkt.GetUsage(); u != nil {
		if err := checkUsage(u); err != nil {
			return r.refuseUsage(err)
		}
		// Spending is real even after a stop: counted (before the policy
		// looks at the budget), and recorded below, never fenced.
		r.t.AddUsage(u)
	}
	// Stamped here, in the event's own allocation: the time the task
	// would give it when recording it a few µs later (Task.Record keeps it).
	ev, kind := events.FromUpstreamAt(pkt, time.Now())
	if ev != nil {
		ev.UpstreamSeq = pkt.GetSeq()
	}
	if kind == events.None {
		if sb := pkt.GetSandbox(); sb != nil {
			// A fact about the world, not planner output: kept even after a
			// stop, so that a continuing task finds the sandbox
			// (QueryTaskStatus shows it).
			if err := r.t.SetSandboxInUse(sb.GetSandbox(), sb.GetKept()); err != nil {
				return r.sl.reject(r.sessionID, err.Error())
			}
			return nil
		}
		return r.sl.reject(r.sessionID, "unsupported payload")
	}
	// The policy decides before the packet is recorded: a stop fences the
	// log here, so this packet is dropped by the fence below like any
	// packet after a stop.
	d := r.evaluate(ev)
	switch kind {
	case events.ToolCall:
		return r.toolCall(ev, d)
	case events.Result:
		r.onResult(ev)
		return nil
	case events.Stopped:
		r.onStopped(ev)
		return nil
	}
	// Planner output (refused once the stop is decided) and usage (never).
	return r.record(ev, kind.Spec().Class)
}

// refuseUsage answers a usage the dispatcher cannot count (checkUsage):
// the packet is refused (ack REJECTED saying why; nothing is counted or
// recorded) and the session is stopped, since its spending can no longer
// be accounted for: a budget it may be under could not be enforced. The
// task ends FAILURE with the reason once the commander acknowledges.
func (r *run) refuseUsage(err error) error {
	reason := "the commander reported an invalid usage (" + err.Error() + "): the session's spending can no longer be accounted for"
	r.log.Warn("usage refused", "error", err)
	r.Stop(reason, dispatchv1.StopCode_STOP_CODE_BUDGET)
	return r.sl.reject(r.sessionID, "usage refused: "+err.Error())
}

// record appends a planner event and handles refusals.
func (r *run) record(ev *dispatchv1.TaskEvent, class eventlog.Class) error {
	seq, err := r.t.Record(ev, class)
	switch {
	case err == nil:
		r.noteRecorded(seq, ev)
		return nil
	case errors.Is(err, eventlog.ErrFenced):
		// Stopped: dropped by design, counted, never forwarded.
		r.sl.srv.stats.DroppedAfterStop.Add(1)
		return nil
	case errors.Is(err, eventlog.ErrFull):
		r.Stop("event log limit reached", dispatchv1.StopCode_STOP_CODE_BUDGET)
		return r.sl.reject(r.sessionID, "event log limit reached; the session is stopped")
	default:
		return r.sl.reject(r.sessionID, "session closed")
	}
}

// onResult ends the session the planner finished. If a stop was decided
// but the planner finished first, the task keeps the planner's real outcome
// (and a cancel says truthfully that it came too late).
func (r *run) onResult(ev *dispatchv1.TaskEvent) {
	res := ev.GetResult()
	_, _ = r.t.Record(ev, events.Result.Spec().Class)
	status := agentpb.TaskStatus_FAILURE
	msg := res.GetMessage()
	switch res.GetOutcome() {
	case dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS:
		status = agentpb.TaskStatus_SUCCESS
		if msg == "" {
			msg = "completed"
		}
	case dispatchv1.SessionOutcome_SESSION_OUTCOME_FAILURE:
		if msg == "" {
			msg = "the planner reported a failure"
		}
	case dispatchv1.SessionOutcome_SESSION_OUTCOME_UNSPECIFIED:
		msg = "the planner ended without an outcome"
	default:
		// A number SessionOutcome does not define (a newer or broken
		// commander): not "without an outcome", which it did send.
		msg = fmt.Sprintf("the planner ended with outcome %d, which this dispatcher does not know", int32(res.GetOutcome()))
	}
	r.end(status, msg, res.GetResult())
}

// onStopped ends a stopped session. A final usage the dispatcher cannot
// count (checkUsage) is neither counted nor recorded, and the task's
// message says so: the packet is terminal, so it cannot be refused.
func (r *run) onStopped(ev *dispatchv1.TaskEvent) {
	st := ev.GetStopped()
	var refused string
	if u := st.GetFinalUsage(); u != nil {
		if err := checkUsage(u); err != nil {
			r.log.Warn("final usage refused", "error", err)
			refused = " (the commander's final usage was refused: " + err.Error() + ")"
			st.FinalUsage = nil // the packet is ours to change until recorded
		} else {
			r.t.AddUsage(u)
		}
	}
	_, _ = r.t.Record(ev, events.Stopped.Spec().Class)
	stopTrace.stopped(r.sessionID, ev.GetTime().AsTime())
	info, decided := r.stopState()
	if decided {
		r.end(stopStatus(info.code), info.reason+refused, "")
		return
	}
	reason := st.GetReason()
	if reason == "" {
		reason = "no reason given"
	}
	r.end(agentpb.TaskStatus_FAILURE, "the planner stopped on its own: "+reason+refused, "")
}

// end finishes the session after its terminal packet.
func (r *run) end(status agentpb.TaskStatus, msg, result string) {
	r.sl.finish(r, status, msg, result, true)
}

// measureStop records the stop latency of a session that ended by a
// commander packet after a stop decision: decision → terminal packet.
// Called by finish before the task ends, so that whoever sees the task end
// also sees the measurement.
func (r *run) measureStop(ackAt time.Time) {
	info, decided := r.stopState()
	if !decided {
		return
	}
	latency := ackAt.Sub(info.at)
	r.span.AddEvent("stopped", trace.WithTimestamp(ackAt), trace.WithAttributes(attribute.Int64("stop.latency_us", latency.Microseconds())))
	stats := &r.sl.srv.stats
	stats.StopsAcked.Add(1)
	stats.StopLatency.Observe(latency)
	attrs := []any{"code", info.code.String(), "ack_after", latency}
	if !info.sentAt.IsZero() {
		attrs = append(attrs, "sent_after", info.sentAt.Sub(info.at))
	}
	r.log.Info("stop latency", attrs...)
}

// Package task holds the task model: its state machine (PENDING → RUNNING →
// SUCCESS | FAILURE | CANCELLED), its event log, its statistics, the registry
// of known tasks, the global config and how a task's config is resolved, and
// the Manager that submits, cancels, interjects and lists, the one entry
// point for task operations of both client APIs.
//
// The package does not know how tasks are scheduled, run or stored: a Queue
// places them, a Runner (a commander session) executes them, and a
// Persistence (package taskstore) keeps them across restarts, so it must not
// read or write a store, encode a stored record or touch a secret's
// encryption itself.
package task

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// Errors of this package; the API layer maps them to gRPC codes.
var (
	// ErrNotFound means no task (or config) has the given id.
	ErrNotFound = errors.New("task not found")
	// ErrInvalidArgument means a request is malformed; the wrapping error
	// says how, in words safe to show to a client.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrNotRunning means the operation needs a RUNNING task.
	ErrNotRunning = errors.New("task is not running")
	// ErrNotPending means Start was called on a task that is not PENDING.
	ErrNotPending = errors.New("task is not pending")
	// ErrClosed means the dispatcher is draining and takes no new tasks.
	ErrClosed = errors.New("dispatcher is shutting down; no new tasks accepted")
	// ErrCancelRequested means a client cancelled the task, so it is not
	// put back in the queue (Requeue).
	ErrCancelRequested = errors.New("task cancel requested")
	// ErrRequeueLimit means the task was put back MaxRequeues times already.
	ErrRequeueLimit = errors.New("task requeued too often")
)

// MaxRequeues bounds how often a task whose slot died before its start went
// out is put back in the queue; after that it fails, so that a pattern that
// kills commanders cannot keep a task circling forever.
const MaxRequeues = 3

// RequeueMessage is the state message of a task put back in the queue
// because its commander connection was lost before the start went out.
const RequeueMessage = "requeued: the commander connection was lost before the task started"

// Runner is what runs a task: a commander session. The task holds it while
// RUNNING so that cancel and interject reach the session.
type Runner interface {
	// Stop decides to stop the session. It reports whether this call made
	// the decision (false if a stop was already decided or the run ended).
	Stop(reason string, code dispatchv1.StopCode) bool
	// Interject delivers a user message to the running planner and records
	// it as an event; it returns the message id and the event's seq.
	Interject(ctx context.Context, text string) (messageID string, seq uint64, err error)
}

// Approver is a Runner that can resolve tool calls held by a policy (a
// separate interface so that runners without policies need not implement it).
type Approver interface {
	// ResolveHold approves or rejects the held call callID; it returns how
	// the hold ended and the seq of the event recording it. An unknown or
	// already resolved call is ErrNotFound.
	ResolveHold(callID string, approve bool, reason string) (dispatchv1.HoldOutcome, uint64, error)
}

// Stats are what a task consumed, summed from Usage packets.
type Stats struct {
	Steps        int32
	InputTokens  int64
	OutputTokens int64
	Cost         float64
	Currency     string
	// Models are the models the tokens were spent on, as the commander's
	// usage names them (the model that ran, not the one configured), in
	// order of first use, joined by ", "; at most maxStatsModels. (A string
	// keeps Stats comparable.)
	Models string `json:",omitempty"`
}

// ModelList is Models as a list.
func (s Stats) ModelList() []string {
	if s.Models == "" {
		return nil
	}
	return strings.Split(s.Models, ", ")
}

// maxStatsModels and maxModelName bound Stats.Models.
const (
	maxStatsModels = 8
	maxModelName   = 128
)

// Summary is what a task is at a glance: the fields Info and Snapshot
// share.
type Summary struct {
	ID             string
	Instruction    string
	Planner        string
	Status         agentpb.TaskStatus
	Message        string
	Result         string
	CreatedAt      time.Time
	StartedAt      time.Time
	EndedAt        time.Time
	CommanderID    string
	SessionID      string
	PreviousTaskID string
	// Tenant owns the task ("" is the default tenant, see internal/tenant).
	Tenant string
	Labels map[string]string
	Stats  Stats
	// LastSeq is the seq of the task's newest event.
	LastSeq uint64
}

// Info is a consistent snapshot of a task for readers.
type Info struct {
	Summary
	// Sandbox is the sandbox the task's session reported using, else the
	// client's choice.
	Sandbox *agentpb.Sandbox
}

// Duration is how long the task ran: from start to end, or to now while it
// runs; 0 if it never started.
func (i *Info) Duration(now time.Time) time.Duration {
	if i.StartedAt.IsZero() {
		return 0
	}
	if !i.EndedAt.IsZero() {
		return i.EndedAt.Sub(i.StartedAt)
	}
	return now.Sub(i.StartedAt)
}

// Task is one submitted instruction. Fields set at creation never change; the
// rest is guarded by mu. Event appends go straight to the log (which has its
// own lock) so the per-packet path never takes mu.
type Task struct {
	id             string
	instruction    string
	planner        string
	required       []string
	labels         map[string]string
	sandbox        *agentpb.Sandbox
	destroySandbox bool
	previousTaskID string
	tenant         string // who owns the task; never changes
	userPrompt     string
	history        []*dispatchv1.ConversationTurn
	timeout        time.Duration
	createdAt      time.Time
	createSeq      uint64
	log            eventlog.Log
	policy         *policy.Policy
	policyErr      error // set when a stored task's policy failed to compile
	done           chan struct{}
	onFinish       func(*Task)
	// sandboxOfOthers reports whether a task of a tenant other than
	// tenant has sandbox id (the Manager's registry); nil: none checked.
	sandboxOfOthers func(id, tenant string) bool
	persist         Persistence // nil: nothing is stored
	// closed is the manager's draining flag (nil: never closed): a task is
	// not requeued while the dispatcher shuts down.
	closed *atomic.Bool
	// span covers the task from submission to its end (a no-op span when
	// tracing is off, and for tasks restored from the store).
	span trace.Span
	// view: a read-only copy of a task another fleet replica runs.
	view bool
	// lease is what Log returns on a fleet replica running the task (nil
	// otherwise): its readers are moved to the fleet's view once the
	// replica lost the task's lease.
	lease *leaseLog

	mu          sync.Mutex
	status      agentpb.TaskStatus
	message     string
	result      string
	config      *agentpb.CommonConfig
	startedAt   time.Time
	endedAt     time.Time
	commanderID string
	sessionID   string
	runner      Runner
	stats       Stats
	// The sandbox the session reported (SandboxInUse), and whether it
	// outlives the task so that a continuing task may use it.
	usedSandbox *agentpb.Sandbox
	sandboxKept bool
	// requeues counts Requeue calls; cancelReason is set (non-empty) once a
	// client asked to cancel: such a task is never put back in the queue.
	requeues     int
	cancelReason string
	// handedBack is set once the fleet hands this copy back to its queue
	// (HandBack): a cancel from then on is not recorded here but goes
	// through the fleet.
	handedBack bool
	// attempt counts the task's starts and re-attaches (handover.go);
	// upstreamSeq is the highest upstream seq its log held when it was
	// restored (a re-attaching session resends what comes after it).
	attempt     int64
	upstreamSeq uint64
	// fence is the fencing token of this copy (a fleet replica's lease
	// attempt it was given, SetFenceToken; 0: none), which its records carry.
	fence int64
	// stop is the stop decided for the running session, if any (Fence);
	// stopUnsaved: no record of the task queued since it was set (see
	// FenceSaveLater).
	stop        *dispatchv1.StopSignal
	stopUnsaved bool
}

// ID is the task's id.
func (t *Task) ID() string { return t.id }

// SpanContext is the trace context of the task's span: the parent of its
// sessions' spans.
func (t *Task) SpanContext() trace.SpanContext {
	if t.span == nil {
		return trace.SpanContext{}
	}
	return t.span.SpanContext()
}

// Instruction is what the client asked for.
func (t *Task) Instruction() string { return t.instruction }

// Planner is the planner the task needs ("chat", ...).
func (t *Task) Planner() string { return t.planner }

// Tenant is the tenant that owns the task ("" is the default tenant). It
// never changes: the scheduler places the task only on a slot that serves
// it, and only its tenant (or an admin) sees it.
func (t *Task) Tenant() string { return t.tenant }

// RequiredCapabilities are the capabilities a slot needs besides the planner.
func (t *Task) RequiredCapabilities() []string { return t.required }

// Labels are the client's labels. Callers must not modify the map.
func (t *Task) Labels() map[string]string { return t.labels }

// Sandbox is the sandbox the client chose, or nil.
func (t *Task) Sandbox() *agentpb.Sandbox { return t.sandbox }

// SetSandboxInUse records the sandbox the session acquired (an empty id is
// ignored); kept says it is not destroyed at the end of the task. A sandbox
// that another tenant's task has (given or reported) is refused with
// ErrForeignSandbox and not recorded: the task would be allowed to act on it.
func (t *Task) SetSandboxInUse(sb *agentpb.Sandbox, kept bool) error {
	if sb.GetId() == "" {
		return nil
	}
	if t.sandboxOfOthers != nil && t.sandboxOfOthers(sb.GetId(), t.tenant) {
		return fmt.Errorf("%w: %q", ErrForeignSandbox, sb.GetId())
	}
	sb = proto.Clone(sb).(*agentpb.Sandbox)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.usedSandbox, t.sandboxKept = sb, kept
	t.saveLocked()
	return nil
}

// ErrForeignSandbox: a session reported a sandbox of another tenant's task.
var ErrForeignSandbox = errors.New("the sandbox is another tenant's")

// SandboxIDs are the sandboxes the task was given, which its tool calls may
// act on (besides the ones they create): the client's choice or the sandbox
// continued from the previous task, and the one its session reported in use.
func (t *Task) SandboxIDs() []string {
	var ids []string
	if id := t.sandbox.GetId(); id != "" {
		ids = append(ids, id)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if id := t.usedSandbox.GetId(); id != "" && (len(ids) == 0 || ids[0] != id) {
		ids = append(ids, id)
	}
	return ids
}

// ContinuedSandbox is the sandbox a task continuing this one runs on: the
// one the session reported and kept, or nil.
func (t *Task) ContinuedSandbox() *agentpb.Sandbox {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.usedSandbox == nil || !t.sandboxKept {
		return nil
	}
	return proto.Clone(t.usedSandbox).(*agentpb.Sandbox)
}

// DestroySandbox says whether the sandbox is destroyed after the task.
func (t *Task) DestroySandbox() bool { return t.destroySandbox }

// PreviousTaskID is the task this one continues, if any.
func (t *Task) PreviousTaskID() string { return t.previousTaskID }

// History is the conversation to continue from.
func (t *Task) History() []*dispatchv1.ConversationTurn { return t.history }

// UserSystemPrompt is the client's addition to the planner's system prompt.
func (t *Task) UserSystemPrompt() string { return t.userPrompt }

// Conversation is the conversation the task ran with: the turns it
// continued from, its instruction and (once there is one) its result —
// what a task continuing this one starts from.
func (t *Task) Conversation() []*dispatchv1.ConversationTurn { return t.conversation() }

// Timeout is the task's wall-clock budget once it starts.
func (t *Task) Timeout() time.Duration { return t.timeout }

// Log is the task's event log, for its readers. On a fleet replica that
// runs the task it is the task's own log until the replica loses the
// task's lease (Manager.Disown), then the fleet's view of it (leaseLog).
func (t *Task) Log() eventlog.Log {
	if t.lease != nil {
		return t.lease
	}
	return t.log
}

// Policy is the task's own extra policy (it only tightens the global one),
// or nil.
func (t *Task) Policy() *policy.Policy { return t.policy }

// Stats returns what the task consumed so far.
func (t *Task) Stats() Stats {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.stats
}

// Done is closed when the task reaches a terminal status.
func (t *Task) Done() <-chan struct{} { return t.done }

// Config is the resolved config with secrets, for the StartSession that
// hands the task to a commander. After the task ends only a masked copy is
// kept. Callers must not modify it.
func (t *Task) Config() *agentpb.CommonConfig {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.config
}

// Status is the current status.
func (t *Task) Status() agentpb.TaskStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.status
}

// Terminal reports whether s is an end state.
func Terminal(s agentpb.TaskStatus) bool {
	return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
}

// Info returns a snapshot.
func (t *Task) Info() Info {
	t.mu.Lock()
	s := t.snapshotLocked()
	t.mu.Unlock()
	return s.Info()
}

// Start moves a PENDING task to RUNNING on r. It fails with ErrNotPending if
// the task is no longer pending (e.g. it was cancelled meanwhile).
func (t *Task) Start(r Runner, commanderID, sessionID string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status != agentpb.TaskStatus_PENDING {
		return ErrNotPending
	}
	t.status = agentpb.TaskStatus_RUNNING
	t.message = "running"
	t.startedAt = time.Now()
	t.runner = r
	t.attempt++
	t.upstreamSeq = 0
	t.stop = nil
	t.commanderID = commanderID
	t.sessionID = sessionID
	if t.span != nil {
		t.span.AddEvent("started", trace.WithAttributes(
			attribute.String("commander.id", commanderID), attribute.String("session.id", sessionID)))
	}
	// Under mu so that state events are in the same order as the changes.
	_, err := t.log.Append(t.stateEvent(), eventlog.Control)
	t.saveLocked()
	return err
}

// Requeue moves a task that is RUNNING on r back to PENDING: r's slot died
// before the commander received the start, so the task never ran. The state
// event (RequeueMessage unless msg is set) tells watchers; the timeout counts
// again from the next start. It refuses (and changes nothing) when the task
// is not running on r (ErrNotRunning), a client asked to cancel it
// (ErrCancelRequested), the dispatcher is draining (ErrClosed), or it was
// requeued MaxRequeues times (ErrRequeueLimit). The caller puts the task back
// in the queue in the same step (scheduler.Requeue), so nobody sees it
// PENDING without it being queued.
func (t *Task) Requeue(r Runner, msg string) error {
	if msg == "" {
		msg = RequeueMessage
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case t.status != agentpb.TaskStatus_RUNNING || t.runner != r:
		return ErrNotRunning
	case t.cancelReason != "":
		return ErrCancelRequested
	case t.closed != nil && t.closed.Load():
		return ErrClosed
	case t.requeues >= MaxRequeues:
		return ErrRequeueLimit
	}
	t.requeues++
	t.status = agentpb.TaskStatus_PENDING
	t.message = msg
	t.startedAt = time.Time{}
	t.runner = nil
	t.commanderID, t.sessionID = "", ""
	if t.span != nil {
		t.span.AddEvent("requeued", trace.WithAttributes(attribute.Int("task.requeues", t.requeues)))
	}
	_, err := t.log.Append(t.stateEvent(), eventlog.Control)
	t.saveLocked()
	return err
}

// Requeues is how often the task was put back in the queue.
func (t *Task) Requeues() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.requeues
}

// requestCancel records that a client asked to cancel the task (reason is
// not empty); from then on Requeue refuses it. It reports whether this was
// the first such request; handedBack, with nothing recorded, if the fleet
// is handing this copy back to its queue (HandBack): the cancel must go
// through the fleet.
func (t *Task) requestCancel(reason string) (first, handedBack bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.handedBack {
		return false, true
	}
	if t.cancelReason != "" {
		return false, false
	}
	t.cancelReason = reason
	return true, false
}

// HandedBack reports whether the fleet is handing this copy back to its
// queue (HandBack marked it).
func (t *Task) HandedBack() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.handedBack
}

// HandBack decides, under the task's lock, between a client's cancel and
// the fleet's hand-back of this copy to its queue: cancelled with the
// cancel's reason if one was asked already (the copy is to end CANCELLED,
// not handed back); else the copy is marked handed back, and a cancel
// asked on it from now on goes through the fleet (Manager.Cancel), which
// records it durably for the task's next owner.
func (t *Task) HandBack() (reason string, cancelled bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.cancelReason != "" {
		return t.cancelReason, true
	}
	t.handedBack = true
	return "", false
}

// CancelRequested returns the reason of a client's cancel, if one was asked.
func (t *Task) CancelRequested() (reason string, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.cancelReason, t.cancelReason != ""
}

// Finish moves the task to a terminal status. Only the first call counts; it
// reports whether this call ended the task. result is the task's answer (for
// SUCCESS). The terminal state event seals the log.
func (t *Task) Finish(status agentpb.TaskStatus, message, result string) bool {
	t.mu.Lock()
	if Terminal(t.status) {
		t.mu.Unlock()
		return false
	}
	t.status = status
	t.message = message
	if result != "" {
		t.result = result
	}
	t.endedAt = time.Now()
	t.runner = nil
	// The secrets were only needed to start the session.
	if t.config != nil {
		t.config = secret.Mask(t.config)
	}
	_, _ = t.log.Seal(t.stateEvent())
	t.saveLocked()
	t.mu.Unlock()
	close(t.done)
	t.endSpan(status, message)
	if t.onFinish != nil {
		t.onFinish(t)
	}
	return true
}

// endSpan ends the task's span with its outcome.
func (t *Task) endSpan(status agentpb.TaskStatus, message string) {
	if t.span == nil {
		return
	}
	t.span.SetAttributes(attribute.String("task.status", status.String()))
	if status != agentpb.TaskStatus_SUCCESS {
		t.span.SetStatus(codes.Error, message)
	}
	t.span.End()
}

// runnerState returns the runner (nil unless RUNNING) and the status.
func (t *Task) runnerState() (Runner, agentpb.TaskStatus) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.runner, t.status
}

// AddUsage adds a Usage delta to the statistics. The session checks the
// numbers at ingest (finite, not negative); the sums saturate rather than
// wrap around however many deltas come.
func (t *Task) AddUsage(u *dispatchv1.Usage) {
	if u == nil {
		return
	}
	t.mu.Lock()
	t.stats.InputTokens = addSat(t.stats.InputTokens, u.GetInputTokens(), math.MaxInt64)
	t.stats.OutputTokens = addSat(t.stats.OutputTokens, u.GetOutputTokens(), math.MaxInt64)
	t.stats.Cost += u.GetCost()
	t.stats.Steps = int32(addSat(int64(t.stats.Steps), int64(u.GetSteps()), math.MaxInt32))
	if c := u.GetCurrency(); c != "" {
		t.stats.Currency = c
	}
	if m := strings.ReplaceAll(textcut.Prefix(u.GetModel(), maxModelName), ", ", " "); m != "" {
		if ms := t.stats.ModelList(); !slices.Contains(ms, m) && len(ms) < maxStatsModels {
			t.stats.Models = strings.Join(append(ms, m), ", ")
		}
	}
	t.mu.Unlock()
}

// addSat is a+b for a, b >= 0, at most limit.
func addSat(a, b, limit int64) int64 {
	if b > limit-a {
		return limit
	}
	return a + b
}

// Record stamps ev with the task id and the current time and appends it.
func (t *Task) Record(ev *dispatchv1.TaskEvent, class eventlog.Class) (uint64, error) {
	t.stamp(ev)
	return t.log.Append(ev, class)
}

// Fence records ev (a stop) and refuses all later Fenceable events: from
// here on no planner output of this task reaches any reader.
// A stop is also kept on the task (and stored with it), so that a session
// re-attaching after a restart is stopped again (handover.go).
func (t *Task) Fence(ev *dispatchv1.TaskEvent) (uint64, error) {
	seq, save, err := t.FenceSaveLater(ev)
	save()
	return seq, err
}

// FenceSaveLater is Fence without queueing the task's record (with the
// stop) for the store: save does, and the caller calls it once the stop is
// on its way to the commander. Building the record (its JSON, the sealed
// config) costs tens of µs of CPU that the stop packet need not wait for
// (docs/benchmarks.md, the stop's legs), and the record is only queued
// either way, not written: a stop sent before it is queued is as durable
// as one sent after. The fence itself (no planner output recorded after
// the stop) and the stop kept on the task (a hand-over re-sends it) take
// effect before FenceSaveLater returns. save queues the record unless one
// was queued since (a later change of the task, such as its end, carries
// the stop too); it may be called more than once.
func (t *Task) FenceSaveLater(ev *dispatchv1.TaskEvent) (seq uint64, save func(), err error) {
	t.stamp(ev)
	seq, err = t.log.Fence(ev)
	st := ev.GetStop()
	if st == nil {
		return seq, func() {}, err
	}
	t.mu.Lock()
	t.stop = proto.Clone(st).(*dispatchv1.StopSignal)
	t.stopUnsaved = true
	t.mu.Unlock()
	return seq, t.saveStop, err
}

// saveStop queues the task's record if the stop set by FenceSaveLater is
// in no record queued yet.
func (t *Task) saveStop() {
	t.mu.Lock()
	if t.stopUnsaved {
		t.saveLocked()
	}
	t.mu.Unlock()
}

func (t *Task) stamp(ev *dispatchv1.TaskEvent) {
	ev.TaskId = t.id
	if ev.Time == nil {
		ev.Time = timestamppb.Now()
	}
}

// stateEvent builds the event for the current status. Caller holds mu.
func (t *Task) stateEvent() *dispatchv1.TaskEvent {
	ev := &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{
		Status: t.status, Message: t.message,
	}}}
	t.stamp(ev)
	return ev
}

// MaxHistoryBytes and MaxHistoryTurns bound the conversation a task
// continuing another (previous_task_id) carries, so that its start packet
// stays under the 4 MiB message limit however long the chain grows: the
// oldest turns are dropped first, and one turn longer than the byte budget
// keeps only its first MaxHistoryBytes (cut at a character boundary).
const (
	MaxHistoryBytes = 1 << 20
	MaxHistoryTurns = 200
	// MaxStartBytes bounds instruction + config + history of one task:
	// an instruction and config over it are refused at submit, and the
	// history gets at most what they leave. The rest of the 4 MiB start
	// (tools, labels) has 1 MiB.
	MaxStartBytes = 3 << 20
	// MaxUserSystemPromptBytes bounds a task's user_system_prompt.
	MaxUserSystemPromptBytes = 64 << 10
)

// conversation is the history a task continuing this one starts from,
// bounded by boundHistory.
func (t *Task) conversation() []*dispatchv1.ConversationTurn {
	info := t.Info()
	h := make([]*dispatchv1.ConversationTurn, 0, len(t.history)+2)
	h = append(h, t.history...)
	h = append(h, &dispatchv1.ConversationTurn{Role: "user", Content: t.instruction})
	if info.Result != "" {
		h = append(h, &dispatchv1.ConversationTurn{Role: "assistant", Content: info.Result})
	}
	return boundHistory(h, MaxHistoryBytes, MaxHistoryTurns)
}

// boundHistory keeps the newest turns of h within maxBytes of content and
// maxTurns turns, dropping the oldest. When even the newest turn is over
// maxBytes, it alone is kept, cut to maxBytes at a UTF-8 boundary.
func boundHistory(h []*dispatchv1.ConversationTurn, maxBytes, maxTurns int) []*dispatchv1.ConversationTurn {
	size := 0
	first := len(h)
	for i := len(h) - 1; i >= 0 && len(h)-i <= maxTurns; i-- {
		n := len(h[i].GetContent()) + len(h[i].GetRole())
		if size+n > maxBytes {
			break
		}
		size += n
		first = i
	}
	if first == len(h) && len(h) > 0 {
		last := h[len(h)-1]
		return []*dispatchv1.ConversationTurn{{Role: last.GetRole(), Content: textcut.Prefix(last.GetContent(), maxBytes-len(last.GetRole()))}}
	}
	return h[first:]
}

// NewID returns a random id in UUID v4 form, unguessable so that a task id
// is not a hint to other tenants' tasks.
func NewID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = (b[6] & 0x0f) | 0x40
	b[8] = (b[8] & 0x3f) | 0x80
	var s [36]byte
	hex.Encode(s[0:8], b[0:4])
	s[8] = '-'
	hex.Encode(s[9:13], b[4:6])
	s[13] = '-'
	hex.Encode(s[14:18], b[6:8])
	s[18] = '-'
	hex.Encode(s[19:23], b[8:10])
	s[23] = '-'
	hex.Encode(s[24:], b[10:])
	return string(s[:])
}

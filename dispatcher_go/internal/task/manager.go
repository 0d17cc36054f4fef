package task

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"slices"
	"strings"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Limits on client input, so that one request cannot make the dispatcher
// hold arbitrary amounts of memory besides the gRPC message limit.
const (
	maxLabels        = 64
	maxCapabilities  = 64
	maxShortField    = 256 // planner, capability, label key/value, ids
	maxTimeoutSecond = 7 * 24 * 3600
)

// plannerName is what may name a planner: the names the commander can
// register (commander/_planners.py _NAME), 1-64 characters of letters,
// digits, '.', '_' and '-', starting with a letter or digit. A task naming
// anything else could never be served.
var plannerName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidPlannerName reports whether s may name a planner (plannerName).
func ValidPlannerName(s string) bool { return plannerName.MatchString(s) }

// Queue places pending tasks on slots. The scheduler implements it.
type Queue interface {
	// Enqueue hands t to a free slot at once or queues it; it fails (e.g.
	// queue full) without keeping t.
	Enqueue(t *Task) error
	// Remove takes t out of the queue; false if it was not queued (already
	// running, or ended).
	Remove(t *Task) bool
}

// Spec is a task as a client submits it.
type Spec struct {
	Instruction          string
	RunningConfig        *agentpb.CommonConfig
	Sandbox              *agentpb.Sandbox
	DestroySandbox       bool
	PreviousTaskID       string
	Planner              string
	RequiredCapabilities []string
	Labels               map[string]string
	TimeoutSeconds       int32
	// UserSystemPrompt is added to the planner's own system prompt (seed
	// 001's user_system_prompt); empty: the planner's prompt alone.
	UserSystemPrompt string
	// Policy is the task's extra policy (compiled by the caller, which
	// reports its errors), or nil.
	Policy *policy.Policy
	// Trace is the submitter's span context (e.g. of the gRPC or HTTP
	// request): the task's span is its child. Zero: a new trace.
	Trace trace.SpanContext
	// Caller is who submits: the task belongs to its tenant, and it may
	// continue (PreviousTaskID) only a task it sees. An admin's
	// continuation belongs to the continued task's tenant. The zero value
	// is the default tenant.
	Caller tenant.Caller
}

// CancelOutcome says truthfully what a cancel did.
type CancelOutcome struct {
	// Cancelled is true if this call dequeued or stopped the task.
	Cancelled bool
	// Status is the task's status after the call.
	Status agentpb.TaskStatus
	// Message explains the outcome in words for the client.
	Message string
}

// ManagerOptions configure a Manager.
type ManagerOptions struct {
	// DefaultPlanner is used when a submission names none. No default is
	// applied here (the dispatcher's is internal/dispatcher's): empty leaves
	// such a task without a planner, so no slot takes it and it ends at its
	// timeout in the queue.
	DefaultPlanner string
	// Planners, when set, are the only planners a task may name: any other
	// is refused at submit (no commander of this deployment serves it).
	// Empty: any name (commanders may bring planners of their own).
	Planners []string
	// StopGrace is how long a cancel waits for the commander's stopped ack
	// (the session aborts the stream after the same grace). No default is
	// applied here: 0 is no grace, a cancel waits only the fixed margin.
	StopGrace time.Duration
	// MaxTasksKept bounds the finished tasks kept in memory.
	MaxTasksKept int
	// Persistence, when set, stores tasks and the global config (see
	// Restore; taskstore.New makes one); nil keeps everything in memory
	// only. With it, the event-log store given to NewManager must be a
	// Reopener.
	Persistence Persistence
	// HandOverWindow, with Persistence, is how long a task that was
	// RUNNING when the dispatcher stopped waits after Restore for its
	// session to re-attach (Reattach) before it ends FAILURE
	// (HandOverExpiredMessage). It also makes Shutdown hand tasks over
	// rather than end them: pending tasks and sessions that detached are
	// left for the next run. 0: no hand-over (such tasks are FAILURE at
	// Restore; Shutdown ends everything).
	HandOverWindow time.Duration
	// DuplicateWait bounds how long a fleet submission whose client
	// request id another submission holds waits for that one's task
	// before it is answered UNAVAILABLE (0: DefaultDuplicateWait).
	DuplicateWait time.Duration
	// Claimer takes a task when its session re-attaches (nil: the attempt
	// after the one in memory).
	Claimer Claimer
	// Logger receives lifecycle logs; nil discards.
	Logger *slog.Logger
}

// Manager is the entry point for task operations shared by both client APIs.
type Manager struct {
	opts    ManagerOptions
	store   eventlog.Store
	configs *ConfigStore
	reg     *Registry
	queue   Queue
	log     *slog.Logger
	closed  atomic.Bool
	persist Persistence // nil: in memory only
	// reopen is store, if it can reopen the logs of stored tasks (the
	// tasks Restore and Get bring back from the store log through it).
	reopen Reopener
	// fleet, when set, makes this manager one replica of a fleet (see
	// Fleet); nil: single node.
	fleet Fleet
	// takes serialises, per task, a fleet re-attach's choice to take the
	// task afresh and the take (Manager.reattach).
	takes keyedMutex
	// adopts serialises, per task, a fleet's Adopt: its look at the copy
	// held and the swap (a copy holding a newer attempt is never replaced).
	adopts keyedMutex
}

// NewManager wires a manager. SetQueue must be called before Submit (the
// scheduler and the manager refer to each other).
func NewManager(store eventlog.Store, configs *ConfigStore, opts ManagerOptions) *Manager {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{opts: opts, store: store, configs: configs, log: opts.Logger, persist: opts.Persistence}
	m.reopen, _ = store.(Reopener)
	m.reg = NewRegistry(opts.MaxTasksKept, func(t *Task) {
		if m.persist != nil {
			m.persist.Evicted()
		}
		store.Remove(t.id)
	})
	if m.persist != nil {
		configs.mu.Lock()
		configs.onChange = m.persist.SaveConfig
		configs.mu.Unlock()
	}
	return m
}

// SetQueue sets the queue tasks are placed on.
func (m *Manager) SetQueue(q Queue) { m.queue = q }

// Configs is the config store.
func (m *Manager) Configs() *ConfigStore { return m.configs }

// Registry is the task registry.
func (m *Manager) Registry() *Registry { return m.reg }

// Submit is SubmitContext without a caller's context.
func (m *Manager) Submit(spec Spec) (*Task, error) {
	return m.SubmitContext(context.Background(), spec)
}

// SubmitContext validates spec, creates the task (PENDING) and queues it.
// ctx bounds only the wait of a duplicate fleet submission (see
// submitOnce): the task itself does not end with it.
func (m *Manager) SubmitContext(ctx context.Context, spec Spec) (*Task, error) {
	if m.closed.Load() {
		return nil, ErrClosed
	}
	if err := validateSpec(&spec); err != nil {
		return nil, err
	}
	if err := m.storeHealth(); err != nil {
		// Refused before anything exists: the client retries later
		// (UNAVAILABLE) instead of waiting for a store that is stuck.
		return nil, err
	}
	newID := NewID()
	if m.fleet != nil {
		if err := m.fleet.Health(); err != nil {
			return nil, err
		}
		if rid := spec.Labels[RequestIDLabel]; rid != "" {
			return m.submitOnce(ctx, spec, rid, newID)
		}
	}
	t, _, err := m.create(spec, newID)
	return t, err
}

// DefaultDuplicateWait is ManagerOptions.DuplicateWait's default.
const DefaultDuplicateWait = 5 * time.Second

// ErrFirstSubmissionPending answers a duplicate submission whose first
// submission has not stored its task within the wait (UNAVAILABLE: the
// client retries and then gets that task).
var ErrFirstSubmissionPending = fmt.Errorf("%w: the first submission with this client_request_id is still being created; retry", store.ErrUnavailable)

// requestKey is the key a fleet reserves for client request id rid of
// tenant: ids are the tenant's own (another tenant's equal id is another
// request). The tenant is length-prefixed, so no pair of (tenant, rid)
// maps to the key of another.
func requestKey(tenant, rid string) string {
	return fmt.Sprintf("%d:%s%s", len(tenant), tenant, rid)
}

// submitOnce submits spec in a fleet under client request id rid: the
// first submission with rid creates the task, the others get it. A
// duplicate never takes the id over: it waits for the first submission's
// task (within ctx and DuplicateWait), else it is answered
// ErrFirstSubmissionPending. The first submission gives the id back only
// if it failed before anything of its task was stored; from then on the
// id is its task's.
func (m *Manager) submitOnce(ctx context.Context, spec Spec, rid, newID string) (*Task, error) {
	// The checks that need no I/O come before the reservation: a
	// submission they refuse never holds the id.
	if err := m.precheck(&spec); err != nil {
		return nil, err
	}
	key := requestKey(spec.Caller.Tenant, rid)
	wait := m.opts.DuplicateWait
	if wait <= 0 {
		wait = DefaultDuplicateWait
	}
	wctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	pending := func(err error) error {
		if ctx.Err() != nil {
			return ctx.Err() // the caller is gone
		}
		if wctx.Err() != nil {
			return ErrFirstSubmissionPending
		}
		return err
	}
	for {
		// Reserve is the atomic read of the reservation too: an id given
		// back meanwhile is reserved here, for this submission.
		existing, err := m.fleet.Reserve(wctx, key, newID)
		if err != nil {
			return nil, pending(err)
		}
		if existing == "" {
			break
		}
		t, err := m.lookupCtx(wctx, existing)
		if err == nil {
			return t, nil // a duplicate: the first submission's task
		}
		if !errors.Is(err, ErrNotFound) {
			return nil, pending(err)
		}
		select {
		case <-wctx.Done():
			return nil, pending(wctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	t, stored, err := m.create(spec, newID)
	if err != nil && !stored {
		uctx, ucancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		if uerr := m.fleet.Unreserve(uctx, key, newID); uerr != nil {
			m.log.Warn("client request id of a failed submission not given back", "client_request_id", rid, "error", uerr)
		} else {
			m.log.Info("client request id of a failed submission given back", "client_request_id", rid, "error", err)
		}
		ucancel()
	}
	return t, err
}

// lookupCtx is Get of a fleet task within ctx.
func (m *Manager) lookupCtx(ctx context.Context, id string) (*Task, error) {
	if t := m.reg.Get(id); t != nil && !t.disowned() {
		return t, nil
	}
	return m.fleet.Lookup(ctx, id)
}

// precheck refuses spec for what needs no I/O: a planner not served,
// another tenant's sandbox, a start over MaxStartBytes, a previous task id
// that is not text (create checks them again).
func (m *Manager) precheck(spec *Spec) error {
	planner := spec.Planner
	if planner == "" {
		planner = m.opts.DefaultPlanner
	}
	if len(m.opts.Planners) > 0 && !slices.Contains(m.opts.Planners, planner) {
		return fmt.Errorf("%w: no commander of this deployment serves planner %q (its planners: %s)", ErrInvalidArgument, planner, strings.Join(m.opts.Planners, ", "))
	}
	if id := spec.Sandbox.GetId(); id != "" && !spec.Caller.Admin {
		if slices.ContainsFunc(m.reg.sandboxTenants(id), func(u string) bool { return u != spec.Caller.Tenant }) {
			return fmt.Errorf("%w: sandbox %q", ErrNotFound, id)
		}
	}
	if id := spec.PreviousTaskID; id != "" && (!utf8.ValidString(id) || strings.ContainsRune(id, 0)) {
		return fmt.Errorf("%w: previous task %q", ErrNotFound, id)
	}
	cfg := m.configs.Resolve(spec.RunningConfig)
	if own := len(spec.Instruction) + len(spec.UserSystemPrompt) + proto.Size(cfg); own > MaxStartBytes {
		return fmt.Errorf("%w: instruction and config of %d bytes exceed the %d bytes a task's start may carry", ErrInvalidArgument, own, MaxStartBytes)
	}
	return nil
}

// create makes the task of a validated spec with id newID (see Submit).
// stored tells whether anything of the task may be stored (its record may
// be written even though err is set).
func (m *Manager) create(spec Spec, newID string) (_ *Task, stored bool, _ error) {
	t, err := m.createTask(spec, newID, &stored)
	return t, stored, err
}

// createTask is create; it sets *stored once anything of the task may be
// stored.
func (m *Manager) createTask(spec Spec, newID string, stored *bool) (*Task, error) {
	planner := spec.Planner
	if planner == "" {
		planner = m.opts.DefaultPlanner
	}
	if len(m.opts.Planners) > 0 && !slices.Contains(m.opts.Planners, planner) {
		return nil, fmt.Errorf("%w: no commander of this deployment serves planner %q (its planners: %s)", ErrInvalidArgument, planner, strings.Join(m.opts.Planners, ", "))
	}
	owner := spec.Caller.Tenant
	if id := spec.Sandbox.GetId(); id != "" {
		users := m.reg.sandboxTenants(id)
		switch {
		case !spec.Caller.Admin && slices.ContainsFunc(users, func(u string) bool { return u != owner }):
			// Another tenant's task was given this sandbox or reported it
			// in use: a task may drive the sandbox it is given, so this one
			// would drive theirs. Answered as a previous task that does not
			// exist (NotFound).
			return nil, fmt.Errorf("%w: sandbox %q", ErrNotFound, id)
		case spec.Caller.Admin && len(users) == 1:
			// An admin's task on a tenant's sandbox is that tenant's (as a
			// continuation is), so that the sandbox stays theirs to use.
			owner = users[0]
		}
	}
	var history []*dispatchv1.ConversationTurn
	sandbox := spec.Sandbox
	if spec.PreviousTaskID != "" {
		prev, err := m.Get(spec.PreviousTaskID) // from the store if not in memory
		if errors.Is(err, store.ErrUnavailable) {
			return nil, err
		}
		// Another tenant's task is answered as one that does not exist:
		// its conversation and sandbox stay its own, and the answer does
		// not tell that it exists.
		if prev == nil || !spec.Caller.Sees(prev.tenant) {
			return nil, fmt.Errorf("%w: previous task %q", ErrNotFound, spec.PreviousTaskID)
		}
		owner = prev.tenant
		history = prev.conversation()
		if sandbox == nil {
			// The sandbox continues too: the one the previous session kept.
			sandbox = prev.ContinuedSandbox()
		}
	}
	cfg := m.configs.Resolve(spec.RunningConfig)
	// The start packet carries the instruction, the config and the history:
	// it must fit the commander's 4 MiB message limit whatever the chain.
	own := len(spec.Instruction) + len(spec.UserSystemPrompt) + proto.Size(cfg)
	if own > MaxStartBytes {
		return nil, fmt.Errorf("%w: instruction and config of %d bytes exceed the %d bytes a task's start may carry", ErrInvalidArgument, own, MaxStartBytes)
	}
	history = boundHistory(history, min(MaxHistoryBytes, MaxStartBytes-own), MaxHistoryTurns)
	timeout := time.Duration(DefaultTaskTimeout) * time.Second
	if s := cfg.GetTaskTimeout(); s > 0 {
		timeout = time.Duration(s) * time.Second
	}
	if spec.TimeoutSeconds > 0 {
		timeout = time.Duration(spec.TimeoutSeconds) * time.Second
	}
	t := &Task{
		id:              newID,
		instruction:     spec.Instruction,
		planner:         planner,
		required:        spec.RequiredCapabilities,
		labels:          spec.Labels,
		sandbox:         sandbox,
		destroySandbox:  spec.DestroySandbox,
		previousTaskID:  spec.PreviousTaskID,
		tenant:          owner,
		userPrompt:      spec.UserSystemPrompt,
		sandboxOfOthers: m.sandboxOfOthers,
		history:         history,
		timeout:         timeout,
		createdAt:       time.Now(),
		done:            make(chan struct{}),
		status:          agentpb.TaskStatus_PENDING,
		message:         "queued",
		config:          cfg,
		onFinish:        m.reg.finishedTask,
		policy:          spec.Policy,
		persist:         m.persist,
		closed:          &m.closed,
	}
	log, err := m.store.Create(t.id)
	if err != nil {
		return nil, fmt.Errorf("create event log: %w", err)
	}
	_, t.span = telemetry.Tracer().Start(trace.ContextWithSpanContext(context.Background(), spec.Trace), "task",
		trace.WithAttributes(attribute.String("task.id", t.id), attribute.String("task.planner", planner)))
	t.log = log
	t.mu.Lock()
	_, _ = t.log.Append(t.stateEvent(), eventlog.Control)
	t.mu.Unlock()
	if m.fleet != nil {
		return m.submitFleet(t, stored)
	}
	m.reg.add(t)
	if err := m.queue.Enqueue(t); err != nil {
		m.reg.remove(t)
		m.store.Remove(t.id)
		t.span.SetStatus(codes.Error, err.Error())
		t.span.End()
		return nil, err
	}
	if m.persist != nil {
		// The client gets the id only once the task survives a crash, as
		// long as the store keeps up. If it stalls meanwhile (the writer
		// turns unhealthy, at most StuckAfter later) the task, already
		// queued and maybe started, is not taken back: the client gets its
		// id, and the record is written once the store recovers (the
		// writer retries). Answering UNAVAILABLE instead would make a
		// client that retries run the task twice.
		t.mu.Lock()
		t.saveLocked()
		t.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := m.persist.FlushWhileHealthy(ctx)
		cancel()
		if err != nil {
			m.log.Error("task not stored yet", "task_id", t.id, "error", err)
		}
	}
	m.log.Debug("task submitted", "task_id", t.id, "planner", planner, "tenant", owner)
	return t, nil
}

// submitFleet stores t and hands it to the fleet's bus: the replica that
// claims it runs it, this one keeps nothing of it. The client gets the id
// only once the task is stored and placed.
func (m *Manager) submitFleet(t *Task, stored *bool) (*Task, error) {
	t.onFinish = nil
	defer t.span.End()
	drop := func() { m.store.Remove(t.id) }
	if m.persist == nil {
		drop()
		return nil, errors.New("task: a fleet needs a store")
	}
	*stored = true // from here its record may be written
	t.mu.Lock()
	t.saveLocked()
	t.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.persist.FlushWhileHealthy(ctx); err != nil {
		// Not stored for sure: the task must not run behind the client's
		// back, so it is ended (its record says so once the store is back).
		t.Finish(agentpb.TaskStatus_FAILURE, "not submitted: "+err.Error(), "")
		drop()
		return nil, err
	}
	// The log's name is freed first: a replica (this one too) may adopt
	// the task as soon as it is placed. t keeps its log for what follows.
	drop()
	if err := m.fleet.Place(ctx, t); err != nil {
		t.Finish(agentpb.TaskStatus_FAILURE, "not submitted: "+err.Error(), "")
		_ = m.persist.Flush(ctx)
		return nil, err
	}
	m.log.Debug("task submitted to the fleet", "task_id", t.id, "planner", t.planner)
	// The caller may follow the task (a streaming submit): it gets the
	// fleet's view, whose log follows whichever replica runs it.
	if v, err := m.fleet.Lookup(ctx, t.id); err == nil {
		return v, nil
	}
	return t, nil
}

// sandboxOfOthers reports whether a task in memory of a tenant other than
// tenant was given sandbox id or reported it in use.
func (m *Manager) sandboxOfOthers(id, tenant string) bool {
	return slices.ContainsFunc(m.reg.sandboxTenants(id), func(u string) bool { return u != tenant })
}

func validateSpec(s *Spec) error {
	if strings.TrimSpace(s.Instruction) == "" {
		return fmt.Errorf("%w: instruction is empty", ErrInvalidArgument)
	}
	if s.TimeoutSeconds < 0 || s.TimeoutSeconds > maxTimeoutSecond {
		return fmt.Errorf("%w: timeout_seconds must be between 0 and %d", ErrInvalidArgument, maxTimeoutSecond)
	}
	if len(s.UserSystemPrompt) > MaxUserSystemPromptBytes {
		return fmt.Errorf("%w: user_system_prompt of %d bytes is over the %d bytes allowed", ErrInvalidArgument, len(s.UserSystemPrompt), MaxUserSystemPromptBytes)
	}
	if len(s.Planner) > maxShortField || len(s.PreviousTaskID) > maxShortField {
		return fmt.Errorf("%w: planner or previous task id too long", ErrInvalidArgument)
	}
	if s.Planner != "" && !ValidPlannerName(s.Planner) {
		return fmt.Errorf("%w: planner %q is not a planner name (1-64 letters, digits, '.', '_', '-', starting with a letter or digit)", ErrInvalidArgument, s.Planner)
	}
	if len(s.RequiredCapabilities) > maxCapabilities {
		return fmt.Errorf("%w: too many required capabilities (max %d)", ErrInvalidArgument, maxCapabilities)
	}
	for _, c := range s.RequiredCapabilities {
		if c == "" || len(c) > maxShortField {
			return fmt.Errorf("%w: required capability empty or too long", ErrInvalidArgument)
		}
		if !utf8.ValidString(c) || strings.ContainsRune(c, 0) {
			// A fleet's queue names are PostgreSQL text: it was NOT_FOUND.
			return fmt.Errorf("%w: required capability must be UTF-8 text without NUL bytes", ErrInvalidArgument)
		}
	}
	if len(s.Labels) > maxLabels {
		return fmt.Errorf("%w: too many labels (max %d)", ErrInvalidArgument, maxLabels)
	}
	for k, v := range s.Labels {
		if len(k) > maxShortField || len(v) > maxShortField {
			return fmt.Errorf("%w: label key or value too long", ErrInvalidArgument)
		}
	}
	if rid := s.Labels[RequestIDLabel]; !utf8.ValidString(rid) || strings.ContainsRune(rid, 0) {
		// A fleet keeps it as PostgreSQL text, which refuses both: the
		// submit was answered UNAVAILABLE, and a client retried for good.
		return fmt.Errorf("%w: label %s must be UTF-8 text without NUL bytes", ErrInvalidArgument, RequestIDLabel)
	}
	if err := ValidateConfig(s.RunningConfig); err != nil {
		return err
	}
	if os := s.Sandbox.GetOs(); agentpb.SandboxOS_name[int32(os)] == "" {
		return fmt.Errorf("%w: sandbox.os %d is not a SandboxOS", ErrInvalidArgument, os)
	}
	return nil
}

// ValidateConfig refuses a config (a task's running config, or the
// global config) that no API should take: a negative taskTimeout, steps
// <= 0, a mode InstanceMode does not define (a client's unknown enum value
// would reach the commander as a number), an id too long to be an id.
func ValidateConfig(rc *agentpb.CommonConfig) error {
	if rc.GetTaskTimeout() < 0 {
		return fmt.Errorf("%w: taskTimeout must not be negative", ErrInvalidArgument)
	}
	if rc != nil && rc.Steps != nil && rc.GetSteps() <= 0 {
		// The seed-001 API refuses max_steps <= 0; every API refuses it alike.
		return fmt.Errorf("%w: steps must be positive", ErrInvalidArgument)
	}
	if mode := rc.GetMode(); agentpb.InstanceMode_name[int32(mode)] == "" {
		return fmt.Errorf("%w: mode %d is not an InstanceMode (MODEUNDEFINED, NORMAL, FAST)", ErrInvalidArgument, mode)
	}
	if len(rc.GetId()) > maxShortField {
		return fmt.Errorf("%w: config id of %d bytes is over the %d allowed", ErrInvalidArgument, len(rc.GetId()), maxShortField)
	}
	return nil
}

// Get returns the task with id or ErrNotFound. Every task that has not
// ended is in memory; a finished one may be only in the store. While the
// store is unavailable (its writer is unhealthy, see store.Writer.Health) a
// task not in memory is not looked for there: Get fails at once with an
// error wrapping store.ErrUnavailable rather than answer NotFound for a
// task that may well exist, or wait for the store.
func (m *Manager) Get(id string) (*Task, error) {
	if t := m.reg.Get(id); t != nil && !t.disowned() {
		return t, nil
	}
	if m.fleet != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return m.fleet.Lookup(ctx, id)
	}
	if err := m.storeHealth(); err != nil {
		return nil, err
	}
	if t := m.loadStored(id); t != nil {
		return t, nil
	}
	if err := m.storeHealth(); err != nil {
		return nil, err // it turned unhealthy while we looked
	}
	return nil, ErrNotFound
}

// GetAs is Get for caller: a task of another tenant is ErrNotFound, as one
// that does not exist (never a permission error, which would tell that it
// exists).
func (m *Manager) GetAs(caller tenant.Caller, id string) (*Task, error) {
	t, err := m.Get(id)
	if err != nil {
		return nil, err
	}
	if !caller.Sees(t.tenant) {
		// Answered as an id not in memory: while the store is unavailable
		// that is UNAVAILABLE, so NOT_FOUND would tell that it exists.
		if err := m.storeHealth(); err != nil {
			return nil, err
		}
		return nil, ErrNotFound
	}
	return t, nil
}

// storeHealth is the store writer's health: nil without a store, or while
// it keeps up; otherwise an error wrapping store.ErrUnavailable.
func (m *Manager) storeHealth() error {
	if m.persist == nil {
		return nil
	}
	return m.persist.Health()
}

// ConfigByID returns the masked config with id: the global config, or the
// resolved config of the task with that id.
func (m *Manager) ConfigByID(id string) (*agentpb.CommonConfig, error) {
	if id == "" || id == m.configs.GlobalID() || id == GlobalConfigID {
		return secret.Mask(m.configs.Global()), nil
	}
	if t, _ := m.Get(id); t != nil {
		return secret.Mask(t.Config()), nil
	}
	return nil, fmt.Errorf("%w: no config with that id", ErrNotFound)
}

// ConfigByIDAs is ConfigByID for caller: the config of a task it does
// not see is ErrNotFound.
func (m *Manager) ConfigByIDAs(caller tenant.Caller, id string) (*agentpb.CommonConfig, error) {
	if id != "" && id != m.configs.GlobalID() && id != GlobalConfigID {
		if t, _ := m.Get(id); t != nil && !caller.Sees(t.tenant) {
			return nil, fmt.Errorf("%w: no config with that id", ErrNotFound)
		}
	}
	return m.ConfigByID(id)
}

// DefaultCancelReason is the reason of a client's cancel that gives none.
const DefaultCancelReason = "cancelled by client"

// CancelAs is Cancel for caller: a task of another tenant is ErrNotFound,
// as GetAs answers, and is left alone. In a fleet, a task this replica
// does not run is checked by the fleet, after the stop is announced (the
// replica running the task checks the caller itself before it stops it),
// so no database round trip comes before the stop.
func (m *Manager) CancelAs(ctx context.Context, caller tenant.Caller, id, reason string, wait bool) (CancelOutcome, error) {
	if m.fleet != nil {
		if t := m.reg.Get(id); t == nil || t.disowned() || t.view {
			return m.cancelRemote(ctx, &caller, id, reason, wait)
		}
	}
	if _, err := m.GetAs(caller, id); err != nil {
		return CancelOutcome{}, err
	}
	return m.cancel(ctx, id, reason, wait, true)
}

// cancelRemote hands the cancel of a task this replica does not run to
// the fleet.
func (m *Manager) cancelRemote(ctx context.Context, caller *tenant.Caller, id, reason string, wait bool) (CancelOutcome, error) {
	if reason == "" {
		reason = DefaultCancelReason
	}
	return m.fleet.Cancel(ctx, caller, id, reason, wait)
}

// Cancel stops a pending task (dequeued → CANCELLED) or a running one (stop
// sent; with wait, it waits up to the stop grace for the task to end so the
// outcome it reports is the real one).
func (m *Manager) Cancel(ctx context.Context, id, reason string, wait bool) (CancelOutcome, error) {
	return m.cancel(ctx, id, reason, wait, false)
}

// cancel is Cancel; keep, for a client's cancel (CancelAs), makes a cancel
// decided here on a task this fleet replica holds durable for the task's
// next owner (Fleet.KeepCancel), once the stop is under way: a command's
// cancel (Fleet.exec) has its row already.
func (m *Manager) cancel(ctx context.Context, id, reason string, wait, keep bool) (CancelOutcome, error) {
	if reason == "" {
		reason = DefaultCancelReason
	}
	reason = noNUL(reason)
	if m.fleet != nil {
		if t := m.reg.Get(id); t == nil || t.disowned() {
			// Not run here: the fleet reads the task and sends the stop
			// in one go (a Lookup first would put one more database round
			// trip before the stop; ErrNotFound comes from the fleet).
			return m.cancelRemote(ctx, nil, id, reason, wait)
		}
	}
	t, err := m.Get(id)
	if err != nil {
		return CancelOutcome{}, err
	}
	if t.view {
		return m.cancelRemote(ctx, nil, id, reason, wait)
	}
	// First, so that a task whose slot dies right now is not put back in
	// the queue behind this cancel's back (Requeue refuses it; the slot
	// ends it CANCELLED instead).
	first, handedBack := t.requestCancel(reason)
	if m.fleet != nil && (handedBack || m.reg.Get(id) != t) {
		// The fleet hands this copy back to its queue (Task.HandBack
		// decided before this cancel was recorded), or took it away
		// meanwhile (dropped it): what it records is refused, so the
		// cancel goes through the fleet, durably. The fleet, forgetting a
		// copy otherwise, looks for a cancel recorded on it after: either
		// it sees this one or this sees the copy gone.
		return m.cancelRemote(ctx, nil, id, reason, wait)
	}
	// After the decision below (never before the stop: the write is in
	// the background anyway), only for the first cancel (a later one
	// finds the first's row, or the command's).
	keepIt := func() {
		if keep && first && m.fleet != nil {
			m.fleet.KeepCancel(id, reason)
		}
	}
	if m.queue.Remove(t) {
		t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
		keepIt()
		return CancelOutcome{Cancelled: true, Status: agentpb.TaskStatus_CANCELLED, Message: "cancelled while pending"}, nil
	}
	r, st := t.runnerState()
	if Terminal(st) {
		return CancelOutcome{Status: st, Message: "task already finished: " + st.String()}, nil
	}
	if r == nil {
		// Neither queued nor running: the scheduler is handing it to a slot
		// (it starts tasks after its lock, see scheduler.Scheduler). Ending
		// it here makes that start fail (Start and Finish are ordered by
		// the task's lock; had the start won, r would be set), and the slot
		// takes the next task. Remove again: had the slot died meanwhile,
		// the task may have been put back before it ended.
		ok := t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
		m.queue.Remove(t)
		keepIt()
		return CancelOutcome{Cancelled: ok, Status: t.Status(), Message: "cancelled"}, nil
	}
	decided := r.Stop(reason, dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL)
	keepIt()
	if !wait {
		return CancelOutcome{Cancelled: decided, Status: t.Status(), Message: "stop sent"}, nil
	}
	// The session ends the task at the latest when the grace runs out; a
	// little more covers the abort itself.
	timer := time.NewTimer(m.opts.StopGrace + 500*time.Millisecond)
	defer timer.Stop()
	select {
	case <-t.Done():
	case <-timer.C:
	case <-ctx.Done():
	}
	info := t.Info()
	switch {
	case info.Status == agentpb.TaskStatus_CANCELLED && (decided || first):
		// first: this was the first cancel asked, e.g. of a task whose slot
		// died before its start (the slot ends it CANCELLED, no stop).
		return CancelOutcome{Cancelled: true, Status: info.Status, Message: "cancelled: " + info.Message}, nil
	case info.Status == agentpb.TaskStatus_CANCELLED:
		return CancelOutcome{Status: info.Status, Message: "already being cancelled: " + info.Message}, nil
	case Terminal(info.Status):
		return CancelOutcome{Status: info.Status, Message: "task ended (" + info.Status.String() + ") before the stop took effect: " + info.Message}, nil
	case decided:
		return CancelOutcome{Cancelled: true, Status: info.Status, Message: "stop sent; the commander has not acknowledged it yet"}, nil
	default:
		return CancelOutcome{Status: info.Status, Message: "a stop is already in progress"}, nil
	}
}

// Fail ends task id FAILURE with reason, whatever it is doing, because the
// dispatcher cannot keep it: the store refused one of its records (see
// store.WriterOptions.OnRejected, which the composition root wires here).
// A queued task leaves the queue; a running one is stopped (the stop says
// why, with STOP_CODE_UNSPECIFIED) and ends FAILURE once the commander
// acknowledges or the grace runs out. A task that already ended, or is no
// longer in memory, is left as it is. It never waits.
func (m *Manager) Fail(id, reason string) {
	t := m.reg.Get(id)
	if t == nil {
		return
	}
	if m.queue.Remove(t) {
		t.Finish(agentpb.TaskStatus_FAILURE, reason, "")
		return
	}
	r, st := t.runnerState()
	switch {
	case Terminal(st):
	case r == nil:
		// Being handed to a slot (see Cancel): its start now fails.
		if t.Finish(agentpb.TaskStatus_FAILURE, reason, "") {
			m.queue.Remove(t)
		}
	default:
		r.Stop(reason, dispatchv1.StopCode_STOP_CODE_UNSPECIFIED)
	}
}

// Interject delivers text to the running task's planner.
func (m *Manager) Interject(ctx context.Context, id, text string) (string, uint64, error) {
	if strings.TrimSpace(text) == "" {
		return "", 0, fmt.Errorf("%w: text is empty", ErrInvalidArgument)
	}
	if strings.ContainsRune(text, 0) {
		// Refused on every deployment alike: a fleet's command row cannot
		// hold it, and a planner's text is not altered on the way.
		return "", 0, fmt.Errorf("%w: text has a NUL byte", ErrInvalidArgument)
	}
	t, err := m.Get(id)
	if err != nil {
		return "", 0, err
	}
	if t.view {
		return m.fleet.Interject(ctx, id, text)
	}
	r, st := t.runnerState()
	if r == nil {
		return "", 0, fmt.Errorf("%w: task is %s", ErrNotRunning, st)
	}
	return r.Interject(ctx, text)
}

// ApproveToolCall resolves a tool call of a running task that a policy
// holds: approve runs it, reject answers it DENIED.
func (m *Manager) ApproveToolCall(id, callID string, approve bool, reason string) (dispatchv1.HoldOutcome, uint64, error) {
	if callID == "" || len(callID) > maxShortField || len(reason) > maxShortField*4 {
		return 0, 0, fmt.Errorf("%w: call_id must be 1 to %d bytes, reason at most %d", ErrInvalidArgument, maxShortField, maxShortField*4)
	}
	reason = noNUL(reason)
	t, err := m.Get(id)
	if err != nil {
		return 0, 0, err
	}
	if t.view {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		return m.fleet.Approve(ctx, id, callID, approve, reason)
	}
	r, st := t.runnerState()
	a, ok := r.(Approver)
	if !ok {
		return 0, 0, fmt.Errorf("%w: task is %s", ErrNotRunning, st)
	}
	return a.ResolveHold(callID, approve, reason)
}

// HandsOver reports whether Shutdown hands tasks over to the next run
// (HandOverWindow with Persistence) instead of ending them.
func (m *Manager) HandsOver() bool { return m.persist != nil && m.opts.HandOverWindow > 0 }

// Close refuses new tasks (and re-attaches) from now on; Shutdown does too.
func (m *Manager) Close() { m.closed.Store(true) }

// Shutdown refuses new tasks, lets queued and running ones finish until ctx
// ends, then stops what is left (STOP_CODE_SHUTDOWN) and waits up to the
// stop grace for it. Pending tasks still queued at that point fail.
//
// When it hands over (HandsOver), pending tasks and tasks whose sessions
// detached (Task.Detach) are left as they are, stored PENDING and RUNNING
// for the next run to queue again and to wait for; only sessions still
// attached (commanders that did not move) are waited for and stopped.
func (m *Manager) Shutdown(ctx context.Context) {
	m.closed.Store(true)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	active := m.reg.Active
	if m.HandsOver() {
		active = m.attached
	}
wait:
	for len(active()) > 0 {
		select {
		case <-ctx.Done():
			break wait
		case <-tick.C:
		}
	}
	left := active()
	if len(left) == 0 {
		return
	}
	const reason = "dispatcher shutting down"
	for _, t := range left {
		if m.queue.Remove(t) {
			t.Finish(agentpb.TaskStatus_FAILURE, reason, "")
			continue
		}
		if r, _ := t.runnerState(); r != nil {
			r.Stop(reason, dispatchv1.StopCode_STOP_CODE_SHUTDOWN)
		} else if t.Finish(agentpb.TaskStatus_FAILURE, reason, "") {
			// Being handed to a slot (see Cancel): its start now fails.
			m.queue.Remove(t)
		}
	}
	deadline := time.NewTimer(m.opts.StopGrace + 500*time.Millisecond)
	defer deadline.Stop()
	for _, t := range left {
		select {
		case <-t.Done():
		case <-deadline.C:
			m.log.Warn("tasks still running at shutdown", "count", len(m.reg.Active()))
			return
		}
	}
}

// attached are the tasks running on a session that is attached here.
func (m *Manager) attached() []*Task {
	var out []*Task
	for _, t := range m.reg.Active() {
		if r, st := t.runnerState(); st == agentpb.TaskStatus_RUNNING && r != nil {
			if _, waiting := r.(*waiter); !waiting {
				out = append(out, t)
			}
		}
	}
	return out
}

// Closed reports whether Shutdown has begun.
func (m *Manager) Closed() bool { return m.closed.Load() }

// noNUL is a reason (a cancel's, an approval's) as every deployment keeps
// it: a NUL byte as U+FFFD, so that the task's message and what the
// planner reads are the same whichever replica took the call (a fleet's
// command row, jsonb, cannot hold a NUL). A reason is not refused for its
// bytes.
func noNUL(s string) string { return strings.ReplaceAll(s, "\x00", "\ufffd") }

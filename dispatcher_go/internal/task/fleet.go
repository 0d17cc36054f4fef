package task

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// RequestIDLabel is the label a client sets to make a submission
// idempotent in a fleet: a second submission with the same value returns
// the first one's task instead of running it again.
const RequestIDLabel = "client_request_id"

// Fleet makes a Manager one replica of a fleet (package fleet implements
// it). With one, a submitted task is stored and handed to the fleet's bus
// instead of the local queue; a replica takes it (Adopt) when one of its
// slots can run it. Tasks another replica runs are read from the shared
// store (Lookup), and cancel, interject and approve of such tasks are sent
// to their owner (the Fleet's methods). Without one (nil) nothing here
// changes the single-node Manager.
type Fleet interface {
	// Health is nil while the fleet takes new work, else an error wrapping
	// store.ErrUnavailable that says why.
	Health() error
	// Reserve maps a client request id to taskID unless it maps to a task
	// already: then it returns that task's id (the submission is a
	// duplicate).
	Reserve(ctx context.Context, requestID, taskID string) (existing string, err error)
	// Unreserve gives requestID back if it maps to taskID (a submission
	// that failed before its task was stored): a retry submits anew.
	Unreserve(ctx context.Context, requestID, taskID string) error
	// Place hands t, a new task whose record and first event are stored,
	// to the fleet's bus; from then on it belongs to the replica that
	// claims it.
	Place(ctx context.Context, t *Task) error
	// Lookup returns a read-only view of task id from the shared store
	// (ErrNotFound when no replica has it).
	Lookup(ctx context.Context, id string) (*Task, error)
	// List lists the fleet's tasks newest first (see Manager.List); local
	// says which of them this replica holds, whose Info is fresher.
	List(ctx context.Context, statuses []agentpb.TaskStatus, limit int, after *ListKey, local func(id string) *Task) ([]Info, *ListKey, error)
	// Cancel, Interject and Approve act on a task this replica does not
	// run: a durable command for its owner (or, for a task nobody runs,
	// the caller takes it and ends it).
	//
	// Cancel's caller, when not nil, is the client the cancel is for: a
	// task it does not see is ErrNotFound, and is not stopped (the fleet
	// may announce the stop before it has read the task, so the replica
	// running it checks the caller too). nil: a cancel the dispatcher
	// itself decided, or whose caller was checked already.
	Cancel(ctx context.Context, caller *tenant.Caller, id, reason string, wait bool) (CancelOutcome, error)
	Interject(ctx context.Context, id, text string) (string, uint64, error)
	Approve(ctx context.Context, id, callID string, approve bool, reason string) (dispatchv1.HoldOutcome, uint64, error)
	// TakeSession takes task id over for its session sessionID, which
	// re-attaches to this replica (the replica that ran it died, drains or
	// lost the commander): the task must be RUNNING with that session and
	// of a tenant serves accepts (else ErrNotFound, nothing claimed). It
	// claims the task's lease with the next attempt whoever held it (the
	// old owner's writes are fenced from then on) and loads the task here
	// waiting for the session (Manager.AdoptWaiting).
	TakeSession(ctx context.Context, id, sessionID string, serves func(tenant string) bool) error
	// ClaimSession is TakeSession's claim alone, for t, a task's copy this
	// replica holds waiting for its session: the new attempt, and the stop
	// of a client's cancel open for the task that this replica has not
	// carried out (nil: none), which the re-attached session is stopped
	// with. ErrLeaseLost if the attempt is not held for t: the replica
	// lost the task's lease meanwhile, or t is no longer the task's copy.
	ClaimSession(ctx context.Context, t *Task, sessionID string) (int64, *dispatchv1.StopSignal, error)
	// KeepCancel makes durable a client's cancel that this replica
	// decided on task id, which it holds (Manager.CancelAs): if the
	// replica dies before the task's end is stored, the task's next owner
	// carries the cancel out instead of ending the task FAILURE or letting
	// its session run on. It must not block (the stop must not wait for
	// it): the write runs in the background.
	KeepCancel(id, reason string)
}

// SetFleet makes m a fleet replica (call once, before serving, like
// SetQueue).
func (m *Manager) SetFleet(f Fleet) { m.fleet = f }

// IsView reports whether t is a read-only view of a task run elsewhere
// (Fleet.Lookup): it records nothing and has no runner here.
func (t *Task) IsView() bool { return t.view }

// NewView makes a read-only task from s whose events are read from log (a
// fleet's view of a task another replica runs).
func NewView(s Snapshot, log eventlog.Log) *Task {
	t := &Task{
		id: s.ID, instruction: s.Instruction, planner: s.Planner, required: s.Required,
		labels: s.Labels, sandbox: s.Sandbox, destroySandbox: s.DestroySandbox,
		previousTaskID: s.PreviousTaskID, history: s.History, timeout: s.Timeout,
		createdAt: s.CreatedAt, log: log, policy: s.Policy, policyErr: s.PolicyErr,
		done: make(chan struct{}), view: true,
		status: s.Status, message: s.Message, result: s.Result, config: s.Config,
		startedAt: s.StartedAt, endedAt: s.EndedAt, commanderID: s.CommanderID,
		sessionID: s.SessionID, stats: s.Stats, usedSandbox: s.UsedSandbox,
		sandboxKept: s.SandboxKept, requeues: s.Requeues,
	}
	if Terminal(t.status) {
		close(t.done)
	}
	return t
}

// Snapshot is t's durable state now.
func (t *Task) Snapshot() Snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.snapshotLocked()
}

// ErrNewerCopy refuses a fleet's Adopt: this replica holds a copy of the
// task given a newer attempt than the one adopted (a re-attach took the
// task for its session after the caller's claim). That copy stays.
var ErrNewerCopy = errors.New("task: this replica holds a copy of the task with a newer attempt")

// Adopt makes this replica the runner of a task the fleet claimed for it
// with attempt (the copy's fencing token, see SetFenceToken): s is its stored
// state and lastSeq the seq of its newest stored event (new events
// continue after it). A copy already held (e.g. a finished one from an
// earlier attempt) is replaced, unless it was given a newer attempt:
// ErrNewerCopy then, nothing changed (a claim of the fleet's that another
// claim of this replica's overtook must not replace the newer one's copy).
// With run, the task goes to the local queue (a slot of this replica
// starts it); without, the caller ends it (Finish) or hands it back.
func (m *Manager) Adopt(s Snapshot, lastSeq uint64, attempt int64, run bool) (*Task, error) {
	if m.reopen == nil {
		return nil, errNoReopen
	}
	unlock := m.adopts.lock(s.ID)
	t, err := m.adoptLocked(s, lastSeq, attempt)
	unlock()
	if err != nil || !run {
		return t, err
	}
	if t.policyErr != nil {
		t.Finish(agentpb.TaskStatus_FAILURE, "its own policy does not compile: "+t.policyErr.Error(), "")
		return t, nil
	}
	if err := m.queue.Enqueue(t); err != nil {
		t.Finish(agentpb.TaskStatus_FAILURE, "could not be queued on this replica: "+err.Error(), "")
	}
	return t, nil
}

// adoptLocked is Adopt's swap (m.adopts held for s.ID).
func (m *Manager) adoptLocked(s Snapshot, lastSeq uint64, attempt int64) (*Task, error) {
	if old := m.reg.Get(s.ID); old != nil {
		if old.FenceToken() > attempt {
			return nil, ErrNewerCopy
		}
		// The copy replaced records nothing more that is stored: the
		// fleet claimed a new attempt for this one, and the fenced store
		// writes only what carries the attempt of the task's lease.
		// Disowned (its watchers follow the fleet's view) and, if it
		// waits for its session, its hand-over forgotten (it never ends
		// itself: waiter.finish).
		if old.lease != nil {
			old.lease.lose()
		}
		old.abandon()
	}
	m.Forget(s.ID)
	s.LastSeq = lastSeq
	log, err := m.reopen.Restore(s.ID, lastSeq, Terminal(s.Status))
	if err != nil {
		return nil, err
	}
	if attempt != 0 && !eventlog.SetToken(log, attempt) {
		// Every record of the copy would carry no token and be refused
		// while it ran on: a silent loss of all it does.
		m.store.Remove(s.ID)
		return nil, fmt.Errorf("task %s: %w", s.ID, errNoFenceToken)
	}
	s.FenceToken = attempt
	t := m.rebuild(s, log)
	m.reg.add(t)
	return t, nil
}

// errNoFenceToken: the copy's event log cannot carry a fencing token (it
// is not a durable log), so the fenced store would refuse all it records.
var errNoFenceToken = errors.New("the task's event log carries no fencing token")

// SetFenceToken gives t, a fleet replica's copy of its task, the fencing token
// attempt: the lease attempt the replica now holds for this copy (a
// session re-attaching to it claimed the next one). What t records from
// now on carries it (its events and records); the fenced store writes
// only what carries the attempt of the task's lease. An error if t's log
// cannot carry a token (nothing changed then).
func (t *Task) SetFenceToken(attempt int64) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !eventlog.SetToken(t.log, attempt) {
		return fmt.Errorf("task %s: %w", t.id, errNoFenceToken)
	}
	t.fence = attempt
	return nil
}

// FenceToken is t's fencing token (SetFenceToken; 0: none).
func (t *Task) FenceToken() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.fence
}

// ForgetCopy is Forget of copy t only: nothing if the registry holds
// another copy of its task (a newer one, taken since).
func (m *Manager) ForgetCopy(t *Task) {
	if m.reg.remove(t) {
		m.forgotten(t)
	}
}

// Forget drops task id from memory (its log too): the fleet moved it to
// another replica, so it is read from the shared store from now on.
func (m *Manager) Forget(id string) {
	if t := m.reg.Get(id); t != nil {
		m.reg.remove(t)
		m.forgotten(t)
	}
}

// forgotten drops the log of copy t, removed from the registry. Its
// lease is lost (as in adoptLocked): a watcher still holding its Log()
// follows the fleet's view, never a record of this copy's the store
// refuses, and WhenDurable never fires for one.
func (m *Manager) forgotten(t *Task) {
	if t.lease != nil {
		t.lease.lose()
	}
	m.store.Remove(t.id)
}

// Disown marks task id as no longer this replica's: it lost the task's
// lease, so from now on whatever its copy here records is refused by the
// store. The copy's readers (watchers here) are moved to the fleet's view
// of the task (the truth, which another replica writes now) and Get
// answers with that view. Call it before the refused records are
// reported durable to the copy's log (the fleet calls it from inside the
// store write that found the fence, before that write returns): a
// watcher here then never sees a record the store refused, such as the
// FAILURE that Drop ends the copy with. It is cheap and does not block.
//
// It returns the copy disowned (nil: none), the one Drop must stop.
func (m *Manager) Disown(id string) *Task {
	t := m.reg.Get(id)
	if t == nil || t.lease == nil {
		return nil
	}
	t.lease.lose()
	return t
}

// Disowned reports whether t is the copy of a task this fleet replica no
// longer holds the lease of (Disown).
func (t *Task) Disowned() bool { return t.disowned() }

// Drop stops the session of task id on this replica without ending the
// task for anyone else: the replica lost the task's lease (its writes are
// fenced), so whatever it records is refused by the store. The local copy
// ends FAILURE with reason and is forgotten; one that waited for its
// session to re-attach (that session went to the replica that took the
// lease) is forgotten without ending. Either way the copy is disowned
// first (see Disown): its watchers here follow the fleet's view of the
// task, never the copy's local end.
func (m *Manager) Drop(id, reason string) {
	if t := m.reg.Get(id); t != nil {
		m.DropCopy(t, reason)
	}
}

// DropCopy is Drop of copy t: the one whose lease was lost, which may no
// longer be the task's copy in the registry when this runs (a session
// re-attaching here took the task afresh meanwhile: Reattach); the copy
// that replaced it is left alone.
func (m *Manager) DropCopy(t *Task, reason string) {
	id := t.id
	if t.lease != nil {
		t.lease.lose()
	}
	forget := func() {
		if m.reg.remove(t) {
			m.store.Remove(id)
		}
	}
	if t.abandon() {
		// It waited for its session, which re-attached to another
		// replica: that replica runs it now; this copy ends nothing and
		// records nothing.
		forget()
		return
	}
	if m.queue.Remove(t) {
		t.Finish(agentpb.TaskStatus_FAILURE, reason, "")
	} else if r, st := t.runnerState(); r != nil {
		r.Stop(reason, dispatchv1.StopCode_STOP_CODE_UNSPECIFIED)
	} else if !Terminal(st) {
		t.Finish(agentpb.TaskStatus_FAILURE, reason, "")
	}
	go func() {
		<-t.Done()
		forget()
	}()
}

// leaseLog is the log readers get (Task.Log) of a task a fleet replica
// runs: the task's own log while the replica holds the task's lease, the
// fleet's view of the task (Fleet.Lookup) once it lost it (Manager.Disown).
// A stale owner (paused past its lease, cut off from PostgreSQL) goes on
// recording into its copy until it finds out; the store refuses those
// records, but the copy's log is told they are done and would show them,
// and Drop then ends the copy FAILURE: without the move, a watcher here
// saw a FAILURE the task never had while it went on elsewhere. A Read
// that returns after the loss is dropped and done again on the view from
// the same seq (what it held before the loss was durable: the loss is
// marked before the refused records are reported done), so the watcher
// misses and repeats nothing. Appends go to the task's own log (the
// embedded Log; the Task appends to it directly).
type leaseLog struct {
	eventlog.Log
	id    string
	fleet Fleet
	// lost is cancelled by lose.
	lost context.Context
	lose context.CancelFunc

	mu   sync.Mutex
	view eventlog.Log // the fleet's view, looked up once after the loss
}

func newLeaseLog(id string, own eventlog.Log, f Fleet) *leaseLog {
	ctx, cancel := context.WithCancel(context.Background())
	return &leaseLog{Log: own, id: id, fleet: f, lost: ctx, lose: cancel}
}

// Read implements eventlog.Log.
func (l *leaseLog) Read(ctx context.Context, after uint64, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	if l.lost.Err() == nil {
		// A reader waiting in the own log is woken by the loss.
		rctx, cancel := context.WithCancel(ctx)
		stop := context.AfterFunc(l.lost, cancel)
		evs, err := l.Log.Read(rctx, after, dst)
		stop()
		cancel()
		if l.lost.Err() == nil {
			return evs, err
		}
		dst = evs[:0] // read after the loss: it may hold refused records
	}
	v, err := l.viewLog(ctx)
	if err != nil {
		return dst[:0], err
	}
	return v.Read(ctx, after, dst)
}

// WhenDurable implements eventlog.Log: f runs once event seq is durable —
// never once the lease is lost. The loss is marked before the fenced
// store's refused records are reported done (Commit), so a call held for
// its tool_call event's durability (a tool that is not idempotent) is not
// invoked on a copy whose record the store refused: the replica that took
// the task over records and runs it.
func (l *leaseLog) WhenDurable(seq uint64, f func()) {
	l.Log.WhenDurable(seq, func() {
		if l.lost.Err() == nil {
			f()
		}
	})
}

// viewLog is the fleet's view of the task, looked up once.
func (l *leaseLog) viewLog(ctx context.Context) (eventlog.Log, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.view != nil {
		return l.view, nil
	}
	v, err := l.fleet.Lookup(ctx, l.id)
	if err != nil {
		return nil, fmt.Errorf("task %s: this dispatcher replica lost its lease and could not read the task from the fleet (watch it again): %w", l.id, err)
	}
	l.view = v.Log()
	return l.view, nil
}

// disowned reports whether t is the copy of a task this fleet replica no
// longer holds the lease of (Manager.Disown).
func (t *Task) disowned() bool { return t.lease != nil && t.lease.lost.Err() != nil }

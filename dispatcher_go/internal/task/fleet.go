package task

import (
	"context"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
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
	Cancel(ctx context.Context, id, reason string, wait bool) (CancelOutcome, error)
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
	// ClaimSession is TakeSession's claim alone, for a task this replica
	// holds waiting for its session: the new attempt.
	ClaimSession(ctx context.Context, id, sessionID string) (int64, error)
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

// Adopt makes this replica the runner of a task the fleet claimed for it:
// s is its stored state and lastSeq the seq of its newest stored event
// (new events continue after it). A copy already held (e.g. a finished one
// from an earlier attempt) is replaced. With run, the task goes to the
// local queue (a slot of this replica starts it); without, the caller ends
// it (Finish) or hands it back.
func (m *Manager) Adopt(s Snapshot, lastSeq uint64, run bool) (*Task, error) {
	if m.reopen == nil {
		return nil, errNoReopen
	}
	m.Forget(s.ID)
	s.LastSeq = lastSeq
	log, err := m.reopen.Restore(s.ID, lastSeq, Terminal(s.Status))
	if err != nil {
		return nil, err
	}
	t := m.rebuild(s, log)
	m.reg.add(t)
	if !run {
		return t, nil
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

// Forget drops task id from memory (its log too): the fleet moved it to
// another replica, so it is read from the shared store from now on.
func (m *Manager) Forget(id string) {
	if t := m.reg.Get(id); t != nil {
		m.reg.remove(t)
		m.store.Remove(id)
	}
}

// Drop stops the session of task id on this replica without ending the
// task for anyone else: the replica lost the task's lease (its writes are
// fenced), so whatever it records is refused by the store. The local copy
// ends FAILURE with reason and is forgotten; one that waited for its
// session to re-attach (that session went to the replica that took the
// lease) is forgotten without ending.
func (m *Manager) Drop(id, reason string) {
	t := m.reg.Get(id)
	if t == nil {
		return
	}
	if t.abandon() {
		// It waited for its session, which re-attached to another
		// replica: that replica runs it now; this copy ends nothing and
		// records nothing.
		m.reg.remove(t)
		m.store.Remove(id)
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
		m.reg.remove(t)
		m.store.Remove(id)
	}()
}

package task

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
)

// Persistence keeps a Manager's tasks and global config across restarts.
// taskstore.Store implements it; this package declares it so that the task
// model does not depend on how tasks are stored (taskstore depends on this
// package, not the other way round).
type Persistence interface {
	// Save queues s to be written behind the events its task appended so
	// far. It is called under the task's lock, so snapshots are queued in
	// the order of the changes they show; it must not wait for the disk.
	Save(s *Snapshot)
	// SaveConfig stores the global config; it is called on every change,
	// in order.
	SaveConfig(c *agentpb.CommonConfig)
	// Flush returns once everything saved and every event appended so far
	// is stored.
	Flush(ctx context.Context) error
	// FlushWhileHealthy is Flush that gives up at once, with an error
	// wrapping store.ErrUnavailable, while (or as soon as) the store is
	// unavailable: request paths use it, never waiting for a stuck store.
	FlushWhileHealthy(ctx context.Context) error
	// Health is nil while the store keeps up, else an error wrapping
	// store.ErrUnavailable (see store.Writer.Health).
	Health() error
	// Evicted says that a finished task was dropped from memory (so the
	// store may hold the only copy of its final state).
	Evicted()
	// Finished returns the finished task id from the store; ErrNotFound if
	// the store has no finished task with that id.
	Finished(ctx context.Context, id string) (Snapshot, error)
	// ListFinished returns, newest first after after (nil: from the
	// newest), up to n finished tasks from the store whose status is in
	// statuses (empty: any) and for which inMemory is false, reading no
	// further than needed to get past floor (nil: no floor).
	ListFinished(ctx context.Context, statuses []agentpb.TaskStatus, after, floor *ListKey, n int, inMemory func(id string) bool) ([]Info, error)
	// Recover reads back what the previous run left (see Manager.Restore),
	// keeping at most maxKept of the tasks that had finished.
	Recover(ctx context.Context, maxKept int) (Recovered, error)
}

// Reopener is an event-log store that can also reopen the logs of tasks
// kept in a store: eventlog.Durable, and wrappers of it (such as a metrics
// observer). A Manager with Persistence needs its event-log store to be one,
// so that tasks brought back from the store log through the same store,
// wrappers included, as the tasks it creates.
type Reopener interface {
	eventlog.Store
	// Restore opens the log of a task whose events up to lastSeq are
	// stored; new events continue at lastSeq+1.
	Restore(taskID string, lastSeq uint64, sealed bool) (eventlog.Log, error)
	// Stored is the read-only, sealed log of a finished task.
	Stored(taskID string, lastSeq uint64) eventlog.Log
}

var _ Reopener = (*eventlog.Durable)(nil)

// errNoReopen means the Manager has Persistence but its event-log store
// cannot reopen the logs of stored tasks.
var errNoReopen = errors.New("task: the event-log store cannot reopen stored logs (Persistence needs an eventlog.Durable)")

// Snapshot is a task's durable state: what a Persistence stores, and what a
// task is rebuilt from when it is read back.
type Snapshot struct {
	Summary
	Required []string
	// Sandbox is the client's choice; UsedSandbox is the one the session
	// reported, and SandboxKept whether it outlives the task.
	Sandbox        *agentpb.Sandbox
	DestroySandbox bool
	UsedSandbox    *agentpb.Sandbox
	SandboxKept    bool
	Timeout        time.Duration
	History        []*dispatchv1.ConversationTurn
	// UserSystemPrompt is the task's addition to the planner's prompt.
	UserSystemPrompt string
	// Config is the resolved config: with its secrets while the task may
	// still run, masked once it ended.
	Config   *agentpb.CommonConfig
	Requeues int
	// Policy is the task's own policy. PolicyErr is set instead when a
	// stored policy no longer compiles: a finished task only shows its
	// state, a requeued one fails rather than run without it.
	Policy    *policy.Policy
	PolicyErr error
	// Attempt is the task's attempt number (see Task.Attempt).
	Attempt int64
	// UpstreamSeq is, for a RUNNING task read back by Recover, the highest
	// upstream seq its log holds (not stored in the record: read from the
	// log).
	UpstreamSeq uint64
	// Stop is the stop decided for the task's running session, if any.
	Stop *dispatchv1.StopSignal
	// FenceToken is the fencing token of the copy the snapshot is of (a fleet
	// lease's attempt, see Task.SetFenceToken; 0: none): its record carries it
	// to the store (store.TaskRecord.Token). Not stored.
	FenceToken int64
}

// Info is the snapshot as readers see it.
func (s *Snapshot) Info() Info {
	sb := s.UsedSandbox
	if sb == nil {
		sb = s.Sandbox
	}
	return Info{Summary: s.Summary, Sandbox: sb}
}

// Recovered is what the previous run left, as Persistence.Recover read it
// back and judged it.
type Recovered struct {
	// Global is the stored global config, or nil.
	Global *agentpb.CommonConfig
	// Finished are the tasks to keep in memory as finished, oldest first:
	// those the store shows finished, and those Recover ended (their final
	// event and record are already stored).
	Finished []Snapshot
	// Pending are the tasks to queue again, oldest first (status PENDING;
	// their new state is not stored yet).
	Pending []Snapshot
	// Running are the tasks that were RUNNING, whose sessions may
	// re-attach (only when the Persistence was asked to keep them, see
	// taskstore.Options.KeepRunning; otherwise they are in Finished,
	// FAILURE). Restore makes each wait for its session for the hand-over
	// window.
	Running []Snapshot
	// Report counts the tasks found (Requeued is left to Restore).
	Report RestoreReport
}

// RestoreReport says what Restore found.
type RestoreReport struct {
	// Loaded is the number of finished tasks loaded into memory.
	Loaded int
	// Requeued tasks were PENDING and are queued again.
	Requeued int
	// Failed tasks were RUNNING and are now FAILURE
	// (taskstore.RestartFailureMessage).
	Failed int
	// Waiting tasks were RUNNING and wait for their sessions to re-attach
	// (ManagerOptions.HandOverWindow).
	Waiting int
	// Finished tasks had ended but their record had not caught up with
	// their terminal event; they take the status the event shows.
	Finished int
}

// Restore brings the state of the previous run back after a restart: the
// Persistence reads it back and judges each task by its last durable event
// (Recover); here the global config is set, the finished tasks are kept in
// memory and the pending ones are queued again, each with its log reopened
// through the Manager's own event-log store. Call it once, after SetQueue
// and before serving.
func (m *Manager) Restore(ctx context.Context) (RestoreReport, error) {
	if m.persist == nil {
		return RestoreReport{}, nil
	}
	if m.reopen == nil {
		return RestoreReport{}, errNoReopen
	}
	got, err := m.persist.Recover(ctx, m.reg.maxKept)
	rep := got.Report
	if err != nil {
		return rep, err
	}
	if got.Global != nil {
		m.configs.set(got.Global)
	}
	for _, s := range got.Finished {
		t := m.rebuild(s, m.reopen.Stored(s.ID, s.LastSeq))
		m.reg.add(t)
		m.reg.finishedTask(t)
	}
	requeue := make([]*Task, 0, len(got.Pending))
	for _, s := range got.Pending {
		log, err := m.reopen.Restore(s.ID, s.LastSeq, false)
		if err != nil {
			return rep, err
		}
		requeue = append(requeue, m.rebuild(s, log))
	}
	for _, t := range requeue {
		m.reg.add(t)
		t.mu.Lock()
		_, _ = t.log.Append(t.stateEvent(), eventlog.Control)
		t.saveLocked()
		t.mu.Unlock()
		if t.policyErr != nil {
			t.Finish(agentpb.TaskStatus_FAILURE, "its own policy does not compile after the dispatcher restart: "+t.policyErr.Error(), "")
			continue
		}
		if err := m.queue.Enqueue(t); err != nil {
			t.Finish(agentpb.TaskStatus_FAILURE, "could not be queued again after a dispatcher restart: "+err.Error(), "")
			continue
		}
		rep.Requeued++
	}
	for _, s := range got.Running {
		log, err := m.reopen.Restore(s.ID, s.LastSeq, false)
		if err != nil {
			return rep, err
		}
		t := m.rebuild(s, log)
		m.reg.add(t)
		if t.policyErr != nil {
			// Its session must not go on looser than it was submitted.
			t.Finish(agentpb.TaskStatus_FAILURE, "its own policy does not compile after the dispatcher restart: "+t.policyErr.Error(), "")
			continue
		}
		t.waitForReattach(m.opts.HandOverWindow)
		rep.Waiting++
	}
	if err := m.persist.Flush(ctx); err != nil {
		return rep, fmt.Errorf("restore: %w", err)
	}
	m.log.Info("state restored", "loaded", rep.Loaded, "requeued", rep.Requeued, "failed_running", rep.Failed, "finished", rep.Finished,
		"waiting_for_reattach", rep.Waiting, "handover_window", m.opts.HandOverWindow)
	return rep, nil
}

// loadStored returns the finished task id from the store (not kept in
// memory), or nil.
func (m *Manager) loadStored(id string) *Task {
	if m.persist == nil || m.reopen == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := m.persist.Finished(ctx, id)
	if err != nil {
		if !errors.Is(err, ErrNotFound) {
			m.log.Warn("stored task not loaded", "task_id", id, "error", err)
		}
		return nil
	}
	return m.rebuild(s, m.reopen.Stored(id, s.LastSeq))
}

// rebuild makes a task from its snapshot, with log as its event log.
func (m *Manager) rebuild(s Snapshot, log eventlog.Log) *Task {
	t := &Task{
		id: s.ID, instruction: s.Instruction, planner: s.Planner, required: s.Required,
		labels: s.Labels, sandbox: s.Sandbox, destroySandbox: s.DestroySandbox,
		previousTaskID: s.PreviousTaskID, tenant: s.Tenant, history: s.History, timeout: s.Timeout, userPrompt: s.UserSystemPrompt,
		createdAt: s.CreatedAt, log: log, policy: s.Policy, policyErr: s.PolicyErr,
		done: make(chan struct{}), onFinish: m.reg.finishedTask, persist: m.persist,
		sandboxOfOthers: m.sandboxOfOthers,
		closed:          &m.closed,
		status:          s.Status, message: s.Message, result: s.Result, config: s.Config,
		startedAt: s.StartedAt, endedAt: s.EndedAt, commanderID: s.CommanderID,
		sessionID: s.SessionID, stats: s.Stats, usedSandbox: s.UsedSandbox,
		sandboxKept: s.SandboxKept, requeues: s.Requeues, attempt: s.Attempt, upstreamSeq: s.UpstreamSeq, stop: s.Stop, fence: s.FenceToken,
	}
	if s.Stop.GetCode() == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL && s.Status == agentpb.TaskStatus_RUNNING {
		// A client's cancel was decided (its stop stored, or, in a fleet,
		// an open cancel its last owner did not end: Fleet.TakeSession):
		// the cancel is recorded, as on the copy that decided it, so that
		// it is not carried out again (the fleet's reconcile would end a
		// copy waiting for its session, refusing the re-attach that is to
		// be stopped with it) and the task is never put back in a queue.
		// RUNNING only: a PENDING copy's stop is cleared by Start, and a
		// cancel recorded on it would outlive that (a store written by an
		// older build can hold such a snapshot).
		t.cancelReason = s.Stop.GetReason()
		if t.cancelReason == "" {
			t.cancelReason = DefaultCancelReason
		}
	}
	if m.fleet != nil {
		t.lease = newLeaseLog(t.id, log, m.fleet)
	}
	if Terminal(t.status) {
		close(t.done)
	}
	return t
}

// snapshotLocked is t's durable state. Caller holds t.mu.
func (t *Task) snapshotLocked() Snapshot {
	return Snapshot{
		Summary: Summary{
			ID: t.id, Instruction: t.instruction, Planner: t.planner, Status: t.status,
			Message: t.message, Result: t.result, CreatedAt: t.createdAt, StartedAt: t.startedAt,
			EndedAt: t.endedAt, CommanderID: t.commanderID, SessionID: t.sessionID,
			PreviousTaskID: t.previousTaskID, Tenant: t.tenant, Labels: t.labels, Stats: t.stats, LastSeq: t.log.LastSeq(),
		},
		Required: t.required, Sandbox: t.sandbox, DestroySandbox: t.destroySandbox, UsedSandbox: t.usedSandbox,
		SandboxKept: t.sandboxKept, Timeout: t.timeout, History: t.history, UserSystemPrompt: t.userPrompt,
		Config: t.config, Requeues: t.requeues, Policy: t.policy, PolicyErr: t.policyErr,
		Attempt: t.attempt, Stop: t.stop, FenceToken: t.fence,
	}
}

// saveLocked queues t's snapshot behind its events. Caller holds t.mu (so
// snapshots are queued in the order of the changes they show).
func (t *Task) saveLocked() {
	t.stopUnsaved = false // this record carries t.stop (see FenceSaveLater)
	if t.persist != nil {
		s := t.snapshotLocked()
		t.persist.Save(&s)
	}
}

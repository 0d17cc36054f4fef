package task

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// Session hand-over (docs/protocol.md, "Session hand-over"). A RUNNING task
// whose session is between two dispatchers has a waiter as its Runner: the
// task stays RUNNING, its session goes on in the commander, and the first
// re-attach of that session (Manager.Reattach) gives the task its new
// Runner. Nobody re-attaching within the hand-over window ends it FAILURE
// (HandOverExpiredMessage): a task is never RUNNING forever.
//
// A waiter comes from two places: Restore, for the tasks the previous run
// left RUNNING, and Detach, for a session whose commander moved away from
// a draining dispatcher (the task is then left RUNNING in the store for the
// next run).

// HandOverExpiredMessage is the message (with the window) of a task whose
// session did not re-attach after a dispatcher restart.
const HandOverExpiredMessage = "dispatcher restarted while the task was running; its session did not re-attach within %s"

// LinkLostExpiredMessage is the message (with the window) of a task whose
// commander's stream broke (Task.DetachLinkLost) and whose session did not
// re-attach: a commander that died, or one cut off for too long.
const LinkLostExpiredMessage = "commander link lost; session did not re-attach within %s"

// Claimer takes a task for this dispatcher when its session re-attaches: it
// returns the task's new attempt number, higher than any before, the fencing
// token of the session from now on. taskstore.Store is the single-node
// implementation (the attempt is kept in the task's record); a fleet
// implements it with a lease.
type Claimer interface {
	Claim(ctx context.Context, taskID string) (attempt int64, err error)
}

// ErrHandOver means the task's session is being handed over: it has no
// session to talk to right now (an interjection or approval is refused;
// the client may retry once the session has re-attached).
var ErrHandOver = fmt.Errorf("%w: its session is being handed over to this dispatcher; retry shortly", ErrNotRunning)

// waiter is the Runner of a RUNNING task between two sessions' streams.
type waiter struct {
	t        *Task
	timer    *time.Timer // the hand-over window; nil: none (a draining dispatcher)
	claiming bool        // a re-attach is claiming the task (guarded by t.mu)
	// claimed is the attempt a fleet already claimed for the re-attach
	// that loaded the task here (Fleet.TakeSession); 0: claim it.
	claimed int64
	// gone: the task moved to another replica; the waiter does nothing
	// more (guarded by t.mu).
	gone bool
	// expired is the message format (with the window) the task ends with
	// when the window runs out; "": HandOverExpiredMessage.
	expired string
	// pending is a stop decided while a re-attach claimed the task, and
	// due that the window ran out meanwhile (guarded by t.mu, see Stop):
	// the re-attach carries them out once the claim is decided.
	pending *dispatchv1.StopSignal
	due     time.Duration
}

// Stop implements Runner: there is no session to stop, so the task ends
// here, as the stop decided (a client's cancel is CANCELLED).
//
// While a re-attach claims the task (claiming) the end waits for the
// claim: in a fleet the claim moves the task's lease to the next attempt,
// and an end written meanwhile with the attempt before was refused by the
// store (fenced): the replica dropped the task as lost to another replica
// and the store kept it RUNNING under a lease nobody renewed. The stop is
// kept instead: a claim that succeeds stops the re-attached session with
// it (Reattached.Stop, as a stop decided before the hand-over), one that
// fails ends the task here as now. It counts as decided.
func (w *waiter) Stop(reason string, code dispatchv1.StopCode) bool {
	t := w.t
	t.mu.Lock()
	if w.claiming && t.runner == w && !w.gone && !Terminal(t.status) {
		if w.pending == nil {
			w.pending = &dispatchv1.StopSignal{Reason: reason, Code: code}
		}
		t.mu.Unlock()
		return true
	}
	t.mu.Unlock()
	return w.finish(reason, code)
}

// finish ends the task as stop (reason, code) decides; nothing if the copy
// was dropped (gone, disowned): a fleet replica that lost the task's lease
// records nothing more of it, and the attempt held now may be a newer
// copy's (a re-attach took the task afresh), whose records this one's end
// would overwrite.
func (w *waiter) finish(reason string, code dispatchv1.StopCode) bool {
	if w.dropped() {
		return false
	}
	status := agentpb.TaskStatus_FAILURE
	if code == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		status = agentpb.TaskStatus_CANCELLED
	}
	return w.t.Finish(status, reason+" (while its session was being handed over)", "")
}

// dropped reports whether w's copy was dropped: abandoned (gone) or
// disowned (a fleet replica lost the task's lease: Manager.DropCopy).
func (w *waiter) dropped() bool {
	w.t.mu.Lock()
	gone := w.gone
	w.t.mu.Unlock()
	return gone || w.t.disowned()
}

// Interject implements Runner.
func (w *waiter) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, ErrHandOver
}

// expire ends the task if it still waits (the window ran out). A stop
// decided before the hand-over decides the outcome (a client's cancel is
// CANCELLED).
func (w *waiter) expire(window time.Duration) {
	if w.dropped() {
		return // see finish
	}
	w.t.mu.Lock()
	if w.claiming && w.t.runner == w && !w.gone {
		// Decided once the claim is: a re-attach that fails ends the task
		// then (else nothing would: the timer fired).
		w.due = max(window, 1)
	}
	waiting := w.t.runner == w && !w.claiming && !w.gone
	stop := w.t.stop
	w.t.mu.Unlock()
	if !waiting {
		return
	}
	format := HandOverExpiredMessage
	if w.expired != "" {
		format = w.expired
	}
	msg := fmt.Sprintf(format, window)
	if stop != nil {
		w.Stop(stop.GetReason()+" ("+msg+")", stop.GetCode())
		return
	}
	w.t.Finish(agentpb.TaskStatus_FAILURE, msg, "")
}

// HandingOver reports whether the task's session is between two streams
// (see waiter).
func (t *Task) HandingOver() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.runner.(*waiter)
	return ok
}

// Attempt is the task's attempt number: 1 at its first start, one more at
// each later start or re-attach.
func (t *Task) Attempt() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.attempt
}

// Detach lets go of the task's session r without ending the task: r's
// commander moves to another dispatcher (this one drains) and will
// re-attach the session there. The task stays RUNNING, with a waiter as its
// runner (no window: the next run's Restore sets one). upstreamSeq is the
// highest upstream seq r handled, what a re-attach here would start from.
// False if the task is not running on r.
func (t *Task) Detach(r Runner, upstreamSeq uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status != agentpb.TaskStatus_RUNNING || t.runner != r {
		return false
	}
	t.runner = &waiter{t: t}
	t.upstreamSeq = upstreamSeq
	if t.span != nil {
		t.span.AddEvent("session detached for a hand-over")
	}
	t.saveLocked()
	return true
}

// DetachLinkLost lets go of the task's session r whose stream broke
// without the session ending (a network cut, a reset connection, a link
// found dead by keepalive, a commander that died): the task stays RUNNING,
// its runner a waiter, for window, so that the commander, if it lives,
// re-attaches the session (here or, in a fleet, on another replica) and it
// goes on with no event lost or repeated. Nobody re-attaching within window
// ends it FAILURE (LinkLostExpiredMessage). upstreamSeq is as for Detach.
// False if the task is not running on r (or window is not positive).
func (t *Task) DetachLinkLost(r Runner, upstreamSeq uint64, window time.Duration) bool {
	if window <= 0 {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status != agentpb.TaskStatus_RUNNING || t.runner != r {
		return false
	}
	w := &waiter{t: t, expired: LinkLostExpiredMessage}
	w.timer = time.AfterFunc(window, func() { w.expire(window) })
	t.runner = w
	t.upstreamSeq = upstreamSeq
	if t.span != nil {
		t.span.AddEvent("session detached: commander link lost")
	}
	t.saveLocked()
	return true
}

// waitForReattach makes t, RUNNING, wait window for its session to
// re-attach (0: it ends FAILURE at once).
func (t *Task) waitForReattach(window time.Duration) {
	w := &waiter{t: t}
	t.mu.Lock()
	t.runner = w
	if window > 0 {
		w.timer = time.AfterFunc(window, func() { w.expire(window) })
	}
	t.mu.Unlock()
	if window <= 0 {
		w.expire(0)
	}
}

// AdoptWaiting makes this replica hold a task another replica ran, for
// its session re-attaching here: s is its stored state (UpstreamSeq the
// highest upstream seq of its stored events), lastSeq its newest stored
// event, attempt the lease a fleet just claimed for the session. The task
// waits for the session (its runner is a waiter that already holds the
// claim, ending it FAILURE if nobody re-attaches within the hand-over
// window); Reattach then gives it its runner. A copy held already is
// replaced.
func (m *Manager) AdoptWaiting(s Snapshot, lastSeq uint64, attempt int64) (*Task, error) {
	t, err := m.Adopt(s, lastSeq, attempt, false)
	if err != nil {
		return nil, err
	}
	w := &waiter{t: t, claimed: attempt}
	window := m.opts.HandOverWindow
	t.mu.Lock()
	t.runner = w
	if window > 0 {
		w.timer = time.AfterFunc(window, func() { w.expire(window) })
	}
	t.mu.Unlock()
	return t, nil
}

// Resave queues t's record again: a fleet replica that holds t's lease
// with a new attempt stores with it an end that may have been written (and
// refused) with the attempt before.
func (t *Task) Resave() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.saveLocked()
}

// abandon forgets the hand-over t waits for without ending t: the task
// moved to another replica (whose session took it over), so this copy
// records nothing more. False if t does not wait.
func (t *Task) abandon() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	w, ok := t.runner.(*waiter)
	if !ok {
		return false
	}
	w.gone = true
	if w.timer != nil {
		w.timer.Stop()
	}
	return true
}

// waitsFor reports whether t is RUNNING and waiting for session
// sessionID to re-attach (nil t: false).
func (t *Task) waitsFor(sessionID string) bool {
	if t == nil {
		return false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	w, ok := t.runner.(*waiter)
	return ok && !w.gone && t.sessionID == sessionID && t.status == agentpb.TaskStatus_RUNNING
}

// Reattached is what Reattach gives the session that took a task over.
type Reattached struct {
	Task *Task
	// Attempt is the task's attempt number now (the claim's).
	Attempt int64
	// UpstreamSeq is the highest upstream seq of the session recorded in
	// the task's log: the commander resends what comes after it.
	UpstreamSeq uint64
	// StartedAt is when the task started (its timeout counts from there).
	StartedAt time.Time
	// Stop is the stop decided before the hand-over, if any: the new
	// runner must stop the session again (the commander may not have had it).
	Stop *dispatchv1.StopSignal
}

// RequeuedRefusal says why session sessionID of a task that was put back
// in the queue requeues times may not re-attach (running: the task runs
// again, in another session; else it waits in the queue): the commander
// ends its planner on it. It names no other session: the one the task
// runs in now is what a claim for that session needs.
func RequeuedRefusal(requeues int, sessionID string, running bool) string {
	now := "it waits in the queue"
	if running {
		now = "it runs again, in another session"
	}
	return fmt.Sprintf("the task was requeued (%d time(s)) and session %s no longer runs it; %s", requeues, sessionID, now)
}

// Reattach gives task taskID, RUNNING and waiting for its session
// sessionID to re-attach, to the runner newRunner makes for it (called once,
// under the task's lock: it must not call back into the task), that
// session's new runner on a slot of commanderID. The task is claimed first (Claimer: attempt + 1). It fails
// with ErrNotFound (no such task) or ErrNotRunning (the task ended, runs,
// or waits for another session) with words for the commander's log.
func (m *Manager) Reattach(ctx context.Context, taskID, sessionID, commanderID string, serves func(tenant string) bool, newRunner func(*Task) Runner) (Reattached, error) {
	if m.closed.Load() {
		return Reattached{}, ErrClosed
	}
	var carried *dispatchv1.StopSignal
	var dropped *Task
	for try := 0; ; try++ {
		got, pending, tried, err := m.reattach(ctx, taskID, sessionID, commanderID, serves, newRunner, try > 0, dropped, carried)
		if !errors.Is(err, ErrLeaseLost) || try > 0 {
			return got, err
		}
		// This replica lost the task's lease while the claim ran (a store
		// stall longer than the lease: Manager.DropCopy abandoned the
		// copy): the session takes the task afresh, as on a replica that
		// never held it (Fleet.TakeSession: loaded from the store, claimed
		// with the next attempt), unless another stream of the session
		// did meanwhile. A stop kept for the claim goes with it.
		carried, dropped = pending, tried
	}
}

// ErrClaimUnderWay refuses a re-attach for now: another re-attach of the
// same session is claiming the task (its store or fleet claim is slow).
var ErrClaimUnderWay = errors.New("another re-attach of the session is claiming the task; try again")

// ErrLeaseLost is what a Fleet's ClaimSession answers when the replica
// lost the task's lease (Drop) while it claimed: the claim is not held
// and the copy is dropped; the re-attach takes the task afresh.
var ErrLeaseLost = fmt.Errorf("%w: this dispatcher replica lost the task's lease while the session re-attached", ErrNotRunning)

// reattach is one try of Reattach, and the copy it tried (nil: none).
// retry: the try before found its copy, dropped, dropped by this replica
// while the claim ran (ErrLeaseLost); a fleet takes the task afresh
// (TakeSession) if the registry holds that copy, a disowned one or none.
// carried is a stop to keep for the session (see Reattach). pending is
// the stop kept while the claim ran (ErrLeaseLost: for the next try).
func (m *Manager) reattach(ctx context.Context, taskID, sessionID, commanderID string, serves func(tenant string) bool, newRunner func(*Task) Runner, retry bool, dropped *Task, carried *dispatchv1.StopSignal) (Reattached, *dispatchv1.StopSignal, *Task, error) {
	unlock := func() {}
	if m.fleet != nil {
		// One take of a task at a time here: two streams of a session
		// re-attaching at once (or a retry and another stream) would each
		// take it afresh, the second forgetting the first's copy while
		// its session runs. The second finds the first's copy instead.
		unlock = m.takes.lock(taskID)
	}
	t, err := m.pick(ctx, taskID, sessionID, serves, retry, dropped)
	unlock()
	if err != nil {
		return Reattached{}, nil, nil, err
	}
	if t == nil {
		return Reattached{}, nil, nil, ErrNotFound
	}
	t.mu.Lock()
	w, waiting := t.runner.(*waiter)
	switch {
	case serves != nil && !serves(t.tenant):
		// A commander may carry on only the tasks it may be given: the same
		// answer as an unknown task, so another tenant's tasks stay unseen
		// (first: nothing of the task's state may tell that it exists).
		t.mu.Unlock()
		return Reattached{}, nil, nil, ErrNotFound
	case Terminal(t.status):
		t.mu.Unlock()
		return Reattached{}, nil, t, fmt.Errorf("%w: the task ended %s: %s", ErrNotRunning, t.status, t.message)
	case t.sessionID != sessionID && t.requeues > 0:
		st, n := t.status, t.requeues
		t.mu.Unlock()
		return Reattached{}, nil, t, fmt.Errorf("%w: %s", ErrNotRunning, RequeuedRefusal(n, sessionID, st == agentpb.TaskStatus_RUNNING))
	case t.sessionID != sessionID:
		t.mu.Unlock()
		return Reattached{}, nil, t, fmt.Errorf("%w: the task's session is not %s", ErrNotRunning, sessionID)
	case waiting && w.claiming && !w.gone:
		// Another re-attach of the session claims the task now (a stream
		// the commander gave up on while the claim waited for the store):
		// not final, its claim may yet fail, and this stream may be the
		// one the commander still reads.
		t.mu.Unlock()
		return Reattached{}, nil, t, ErrClaimUnderWay
	case !waiting || w.claiming || w.gone:
		t.mu.Unlock()
		return Reattached{}, nil, t, fmt.Errorf("%w: the task's session is attached to another stream", ErrNotRunning)
	}
	w.claiming = true
	if carried != nil {
		w.pending = carried
	}
	t.mu.Unlock()

	attempt, cancelStop, err := m.claim(ctx, t, w, sessionID)

	t.mu.Lock()
	w.claiming = false
	pending, due := w.pending, w.due
	w.pending, w.due = nil, 0
	lost := w.gone || t.disowned()
	switch {
	case m.fleet != nil && (errors.Is(err, ErrLeaseLost) || err == nil && lost):
		// The copy was dropped while the claim ran (the fleet holds no
		// attempt of the claim's for it: ClaimSession refused, or the
		// lease it claimed was lost again at once): it records nothing
		// more, and the session must not run on it.
		t.mu.Unlock()
		return Reattached{}, pending, t, ErrLeaseLost
	case err != nil || t.runner != w || Terminal(t.status):
		// Ended while the claim ran, not by a stop (those wait for the
		// claim, see waiter.Stop): a fleet's ClaimSession wrote the end
		// again with the attempt it claimed.
		st, msg := t.status, t.message
		t.mu.Unlock()
		switch {
		case lost:
		case pending != nil:
			// The stop kept for the claim, which failed: as it would have.
			w.finish(pending.GetReason(), pending.GetCode())
		case due > 0:
			w.expire(due)
		}
		if err != nil {
			return Reattached{}, nil, t, fmt.Errorf("claim the task: %w", err)
		}
		return Reattached{}, nil, t, fmt.Errorf("%w: the task ended %s: %s", ErrNotRunning, st, msg)
	}
	defer t.mu.Unlock()
	if w.timer != nil {
		w.timer.Stop()
	}
	for _, st := range []*dispatchv1.StopSignal{pending, cancelStop} {
		if st == nil || t.stop != nil {
			continue
		}
		// A stop decided while the claim ran (waiter.Stop), or a client's
		// cancel the claim found open and not carried out here (in a
		// fleet: its announcement lost, or asked of a replica that held
		// the task meanwhile): the session is stopped with it at once, as
		// with a stop decided before the hand-over, and stored with the
		// task. A cancel is recorded, as on a copy that decided it: it is
		// not carried out again, and the task is never requeued.
		t.stop = st
		if st.GetCode() == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL && t.cancelReason == "" {
			t.cancelReason = st.GetReason()
			if t.cancelReason == "" {
				t.cancelReason = DefaultCancelReason
			}
		}
	}
	t.runner = newRunner(t)
	t.attempt = attempt
	t.commanderID = commanderID
	t.message = "running"
	if t.span != nil {
		t.span.AddEvent("session re-attached", trace.WithAttributes(attribute.Int64("task.attempt", attempt)))
	}
	// Watchers learn of the hand-over; the event is the task's first after it.
	ev := t.stateEvent()
	ev.GetState().Message = fmt.Sprintf("running: session re-attached (attempt %d)", attempt)
	_, _ = t.log.Append(ev, eventlog.Control)
	t.saveLocked()
	return Reattached{Task: t, Attempt: attempt, UpstreamSeq: t.upstreamSeq, StartedAt: t.startedAt, Stop: t.stop}, nil, t, nil
}

// pick is the copy of task taskID that reattach claims (nil: none), taken
// afresh first in a fleet when it must be (see reattach).
func (m *Manager) pick(ctx context.Context, taskID, sessionID string, serves func(tenant string) bool, retry bool, dropped *Task) (*Task, error) {
	t := m.reg.Get(taskID)
	switch {
	case retry && t != nil && t != dropped && !t.disowned():
		// Another stream of the session took the task afresh while the
		// claim ran (or the sweep's copy holds it): its copy holds an
		// attempt of its own. Taken afresh again, that copy would be
		// forgotten while its session runs (two sessions, and its records
		// written with this one's attempt). This try goes on with that
		// copy as a first try would: refused unless it waits for the
		// session.
	case m.fleet != nil && (t == nil || retry || Terminal(t.Status()) || t.disowned() && t.HandingOver()):
		// In a fleet the task may be another replica's (dead, draining or
		// cut off from the commander): take it over for the session. So is
		// a copy waiting here whose lease this replica lost (being
		// dropped without ending: Manager.DropCopy).
		if err := m.fleet.TakeSession(ctx, taskID, sessionID, serves); err != nil {
			return nil, err
		}
		t = m.reg.Get(taskID)
	}
	return t, nil
}

// claim asks the Claimer for t's next attempt (without one: the attempt
// after the one in memory). In a fleet the fleet claims the lease for the
// session (unless it did already, loading the task: w.claimed), and
// returns too the stop of a cancel open for the task (Fleet.ClaimSession).
func (m *Manager) claim(ctx context.Context, t *Task, w *waiter, sessionID string) (int64, *dispatchv1.StopSignal, error) {
	if w.claimed > 0 {
		return w.claimed, nil, nil
	}
	if m.fleet != nil {
		return m.fleet.ClaimSession(ctx, t, sessionID)
	}
	if m.opts.Claimer == nil {
		return t.Attempt() + 1, nil, nil
	}
	attempt, err := m.opts.Claimer.Claim(ctx, t.id)
	if err == nil && attempt <= 0 {
		err = errors.New("the claimer returned no attempt")
	}
	return attempt, nil, err
}

// keyedMutex is a mutex per key (the zero value is ready); a key's entry
// lives while it is held or waited for.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu sync.Mutex
	n  int // holders and waiters
}

// lock locks key and returns its unlock.
func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.n++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		if e.n--; e.n == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/jackc/pgx/v5/pgconn"
)

// notText reports whether err is PostgreSQL refusing a string as text
// (SQLSTATE 22021: a NUL byte or a byte sequence that is not UTF-8).
func notText(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && pe.Code == "22021"
}

// isText reports whether s can be a PostgreSQL text value (and so a task
// id): valid UTF-8 without a NUL byte.
func isText(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsRune(s, 0)
}

// unavailable wraps a PostgreSQL failure for clients (UNAVAILABLE). An id
// PostgreSQL cannot hold as text (a NUL byte, invalid UTF-8: SQLSTATE
// 22021) names no task: NOT_FOUND, not a "did not answer" the client would
// retry for good.
func unavailable(what string, err error) error {
	if errors.Is(err, task.ErrNotFound) || errors.Is(err, context.Canceled) {
		return err
	}
	if notText(err) {
		return fmt.Errorf("%w: %s: the id is not text (NUL byte or invalid UTF-8)", task.ErrNotFound, what)
	}
	return fmt.Errorf("%w: %s: the fleet's database did not answer", store.ErrUnavailable, what)
}

// Reserve implements task.Fleet.
func (f *Fleet) Reserve(ctx context.Context, requestID, taskID string) (string, error) {
	got, err := f.leases.Reserve(ctx, requestID, taskID)
	if err != nil {
		return "", unavailable("client request id", err)
	}
	return got, nil
}

// Unreserve implements task.Fleet.
func (f *Fleet) Unreserve(ctx context.Context, requestID, taskID string) error {
	if err := f.leases.Unreserve(ctx, requestID, taskID); err != nil {
		return unavailable("client request id", err)
	}
	return nil
}

// Place implements task.Fleet: the queue row, then the bus entry. The
// submitting replica's own idle slot competes for it like any other.
func (f *Fleet) Place(ctx context.Context, t *task.Task) error {
	if err := f.Health(); err != nil {
		return err
	}
	q := queueName(t.Planner(), t.RequiredCapabilities())
	if err := f.leases.Enqueue(ctx, t.ID(), q); err != nil {
		return unavailable("queue the task", err)
	}
	if err := f.xadd(ctx, t.ID(), q); err != nil {
		_ = f.leases.Dequeue(ctx, t.ID())
		return errBusDown(err)
	}
	f.kick()
	return nil
}

// Lookup implements task.Fleet. The task and its last seq are read in
// one statement: a lookup is on the path of every watch
// and cancel of a task another replica runs (the API looks the task up
// for the caller's tenant, then the manager again), and each round trip
// to PostgreSQL is a wait on a busy machine.
func (f *Fleet) Lookup(ctx context.Context, id string) (*task.Task, error) {
	// The fenced store's GetTask fills the slot (one round trip and one
	// backend wake-up; before, two queries on two pooled connections).
	if f.legs != nil {
		defer func(began time.Time) { f.legs.addID(legLookup, id, time.Since(began)) }(time.Now())
	}
	slot := &lastSeqSlot{}
	snap, err := f.ts.Load(context.WithValue(ctx, lastSeqKey{}, slot), id)
	if err != nil {
		return nil, unavailable("read the task", err)
	}
	last := slot.seq
	if !slot.ok { // a task store not on the fenced store (never in a fleet)
		if last, err = f.pg.LastSeq(ctx, id); err != nil {
			return nil, unavailable("read the task", err)
		}
	}
	snap.LastSeq = last
	return task.NewView(snap, &remoteLog{f: f, taskID: id, lastSeq: last}), nil
}

// List implements task.Fleet: every task is in PostgreSQL; the ones this
// replica runs are shown as it has them now.
func (f *Fleet) List(ctx context.Context, statuses []agentpb.TaskStatus, limit int, after *task.ListKey, local func(string) *task.Task) ([]task.Info, *task.ListKey, error) {
	infos, err := f.ts.ListAll(ctx, statuses, after, limit+1)
	if err != nil {
		return nil, nil, unavailable("list tasks", err)
	}
	for i := range infos {
		if t := local(infos[i].ID); t != nil && !t.IsView() {
			infos[i] = t.Info()
		}
	}
	var next *task.ListKey
	if len(infos) > limit {
		infos = infos[:limit]
		next = &task.ListKey{CreatedAt: infos[limit-1].CreatedAt, ID: infos[limit-1].ID}
	}
	return infos, next, nil
}

// takeFree claims a task nobody holds (pending on the bus, or left by a
// dead replica) and ends it with status: ok false if another replica
// holds it, or if this replica's claim was overtaken before it took the
// task (a session re-attaching here took it with a newer attempt,
// task.ErrNewerCopy, or the claim's attempt was lost, task.ErrLeaseLost):
// the caller then goes through the task's holder, as for ErrLeaseHeld (a
// cancel: the command row, which this replica's own newer copy carries
// out).
//
// A cancel (status CANCELLED) is written as a command row first, left
// open until the end is stored (CloseEnded): if this replica stops before
// (killed, its store refusing the end), the lease expires and the task's
// next owner carries the cancel out (ClaimQueued, takeOver's cancelAsked,
// TakeSession) instead of running the task again or ending it FAILURE.
func (f *Fleet) takeFree(ctx context.Context, id string, status agentpb.TaskStatus, reason string) (bool, error) {
	t, attempt, err := f.Take(ctx, id)
	if errors.Is(err, ErrLeaseHeld) || errors.Is(err, ErrTaskEnded) || errors.Is(err, task.ErrNotFound) ||
		errors.Is(err, task.ErrNewerCopy) || errors.Is(err, task.ErrLeaseLost) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if status == agentpb.TaskStatus_CANCELLED {
		if _, err := f.leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: reason}); err != nil {
			f.log.Warn("the cancel of a task nobody held is not written as a command; its end must be stored before this replica stops", "task_id", id, "error", err)
		}
	}
	t.Finish(status, reason, "")
	if err := f.writer.Flush(ctx); err != nil {
		return true, nil // stored once the store is back; the lease expires
	}
	if f.fenced.disown(id, attempt) {
		_ = f.leases.Release(ctx, id, attempt)
	}
	return true, nil
}

// command stores a command for id's owner and wakes it: the row first
// (the truth: the owner's reconcile carries out any command a lost
// message did not announce), then the command itself on the channel, so
// the owner acts on it without reading it back from PostgreSQL.
func (f *Fleet) command(ctx context.Context, id, kind string, args cmdArgs) (int64, error) {
	cid, err := f.addCommand(ctx, id, kind, args)
	if err != nil {
		return 0, unavailable("send the command", err)
	}
	f.announce(ctx, cmdMessage{ID: cid, TaskID: id, Kind: kind, Args: args})
	return cid, nil
}

// announce publishes m on the command channel (nothing while Redis is
// down: the owner's reconcile finds the row).
func (f *Fleet) announce(ctx context.Context, m cmdMessage) {
	if !f.busUp() {
		return
	}
	if f.legs != nil {
		m.Sent = time.Now().UnixMicro()
	}
	b, _ := json.Marshal(m)
	f.ann.publish(ctx, b) // batched with the replica's other announcements
}

// The kinds of cmdChannel messages besides the commands' own
// ("cancel", "interject", "approve"), which copy a row (or, a cancel with
// ID 0, announce one before it is written, its caller checked).
const (
	// kindCancelFor announces a cancel before its caller was checked (ID
	// 0, Caller set): the owner carries it out only if the caller sees the
	// task. A replica that does not know this kind ignores it and acts on
	// the row's own announcement.
	kindCancelFor = "cancel_for"
	// kindEnded tells that a task ended and its end is stored (Status):
	// it wakes the cancels waiting for that (Fleet.Cancel with wait).
	kindEnded = "ended"
)

// cmdMessage is a command announced on cmdChannel: its row's copy, or (ID
// 0, a cancel only) the cancel announced before its row is written; or
// (kindEnded) a task's end.
type cmdMessage struct {
	ID     int64   `json:"id,omitempty"`
	TaskID string  `json:"task"`
	Kind   string  `json:"kind"`
	Args   cmdArgs `json:"args"`
	// Caller, of a kindCancelFor, is the client the cancel is for.
	Caller *cmdCaller `json:"caller,omitempty"`
	// Status, of a kindEnded, is the task's end.
	Status int32 `json:"status,omitempty"`
	// Sent is when it was published (µs, the sender's clock), only while
	// leg stats are on.
	Sent int64 `json:"t,omitempty"`
	// Result, on the receiving replica only: what a cancel carried out at
	// once did, for its row.
	Result *cmdResult `json:"-"`
}

// cmdCaller is a tenant.Caller on the bus.
type cmdCaller struct {
	Tenant string `json:"tenant,omitempty"`
	Admin  bool   `json:"admin,omitempty"`
}

func (c cmdCaller) caller() tenant.Caller { return tenant.Caller{Tenant: c.Tenant, Admin: c.Admin} }

// cancelSkew is how much earlier than a cancel began a task may have
// ended CANCELLED and still count as stopped by it (or by a cancel sent at
// the same time): the end time is the owner's clock.
const cancelSkew = time.Second

// cancelPoll is how often a cancel waiting for the task's end reads its
// status while the bus is up: the end's announcement (kindEnded) wakes it
// at once; the read only makes up for a lost message. While the bus is
// down it reads every cancelPollDown.
const (
	cancelPoll     = 250 * time.Millisecond
	cancelPollDown = 20 * time.Millisecond
)

// Cancel implements task.Fleet.
//
// The cancel is announced first, before anything is read: the owner (the
// only replica that acts on it, whoever it is) stops the session on this
// message at once (a second stop is a no-op), so the stop does not wait
// for any PostgreSQL round trip here. With a caller, the announcement
// carries it and the owner stops the task only if the caller sees it (the
// owner has the task, and its tenant, in memory); the one read here
// (Holder) then answers ErrNotFound for a task of another tenant, as a
// look-up would have, and nothing durable is written for it. The row
// follows (f.command) and stays the truth: a lost message is made up for
// by its own announcement, or by the owner's reconcile. The price: if
// PostgreSQL then fails, the client is told UNAVAILABLE although the stop
// may have landed. Because the stop may land before the status read
// below, a task found CANCELLED that ended after this cancel began (less
// cancelSkew, the owner's clock) counts as cancelled by it, not as
// "already finished" (so a second CancelTask a moment after the first may
// be told "cancelled" too).
func (f *Fleet) Cancel(ctx context.Context, caller *tenant.Caller, id, reason string, wait bool) (task.CancelOutcome, error) {
	if !isText(id) {
		// No task has it (PostgreSQL cannot hold it); in a batched read it
		// would fail the other cancels' reads too.
		return task.CancelOutcome{}, fmt.Errorf("%w: the id is not text (NUL byte or invalid UTF-8)", task.ErrNotFound)
	}
	reason = noNUL(reason)
	began := time.Now()
	var ended <-chan agentpb.TaskStatus
	if wait {
		// Before anything is read: an end announced from now on is seen.
		ch := f.ends.add(id)
		defer f.ends.remove(id, ch)
		ended = ch
	}
	m := cmdMessage{TaskID: id, Kind: "cancel", Args: cmdArgs{Reason: reason}}
	if caller != nil {
		m.Kind, m.Caller = kindCancelFor, &cmdCaller{Tenant: caller.Tenant, Admin: caller.Admin}
	}
	f.announce(ctx, m)
	f.legs.addID(legAnnounce, id, time.Since(began))
	h, err := f.holder(ctx, id)
	if err != nil {
		return task.CancelOutcome{}, unavailable("read the task", err)
	}
	if caller != nil && !caller.Sees(h.Tenant) {
		// As Manager.GetAs answers: another tenant's task is one that does
		// not exist. The owner did not stop it (it checks the caller).
		return task.CancelOutcome{}, task.ErrNotFound
	}
	st := h.Status
	if st == agentpb.TaskStatus_CANCELLED && !h.Ended.Before(began.Add(-cancelSkew)) {
		f.legs.addID(legCancel, id, time.Since(began))
		return task.CancelOutcome{Cancelled: true, Status: st, Message: "cancelled"}, nil
	}
	if task.Terminal(st) {
		return task.CancelOutcome{Status: st, Message: "task already finished: " + st.String()}, nil
	}
	// Nobody runs it (still on the bus, or its replica is gone): end it
	// here.
	if h.Owner == "" {
		if ok, err := f.takeFree(ctx, id, agentpb.TaskStatus_CANCELLED, reason); err != nil {
			return task.CancelOutcome{}, err
		} else if ok {
			msg := "cancelled"
			if st == agentpb.TaskStatus_PENDING {
				msg = "cancelled while pending"
			}
			return task.CancelOutcome{Cancelled: true, Status: agentpb.TaskStatus_CANCELLED, Message: msg}, nil
		}
	}
	if _, err := f.command(ctx, id, "cancel", cmdArgs{Reason: reason}); err != nil {
		return task.CancelOutcome{}, err
	}
	f.legs.addID(legCancel, id, time.Since(began))
	if !wait {
		return task.CancelOutcome{Cancelled: true, Status: st, Message: "stop sent to the replica running the task"}, nil
	}
	st = f.awaitEnd(ctx, id, st, ended)
	switch {
	case st == agentpb.TaskStatus_CANCELLED:
		return task.CancelOutcome{Cancelled: true, Status: st, Message: "cancelled"}, nil
	case task.Terminal(st):
		return task.CancelOutcome{Status: st, Message: "task ended (" + st.String() + ") before the stop took effect"}, nil
	}
	return task.CancelOutcome{Cancelled: true, Status: st, Message: "stop sent; the commander has not acknowledged it yet"}, nil
}

// awaitEnd waits up to the stop grace (and a second) for task id to end,
// woken by the end's announcement on ended, reading its status now and
// then in case that message is lost: its last status (st if none read).
func (f *Fleet) awaitEnd(ctx context.Context, id string, st agentpb.TaskStatus, ended <-chan agentpb.TaskStatus) agentpb.TaskStatus {
	deadline := time.NewTimer(f.opts.StopGrace + time.Second)
	defer deadline.Stop()
	for !task.Terminal(st) {
		every := cancelPoll
		if !f.busUp() {
			every = cancelPollDown
		}
		poll := time.NewTimer(every)
		select {
		case s := <-ended:
			st = s
		case <-poll.C:
			if s, err := f.leases.Status(ctx, id); err == nil {
				st = s
			}
		case <-deadline.C:
			poll.Stop()
			return st
		case <-ctx.Done():
			poll.Stop()
			return st
		}
		poll.Stop()
	}
	return st
}

// endWaiters are the cancels waiting for tasks to end (Fleet.Cancel with
// wait), woken by kindEnded messages.
type endWaiters struct {
	mu sync.Mutex
	m  map[string][]chan agentpb.TaskStatus
}

// add registers a waiter for task id's end.
func (e *endWaiters) add(id string) chan agentpb.TaskStatus {
	ch := make(chan agentpb.TaskStatus, 1)
	e.mu.Lock()
	if e.m == nil {
		e.m = map[string][]chan agentpb.TaskStatus{}
	}
	e.m[id] = append(e.m[id], ch)
	e.mu.Unlock()
	return ch
}

// remove unregisters ch (a waiter of task id).
func (e *endWaiters) remove(id string, ch chan agentpb.TaskStatus) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ws := slices.DeleteFunc(e.m[id], func(w chan agentpb.TaskStatus) bool { return w == ch })
	if len(ws) == 0 {
		delete(e.m, id)
	} else {
		e.m[id] = ws
	}
}

// notify tells task id's waiters that it ended with st.
func (e *endWaiters) notify(id string, st agentpb.TaskStatus) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ch := range e.m[id] {
		select {
		case ch <- st:
		default: // told already
		}
	}
}

// await waits for command cid's result (up to 10 s or ctx).
func (f *Fleet) await(ctx context.Context, cid int64) (cmdResult, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	for {
		r, ok, err := f.leases.Result(ctx, cid)
		if err == nil && ok {
			if r.Err != "" {
				return r, kindErr(r.ErrKind, r.Err)
			}
			return r, nil
		}
		if !sleepCtx(ctx, 10*time.Millisecond) {
			return r, fmt.Errorf("%w: the replica running the task did not answer in time", store.ErrUnavailable)
		}
	}
}

// running checks that id is running (the only state the owner-side
// commands apply to).
func (f *Fleet) running(ctx context.Context, id string) error {
	st, err := f.leases.Status(ctx, id)
	if err != nil {
		return unavailable("read the task", err)
	}
	if st != agentpb.TaskStatus_RUNNING {
		return fmt.Errorf("%w: task is %s", task.ErrNotRunning, st)
	}
	return nil
}

// noNUL is a reason as the command carries it: a NUL byte as U+FFFD, in
// its message as in its row (whose jsonb cannot hold a NUL). A cancel is
// not refused for its reason's bytes.
func noNUL(s string) string { return strings.ReplaceAll(s, "\x00", "\ufffd") }

// errNULText refuses an interject whose text has a NUL byte: the command
// row (jsonb) cannot hold it as sent, and text delivered to a planner is
// not altered on the way.
var errNULText = fmt.Errorf("%w: text has a NUL byte", task.ErrInvalidArgument)

// Interject implements task.Fleet: the owner delivers it and answers.
func (f *Fleet) Interject(ctx context.Context, id, text string) (string, uint64, error) {
	if strings.ContainsRune(text, 0) {
		return "", 0, errNULText
	}
	if err := f.running(ctx, id); err != nil {
		return "", 0, err
	}
	cid, err := f.command(ctx, id, "interject", cmdArgs{Text: text})
	if err != nil {
		return "", 0, err
	}
	r, err := f.await(ctx, cid)
	return r.MessageID, r.Seq, err
}

// Approve implements task.Fleet.
func (f *Fleet) Approve(ctx context.Context, id, callID string, approve bool, reason string) (dispatchv1.HoldOutcome, uint64, error) {
	reason = noNUL(reason)
	if err := f.running(ctx, id); err != nil {
		return 0, 0, err
	}
	cid, err := f.command(ctx, id, "approve", cmdArgs{CallID: callID, Approve: approve, Reason: reason})
	if err != nil {
		return 0, 0, err
	}
	r, err := f.await(ctx, cid)
	return dispatchv1.HoldOutcome(r.Outcome), r.Seq, err
}

// Take claims task id for this replica (Claim) and makes it local without
// queueing it: the session hand-over re-attaches a running session to the
// returned task (its log continues after the last stored event, its writes
// carry the new attempt). The lease is released once the task ends.
func (f *Fleet) Take(ctx context.Context, id string) (*task.Task, int64, error) {
	attempt, err := f.Claim(ctx, id)
	if errors.Is(err, ErrLeaseHeld) || errors.Is(err, ErrTaskEnded) {
		return nil, 0, err
	}
	if err != nil {
		return nil, 0, unavailable("claim the task", err)
	}
	// A failure from here hands the lease back (handBack: not released:
	// the task may be RUNNING, a dead replica's, and a released lease is
	// never swept, it would stay RUNNING for good; or PENDING with its
	// queue row gone, the claim took it), and expired now: this take is a
	// client's cancel's, whose own row is written only after it (see
	// Leases.expireNow); the sweep deals with it after the grace.
	if f.hooks.taken != nil {
		f.hooks.taken(id, attempt)
	}
	snap, err := f.ts.Load(ctx, id)
	if err != nil {
		f.handBack(id, attempt, true)
		return nil, 0, unavailable("read the task", err)
	}
	last, err := f.pg.LastSeq(ctx, id)
	if err != nil {
		f.handBack(id, attempt, true)
		return nil, 0, unavailable("read the task", err)
	}
	t, err := f.adoptHeld(snap, last, attempt, false)
	if err != nil {
		f.handBack(id, attempt, true)
		return nil, 0, err
	}
	f.watchOwned(t, attempt)
	return t, attempt, nil
}

// TakeSession implements task.Fleet: a session re-attaching to this
// replica takes its task over from whichever replica ran it (see
// Leases.ClaimForSession), at once, without waiting for that replica's
// lease to expire. The task is loaded from PostgreSQL after the claim
// (nothing of the old owner is written after it) with the highest upstream
// seq of its stored events, and waits here for the session
// (task.Manager.AdoptWaiting).
func (f *Fleet) TakeSession(ctx context.Context, id, sessionID string, serves func(string) bool) error {
	snap, err := f.ts.Load(ctx, id)
	if err != nil {
		return unavailable("read the task", err)
	}
	switch {
	case serves != nil && !serves(snap.Tenant):
		return task.ErrNotFound // as Manager.Reattach: another tenant's task stays unseen
	case task.Terminal(snap.Status):
		return fmt.Errorf("%w: the task ended %s: %s", task.ErrNotRunning, snap.Status, snap.Message)
	case (snap.Status != agentpb.TaskStatus_RUNNING || snap.SessionID != sessionID) && snap.Requeues > 0:
		return fmt.Errorf("%w: %s", task.ErrNotRunning, task.RequeuedRefusal(snap.Requeues, sessionID, snap.Status == agentpb.TaskStatus_RUNNING))
	case snap.Status != agentpb.TaskStatus_RUNNING || snap.SessionID != sessionID:
		return fmt.Errorf("%w: the task's session is not %s", task.ErrNotRunning, sessionID)
	}
	attempt, cmd, err := f.claimSession(ctx, id, sessionID)
	if err != nil {
		return err
	}
	// A failure from here hands the lease back (handBack): disowned here;
	// with a cancel open for the task, expired at once (not released: a
	// released lease is never swept, the task would stay RUNNING for
	// good), so the cancel takes the task now, not after the lease and
	// the grace. Without one the lease is left to expire: the session's
	// next re-attach takes the task anyway, and the sweep ends it only
	// after the lease and the grace, as if this take had not run.
	release := func(err error) error {
		f.handBack(id, attempt, false)
		return unavailable("read the task", err)
	}
	if f.hooks.sessionTaken != nil {
		if err := f.hooks.sessionTaken(id); err != nil {
			return release(err)
		}
	}
	if snap, err = f.ts.Load(ctx, id); err != nil {
		return release(err)
	}
	last, err := f.pg.LastSeq(ctx, id)
	if err != nil {
		return release(err)
	}
	if snap.UpstreamSeq, err = f.upstreamSeq(ctx, id, last); err != nil {
		return release(err)
	}
	if cmd != nil && snap.Stop == nil {
		// A cancel asked of the task's last owner, whose stop was not
		// stored (that owner was killed, or its store refused the stop,
		// before the task's end was stored): the re-attached session is
		// stopped with it (task.Reattached.Stop), as with a stop that was
		// stored, and the task ends CANCELLED; nobody re-attaching, the
		// waiter ends it CANCELLED too. The row stays open until that end
		// is stored. The adopted copy has the cancel recorded (a stop
		// that is a client's cancel: task.Manager.Adopt), so this
		// replica's reconcile does not carry it out again (that would end
		// the copy waiting for its session and refuse the re-attach).
		snap.Stop = cancelStop(*cmd)
		f.log.Info("a re-attaching session's task has a cancel its last owner did not end: the session is stopped", "task_id", id, "command", cmd.ID)
	}
	t, err := f.mgr.AdoptWaiting(snap, last, attempt)
	if err != nil {
		f.handBack(id, attempt, false)
		return err
	}
	f.watchOwned(t, attempt)
	f.log.Info("task taken over for its re-attaching session", "task_id", id, "attempt", attempt, "last_seq", last, "upstream_seq", snap.UpstreamSeq)
	return nil
}

// handBack gives up task id's lease, which this replica claimed with
// attempt and could not take the task with (TakeSession, Take): disowned,
// and, if the task is PENDING or a cancel is open for it, expired now in
// PostgreSQL (Leases.expireNow), if it is still that attempt's. Otherwise
// (and if that write fails) it is left to expire.
//
// always (Take: a client's cancel's take) expires it whatever the task's
// state (Leases.expireNow).
func (f *Fleet) handBack(id string, attempt int64, always bool) {
	if !f.fenced.disown(id, attempt) {
		return // lost or moved on meanwhile: not this replica's to give
	}
	ctx, cancel := context.WithTimeout(f.ctx, opTimeout)
	defer cancel()
	if err := f.leases.expireNow(ctx, id, f.id, attempt, always); err != nil {
		f.log.Debug("handing a lease back failed; it expires", "task_id", id, "error", err)
	}
}

// ClaimSession implements task.Fleet: the lease of task id for session
// sessionID re-attaching here (Leases.ClaimForSession), and the fenced
// store's permission to write with it.
//
// A cancel open for the task (see claimSession), which this replica has
// not carried out (its announcement lost, or asked of another replica that
// held the task meanwhile and stopped before the task's end was stored),
// comes back as the stop the re-attached session is stopped with
// (task.Reattached.Stop), at once, as TakeSession does: the reconcile
// would carry it out only up to a second later, the session running on
// meanwhile. Its row stays open until the task's end is stored.
//
// The copy's watch (watchOwned) releases the lease with the new attempt
// once the task ended: the one it started with is no longer this
// replica's (before, nothing released the lease after such a re-attach:
// no "ended" announcement, the lease renewed until the replica stopped).
//
// The records this replica wrote of the task before the claim (the
// detach's, the last of the session before it) are stored first: written
// after the claim, with the attempt before it, the store refuses them
// (fenced) and this replica drops its own session as lost to another
// replica. A slow store makes the re-attach wait (ctx bounds it: the
// re-attach's own deadline), as the claim's lock on the lease row would
// have; a store that does not answer within it refuses the re-attach
// UNAVAILABLE. The claim also reads the task's stored session.
func (f *Fleet) ClaimSession(ctx context.Context, t *task.Task, sessionID string) (int64, *dispatchv1.StopSignal, error) {
	id := t.ID()
	if err := f.writer.Flush(ctx); err != nil {
		return 0, nil, unavailable("store the task's records before the claim", err)
	}
	if f.hooks.beforeSessionClaim != nil {
		f.hooks.beforeSessionClaim(id)
	}
	attempt, cmd, err := f.claimSessionRow(ctx, id, sessionID)
	if err != nil {
		return attempt, nil, err
	}
	if f.hooks.sessionClaimed != nil {
		f.hooks.sessionClaimed(id)
	}
	// Held only for t, the copy waiting here that the claim is for, if
	// this replica did not lose its lease meanwhile (Fleet.lost, under
	// watchMu too: a store stall longer than the lease; DropCopy abandons
	// the copy) and the registry still holds t (not a copy another stream
	// of the session took afresh meanwhile: that copy holds an attempt of
	// its own). Else the session would run on a dropped copy, the attempt
	// claimed renewed by nobody or held for a copy nobody watches. Not
	// held, the attempt claimed expires (not released: the task is
	// RUNNING, the sweep takes it over); the re-attach takes the task
	// afresh (TakeSession) unless another copy holds it.
	//
	// The attempt and its watch are taken under one lock: a loss of the
	// attempt (lost) after it ends the watch too.
	f.watchMu.Lock()
	held := f.mgr.Registry().Get(id) == t && !t.IsView() && !t.Disowned()
	var w *ownedWatch
	var tokenErr error
	if held {
		// Held before the copy's records carry it: the fence refuses a
		// record whose attempt this replica does not hold (fencedStore).
		// What the copy records from now on carries the attempt (the
		// fence is per copy). A copy that cannot carry it would have all
		// it records refused: not held.
		f.fenced.own(id, attempt)
		if tokenErr = t.SetFenceToken(attempt); tokenErr != nil {
			held = false
			f.fenced.disown(id, attempt)
		}
	}
	if held {
		f.dropped.Delete(id)
		w = f.watchLocked(t, attempt)
	}
	f.watchMu.Unlock()
	if tokenErr != nil {
		f.log.Error("fleet: a session's claim of its task: the copy cannot carry the attempt", "task_id", id, "error", tokenErr)
	}
	if !held {
		return 0, nil, task.ErrLeaseLost
	}
	if task.Terminal(t.Status()) {
		// Ended while the claim ran (not by a stop: those wait for the
		// claim, task.waiter.Stop): its end may have been written with
		// the attempt before, which the store refused. Written again with
		// the attempt held now, before the watch's flush: the stored end
		// wins and the lease is released after it (the re-attach is
		// refused: the task ended).
		t.Resave()
	}
	f.startWatch(w)
	if f.hooks.sessionHeld != nil {
		f.hooks.sessionHeld(id)
	}
	if cmd == nil {
		return attempt, nil, nil
	}
	f.log.Info("a re-attaching session's task has an open cancel: the session is stopped", "task_id", id, "command", cmd.ID)
	return attempt, cancelStop(*cmd), nil
}

// cancelStop is the stop of cancel command c: a client's cancel with its
// reason.
func cancelStop(c command) *dispatchv1.StopSignal {
	reason := c.Args.Reason
	if reason == "" {
		reason = task.DefaultCancelReason
	}
	return &dispatchv1.StopSignal{Reason: reason, Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}
}

// claimSession is ClaimSession that returns too the oldest cancel open for
// the task (nil: none), which the session's new owner must carry out.
func (f *Fleet) claimSession(ctx context.Context, id, sessionID string) (int64, *command, error) {
	attempt, cmd, err := f.claimSessionRow(ctx, id, sessionID)
	if err != nil {
		return 0, nil, err
	}
	f.dropped.Delete(id)
	f.fenced.own(id, attempt)
	return attempt, cmd, nil
}

// claimSessionRow is claimSession's claim of the lease row alone: this
// replica does not hold the attempt yet (fenced.own).
func (f *Fleet) claimSessionRow(ctx context.Context, id, sessionID string) (int64, *command, error) {
	attempt, cmd, err := f.leases.claimSession(ctx, id, f.id, sessionID)
	switch {
	case errors.Is(err, task.ErrNotFound):
		return 0, nil, err
	case errors.Is(err, ErrTaskEnded), errors.Is(err, ErrNotSession):
		return 0, nil, fmt.Errorf("%w: %v", task.ErrNotRunning, err)
	case err != nil:
		return 0, nil, unavailable("claim the task", err)
	}
	return attempt, cmd, nil
}

// upstreamScanPage is how many events upstreamSeq reads at a time.
const upstreamScanPage = 64

// upstreamSeq is the highest upstream seq among task id's stored events up
// to last (that of the newest event that has one), 0 if none has: what the
// session's commander resends after (as a single node's restore reads it).
func (f *Fleet) upstreamSeq(ctx context.Context, id string, last uint64) (uint64, error) {
	for hi := last; hi > 0; {
		lo := uint64(0)
		if hi > upstreamScanPage {
			lo = hi - upstreamScanPage
		}
		evs, err := f.writer.ReadStored(ctx, id, lo, int(hi-lo))
		if err != nil {
			return 0, err
		}
		for i := len(evs) - 1; i >= 0; i-- {
			if evs[i].GetSeq() <= hi {
				if u := evs[i].GetUpstreamSeq(); u > 0 {
					return u, nil
				}
			}
		}
		hi = lo
	}
	return 0, nil
}

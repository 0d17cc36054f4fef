package session

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Session hand-over (docs/protocol.md, "Session hand-over"): a running
// session survives its dispatcher.
//
//   - Every upstream packet of a session carries a seq. The receiving
//     goroutine drops a packet whose seq it has handled already (a resend)
//     and records the seq in the packet's event (TaskEvent.upstream_seq), so
//     that a restarted dispatcher reads the highest back from the log.
//   - The acker (one goroutine per Server, running while sessions run)
//     makes what the sessions handled durable (Options.Flush) every
//     AckInterval and then tells each session that handled more since the
//     last time the highest seq: ack{ACK_KIND_RECORDED}. One ack per session
//     per interval at most, in the outbox's ack lane (newest wins).
//   - A hello with reattach takes over a task that waits for its session
//     (task.Manager.Reattach): the slot is busy with that session from the
//     start, and the hello's ack says up to which seq it was recorded.
//   - Drain sends move on every stream; a session whose stream then ends is
//     detached (task.Task.Detach), not ended: the task stays RUNNING for the
//     next dispatcher.
//   - With a LinkLossWindow, a session whose stream breaks without the
//     session ending (transport error, reset, keepalive, the commander's
//     EOF) is detached too (task.Task.DetachLinkLost): the task waits the
//     window for the commander to re-attach it, here or on another replica,
//     then ends FAILURE. A re-attach that finds the session still attached
//     here to an older stream of the same commander ends that stream
//     (supersede): the commander would not re-attach over a live one.
//   - A re-attach refused for good (the task ended, is unknown or another
//     tenant's, waits for another session) is answered in the hello's ack,
//     without the session id: the commander gives the session up. One this
//     dispatcher could not decide now (its store or the fleet's database
//     did not answer, it is shutting down, a deadline) ends the stream
//     UNAVAILABLE before any ack (ErrReattachLater): the commander
//     reconnects and re-attaches again while its hand-over window lasts,
//     and the task goes on waiting for it meanwhile.

// DefaultAckInterval is the acker's period when Options.AckInterval is 0.
const DefaultAckInterval = 20 * time.Millisecond

// reattachTimeout bounds the claim of a re-attach. Under the commander's
// handshake timeout (10 s by default): a claim that does not make it is
// answered ErrReattachLater, and over, before the commander's next try
// (which a claim still under way refuses for now too: task.ErrClaimUnderWay).
const reattachTimeout = 8 * time.Second

// ackFlushTimeout bounds one flush of the acker; a store that does not
// make it in time gets no acks (the commander keeps the packets).
const ackFlushTimeout = 5 * time.Second

// Reattacher gives a task waiting for its session to the session's new
// run. task.Manager implements it.
type Reattacher interface {
	Reattach(ctx context.Context, taskID, sessionID, commanderID string, serves func(tenant string) bool, newRunner func(*task.Task) task.Runner) (task.Reattached, error)
}

// track registers r with the acker, starting it if it is not running.
func (s *Server) track(r *run) {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	if s.runs == nil {
		s.runs = make(map[*run]struct{})
	}
	s.runs[r] = struct{}{}
	if !s.ackerOn {
		s.ackerOn = true
		go s.ackLoop()
	}
}

// untrack removes r from the acker.
func (s *Server) untrack(r *run) {
	s.ackMu.Lock()
	delete(s.runs, r)
	s.ackMu.Unlock()
}

// ackLoop acknowledges what the sessions handled, once durable, until no
// session runs (it is started again by the next track).
func (s *Server) ackLoop() {
	interval := s.opts.AckInterval
	if interval <= 0 {
		interval = DefaultAckInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var due []*run
	for {
		select {
		case <-tick.C:
		case <-s.base.Done():
			s.ackMu.Lock()
			s.ackerOn = false
			s.ackMu.Unlock()
			return
		}
		due = due[:0]
		s.ackMu.Lock()
		if len(s.runs) == 0 {
			s.ackerOn = false
			s.ackMu.Unlock()
			return
		}
		for r := range s.runs {
			if r.upSeq.Load() > r.ackedSeq.Load() {
				due = append(due, r)
			}
		}
		s.ackMu.Unlock()
		if len(due) == 0 {
			continue
		}
		// What is handled now is in the store's queue (events are appended
		// before the seq is set); the flush makes it durable.
		seqs := make([]uint64, len(due))
		for i, r := range due {
			seqs[i] = r.upSeq.Load()
		}
		if f := s.opts.Flush; f != nil {
			ctx, cancel := context.WithTimeout(s.base, ackFlushTimeout)
			err := f(ctx)
			cancel()
			if err != nil {
				s.log.Warn("acks held back: the store did not flush", "error", err)
				continue
			}
		}
		for i, r := range due {
			r.ackUpTo(seqs[i])
		}
	}
}

// ackUpTo acknowledges the session's packets up to seq, durably recorded,
// unless an ack said as much already (the acker and early acks race).
func (r *run) ackUpTo(seq uint64) {
	r.ackMu.Lock()
	defer r.ackMu.Unlock()
	if seq <= r.ackedSeq.Load() {
		return
	}
	r.ackedSeq.Store(seq)
	r.sl.out.setAck(&dispatchv1.DownstreamPacket{
		SessionId: r.sessionID,
		Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{
			Kind: dispatchv1.AckKind_ACK_KIND_RECORDED, UpstreamSeq: seq,
		}},
	})
	r.sl.srv.stats.AcksSent.Add(1)
}

// Early acks. With acks only every AckInterval a commander whose credit
// window of characters (docs/protocol.md) fills within the interval is
// paced by it: a flooding session writes its window, then waits for the
// next tick (the Python commander's 8 Ki characters: ~6.4 k 64-character
// chunks/s a session, below raw grpc.aio). So a session that has had
// EarlyAckBytes bytes of content text recorded since its last ack gets an
// ack as soon as they are durable: at 3/4 of the Python commander's window
// the credit comes back while the rest is on its way, and the window still
// bounds what a stopped queues behind. The ack rides the store's writes (the
// log's WhenDurable, told by the writer's commit of the event): no flush of
// its own, and never past what is stored. Packets are not counted: a window
// of 64 small packets (loadgen's --credit 64 of 64 bytes: 4 KiB) stays on
// the tick, as it was measured (bench.sh's stop-flood): unpaced, such a Go
// flood tripled its packets/s and the stop's decision → stopped p99.
const EarlyAckBytes = 6 * 1024

// earlyCount is what the receiving goroutine recorded since the ack it
// last asked for (or saw go out): only that goroutine touches it.
type earlyCount struct {
	from  uint64 // the upstream seq counted from
	last  uint64 // the upstream seq counted last
	bytes int    // content text since from
}

// noteRecorded counts ev, the event of upstream packet ev.UpstreamSeq
// recorded at log seq (on the receiving goroutine), and asks for an early
// ack once enough has been recorded since the last ack.
func (r *run) noteRecorded(seq uint64, ev *dispatchv1.TaskEvent) {
	up := ev.GetUpstreamSeq()
	if up == 0 {
		return // unnumbered: a commander without hand-over gets no acks
	}
	e := &r.early
	if a := r.ackedSeq.Load(); a > e.from && a >= e.last {
		// An ack went out since that covers all that was counted: count
		// from it. One that covers only part (the tick's, snapshotted
		// before its flush while more was recorded) keeps the count:
		// counting too much only acks sooner, never past what is stored.
		e.from, e.bytes = a, 0
	}
	e.last = up
	e.bytes += len(ev.GetContent().GetText())
	if e.bytes < EarlyAckBytes {
		return
	}
	e.from, e.bytes = up, 0
	// Every packet up to up was handled, its events appended up to seq
	// (the log's order): once seq is durable, so are they.
	r.t.Log().WhenDurable(seq, func() {
		if !r.ended.Load() {
			r.ackUpTo(up)
		}
	})
}

// Drain tells every commander to move (downstream move) and waits, until
// ctx ends, for the sessions to leave: a session whose stream ends after
// the move is detached, its task left RUNNING for the next dispatcher
// (closeCurrent). From now on new streams are refused (ErrShutdown) and no
// task is started on a slot. Without Options.HandOver it does nothing.
func (s *Server) Drain(ctx context.Context, reason string) {
	if !s.opts.HandOver {
		return
	}
	s.slotsMu.Lock()
	s.draining.Store(true)
	slots := make([]*slot, 0, len(s.slots))
	for sl := range s.slots {
		slots = append(slots, sl)
	}
	s.slotsMu.Unlock()
	move := &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Move{Move: &dispatchv1.Move{Reason: reason}}}
	for _, sl := range slots {
		sl.moving.Store(true)
		sl.out.pushControl(move)
	}
	s.log.Info("draining: commanders told to move", "slots", len(slots))
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for s.busySlots() > 0 {
		select {
		case <-ctx.Done():
			s.log.Warn("draining: sessions still attached", "count", s.busySlots())
			return
		case <-tick.C:
		}
	}
}

// busySlots counts the slots that run a session.
func (s *Server) busySlots() int {
	s.slotsMu.Lock()
	defer s.slotsMu.Unlock()
	n := 0
	for sl := range s.slots {
		if sl.cur.Load() != nil {
			n++
		}
	}
	return n
}

// ErrReattachLater ends the stream of a re-attach refused for now, before
// any ack (gRPC status UNAVAILABLE): the dispatcher could not decide it
// (its store or the fleet's database did not answer in time, it is
// shutting down). The task still waits for its session; the commander
// reconnects and re-attaches again, here or on another replica, until its
// hand-over window runs out (the Python commander after 0.5, 1, 2, then
// every 4 s, jittered). A commander of any version does so: a stream that
// ends before the hello's ack is a failed connection attempt to it.
var ErrReattachLater = errors.New("re-attach refused for now; reconnect and re-attach again")

// Final refusals of a re-attach that reattach makes itself.
var (
	errNoHandOver  = errors.New("this dispatcher does not take sessions over")
	errBadReattach = errors.New("reattach needs a task_id and a session_id")
)

// refusedForGood reports whether the re-attach refusal err is final: the
// task ended, is unknown (or another tenant's), waits for another session
// or is attached to another stream, or this dispatcher takes no session
// over. Anything else (the store, the fleet's database, a deadline, the
// manager closing) is for now: a later re-attach may succeed.
func refusedForGood(err error) bool {
	return errors.Is(err, task.ErrNotFound) || errors.Is(err, task.ErrNotRunning) ||
		errors.Is(err, errNoHandOver) || errors.Is(err, errBadReattach)
}

// reattachLater is the error that ends the stream of a re-attach refused
// for now with err: ErrReattachLater, with words for the commander's log.
// The errors of the store and of the manager's shutdown are written for
// clients; any other (a driver's error) stays in the dispatcher's log.
func reattachLater(err error) error {
	why := "the task could not be claimed"
	switch {
	case errors.Is(err, store.ErrUnavailable), errors.Is(err, task.ErrClosed), errors.Is(err, task.ErrClaimUnderWay):
		why = err.Error()
	case errors.Is(err, context.DeadlineExceeded):
		why = "the task could not be claimed in time"
	}
	return fmt.Errorf("%w (%s)", ErrReattachLater, why)
}

// laterLogEvery paces the Warn line of the refusals for now: during an
// outage every waiting session is refused about once per its commander's
// retry, which would flood the log.
const laterLogEvery = 10 * time.Second

// logReattachLater logs a re-attach refused for now: at Warn at most once
// per laterLogEvery for the whole server (with how many were logged at
// Debug since the last Warn), else at Debug.
func (s *Server) logReattachLater(log *slog.Logger, ra *dispatchv1.Reattach, err error) {
	warned := false
	s.laterWarn.Do(func() { warned = true })
	if !warned {
		s.laterQuiet.Add(1)
		log.Debug("re-attach refused for now: the commander will try again", "task_id", ra.GetTaskId(), "session_id", ra.GetSessionId(), "reason", err.Error())
		return
	}
	log.Warn("re-attach refused for now: the commander will try again", "task_id", ra.GetTaskId(), "session_id", ra.GetSessionId(), "reason", err.Error(),
		"more_at_debug", s.laterQuiet.Swap(0), "warn_every", laterLogEvery)
}

// reattach takes over the task of ra on sl (called by Serve before the
// slot is registered): the run continues the session from the seq the
// task's log holds. A refusal says why, for the hello's ack (final:
// refusedForGood) or the stream's status (for now: reattachLater).
func (sl *slot) reattach(ra *dispatchv1.Reattach) (*run, task.Reattached, error) {
	ta := sl.srv.opts.Reattacher
	if ta == nil || !sl.srv.opts.HandOver {
		return nil, task.Reattached{}, errNoHandOver
	}
	if ra.GetTaskId() == "" || ra.GetSessionId() == "" || len(ra.GetTaskId()) > maxHelloField || len(ra.GetSessionId()) > maxHelloField {
		return nil, task.Reattached{}, errBadReattach
	}
	sl.srv.supersede(sl, ra)
	ctx, cancel := context.WithTimeout(sl.ctx, reattachTimeout)
	defer cancel()
	var r *run
	info, err := ta.Reattach(ctx, ra.GetTaskId(), ra.GetSessionId(), sl.commanderID, sl.ServesTenant, func(t *task.Task) task.Runner {
		// Under the task's lock: nothing here calls back into t.
		r = newRunWithID(sl, t, ra.GetSessionId())
		r.startSent.Store(true)
		sl.cur.Store(r)
		return r
	})
	if err != nil {
		if r != nil {
			sl.cur.CompareAndSwap(r, nil)
			r.cancel()
			r.span.End()
		}
		return nil, task.Reattached{}, err
	}
	// No packet of the session is handled before Serve starts the receiver.
	r.upSeq.Store(info.UpstreamSeq)
	r.ackedSeq.Store(info.UpstreamSeq)
	sl.srv.track(r)
	// The task's timeout still counts from its start.
	r.armDeadlineAt(info.StartedAt.Add(info.Task.Timeout()))
	r.log.Info("session re-attached", "attempt", info.Attempt, "upstream_seq", info.UpstreamSeq,
		"commander_attempt", ra.GetAttempt(), "commander_acked_seq", ra.GetAckedSeq(), "stop_decided", info.Stop != nil)
	return r, info, nil
}

// restop stops again a re-attached session whose stop was decided before
// the hand-over (the commander may never have had it). Called once the
// hello's ack is out, so the stop follows it.
func (r *run) restop(st *dispatchv1.StopSignal) {
	r.stopWith(st.GetReason(), st.GetCode(), st.GetRuleId())
}

// errSuperseded ends a stream whose session the commander re-attached on a
// new stream (supersede): the old one is dead on the commander's side.
var errSuperseded = errors.New("the commander re-attached its session on a new stream")

// linkLost reports whether a stream that ended with cause lost its link
// (transport error, reset, keepalive, the commander's EOF) rather than
// being ended by the dispatcher for a reason of its own.
func linkLost(cause error) bool {
	switch {
	case errors.Is(cause, ErrShutdown), errors.Is(cause, ErrProtocol),
		errors.Is(cause, ErrStopNotAcknowledged), errors.Is(cause, errSuperseded), undecodable(cause):
		return false
	}
	return true
}

// detachLinkLost lets go of r, whose stream broke while its session ran:
// the task waits window for the commander to re-attach the session
// (task.Task.DetachLinkLost). False as for detach (r ended, or a stop was
// decided: it then ends as usual).
func (sl *slot) detachLinkLost(r *run, window time.Duration, why string) bool {
	if !sl.release(r) {
		return false
	}
	if !r.t.DetachLinkLost(r, r.upSeq.Load(), window) {
		return false
	}
	r.span.AddEvent("detached: commander link lost")
	r.span.End()
	sl.srv.stats.Detached.Add(1)
	r.log.Warn("commander link lost: the session waits for its commander to re-attach it",
		"reason", why, "window", window, "upstream_seq", r.upSeq.Load())
	return true
}

// release claims r for a detach: r ends here without its task ending. False
// if r ended already or a stop was decided for it.
func (sl *slot) release(r *run) bool {
	r.mu.Lock()
	if r.decided || !r.ended.CompareAndSwap(false, true) {
		r.mu.Unlock()
		return false
	}
	r.mu.Unlock()
	sl.cur.CompareAndSwap(r, nil)
	sl.srv.untrack(r)
	r.cancel()
	r.disarm()
	return true
}

// supersede lets go of session ra still attached here on another stream
// of the same commander (the re-attaching slot nsl's): the commander
// re-attaching it proves that stream dead, though this dispatcher has not
// seen it end yet (a black-holed link before keepalive, a reset whose
// reconnect was faster). The session is detached as for a lost link and
// the old stream ended, so that the re-attach finds the task waiting.
// Only with a LinkLossWindow.
func (s *Server) supersede(nsl *slot, ra *dispatchv1.Reattach) {
	w := s.opts.LinkLossWindow
	if w <= 0 {
		return
	}
	s.slotsMu.Lock()
	var old *slot
	var r *run
	for sl := range s.slots {
		if cur := sl.cur.Load(); sl != nsl && cur != nil && cur.sessionID == ra.GetSessionId() &&
			cur.t.ID() == ra.GetTaskId() && sl.commanderID == nsl.commanderID {
			old, r = sl, cur
			break
		}
	}
	s.slotsMu.Unlock()
	// A session whose start never went out is not the commander's to re-attach.
	if old == nil || !nsl.ServesTenant(r.t.Tenant()) || !r.startWasSent() {
		return
	}
	if old.detachLinkLost(r, w, errSuperseded.Error()) {
		old.cancel(errSuperseded)
	}
}

// detach lets go of r, whose stream ended after a move: the task stays
// RUNNING (task.Task.Detach) for the dispatcher the commander moves to. It
// reports whether r was detached (false: r ended, or a stop was decided,
// which then ends it as usual).
func (sl *slot) detach(r *run) bool {
	if !sl.release(r) {
		return false
	}
	if !r.t.Detach(r, r.upSeq.Load()) {
		return false
	}
	r.span.AddEvent("detached")
	r.span.End()
	sl.srv.stats.Detached.Add(1)
	r.log.Info("session detached: its commander moves to another dispatcher", "upstream_seq", r.upSeq.Load())
	return true
}

// reattachAck is the hello's ack answering a re-attach.
func reattachAck(slotID string, r *run, info task.Reattached, err error) *dispatchv1.DownstreamPacket {
	ack := &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_HELLO, SlotId: slotID, MaxUpstreamBatch: MaxUpstreamBatch}
	p := &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Ack{Ack: ack}}
	if err != nil {
		ack.Detail = fmt.Sprintf("re-attach refused: %v", err)
		return p
	}
	p.SessionId = r.sessionID
	ack.UpstreamSeq, ack.Attempt = info.UpstreamSeq, info.Attempt
	return p
}

package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// slot is one ChatStream after its hello. It implements scheduler.Slot.
type slot struct {
	srv         *Server
	id          string
	commanderID string
	// caps are the hello's capabilities (duplicates and all); capSet
	// indexes them when there are many (nil up to capScan).
	caps     []string
	capSet   map[string]struct{}
	planners []string
	tenants  []string // served tenants; empty: every tenant
	log      *slog.Logger

	// ctx ends with the stream; cancel ends the stream with a cause
	// (cancelCtx, and with an abort cancelAndAbort: server.go).
	ctx       context.Context
	cancel    context.CancelCauseFunc
	cancelCtx context.CancelCauseFunc
	abort     func(error) // WithAbort's; nil: Serve receives aside
	out       outbox
	// moving: Drain told the commander to move; a session whose stream
	// ends from now on is detached (handover.go).
	moving atomic.Bool
	// cur is the running session, nil while idle. Written by Deliver and by
	// finish; read by everyone.
	cur atomic.Pointer[run]
	// deliverMu orders Deliver against the end of the stream (closeCurrent):
	// a Deliver either completes before closeCurrent looks at cur, or sees
	// the stream's context ended and refuses the task.
	deliverMu sync.Mutex

	// Tool calls in flight run in their own goroutines; Serve waits for
	// them once the stream is over. toolsMu orders goTool against that wait.
	toolsMu     sync.Mutex
	toolsClosed bool
	tools       sync.WaitGroup

	// endMu orders Serve's end of the slot against endAside's (server.go):
	// whichever claims it first ends the slot; the other waits for that.
	endMu      sync.Mutex
	endClaimed bool

	// startMu orders the sender's taking of a start packet against the end
	// of the stream, so that closeCurrent knows whether the commander can
	// have received the start (see takeStart, startReached).
	startMu      sync.Mutex
	startSession string        // session whose start the sender took last
	startDone    chan struct{} // closed when that Send returned
	startErr     error         // its error
}

func newSlot(s *Server, ctx context.Context, cancel context.CancelCauseFunc, h *dispatchv1.Hello, id string) *slot {
	sl := &slot{
		srv:         s,
		id:          id,
		commanderID: h.GetCommanderId(),
		caps:        h.GetCapabilities(),
		ctx:         ctx,
		cancel:      cancel,
		cancelCtx:   cancel,
		out:         outbox{limit: s.opts.OutboxSize},
	}
	if sl.commanderID == "" {
		sl.commanderID = "unnamed"
	}
	if len(sl.caps) > capScan {
		sl.capSet = make(map[string]struct{}, len(sl.caps))
	}
	for i, c := range sl.caps {
		if sl.capSet != nil {
			sl.capSet[c] = struct{}{}
		}
		if strings.HasPrefix(c, "planner:") && !slices.Contains(sl.caps[:i], c) {
			sl.planners = append(sl.planners, c)
		}
	}
	sl.log = s.log.With("slot_id", id, "commander_id", sl.commanderID)
	return sl
}

// HasCapability implements scheduler.Slot.
func (sl *slot) HasCapability(c string) bool {
	if sl.capSet == nil {
		return slices.Contains(sl.caps, c)
	}
	_, ok := sl.capSet[c]
	return ok
}

// capScan is how many capabilities HasCapability scans; a slot with more
// gets a map (most hellos name a handful: a map each would cost an idle
// slot ~200 bytes).
const capScan = 16

// Tenants lists the tenants the slot serves (empty: every tenant).
func (sl *slot) Tenants() []string { return sl.tenants }

// ServesTenant implements scheduler.Slot.
func (sl *slot) ServesTenant(t string) bool {
	return len(sl.tenants) == 0 || slices.Contains(sl.tenants, t)
}

// PlannerCapabilities implements scheduler.Slot.
func (sl *slot) PlannerCapabilities() []string { return sl.planners }

// Deliver implements scheduler.Slot: it starts t on this slot. The
// scheduler calls it outside its lock; it only records state and queues the
// start (the task's state event is a Control append, which never waits for
// the store: see eventlog.Control).
//
// The stream may be ending concurrently (Serve: cancel, RemoveSlot, close
// the outbox, closeCurrent). deliverMu makes the two orderly: a Deliver that
// checks the context before the cancel finishes before closeCurrent reads
// cur, so the session it starts is ended (or requeued) there; one that
// comes later answers SlotGone and the scheduler places t again.
func (sl *slot) Deliver(t *task.Task) scheduler.Delivery {
	sl.deliverMu.Lock()
	defer sl.deliverMu.Unlock()
	if sl.ctx.Err() != nil || sl.srv.draining.Load() {
		// A draining dispatcher starts nothing: the task stays queued
		// (and, handed over, is queued again by the next run).
		return scheduler.SlotGone
	}
	r := newRun(sl, t)
	// Once Start returns, a cancel (or the drain, or Fail) sees r and stops
	// it; r.mu, where a stop is decided, keeps that stop until the start is
	// queued, so that it withdraws the start (outbox.setStop) instead of
	// sending a stop for a session the commander has not heard of, ahead
	// of its start.
	r.mu.Lock()
	if err := t.Start(r, sl.commanderID, r.sessionID); err != nil {
		r.mu.Unlock()
		// The task is no longer pending (cancelled during the hand-over);
		// the slot stays free and the scheduler gives it the next task.
		r.cancel()
		r.span.End()
		return scheduler.TaskGone
	}
	sl.cur.Store(r)
	sl.out.pushControl(r.startPacket())
	r.mu.Unlock()
	sl.srv.track(r)
	r.armDeadline()
	r.log.Debug("session started")
	return scheduler.Started
}

var _ scheduler.Slot = (*slot)(nil)

// sendLoop is the stream's only sender while it runs: the outbox starts it
// when a packet is queued and none runs, and it returns once the outbox is
// empty (outbox.take) or a Send failed. An idle slot has no sender.
func (sl *slot) sendLoop(stream Stream) {
	for {
		p, ok := sl.out.take()
		if !ok {
			return
		}
		var startDone chan struct{}
		if p.GetStart() != nil {
			var ok bool
			if startDone, ok = sl.takeStart(p.GetSessionId()); !ok {
				// The stream is ending: the start is not handed out, so
				// closeCurrent can put the task back in the queue.
				continue
			}
		}
		if stopTrace != nil && p.GetStop() != nil {
			stopTrace.took(p.GetSessionId(), false)
		}
		err := stream.Send(p)
		toolTrace.sent(p)
		if stopTrace != nil && p.GetStop() != nil {
			stopTrace.took(p.GetSessionId(), true)
		}
		if startDone != nil {
			sl.startMu.Lock()
			sl.startErr = err
			sl.startMu.Unlock()
			close(startDone)
		}
		if err != nil {
			sl.out.sendFailed()
			sl.cancel(fmt.Errorf("send: %w", err))
			return
		}
		switch p.GetSignal().(type) {
		case *dispatchv1.DownstreamPacket_Start:
			if afterStartSend != nil {
				afterStartSend()
			}
			if r := sl.cur.Load(); r != nil && r.sessionID == p.GetSessionId() {
				r.startSent.Store(true)
			}
		case *dispatchv1.DownstreamPacket_Stop:
			if r := sl.cur.Load(); r != nil && r.sessionID == p.GetSessionId() {
				r.stopSent()
			}
		}
	}
}

// afterStartSend, when set (tests only), runs between a start's Send
// returning and the run noting it: the window in which the commander has
// the start although startWasSent is still false.
var afterStartSend func()

// takeStart records that the sender is about to send the start of session
// sid; it refuses once the stream is ending (then the start is never sent).
// done is closed when the Send returned.
func (sl *slot) takeStart(sid string) (done chan struct{}, ok bool) {
	sl.startMu.Lock()
	defer sl.startMu.Unlock()
	if sl.ctx.Err() != nil {
		return nil, false
	}
	sl.startSession, sl.startDone, sl.startErr = sid, make(chan struct{}), nil
	return sl.startDone, true
}

// startReached reports whether the commander may have received r's start.
// Called once the stream has ended (sl.ctx is done), when the sender can no
// longer take the start: false means it certainly did not (never taken, or
// its Send failed). A Send still under way after startSendWait counts as
// reached: a task must not run twice.
func (sl *slot) startReached(r *run) bool {
	if r.startWasSent() {
		return true
	}
	sl.startMu.Lock()
	taken, done := sl.startSession == r.sessionID, sl.startDone
	sl.startMu.Unlock()
	if !taken {
		return false
	}
	t := time.NewTimer(startSendWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		return true
	}
	sl.startMu.Lock()
	defer sl.startMu.Unlock()
	return sl.startErr == nil
}

// startSendWait bounds how long closeCurrent waits for a start's Send that
// is under way when the stream ends (on a dead connection it fails at once).
const startSendWait = 250 * time.Millisecond

// msgReceiver is a Stream that can receive into a given message (grpc's
// streams can: RecvMsg).
type msgReceiver interface {
	RecvMsg(m any) error
}

// recvLoop is the stream's only receiver; it handles each packet inline.
// With RecvMsg it receives every packet into the same UpstreamPacket:
// unmarshalling resets it first, which drops its references to the last
// packet's payload without touching it (an event keeps that payload), and
// nothing keeps the packet itself past handle.
func (sl *slot) recvLoop(stream Stream) error {
	if rs, ok := stream.(msgReceiver); ok {
		pkt := new(dispatchv1.UpstreamPacket)
		for {
			if err := rs.RecvMsg(pkt); err != nil {
				return err
			}
			if err := sl.handle(pkt); err != nil {
				return err
			}
		}
	}
	for {
		pkt, err := stream.Recv()
		if err != nil {
			return err
		}
		if err := sl.handle(pkt); err != nil {
			return err
		}
	}
}

// handle processes one upstream packet. A non-nil error ends the stream.
func (sl *slot) handle(pkt *dispatchv1.UpstreamPacket) error {
	switch pkt.GetPayload().(type) {
	case nil:
		return sl.reject(pkt.GetSessionId(), "packet has no payload")
	case *dispatchv1.UpstreamPacket_Hello:
		return fmt.Errorf("%w: second hello on a stream", ErrProtocol)
	case *dispatchv1.UpstreamPacket_Batch:
		return sl.handleBatch(pkt.GetBatch())
	}
	r := sl.cur.Load()
	current := r != nil && pkt.GetSessionId() == r.sessionID
	seq := pkt.GetSeq()
	if current && seq > 0 {
		if seq <= r.upSeq.Load() {
			// Resent after a hand-over, and recorded already: dropped.
			sl.srv.stats.Resent.Add(1)
			return nil
		}
		defer r.upSeq.Store(seq)
	}
	if current && r.stopped.Load() && fencedOutput(pkt) {
		// Fenced by the stop: dropped before any work (fenced.go).
		sl.srv.stats.DroppedAfterStop.Add(1)
		return nil
	}
	if limit := sl.srv.opts.MaxMessageBytes; limit > 0 {
		if n := packetSize(pkt); n > limit {
			// Over our limit but under the transport's: the packet is
			// dropped and its session stopped with the reason; the stream
			// and the slot go on.
			reason := fmt.Sprintf("a %s packet of %d bytes exceeds the limit of %d bytes", payloadName(pkt), n, limit)
			if !current {
				return sl.reject(pkt.GetSessionId(), reason)
			}
			r.log.Warn("oversized packet", "bytes", n, "limit", limit)
			switch pkt.GetPayload().(type) {
			case *dispatchv1.UpstreamPacket_Result, *dispatchv1.UpstreamPacket_Stopped:
				// The commander's session is over: no stopped would
				// follow a stop, so the session ends here.
				sl.finish(r, agentpb.TaskStatus_FAILURE, reason, "", true)
			default:
				r.stopWith(reason, dispatchv1.StopCode_STOP_CODE_POLICY, "limit.max_message_bytes")
			}
			return nil
		}
	}
	if !current {
		return sl.reject(pkt.GetSessionId(), "unknown or closed session")
	}
	return r.handle(pkt)
}

// MaxUpstreamBatch is the most packets an UpstreamBatch may carry; the
// hello's ack announces it (Ack.max_upstream_batch). A batch is handled on
// the receiving goroutine like that many packets in a row (a few µs each):
// it holds up only the packets behind it on the same stream.
const MaxUpstreamBatch = 256

// tooLongPackets is the packets of TooLongBatch: MaxUpstreamBatch+1
// pointers to one empty packet, never handled (handleBatch refuses the
// batch by its length first) and never written.
var tooLongPackets = func() []*dispatchv1.UpstreamPacket {
	empty := &dispatchv1.UpstreamPacket{}
	pkts := make([]*dispatchv1.UpstreamPacket, MaxUpstreamBatch+1)
	for i := range pkts {
		pkts[i] = empty
	}
	return pkts
}()

// TooLongBatch is the payload a receiver decodes a batch of more than
// MaxUpstreamBatch packets (nested batches counted) to, instead of its
// packets: handleBatch refuses it as it refuses any batch too long (the
// stream ends, FAILED_PRECONDITION), without the receiver having made a
// packet for each. A message at the transport's limit (8 MiB) holds
// millions of empty packets, ~100 bytes of memory each once decoded.
func TooLongBatch() *dispatchv1.UpstreamPacket_Batch {
	return &dispatchv1.UpstreamPacket_Batch{Batch: &dispatchv1.UpstreamBatch{Packets: tooLongPackets}}
}

// handleBatch handles the packets of a batch in order, each as if it had
// come alone (numbering, fence, size limit, policy: handle). A batch that
// is too long, or holds a hello or a batch, breaks the protocol: the
// stream ends, as for a second hello. Once the slot has ended (its context
// is done) the rest of the batch is not handled, as a Recv would have
// failed.
func (sl *slot) handleBatch(b *dispatchv1.UpstreamBatch) error {
	pkts := b.GetPackets()
	if len(pkts) > 0 && &pkts[0] == &tooLongPackets[0] {
		return fmt.Errorf("%w: a batch of more than %d packets", ErrProtocol, MaxUpstreamBatch)
	}
	if len(pkts) > MaxUpstreamBatch {
		return fmt.Errorf("%w: a batch of %d packets (at most %d)", ErrProtocol, len(pkts), MaxUpstreamBatch)
	}
	for _, p := range pkts {
		switch p.GetPayload().(type) {
		case *dispatchv1.UpstreamPacket_Hello, *dispatchv1.UpstreamPacket_Batch:
			return fmt.Errorf("%w: a %s packet inside a batch", ErrProtocol, payloadName(p))
		}
		if sl.ctx.Err() != nil {
			return context.Cause(sl.ctx)
		}
		if err := sl.handle(p); err != nil {
			return err
		}
	}
	sl.srv.stats.UpstreamBatches.Add(1)
	return nil
}

// payloadName names a packet's payload for messages ("content", "tool_call").
func payloadName(pkt *dispatchv1.UpstreamPacket) string {
	if m := pkt.ProtoReflect(); m != nil {
		if od := m.Descriptor().Oneofs().ByName("payload"); od != nil {
			if f := m.WhichOneof(od); f != nil {
				return string(f.Name())
			}
		}
	}
	return "packet"
}

// reject answers a refused packet with ack REJECTED; the stream goes on.
func (sl *slot) reject(sessionID, detail string) error {
	err := sl.out.push(sl.ctx, &dispatchv1.DownstreamPacket{
		SessionId: sessionID,
		Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{
			Kind: dispatchv1.AckKind_ACK_KIND_REJECTED, Detail: detail,
		}},
	})
	if err != nil {
		return context.Cause(sl.ctx)
	}
	return nil
}

// goTool runs f in a tracked goroutine; false once the slot has closed.
func (sl *slot) goTool(f func()) bool {
	if !sl.addTool() {
		return false
	}
	go func() {
		defer sl.tools.Done()
		f()
	}()
	return true
}

// addTool tracks a tool call that has no goroutine of its own (broker.Go):
// waitTools waits for its sl.tools.Done as for a goroutine's. False once
// the slot has closed.
func (sl *slot) addTool() bool {
	sl.toolsMu.Lock()
	defer sl.toolsMu.Unlock()
	if sl.toolsClosed {
		return false
	}
	sl.tools.Add(1)
	return true
}

// waitTools refuses new tool goroutines and waits for the running ones,
// which end promptly: they run under the slot's (now done) context.
func (sl *slot) waitTools() {
	sl.toolsMu.Lock()
	sl.toolsClosed = true
	sl.toolsMu.Unlock()
	sl.tools.Wait()
}

// closeCurrent ends the running session when the stream is gone. A task
// whose start never reached the commander did not run: it goes back to the
// head of the queue (task.MaxRequeues times at most), unless a stop was
// decided, a client cancelled it, or the dispatcher is shutting down.
func (sl *slot) closeCurrent(cause error) {
	sl.deliverMu.Lock() // a Deliver under way completes first (see Deliver)
	r := sl.cur.Load()
	sl.deliverMu.Unlock()
	if r == nil {
		return
	}
	reached := sl.startReached(r)
	if sl.srv.opts.HandOver && reached {
		if sl.moving.Load() && sl.detach(r) {
			return
		}
		if w := sl.srv.opts.LinkLossWindow; w > 0 && linkLost(cause) && sl.detachLinkLost(r, w, describeEnd(cause)) {
			return
		}
	}
	if !errors.Is(cause, ErrShutdown) && !reached && sl.requeue(r, cause) {
		return
	}
	st, decided := r.stopState()
	var status agentpb.TaskStatus
	var msg string
	switch {
	case decided && errors.Is(cause, ErrStopNotAcknowledged):
		status = stopStatus(st.code)
		msg = fmt.Sprintf("%s (the commander did not acknowledge the stop within %s)", st.reason, sl.srv.opts.StopGrace)
		sl.srv.stats.StopsAborted.Add(1)
	case decided:
		status = stopStatus(st.code)
		msg = st.reason + " (commander connection lost before it acknowledged the stop)"
	case !reached:
		// Not r.startWasSent(): the sender sets that just after the start's
		// Send returns, and the commander may already have it (the task
		// ran) — reached waited for that Send.
		status = agentpb.TaskStatus_FAILURE
		msg = "commander connection lost before the task started: " + describeEnd(cause)
	default:
		status = agentpb.TaskStatus_FAILURE
		msg = "commander connection lost: " + describeEnd(cause)
	}
	if sl.finish(r, status, msg, "", false) {
		r.log.Warn("session ended with its stream", "status", status.String(), "message", msg)
	}
}

// requeue ends session r, whose start never reached the commander, and puts
// its task back in the queue. It reports whether r was dealt with (requeued,
// or ended CANCELLED for a client's cancel); false leaves r to closeCurrent.
func (sl *slot) requeue(r *run, cause error) bool {
	// Claim r under its lock, where a stop is decided: no stop can be
	// decided after this (Stop sees r ended), none was before.
	r.mu.Lock()
	if r.decided || !r.ended.CompareAndSwap(false, true) {
		r.mu.Unlock()
		return false
	}
	r.mu.Unlock()
	sl.cur.CompareAndSwap(r, nil)
	sl.srv.untrack(r)
	r.cancel()
	r.disarm() // the deadline of this attempt; the next start arms a new one
	err := sl.srv.sched.Requeue(r.t, func() error { return r.t.Requeue(r, "") })
	if err == nil {
		r.span.AddEvent("requeued")
		r.span.End()
		r.log.Warn("commander connection lost before the task started; task requeued", "requeues", r.t.Requeues())
		return true
	}
	status, msg := agentpb.TaskStatus_FAILURE, "commander connection lost before the task started: "+describeEnd(cause)
	switch reason, cancelled := r.t.CancelRequested(); {
	case cancelled:
		status, msg = agentpb.TaskStatus_CANCELLED, reason
	case errors.Is(err, task.ErrRequeueLimit):
		msg += fmt.Sprintf(" (not requeued again: requeued %d times already)", task.MaxRequeues)
	case errors.Is(err, task.ErrClosed):
		msg += " (not requeued: the dispatcher is shutting down)"
	}
	sl.endRun(r, status, msg, "", false)
	r.log.Warn("session ended with its stream", "status", status.String(), "message", msg)
	return true
}

// finish ends session r once: the task gets its terminal status, the slot
// becomes idle (with ack SESSION_CLOSED when the commander ended the
// session) and may take the next task. It reports whether this call ended r.
func (sl *slot) finish(r *run, status agentpb.TaskStatus, msg, result string, closeAck bool) bool {
	ackAt := time.Now()
	if !r.ended.CompareAndSwap(false, true) {
		return false
	}
	if closeAck {
		r.measureStop(ackAt)
	}
	sl.endRun(r, status, msg, result, closeAck)
	return true
}

// endRun is finish once r is claimed (the caller set r.ended).
func (sl *slot) endRun(r *run, status agentpb.TaskStatus, msg, result string, closeAck bool) {
	stopTrace.forget(r.sessionID)
	sl.cur.CompareAndSwap(r, nil)
	sl.srv.untrack(r)
	r.cancel()
	r.disarm()
	r.t.Finish(status, msg, result)
	r.endSpan(status, msg)
	if closeAck {
		sl.out.pushControl(&dispatchv1.DownstreamPacket{
			SessionId: r.sessionID,
			Signal:    &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED}},
		})
	}
	r.log.Debug("session ended", "status", status.String())
	if sl.ctx.Err() == nil {
		sl.srv.sched.Release(sl)
	}
}

// stopStatus is the task status a stop leads to: the client's cancel is
// CANCELLED; a policy, deadline, budget or shutdown stop is a FAILURE.
func stopStatus(code dispatchv1.StopCode) agentpb.TaskStatus {
	if code == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		return agentpb.TaskStatus_CANCELLED
	}
	return agentpb.TaskStatus_FAILURE
}

// undecodable reports whether err is the refusal of a received message
// that does not decode: a string that is not UTF-8 (protobuf-go checks
// every string) or malformed protobuf. grpc-go's is INTERNAL; the api
// package's server makes it INVALID_ARGUMENT with grpc-go's words. The
// stream is over then.
func undecodable(err error) bool {
	st, ok := status.FromError(err)
	return ok && (st.Code() == codes.Internal || st.Code() == codes.InvalidArgument) &&
		strings.HasPrefix(st.Message(), "grpc: failed to unmarshal")
}

// describeEnd words why a stream ended, for task messages and logs. It
// never includes more than the gRPC status text of our own transport.
func describeEnd(err error) string {
	switch {
	case err == nil:
		return "stream ended"
	case errors.Is(err, io.EOF):
		return "stream closed by the commander"
	case errors.Is(err, ErrStopNotAcknowledged), errors.Is(err, ErrShutdown), errors.Is(err, ErrProtocol):
		return err.Error()
	case errors.Is(err, context.Canceled):
		return "stream cancelled"
	case undecodable(err):
		// grpc-go's words: "grpc: failed to unmarshal the received
		// message: string field contains invalid UTF-8".
		_, why, _ := strings.Cut(status.Convert(err).Message(), "message: ")
		return "the commander sent a packet the dispatcher cannot decode (" + why + "); the stream cannot go on"
	}
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

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
	caps        map[string]struct{}
	planners    []string
	log         *slog.Logger

	// ctx ends with the stream; cancel ends the stream with a cause.
	ctx    context.Context
	cancel context.CancelCauseFunc
	out    *outbox
	// cur is the running session, nil while idle. Written by Deliver (under
	// the scheduler's lock) and by finish; read by everyone.
	cur atomic.Pointer[run]

	// Tool calls in flight run in their own goroutines; Serve waits for
	// them once the stream is over. toolsMu orders goTool against that wait.
	toolsMu     sync.Mutex
	toolsClosed bool
	tools       sync.WaitGroup
}

func newSlot(s *Server, ctx context.Context, cancel context.CancelCauseFunc, h *dispatchv1.Hello, id string) *slot {
	sl := &slot{
		srv:         s,
		id:          id,
		commanderID: h.GetCommanderId(),
		caps:        make(map[string]struct{}, len(h.GetCapabilities())),
		ctx:         ctx,
		cancel:      cancel,
		out:         newOutbox(s.opts.OutboxSize),
	}
	if sl.commanderID == "" {
		sl.commanderID = "unnamed"
	}
	for _, c := range h.GetCapabilities() {
		if _, dup := sl.caps[c]; dup {
			continue
		}
		sl.caps[c] = struct{}{}
		if strings.HasPrefix(c, "planner:") {
			sl.planners = append(sl.planners, c)
		}
	}
	sl.log = s.log.With("slot_id", id, "commander_id", sl.commanderID)
	return sl
}

// HasCapability implements scheduler.Slot.
func (sl *slot) HasCapability(c string) bool {
	_, ok := sl.caps[c]
	return ok
}

// PlannerCapabilities implements scheduler.Slot.
func (sl *slot) PlannerCapabilities() []string { return sl.planners }

// Deliver implements scheduler.Slot: it starts t on this slot. It runs under
// the scheduler's lock, so it only records state and queues the start.
func (sl *slot) Deliver(t *task.Task) bool {
	if sl.ctx.Err() != nil {
		return false
	}
	r := newRun(sl, t)
	if err := t.Start(r, sl.commanderID, r.sessionID); err != nil {
		// The task is no longer pending; the slot stays free. Release
		// needs the scheduler's lock, which our caller holds.
		r.cancel()
		r.span.End()
		go sl.srv.sched.Release(sl)
		return true
	}
	sl.cur.Store(r)
	sl.out.pushControl(r.startPacket())
	r.armDeadline()
	r.log.Debug("session started")
	return true
}

var _ scheduler.Slot = (*slot)(nil)

// sendLoop is the stream's only sender.
func (sl *slot) sendLoop(stream Stream) {
	for {
		p, err := sl.out.next(sl.ctx)
		if err != nil {
			return
		}
		if err := stream.Send(p); err != nil {
			sl.cancel(fmt.Errorf("send: %w", err))
			return
		}
		switch p.GetSignal().(type) {
		case *dispatchv1.DownstreamPacket_Start:
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

// recvLoop is the stream's only receiver; it handles each packet inline.
func (sl *slot) recvLoop(stream Stream) error {
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
	}
	r := sl.cur.Load()
	if r == nil || pkt.GetSessionId() != r.sessionID {
		return sl.reject(pkt.GetSessionId(), "unknown or closed session")
	}
	return r.handle(pkt)
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
	sl.toolsMu.Lock()
	defer sl.toolsMu.Unlock()
	if sl.toolsClosed {
		return false
	}
	sl.tools.Add(1)
	go func() {
		defer sl.tools.Done()
		f()
	}()
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

// closeCurrent ends the running session when the stream is gone.
func (sl *slot) closeCurrent(cause error) {
	r := sl.cur.Load()
	if r == nil {
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
	case !r.startWasSent():
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
	sl.cur.CompareAndSwap(r, nil)
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
	return true
}

// stopStatus is the task status a stop leads to: the client's cancel is
// CANCELLED; a policy, deadline, budget or shutdown stop is a FAILURE.
func stopStatus(code dispatchv1.StopCode) agentpb.TaskStatus {
	if code == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		return agentpb.TaskStatus_CANCELLED
	}
	return agentpb.TaskStatus_FAILURE
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
	}
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

package session

import (
	"context"
	"fmt"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// The upstream stop lane (AgentInteraction.Stopped, docs/protocol.md "The
// stop lane"). Downstream a stop already goes ahead of every queued packet
// (outbox.setStop); upstream a commander's stopped used to wait behind the
// content it had written before it heard of the stop: up to a whole HTTP/2
// window of it, all fenced by the stop and dropped, but read, decoded and
// handled one by one first. The lane is a unary call beside the stream: its
// packets (the stopped, and the usage and sandbox packets not yet
// acknowledged, which a stop does not fence) are handled as if they came on
// the stream, under the slot's handling lock (slot.handleMu), so that the
// seq check drops whichever copy comes second and nothing is counted twice.
// The session ends at once; what is still queued on the stream for it is
// dropped silently by its seq (laneEnded), never answered with REJECTED.

// maxLanePackets bounds a Stopped request: the unacknowledged usage and
// sandbox packets of one session (a few per ack interval) and its stopped.
const maxLanePackets = 256

// laneMemory is how many sessions ended by the lane a slot remembers, to
// drop their packets still queued on the stream (one suffices unless the
// next sessions are stopped before the stream has caught up).
const laneMemory = 4

// laneEnd is a session the lane ended: its packets up to seq that arrive
// later on the stream are dropped.
type laneEnd struct {
	sessionID string
	seq       uint64
}

// Stopped handles a StoppedRequest of the commander c (AgentInteraction.Stopped).
func (s *Server) Stopped(ctx context.Context, c tenant.Commander, req *dispatchv1.StoppedRequest) error {
	pkts := req.GetPackets()
	if err := checkLane(pkts); err != nil {
		return err
	}
	sid := pkts[0].GetSessionId()
	r := s.runBySession(sid)
	if r == nil || (c.Restricted && r.t.Tenant() != c.Tenant) {
		// A session of another tenant is as unknown as an ended one.
		return fmt.Errorf("%w: session %s is not attached to this dispatcher", task.ErrNotFound, sid)
	}
	sl := r.sl
	sl.handleMu.Lock()
	defer sl.handleMu.Unlock()
	if sl.cur.Load() != r || r.ended.Load() {
		return fmt.Errorf("%w: session %s is not attached to this dispatcher", task.ErrNotFound, sid)
	}
	if !r.stopped.Load() {
		// Without a stop the content queued on the stream is not fenced:
		// the stopped must come after it.
		return fmt.Errorf("%w: no stop was decided for session %s", task.ErrNotRunning, sid)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	for _, p := range pkts {
		if err := sl.handle(p); err != nil {
			// Only a dead stream fails handle here (checkLane refused a
			// hello): the stream ends by itself.
			return fmt.Errorf("%w: %v", task.ErrClosed, err)
		}
	}
	s.stats.LaneStops.Add(1)
	if r.ended.Load() {
		sl.laneEnded[sl.laneNext%laneMemory] = laneEnd{sessionID: sid, seq: pkts[len(pkts)-1].GetSeq()}
		sl.laneNext++
	}
	return nil
}

// checkLane refuses a malformed request: packets of one session, numbered
// in increasing order, usage and sandbox packets, then one stopped.
func checkLane(pkts []*dispatchv1.UpstreamPacket) error {
	if len(pkts) == 0 || len(pkts) > maxLanePackets {
		return fmt.Errorf("%w: a Stopped request carries 1 to %d packets", task.ErrInvalidArgument, maxLanePackets)
	}
	sid := pkts[0].GetSessionId()
	if sid == "" {
		return fmt.Errorf("%w: packets without a session_id", task.ErrInvalidArgument)
	}
	var prev uint64
	for i, p := range pkts {
		if p.GetSessionId() != sid {
			return fmt.Errorf("%w: packets of several sessions", task.ErrInvalidArgument)
		}
		if p.GetSeq() <= prev {
			return fmt.Errorf("%w: packets must be numbered (seq > 0) in increasing order", task.ErrInvalidArgument)
		}
		prev = p.GetSeq()
		last := i == len(pkts)-1
		switch p.GetPayload().(type) {
		case *dispatchv1.UpstreamPacket_Stopped:
			if !last {
				return fmt.Errorf("%w: stopped must be the last packet", task.ErrInvalidArgument)
			}
		case *dispatchv1.UpstreamPacket_Usage, *dispatchv1.UpstreamPacket_Sandbox:
			if last {
				return fmt.Errorf("%w: the last packet must be stopped", task.ErrInvalidArgument)
			}
		default:
			return fmt.Errorf("%w: a %s packet cannot take the stop lane (only usage, sandbox and stopped)", task.ErrInvalidArgument, payloadName(p))
		}
	}
	return nil
}

// laneDropped reports whether pkt (of no current session) is a packet the
// lane made obsolete: one of a session it ended, numbered up to its
// stopped. Receiving goroutine, under handleMu.
func (sl *slot) laneDropped(pkt *dispatchv1.UpstreamPacket) bool {
	seq := pkt.GetSeq()
	if seq == 0 {
		return false
	}
	for _, e := range sl.laneEnded {
		if e.sessionID != "" && e.sessionID == pkt.GetSessionId() && seq <= e.seq {
			sl.srv.stats.DroppedAfterLane.Add(1)
			return true
		}
	}
	return false
}

// fencedOutput reports whether pkt is planner output a stop fences and that
// has no effect but its record: after the stop it is dropped before any
// work (the policy, the size check, the event). Tool calls are not: they
// are answered (DENIED).
func fencedOutput(pkt *dispatchv1.UpstreamPacket) bool {
	switch pkt.GetPayload().(type) {
	case *dispatchv1.UpstreamPacket_Content, *dispatchv1.UpstreamPacket_Thought,
		*dispatchv1.UpstreamPacket_Stage, *dispatchv1.UpstreamPacket_Artifact,
		*dispatchv1.UpstreamPacket_Error:
		return true
	}
	return false
}

// runBySession is the running session sid, if it is attached here.
func (s *Server) runBySession(sid string) *run {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	return s.bySession[sid]
}

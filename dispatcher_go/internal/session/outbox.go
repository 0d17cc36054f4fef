package session

import (
	"context"
	"errors"
	"sync"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// errOutboxClosed is returned by push once the slot has ended.
var errOutboxClosed = errors.New("slot closed")

// outbox holds the downstream packets of one slot until its single sender
// goroutine writes them. It has two lanes: a one-packet stop lane that the
// sender always empties first, and a bounded FIFO ring for everything else.
//
// Bounded: push waits while the ring holds limit packets, so a commander that
// does not read its stream slows its own slot down (HTTP/2 flow control
// pushes back on the sender, the sender stops draining, producers wait) —
// never the dispatcher's memory. pushControl ignores the limit for the
// packets the protocol bounds by itself (hello ack, start, session-closed ack:
// at most a few per session), so that the scheduler, which must not block,
// can always hand a task over.
type outbox struct {
	mu   sync.Mutex
	stop *dispatchv1.DownstreamPacket
	// ack holds the newest cumulative ack of each session (handover.go):
	// a newer one replaces an older one of the same session.
	acks   []*dispatchv1.DownstreamPacket
	ring   []*dispatchv1.DownstreamPacket
	head   int
	n      int
	limit  int
	closed bool
	space  chan struct{} // closed when the ring drains below limit; nil unless someone waits
	ready  chan struct{} // capacity 1: wakes the sender
}

func newOutbox(limit int) *outbox {
	return &outbox{
		limit: limit,
		ring:  make([]*dispatchv1.DownstreamPacket, limit+8),
		ready: make(chan struct{}, 1),
	}
}

// push queues p, waiting while the ring is full. It fails when ctx ends or
// the slot closes.
func (o *outbox) push(ctx context.Context, p *dispatchv1.DownstreamPacket) error {
	for {
		o.mu.Lock()
		if o.closed {
			o.mu.Unlock()
			return errOutboxClosed
		}
		if o.n < o.limit {
			o.enqueueLocked(p)
			o.mu.Unlock()
			o.signal()
			return nil
		}
		if o.space == nil {
			o.space = make(chan struct{})
		}
		wait := o.space
		o.mu.Unlock()
		select {
		case <-wait:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// pushControl queues p without waiting (see the type comment).
func (o *outbox) pushControl(p *dispatchv1.DownstreamPacket) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	if o.n == len(o.ring) {
		// Only reachable if the protocol bound is broken; grow rather than
		// lose a start or an ack.
		grown := make([]*dispatchv1.DownstreamPacket, 2*len(o.ring))
		for i := range o.n {
			grown[i] = o.ring[(o.head+i)%len(o.ring)]
		}
		o.ring, o.head = grown, 0
	}
	o.enqueueLocked(p)
	o.mu.Unlock()
	o.signal()
}

func (o *outbox) enqueueLocked(p *dispatchv1.DownstreamPacket) {
	o.ring[(o.head+o.n)%len(o.ring)] = p
	o.n++
}

// setStop puts p in the stop lane, ahead of everything queued. If the start
// of that session is still queued (the commander has not heard of the
// session), the start is withdrawn instead and setStop reports true: there
// is nothing to stop and no stopped ack to wait for.
func (o *outbox) setStop(p *dispatchv1.DownstreamPacket) (withdrawn bool) {
	o.mu.Lock()
	for i := range o.n {
		idx := (o.head + i) % len(o.ring)
		q := o.ring[idx]
		if q.GetStart() != nil && q.GetSessionId() == p.GetSessionId() {
			// Close the gap, keeping the order of the rest.
			for j := i; j < o.n-1; j++ {
				o.ring[(o.head+j)%len(o.ring)] = o.ring[(o.head+j+1)%len(o.ring)]
			}
			o.ring[(o.head+o.n-1)%len(o.ring)] = nil
			o.n--
			o.mu.Unlock()
			return true
		}
	}
	// A stop still in the lane belongs to a session that has ended since
	// (one stop per session, and a session ends before the next starts),
	// so replacing it loses nothing.
	o.stop = p
	o.mu.Unlock()
	o.signal()
	return false
}

// setAck queues p, a cumulative ack, in the ack lane: it replaces a
// queued ack of the same session (the newer one says more), so the lane
// holds at most one per session however slowly the commander reads.
func (o *outbox) setAck(p *dispatchv1.DownstreamPacket) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	replaced := false
	for i, q := range o.acks {
		if q.GetSessionId() == p.GetSessionId() {
			o.acks[i], replaced = p, true
			break
		}
	}
	if !replaced {
		o.acks = append(o.acks, p)
	}
	o.mu.Unlock()
	o.signal()
}

// next returns the packet to send: the stop lane first, then the acks,
// then FIFO order.
func (o *outbox) next(ctx context.Context) (*dispatchv1.DownstreamPacket, error) {
	for {
		o.mu.Lock()
		if p := o.stop; p != nil {
			o.stop = nil
			o.mu.Unlock()
			return p, nil
		}
		if len(o.acks) > 0 {
			p := o.acks[0]
			o.acks[0] = nil
			o.acks = o.acks[1:]
			o.mu.Unlock()
			return p, nil
		}
		if o.n > 0 {
			p := o.ring[o.head]
			o.ring[o.head] = nil
			o.head = (o.head + 1) % len(o.ring)
			o.n--
			if o.space != nil && o.n < o.limit {
				close(o.space)
				o.space = nil
			}
			o.mu.Unlock()
			return p, nil
		}
		o.mu.Unlock()
		// A signal sent after the check above is kept in ready's buffer,
		// so no wake-up is lost.
		select {
		case <-o.ready:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// close refuses further pushes and releases producers waiting for space.
func (o *outbox) close() {
	o.mu.Lock()
	o.closed = true
	if o.space != nil {
		close(o.space)
		o.space = nil
	}
	o.mu.Unlock()
}

func (o *outbox) signal() {
	select {
	case o.ready <- struct{}{}:
	default:
	}
}

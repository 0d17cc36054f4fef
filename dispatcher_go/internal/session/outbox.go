package session

import (
	"context"
	"errors"
	"sync"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// errOutboxClosed is returned by push once the slot has ended;
// errOutboxFull by tryPush when the ring is full.
var (
	errOutboxClosed = errors.New("slot closed")
	errOutboxFull   = errors.New("outbox full")
)

// outbox holds the downstream packets of one slot until its sender writes
// them. It has two lanes: a one-packet stop lane that the sender always
// empties first, and a bounded FIFO ring for everything else.
//
// The sender is a goroutine that exists only while there is something to
// send: the first packet queued starts it (once the slot has released the
// outbox, see release), and it ends when it finds the outbox empty. Both
// happen under mu, so there is never more than one sender, and a packet
// queued is always either taken by the running sender or starts a new one.
// An idle slot has no sender, no ring and no channel (docs/benchmarks.md,
// idle slots). The outbox is part of its slot (outbox{limit: n}).
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
	acks []*dispatchv1.DownstreamPacket
	// ring is allocated by the first packet and grows (doubling, from
	// ringMin) up to limit+ringSpare under push.
	ring   []*dispatchv1.DownstreamPacket
	head   int
	n      int
	limit  int
	closed bool
	space  chan struct{} // closed when the ring drains below limit; nil unless someone waits

	// The sender (see the type comment).
	sender     func() // what a new sender goroutine runs; nil until release
	sending    bool   // a sender goroutine runs
	dead       bool   // a Send failed: the stream is broken, no new sender
	senderDone chan struct{}
}

// ringMin is the ring's first size; ringSpare the room pushControl has
// beyond limit before the ring must grow.
const (
	ringMin   = 8
	ringSpare = 8
)

// release lets packets start sender goroutines running sender, starting one
// now if packets are queued. Until then the handler may send on the stream
// itself (the re-attach ack goes out before anything queued).
func (o *outbox) release(sender func()) {
	o.mu.Lock()
	o.sender = sender
	start := o.wakeLocked()
	o.mu.Unlock()
	o.start(start)
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
			start := o.wakeLocked()
			o.mu.Unlock()
			o.start(start)
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

// tryPush queues p if the ring has room; it never waits (errOutboxFull).
func (o *outbox) tryPush(p *dispatchv1.DownstreamPacket) error {
	o.mu.Lock()
	switch {
	case o.closed:
		o.mu.Unlock()
		return errOutboxClosed
	case o.n >= o.limit:
		o.mu.Unlock()
		return errOutboxFull
	}
	o.enqueueLocked(p)
	start := o.wakeLocked()
	o.mu.Unlock()
	o.start(start)
	return nil
}

// pushControl queues p without waiting (see the type comment).
func (o *outbox) pushControl(p *dispatchv1.DownstreamPacket) {
	o.mu.Lock()
	if o.closed {
		o.mu.Unlock()
		return
	}
	o.enqueueLocked(p)
	start := o.wakeLocked()
	o.mu.Unlock()
	o.start(start)
}

// enqueueLocked appends p to the ring, growing it when full: up to
// limit+ringSpare under push, beyond only if pushControl's protocol bound
// is broken (rather than lose a start or an ack).
func (o *outbox) enqueueLocked(p *dispatchv1.DownstreamPacket) {
	if o.n == len(o.ring) {
		size := max(ringMin, 2*len(o.ring))
		if len(o.ring) < o.limit+ringSpare {
			size = min(size, o.limit+ringSpare)
		}
		grown := make([]*dispatchv1.DownstreamPacket, size)
		for i := range o.n {
			grown[i] = o.ring[(o.head+i)%len(o.ring)]
		}
		o.ring, o.head = grown, 0
	}
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
	start := o.wakeLocked()
	o.mu.Unlock()
	o.start(start)
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
	start := o.wakeLocked()
	o.mu.Unlock()
	o.start(start)
}

// take returns the packet the sender sends next: the stop lane first, then
// the acks, then FIFO order. When there is none it reports false and the
// calling sender must return: it is no longer the sender (the next packet
// queued starts a new one).
func (o *outbox) take() (*dispatchv1.DownstreamPacket, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if p := o.stop; p != nil {
		o.stop = nil
		return p, true
	}
	if len(o.acks) > 0 {
		p := o.acks[0]
		o.acks[0] = nil
		o.acks = o.acks[1:]
		if len(o.acks) == 0 {
			o.acks = nil // the drained backing array goes (idle slots keep nothing)
		}
		return p, true
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
		toolTrace.took(p)
		return p, true
	}
	o.senderExitLocked()
	return nil, false
}

// sendFailed is called by the sender instead of take when a Send failed:
// it returns, and no new sender starts (the stream is broken; Serve ends it).
func (o *outbox) sendFailed() {
	o.mu.Lock()
	o.dead = true
	o.senderExitLocked()
	o.mu.Unlock()
}

func (o *outbox) senderExitLocked() {
	o.sending = false
	if o.senderDone != nil {
		close(o.senderDone)
		o.senderDone = nil
	}
}

// wakeLocked reports whether a sender must be started for what was just
// queued (and records that one runs).
func (o *outbox) wakeLocked() bool {
	if o.sending || o.sender == nil || o.dead || o.closed {
		return false
	}
	if o.stop == nil && len(o.acks) == 0 && o.n == 0 {
		return false
	}
	o.sending = true
	return true
}

func (o *outbox) start(ok bool) {
	if ok {
		go o.sender()
	}
}

// senderGone returns a channel closed once no sender runs (nil: none runs
// now). After close no new sender starts, so what it returns then stays true.
func (o *outbox) senderGone() <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.sending {
		return nil
	}
	if o.senderDone == nil {
		o.senderDone = make(chan struct{})
	}
	return o.senderDone
}

// close refuses further pushes (and new senders: a running one still
// empties the queue) and releases producers waiting for space.
func (o *outbox) close() {
	o.mu.Lock()
	o.closed = true
	if o.space != nil {
		close(o.space)
		o.space = nil
	}
	o.mu.Unlock()
}

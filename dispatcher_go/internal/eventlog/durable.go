package eventlog

import (
	"context"
	"errors"
	"sync"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// ErrTrimmed means a reader asked for events the store no longer holds
// (removed by retention, or lost).
var ErrTrimmed = errors.New("event log: earlier events are no longer stored")

// Committer is told which events became durable. Durable logs implement it.
type Committer interface {
	// Commit says that every event up to seq is durable.
	Commit(seq uint64)
	// Replace says that the store keeps ev in place of event seq, which it
	// could not store (ev says why): readers get ev from then on. It is
	// called before the Commit that covers seq, so no reader saw the
	// event it replaces.
	Replace(seq uint64, ev *dispatchv1.TaskEvent)
}

// Sink persists events for Durable logs (store.Writer implements it).
type Sink interface {
	// WaitRoom waits while the sink's bounded buffer is full: the
	// back-pressure on producers when the disk falls behind. It returns
	// early when abort is closed (the append would be refused anyway). Logs
	// call it before taking their lock, never under it, and only for
	// content (Capped appends): Control events, the fence and the seal never
	// wait for room (see Control).
	WaitRoom(abort <-chan struct{})
	// Persist queues ev (already numbered) of taskID for writing and calls
	// c.Commit once it is durable. It is called under the log's lock, in
	// seq order, and must not block (Commit takes that lock).
	Persist(c Committer, taskID string, ev *dispatchv1.TaskEvent)
	// ReadStored returns up to limit stored events of taskID with
	// seq > afterSeq, in order.
	ReadStored(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]*dispatchv1.TaskEvent, error)
}

// SetToken sets the fencing token that l's events appended from now on
// carry to its sink (TokenOf; store.Event.Token): a fleet replica's copy
// of a task stamps what it records with the attempt it was given, and its
// store writes only what carries the attempt of the task's lease. A log
// that wraps another passes it on through Unwrap() Log. False if l is not
// a durable log (nor wraps one): nothing carries a token.
func SetToken(l Log, token int64) bool {
	for l != nil {
		switch x := l.(type) {
		case *memLog:
			x.token.Store(token)
			return true
		case interface{ Unwrap() Log }:
			l = x.Unwrap()
		default:
			return false
		}
	}
	return false
}

// TokenOf is the fencing token of the log c (a Committer a Sink was
// given), as SetToken set it: 0 if none.
func TokenOf(c Committer) int64 {
	if l, ok := c.(*memLog); ok {
		return l.token.Load()
	}
	return 0
}

// Durable is a Store whose logs keep serving live readers from memory while
// every event is written to a Sink in batches. A reader sees an event only
// once it is durable, so whatever a watcher was sent survives a crash and a
// watcher that resumes by seq after a restart neither misses nor repeats
// an event. The added latency is the sink's flush interval; appends never
// wait for a disk write (only content waits for buffer room when the disk
// falls behind; see Sink.WaitRoom).
//
// A finished task's log keeps its events in memory after the last one is
// durable while it is among the most recently finished logs that fit in
// RetainBytes together; then it lets them go and readers still behind read
// the store. So the watchers of a task that just ended (a few events, or
// seconds, behind) read its tail from memory, not from the store, and the
// memory of finished tasks stays bounded.
type Durable struct {
	limits Limits
	sink   Sink
	retainer

	mu   sync.Mutex
	logs map[string]struct{}
}

// retainer keeps the events of the most recently finished logs in memory,
// within retainBytes, and lets the older ones go (memLog.release): a
// durable log's readers then read the store, a memory log's read its
// encodings (packed.go).
type retainer struct {
	// retainBytes bounds the events of finished logs kept in memory
	// (RetainBytes; tests change it).
	retainBytes int64

	// retained are the finished logs still holding their events, oldest
	// first, and their estimated bytes (memLog.heldBytes).
	retainMu      sync.Mutex
	retained      []retainedLog
	retainedBytes int64
}

type retainedLog struct {
	l     *memLog
	bytes int64
}

// RetainBytes bounds the events of finished tasks that a Durable store
// keeps in memory for their late readers (see Durable): 16 MiB, the
// tails of a few hundred ordinary tasks.
const RetainBytes = 16 << 20

// NewDurable returns a Store whose logs obey limits and persist to sink.
func NewDurable(limits Limits, sink Sink) *Durable {
	return &Durable{limits: limits, sink: sink, retainer: retainer{retainBytes: RetainBytes}, logs: make(map[string]struct{})}
}

// retain keeps l (finished, every event durable, bytes held) among the
// retained logs and lets the oldest go past retainBytes. It is called
// without l's lock (it takes the locks of the logs it lets go).
func (d *retainer) retain(l *memLog, bytes int64) {
	d.retainMu.Lock()
	d.retained = append(d.retained, retainedLog{l, bytes})
	d.retainedBytes += bytes
	n := 0
	for n < len(d.retained) && d.retainedBytes > d.retainBytes {
		d.retainedBytes -= d.retained[n].bytes
		n++
	}
	gone := make([]*memLog, n)
	for i := range n {
		gone[i] = d.retained[i].l
		d.retained[i] = retainedLog{}
	}
	d.retained = d.retained[n:]
	if len(d.retained) == 0 {
		d.retained = nil // let the backing array go
	}
	d.retainMu.Unlock()
	for _, g := range gone {
		g.release()
	}
}

// Create implements Store.
func (d *Durable) Create(taskID string) (Log, error) {
	return d.Restore(taskID, 0, false)
}

// Restore opens the log of a task whose events up to lastSeq are already
// stored (after a restart): new events continue at lastSeq+1 and readers
// that start before it read the store. A sealed log accepts nothing.
func (d *Durable) Restore(taskID string, lastSeq uint64, sealed bool) (Log, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.logs[taskID]; ok {
		return nil, ErrExists
	}
	d.logs[taskID] = struct{}{}
	l := &memLog{
		limits: d.limits, sink: d.sink, owner: &d.retainer, taskID: taskID,
		base: lastSeq, committed: lastSeq, sealed: sealed,
		events:   make([]*dispatchv1.TaskEvent, 0, 16),
		fencedCh: make(chan struct{}),
		sealedCh: make(chan struct{}),
	}
	if sealed {
		l.fencedCh, l.sealedCh = closedCh, closedCh
	}
	return l, nil
}

// Stored returns a read-only, sealed log of a finished task that is not
// held in memory: every read goes to the store. It is not registered, so
// any number of them may exist for one task.
func (d *Durable) Stored(taskID string, lastSeq uint64) Log {
	return &memLog{
		limits: d.limits, sink: d.sink, taskID: taskID, base: lastSeq, committed: lastSeq, sealed: true,
		fencedCh: closedCh, sealedCh: closedCh,
	}
}

// closedCh is the abort channel of logs that are sealed from the start.
var closedCh = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// Remove implements Store.
func (d *Durable) Remove(taskID string) {
	d.mu.Lock()
	delete(d.logs, taskID)
	d.mu.Unlock()
}

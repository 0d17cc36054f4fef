package eventlog

import (
	"context"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// defaultBatch is how many events Read returns when dst has no capacity.
const defaultBatch = 64

// Memory is an in-memory Store. Its logs live as long as somebody holds them;
// the Store only keeps names so that a task id cannot get two logs. A log
// keeps every event, also as its encoding (packed.go); once its task has
// finished and it is no longer among the most recently finished logs
// (RetainBytes, as in Durable), it keeps only the encodings and its
// readers decode the events they read.
type Memory struct {
	limits Limits
	retainer

	mu   sync.Mutex
	logs map[string]struct{}
}

// NewMemory returns a Store whose logs obey limits.
func NewMemory(limits Limits) *Memory {
	return &Memory{limits: limits, retainer: retainer{retainBytes: RetainBytes}, logs: make(map[string]struct{})}
}

// Create implements Store.
func (m *Memory) Create(taskID string) (Log, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.logs[taskID]; ok {
		return nil, ErrExists
	}
	m.logs[taskID] = struct{}{}
	return &memLog{
		limits: m.limits, owner: &m.retainer, events: make([]*dispatchv1.TaskEvent, 0, 16),
		packed: &packed{}, rawOff: true,
	}, nil
}

// Remove implements Store.
func (m *Memory) Remove(taskID string) {
	m.mu.Lock()
	delete(m.logs, taskID)
	m.mu.Unlock()
}

// Len is the number of logs the store knows (for tests and stats).
func (m *Memory) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.logs)
}

// memLog is a slice of events under a RWMutex. Readers that find nothing new
// wait on wake, a channel made only when somebody waits and closed by the next
// append: no per-reader queue, no allocation per event when nobody waits.
type memLog struct {
	limits Limits
	// Durable logs only (see Durable): sink persists each event, readers
	// see events up to committed (what the sink reported durable), and the
	// first base events live only in the store.
	sink Sink
	// token is the fencing token the log's events carry to the sink
	// (SetToken, TokenOf).
	token  atomic.Int64
	owner  *retainer // keeps the events once the log is finished (nil: none)
	taskID string
	base   uint64
	// packed holds every event's encoding (memory logs only: nil in
	// durable ones): what a finished log keeps once it lets its events go
	// (base > 0 then), and the bytes Encoded hands out (no raw ring).
	packed *packed
	// fencedCh is closed at Fence or Seal, sealedCh at Seal (durable logs
	// only): they end a content append's wait for room once the append
	// would be refused anyway.
	fencedCh, sealedCh chan struct{}

	mu     sync.RWMutex
	events []*dispatchv1.TaskEvent
	// raw holds the newest events' encodings (encode.go), until the log
	// lets them go (rawOff, see dropRawLocked).
	raw          rawRing
	rawOff       bool
	arena        arena // space for the encodings (its own lock)
	cappedEvents int
	cappedBytes  int64
	fenced       atomic.Bool // set under mu; read without it on the append path
	sealed       bool
	retained     bool // handed to owner.retain (finished, all durable)
	committed    uint64
	wake         chan struct{}
	committedAt  time.Duration // since traceBase, of the last Commit (trace only)
	// whenDurable are the WhenDurable callbacks of events not committed
	// yet (durable logs only): one per tool call that waits for its record
	// (a Capped event, so bounded by Limits).
	whenDurable []durableFunc
}

type durableFunc struct {
	seq uint64
	f   func()
}

// Append implements Log.
func (l *memLog) Append(ev *dispatchv1.TaskEvent, class Class) (uint64, error) {
	if class&Fenceable != 0 && l.fenced.Load() {
		// Refused anyway (checked again under the lock below): no waiting
		// for the sink's room, so after a stop the session's queued output
		// drains at parse speed and its stopped is not held up behind it.
		return 0, ErrFenced
	}
	// Encoded (and so sized) outside the lock: it walks the message and
	// needs no log state. The size is the event's without its seq.
	u := encodeUnnumbered(ev, &l.arena)
	var size int64
	if class&Capped != 0 && l.limits.MaxBytes > 0 {
		if u.buf != nil {
			size = int64(u.size())
		} else {
			size = int64(proto.Size(ev))
		}
	}
	if class != Control {
		// Content waits for the sink's room; Control events never do (see
		// Control). The wait ends early once the append would be refused:
		// at the fence (Fenceable) or the seal, so that a stop or the end
		// of the task never waits behind this content either.
		abort := l.sealedCh
		if class&Fenceable != 0 {
			abort = l.fencedCh
		}
		l.waitRoom(abort)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sealed {
		return 0, ErrSealed
	}
	if class&Fenceable != 0 && l.fenced.Load() {
		return 0, ErrFenced
	}
	if class&Capped != 0 {
		if l.limits.MaxEvents > 0 && l.cappedEvents >= l.limits.MaxEvents {
			return 0, ErrFull
		}
		if l.limits.MaxBytes > 0 && l.cappedBytes+size > l.limits.MaxBytes {
			return 0, ErrFull
		}
		l.cappedEvents++
		l.cappedBytes += size
	}
	return l.appendLocked(ev, u), nil
}

// Fence implements Log.
func (l *memLog) Fence(ev *dispatchv1.TaskEvent) (uint64, error) {
	// No waitRoom: the stop goes out only after its fence, so it must not
	// queue behind the sink's back-pressure (one event per task over the
	// bound at most).
	u := encodeUnnumbered(ev, &l.arena)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sealed {
		return 0, ErrSealed
	}
	if l.fenced.Load() {
		return 0, ErrFenced
	}
	l.fenced.Store(true)
	if l.fencedCh != nil {
		close(l.fencedCh) // releases Fenceable appends waiting for room
	}
	return l.appendLocked(ev, u), nil
}

// Seal implements Log. Like Fence it never waits for the sink's room: the
// terminal event is one per task, and it is appended under the task's lock.
func (l *memLog) Seal(ev *dispatchv1.TaskEvent) (uint64, error) {
	u := encodeUnnumbered(ev, &l.arena)
	l.mu.Lock()
	if l.sealed {
		l.mu.Unlock()
		return 0, ErrSealed
	}
	seq := l.appendLocked(ev, u)
	l.sealed = true
	var retain int64 = -1
	if l.sink == nil {
		// Finished, and every event is in packed (a memory log): kept a
		// while for the late readers, then only as encodings (Commit does
		// the same for a durable log once its last event is durable).
		l.dropRawLocked()
		if l.owner != nil && !l.retained {
			l.retained = true
			retain = l.heldBytesLocked()
		}
	}
	if l.sealedCh != nil {
		if !l.fenced.Load() {
			close(l.fencedCh)
		}
		close(l.sealedCh) // releases every append waiting for room
	}
	l.mu.Unlock()
	if retain >= 0 {
		l.owner.retain(l, retain) // outside l.mu: it may release others
	}
	return seq, nil
}

// waitRoom applies the sink's back-pressure, outside the lock, until abort
// is closed.
func (l *memLog) waitRoom(abort <-chan struct{}) {
	if l.sink != nil {
		l.sink.WaitRoom(abort)
	}
}

func (l *memLog) appendLocked(ev *dispatchv1.TaskEvent, u unnumbered) uint64 {
	seq := l.base + uint64(len(l.events)) + 1
	ev.Seq = seq
	data := u.number(seq)
	l.events = append(l.events, ev)
	if l.packed != nil {
		l.packed.put(seq, data, ev)
	}
	if !l.rawOff {
		l.raw.put(seq, data)
	}
	if l.sink != nil {
		// Readers are woken by Commit once the event is durable.
		if s, ok := l.sink.(EncodedSink); ok {
			s.PersistEncoded(l, l.taskID, ev, data)
		} else {
			l.sink.Persist(l, l.taskID, ev)
		}
		return seq
	}
	l.committed = seq
	if l.wake != nil {
		close(l.wake)
		l.wake = nil
	}
	return seq
}

// Commit implements Committer: events up to seq are durable and may be read.
func (l *memLog) Commit(seq uint64) {
	l.mu.Lock()
	if seq <= l.committed {
		l.mu.Unlock()
		return
	}
	l.committed = min(seq, l.base+uint64(len(l.events)))
	if traceWakes.Load() {
		l.committedAt = time.Since(traceBase)
	}
	var retain int64 = -1
	if l.sink != nil && l.sealed && l.committed == l.base+uint64(len(l.events)) && !l.retained {
		// Every event of the finished task is in the store: the owner
		// keeps them a while for late readers, within its bound, then
		// lets them go (release), so that the memory of finished tasks
		// does not grow with their logs.
		l.retained = true
		l.dropRawLocked() // late readers encode the events themselves
		retain = l.heldBytesLocked()
	}
	if l.wake != nil {
		close(l.wake)
		l.wake = nil
	}
	var due []durableFunc
	if len(l.whenDurable) > 0 {
		keep := l.whenDurable[:0]
		for _, w := range l.whenDurable {
			if w.seq <= l.committed {
				due = append(due, w)
			} else {
				keep = append(keep, w)
			}
		}
		clear(l.whenDurable[len(keep):])
		l.whenDurable = keep
	}
	l.mu.Unlock()
	for _, w := range due {
		w.f()
	}
	if retain >= 0 {
		if l.owner != nil {
			l.owner.retain(l, retain) // outside l.mu: it may release others
		} else {
			l.release()
		}
	}
}

// WhenDurable implements Log.
func (l *memLog) WhenDurable(seq uint64, f func()) {
	l.mu.Lock()
	if seq <= l.committed {
		l.mu.Unlock()
		f()
		return
	}
	l.whenDurable = append(l.whenDurable, durableFunc{seq, f})
	l.mu.Unlock()
}

// heldBytesLocked estimates the memory of the events held: their wire
// size where it was measured (Capped events under a byte limit), plus 64
// bytes an event, plus their encodings while they are kept (a durable
// log's raw ring). A memory log counts all it holds, its messages at
// memMessageBytes beside their wire size, and its packed encodings and
// refs, so that its retained logs hold about RetainBytes of heap
// (TestMemoryRetainedHeapNearBound).
func (l *memLog) heldBytesLocked() int64 {
	if l.packed != nil {
		return l.cappedBytes + memMessageBytes*int64(len(l.events)) + l.packed.bytes()
	}
	return l.cappedBytes + l.raw.bytes + 64*int64(len(l.events))
}

// memMessageBytes is the heap of a content event's message beside its
// wire size (its four objects and the log's pointer to it), measured by
// TestMemoryRetainedHeapNearBound: ~200 bytes with or without a task id
// and a time.
const memMessageBytes = 200

// dropRawLocked lets the events' encodings go for good: the log no longer
// keeps any (readers encode what they send themselves). Logs do so once
// their task finished: the bytes (at most rawWindow events', see rawRing)
// are held only while the task runs.
func (l *memLog) dropRawLocked() {
	l.raw, l.rawOff = rawRing{}, true
}

// release lets the events of a finished log go once every one is
// durable: readers still behind read the rest from the store, or from the
// encodings a memory log keeps (see Read).
func (l *memLog) release() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.sealed && l.committed == l.base+uint64(len(l.events)) {
		l.base, l.events = l.committed, nil
		l.dropRawLocked()
		if l.packed != nil {
			l.packed.trim()
		}
	}
}

// Replace implements Committer. Only an event not committed yet (that no
// reader can hold) is replaced; the log then serves ev at seq.
func (l *memLog) Replace(seq uint64, ev *dispatchv1.TaskEvent) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if seq > l.committed && seq > l.base && seq <= l.base+uint64(len(l.events)) {
		ev.Seq = seq
		i := seq - l.base - 1
		l.events[i] = ev
		l.raw.clear(seq) // the readers encode the placeholder themselves (rare)
		// The event waited for is not what the store keeps: its WhenDurable
		// callbacks never run (a held tool call is not invoked; its
		// deadline, a stop or the task's end finishes it).
		keep := l.whenDurable[:0]
		for _, w := range l.whenDurable {
			if w.seq != seq {
				keep = append(keep, w)
			}
		}
		clear(l.whenDurable[len(keep):])
		l.whenDurable = keep
	}
}

// LastSeq implements Log.
func (l *memLog) LastSeq() uint64 {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.base + uint64(len(l.events))
}

// Encoded implements Encoder. An event is matched by its seq and pointer:
// only the events this log holds and gave out have bytes here — and, in a
// memory log, the events it let go (seq <= base), which its readers got
// decoded from the very bytes (a memory log replaces no event).
func (l *memLog) Encoded(evs []*dispatchv1.TaskEvent, dst [][]byte) [][]byte {
	dst = dst[:0]
	l.mu.RLock()
	for _, ev := range evs {
		var data []byte
		s := ev.GetSeq()
		held := s > l.base && s-l.base <= uint64(len(l.events)) && l.events[s-l.base-1] == ev
		switch {
		case l.packed != nil && (held || (s > 0 && s <= l.base)):
			data = l.packed.get(s)
		case held:
			data = l.raw.get(s)
		}
		dst = append(dst, data)
	}
	l.mu.RUnlock()
	return dst
}

// Read implements Log.
func (l *memLog) Read(ctx context.Context, afterSeq uint64, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	limit := cap(dst)
	if limit == 0 {
		limit = defaultBatch
	}
	dst = dst[:0]
	waited := false
	for {
		l.mu.RLock()
		if base := l.base; afterSeq < base {
			if l.packed != nil {
				// A memory log that let its events go: decode them.
				dst, err := l.readPackedLocked(afterSeq, base, limit, dst)
				l.mu.RUnlock()
				return dst, err
			}
			// Not (or no longer) held by this process: read the store.
			l.mu.RUnlock()
			return l.readStored(ctx, afterSeq, base, limit, dst)
		}
		if n := l.committed; afterSeq < n {
			end := min(n, afterSeq+uint64(limit))
			dst = append(dst, l.events[afterSeq-l.base:end-l.base]...)
			if waited && l.sink != nil && traceWakes.Load() {
				traceWake(l.committedAt)
			}
			l.mu.RUnlock()
			return dst, nil
		}
		sealed := l.sealed && l.committed == l.base+uint64(len(l.events))
		l.mu.RUnlock()
		if sealed {
			return dst, io.EOF
		}
		w := l.waiter(afterSeq)
		if w == nil {
			continue // something arrived between the two locks
		}
		waited = true
		select {
		case <-w:
		case <-ctx.Done():
			return dst, ctx.Err()
		}
	}
}

// readStored reads up to limit events after afterSeq, all older than base,
// from the store.
func (l *memLog) readStored(ctx context.Context, afterSeq, base uint64, limit int, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	evs, err := l.sink.ReadStored(ctx, l.taskID, afterSeq, int(min(uint64(limit), base-afterSeq)))
	if err != nil {
		return dst, err
	}
	if len(evs) == 0 {
		return dst, ErrTrimmed
	}
	return append(dst, evs...), nil
}

// readPackedLocked decodes up to limit events after afterSeq, all older
// than base, from a memory log's encodings; under the read lock.
func (l *memLog) readPackedLocked(afterSeq, base uint64, limit int, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	end := min(base, afterSeq+uint64(limit))
	for s := afterSeq + 1; s <= end; s++ {
		ev, err := l.packed.event(s)
		if err != nil {
			return dst, err
		}
		if ev.GetSeq() != s {
			return dst, fmt.Errorf("eventlog: event %d decoded as seq %d", s, ev.GetSeq())
		}
		dst = append(dst, ev)
	}
	return dst, nil
}

// waiter returns the channel the next append closes, or nil if the log
// changed since the caller looked (new events past afterSeq, or sealed).
func (l *memLog) waiter(afterSeq uint64) chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	if afterSeq < l.committed || (l.sealed && l.committed == l.base+uint64(len(l.events))) {
		return nil
	}
	if l.wake == nil {
		l.wake = make(chan struct{})
	}
	return l.wake
}

package store

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"runtime"
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// ErrWriterClosed means the Writer was closed before the write was durable.
var ErrWriterClosed = errors.New("store: writer closed")

// ErrUnavailable means the store does not keep up: its last write failed, or
// a write has been under way for longer than WriterOptions.StuckAfter (see
// Writer.Health). The text of errors wrapping it is safe to show to clients:
// it never includes the store's own error.
var ErrUnavailable = errors.New("task store unavailable")

// DefaultMaxPending is the default bound of the items waiting for a write.
const DefaultMaxPending = 16384

// writeBurst is the default WriterOptions.Burst: how many writes may start back to back (each as soon as
// the previous one ended) before Interval paces them: Interval caps the
// average rate of writes, not the gap between two. Many tasks' events
// often arrive together (sessions streaming in step; a burst after a
// stall): with a fixed least gap the first of them was written at once and
// the others waited out Interval behind it, whereas now they go in the
// next write. Under a steady stream the bucket is empty and writes start
// every Interval, as before (same writes per second, same CPU).
const writeBurst = 4

// pacer paces the writes: a token bucket (as GCRA) of burst writes
// refilled one per interval. tat is the bucket's theoretical arrival time:
// a write may start once now >= tat - (burst-1)*interval, and each start
// moves tat to max(tat, now) + interval.
//
// With from > 0 the bucket applies only under load (paces): while records
// are taken into writes at from or more per interval on average (load, a
// count of them decaying with the time constant paceTau intervals). Below
// that a write starts as soon as the previous one ended and is not counted
// in the bucket, so no timer is on the way of an event at a moderate rate
// (a Go timer asked for less than a millisecond fires about a millisecond
// late: the runtime's epoll_wait timeout is whole milliseconds), while a
// flood is still gathered into one write per interval.
type pacer struct {
	interval time.Duration
	burst    int
	tat      time.Time

	from   int       // pace only from this many records per interval (0: always)
	load   float64   // records taken, decayed with the time constant paceTau intervals
	loadAt time.Time // when load was last updated
}

// paceTau is the time constant of the pacer's load, in intervals: the load
// follows a change of rate within a few times that (8 ms at 1 ms).
const paceTau = 8

// newPacer starts with tat = created + burst*interval: the first write
// waits interval (tests hold items pending until Flush with a long one;
// with from > 0 only a write under load waits).
func newPacer(created time.Time, interval time.Duration, burst, from int) pacer {
	return pacer{interval: interval, burst: burst, tat: created.Add(time.Duration(burst) * interval), from: from, loadAt: created}
}

// paces reports whether a write of the pending records must wait its turn
// in the bucket at now: always with from 0; else when the load, counting
// the pending records, is at least from records per interval (a steady
// rate of r records per interval keeps the load at r*paceTau).
func (p *pacer) paces(now time.Time, pending int) bool {
	return p.from <= 0 || p.decayed(now)+float64(pending)*p.spread(now) >= float64(p.from*paceTau)
}

// took counts n records taken into a write at now.
func (p *pacer) took(now time.Time, n int) {
	if p.from <= 0 || n <= 0 {
		return
	}
	p.load = p.decayed(now) + float64(n)*p.spread(now)
	p.loadAt = now
}

// spread is what a record taken at now adds to the load: the records of a
// write arrived since the previous write, so each counts as spread over
// that gap (its decayed share, (tau/gap)(1-e^(-gap/tau)): about 1 for a
// gap well under tau). A backlog after a stall (the machine's, the
// Writer's) then counts as the rate it arrived at, not as a flood: pacing
// it would add a timer's wait to events already late.
func (p *pacer) spread(now time.Time) float64 {
	gap := float64(now.Sub(p.loadAt)) / float64(paceTau*p.interval)
	if gap <= 1e-3 {
		return 1
	}
	return -math.Expm1(-gap) / gap
}

// decayed is the load at now.
func (p *pacer) decayed(now time.Time) float64 {
	dt := now.Sub(p.loadAt)
	if p.load == 0 || dt <= 0 {
		return p.load
	}
	return p.load * math.Exp(-float64(dt)/float64(paceTau*p.interval))
}

// wait is how long a write must wait at now (<= 0: none).
func (p *pacer) wait(now time.Time) time.Duration {
	return p.tat.Sub(now) - time.Duration(p.burst-1)*p.interval
}

// start records a write started at now.
func (p *pacer) start(now time.Time) {
	if p.tat.Before(now) {
		p.tat = now
	}
	p.tat = p.tat.Add(p.interval)
}

// DefaultStuckAfter is how long a write may take before the Writer counts
// as unhealthy. A write is one transaction of what was pending: at most
// about MaxPending (16 384) events plus task records, which SQLite writes
// in about 50 ms and Postgres in about 100 ms (docs/operations.md, hot
// path), so a second means the disk or the database is stalled, and
// clients are better told UNAVAILABLE than left waiting.
const DefaultStuckAfter = time.Second

// WriterOptions tune a Writer. Zero fields take the defaults.
type WriterOptions struct {
	// Interval paces the writes: at most one per Interval on average,
	// with up to Burst of them back to back (see Burst). The default, 0,
	// waits for nothing: a write starts as soon as something is pending
	// and the previous write has ended, so an idle Writer adds one write
	// of latency and under load batches grow by themselves (everything
	// that arrived during a write goes into the next one). A positive
	// Interval caps the writes per second (each has a fixed cost) at up to
	// Interval of added latency once the burst is used up; an item that
	// arrives when the burst is not used up is written at once (after the
	// write under way). Readers of a durable log see an event once it is
	// written. (The first write counts from NewWriter: tests use a long
	// Interval to hold items pending until Flush.)
	Interval time.Duration
	// Burst is how many writes may start back to back, each as soon as the
	// previous one ended, before Interval paces them (default writeBurst;
	// 1: every write waits Interval after the previous one started).
	Burst int
	// PaceFrom applies Interval only under load: while records (events
	// and task records) are written at PaceFrom or more per Interval on
	// average over the last few Intervals (see pacer). Below that rate a
	// write starts as soon as the previous one ended, as with Interval 0.
	// 0 (the default): Interval always applies. It applies only with one
	// write at a time (InFlight 1, SQLite): with more, an unpaced Writer
	// starts a write for nearly every record that arrives while a slot is
	// free (a simulation at ~3 900 events/s: 2-3x the writes, every slot
	// busy, 1.5-2 events a write), so Interval always applies there.
	PaceFrom int
	// MaxBatch ends the Interval wait at once when this many items are
	// pending (default 2048). It does not cap a batch: a write takes
	// everything pending (at most about MaxPending items).
	MaxBatch int
	// MaxPending bounds the items waiting for a write (default
	// DefaultMaxPending).
	// Past it, appends wait: the producer is slowed to what the disk can
	// take instead of memory growing without bound.
	MaxPending int
	// StuckAfter is how long a write (a batch, with its retries) may be
	// under way before the Writer reports itself unhealthy (default
	// DefaultStuckAfter).
	StuckAfter time.Duration
	// OnRejected is told of each task with a record set aside in a write:
	// one the store refused (ErrRejected) or that could not be encoded (an
	// event protobuf refuses, a task record without a body). reason says
	// why in words for clients (never the store's error text, which is
	// logged). The record is never retried: an event is stored as an error
	// event with code EventNotStored at its seq instead (readers get that
	// too), a task record is not stored; everything else of the write is.
	// The composition root fails the task with the reason. It runs on the
	// Writer's goroutine, outside its lock: it may append events and save
	// records, but must not wait for the Writer (Flush). nil: only logged.
	OnRejected func(taskID, reason string)
	// Logger receives write errors; nil discards.
	Logger *slog.Logger
	// InFlight is how many writes may be under way at once (see
	// writer_inflight.go). 0: what the store asks for (ConcurrentStore),
	// else 1: one write at a time.
	InFlight int
}

func (o *WriterOptions) applyDefaults() {
	if o.Interval < 0 {
		o.Interval = 0
	}
	if o.Burst <= 0 {
		o.Burst = writeBurst
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = 2048
	}
	if o.MaxPending <= 0 {
		o.MaxPending = DefaultMaxPending
	}
	if o.MaxPending < o.MaxBatch {
		o.MaxPending = o.MaxBatch
	}
	if o.StuckAfter <= 0 {
		o.StuckAfter = DefaultStuckAfter
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

type pendingEvent struct {
	c      eventlog.Committer
	taskID string
	ev     *dispatchv1.TaskEvent
	data   []byte        // ev encoded by the log (nil: newJob encodes it)
	at     time.Duration // since traceBase, when queued (trace only)
	n      uint64        // its number in the queue (flights only)
}

// Writer batches event and task writes into one Store.Apply per flush: a
// flush takes everything pending and starts as soon as the previous one
// ended (group commit: one write in flight — or InFlight, see
// writer_inflight.go — the next batch gathers
// meanwhile), paced by Interval: at most Burst writes back to back, then
// one per Interval (at once when MaxBatch items are pending or somebody
// calls Flush). It implements
// eventlog.Sink: appending an event costs a mutex and a slice append, the
// serialization and the disk write happen on the Writer's goroutine, and the
// log is told (Committer.Commit) once the event is durable.
//
// A failed write is retried (and logged) until it succeeds or the Writer is
// closed; meanwhile content appends wait once MaxPending is reached (task
// records and Control events do not: their number is bounded by the tasks'
// protocol, see eventlog.Control). While a write fails or is stuck the
// Writer is unhealthy (Health); callers that would wait for it
// (FlushWhileHealthy) give up at once instead.
//
// A write that fails because of a record rather than the store (an error
// wrapping ErrRejected, or a record that cannot be encoded) is not retried
// as it is: the record is found (the batch is split), set aside and its
// task reported (WriterOptions.OnRejected); every other record is written,
// and the Writer stays healthy. One bad record never holds up the others.
type Writer struct {
	st   Store
	opts WriterOptions

	mu      sync.Mutex
	room    chan struct{} // closed when pending items are written; nil unless someone waits
	events  []pendingEvent
	spare   []pendingEvent // the previous batch's slice, emptied, for the next one
	tasks   []TaskRecord
	waiters []chan error
	pace    pacer // when the next write may start (under mu)
	closed  bool
	flights // more than one write under way (writer_inflight.go)

	// Health, under mu. writeBegan is when the write under way began (zero
	// between writes); stuck is set by stuckTimer once it is older than
	// StuckAfter; writeErr is the error of the last attempt, until one
	// succeeds. healthCh is closed at the next change of Health.
	writeBegan time.Time
	stuck      bool
	writeErr   error
	healthCh   chan struct{}
	stuckTimer *time.Timer

	wake chan struct{}
	done chan struct{}

	wokeAt time.Duration // trace only: when the wake-up now pending was sent (since traceBase; under mu)
}

// NewWriter starts a Writer on st. Close stops it.
func NewWriter(st Store, opts WriterOptions) *Writer {
	opts.applyDefaults()
	opts.InFlight = inFlight(st, opts.InFlight)
	if opts.InFlight > 1 {
		opts.PaceFrom = 0 // see PaceFrom: the bucket always applies
	}
	w := &Writer{st: st, opts: opts, pace: newPacer(time.Now(), opts.Interval, opts.Burst, opts.PaceFrom), wake: make(chan struct{}, 1), done: make(chan struct{})}
	w.stuckTimer = time.AfterFunc(time.Hour, w.checkStuck)
	w.stuckTimer.Stop()
	go w.run()
	return w
}

// Health is nil while the Writer keeps up with the store, and otherwise an
// error wrapping ErrUnavailable that says why, in words for clients: the
// last write failed (it is being retried), or a write has been under way
// for longer than StuckAfter. It turns nil again once a write succeeds.
func (w *Writer) Health() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.healthLocked()
}

func (w *Writer) healthLocked() error {
	switch {
	case w.writeErr != nil:
		return fmt.Errorf("%w: writes are failing (retrying)", ErrUnavailable)
	case w.stuck:
		return fmt.Errorf("%w: a write has been under way for more than %s", ErrUnavailable, w.opts.StuckAfter)
	}
	return nil
}

// HealthChanged returns a channel that is closed when Health next changes
// between nil and non-nil. Take it before reading Health so that no change
// is missed.
func (w *Writer) HealthChanged() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.healthChLocked()
}

func (w *Writer) healthChLocked() chan struct{} {
	if w.healthCh == nil {
		w.healthCh = make(chan struct{})
	}
	return w.healthCh
}

// setHealthLocked applies f to the health fields and tells the watchers
// (HealthChanged) if Health turned from nil to an error or back.
func (w *Writer) setHealthLocked(f func()) {
	was := w.healthLocked() != nil
	f()
	now := w.healthLocked()
	if (now != nil) == was {
		return
	}
	if now != nil {
		w.opts.Logger.Warn("store writer unhealthy", "reason", now.Error(), "pending", w.pendingLocked())
	} else {
		w.opts.Logger.Info("store writer healthy again")
	}
	if w.healthCh != nil {
		close(w.healthCh)
		w.healthCh = nil
	}
}

// checkStuck runs on stuckTimer: the write under way is stuck if it began
// StuckAfter ago (a late timer of an earlier write finds a newer one).
func (w *Writer) checkStuck() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.writeBegan.IsZero() && time.Since(w.writeBegan) >= w.opts.StuckAfter {
		w.setHealthLocked(func() { w.stuck = true })
	}
}

// Pending is the number of items waiting to be written (not counting the
// batch being written).
func (w *Writer) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pendingLocked()
}

// Store is the store written to.
func (w *Writer) Store() Store { return w.st }

func (w *Writer) pendingLocked() int { return len(w.events) + len(w.tasks) }

func (w *Writer) notifyLocked(taskID string) {
	if w.heldLocked(taskID) {
		return // the write under way that holds it up wakes the Writer when it ends
	}
	n := w.pendingLocked()
	if n == 1 || n >= w.opts.MaxBatch || w.slotFreeLocked() {
		select {
		case w.wake <- struct{}{}:
			if trace != nil && n == 1 {
				w.wokeAt = time.Since(traceBase)
			}
		default:
		}
	}
}

// tookLocked counts n records taken into a write in the pacer's load.
func (w *Writer) tookLocked(n int) {
	if w.opts.PaceFrom > 0 && w.opts.Interval > 0 {
		w.pace.took(time.Now(), n)
	}
}

// WaitRoom implements eventlog.Sink: it waits while MaxPending items are
// waiting to be written, or until abort is closed. (Producers that passed
// it together may overshoot the bound by one item each.)
func (w *Writer) WaitRoom(abort <-chan struct{}) {
	w.mu.Lock()
	for w.pendingLocked() >= w.opts.MaxPending && !w.closed {
		if w.room == nil {
			w.room = make(chan struct{})
		}
		room := w.room
		w.mu.Unlock()
		select {
		case <-room:
		case <-abort:
			return
		}
		w.mu.Lock()
	}
	w.mu.Unlock()
}

// roomLocked wakes the producers waiting in WaitRoom.
func (w *Writer) roomLocked() {
	if w.room != nil {
		close(w.room)
		w.room = nil
	}
}

// Persist implements eventlog.Sink. It is called under the log's lock, in
// seq order, and never waits for room (WaitRoom did).
func (w *Writer) Persist(c eventlog.Committer, taskID string, ev *dispatchv1.TaskEvent) {
	w.PersistEncoded(c, taskID, ev, nil)
}

// PersistEncoded implements eventlog.EncodedSink: Persist with the bytes
// the log encoded ev into (stored as they are; nil: encoded here).
func (w *Writer) PersistEncoded(c eventlog.Committer, taskID string, ev *dispatchv1.TaskEvent, data []byte) {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return // shutting down: the event stays in memory only
	}
	p := pendingEvent{c: c, taskID: taskID, ev: ev, data: data, n: w.numberLocked()}
	if trace != nil {
		p.at = time.Since(traceBase)
	}
	w.events = append(w.events, p)
	w.notifyLocked(taskID)
	w.mu.Unlock()
}

// ReadStored implements eventlog.Sink. A stored event that cannot be
// decoded is read as an error event with code EventUndecodable at its seq,
// a seq the store does not hold (before one it holds) as one with code
// EventMissing: the reader learns of the gap, and reads on past it.
func (w *Writer) ReadStored(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]*dispatchv1.TaskEvent, error) {
	limit = EventLimit(limit)
	rows, err := w.st.ReadEvents(ctx, taskID, afterSeq, limit)
	if err != nil {
		return nil, err
	}
	out := make([]*dispatchv1.TaskEvent, 0, len(rows))
	next := afterSeq + 1
	for _, r := range rows {
		for ; next < r.Seq && len(out) < limit; next++ {
			out = append(out, missing(taskID, next))
		}
		if len(out) >= limit {
			break
		}
		out = append(out, decodeStored(taskID, r))
		next = r.Seq + 1
	}
	return out, nil
}

// SaveTask queues an upsert of rec, written after every event queued before it.
func (w *Writer) SaveTask(rec TaskRecord) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return
	}
	w.tasks = append(w.tasks, rec)
	w.queuedTaskLocked()
	w.notifyLocked(rec.ID)
}

// Flush writes everything queued so far now and waits until it is durable.
func (w *Writer) Flush(ctx context.Context) error {
	return w.flush(ctx, false)
}

// FlushWhileHealthy is Flush for callers that must not wait for a store in
// trouble (a client's request): it returns Health's error at once when the
// Writer is unhealthy, and as soon as it turns unhealthy while waiting (the
// queued items are still written once the store recovers).
func (w *Writer) FlushWhileHealthy(ctx context.Context) error {
	return w.flush(ctx, true)
}

func (w *Writer) flush(ctx context.Context, whileHealthy bool) error {
	ch := make(chan error, 1)
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return ErrWriterClosed
	}
	var changed chan struct{} // nil (never ready) unless whileHealthy
	if whileHealthy {
		if err := w.healthLocked(); err != nil {
			w.mu.Unlock()
			return err
		}
		changed = w.healthChLocked()
	}
	w.waiters = append(w.waiters, ch)
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
	for {
		select {
		case err := <-ch:
			return err
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
			w.mu.Lock()
			err := w.healthLocked()
			changed = w.healthChLocked()
			w.mu.Unlock()
			if err != nil {
				return err
			}
		}
	}
}

// Close writes what is pending and stops the Writer. Later appends are
// kept in memory only.
func (w *Writer) Close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.done
		return
	}
	w.closed = true
	w.roomLocked()
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
	<-w.done
}

func (w *Writer) run() {
	defer close(w.done)
	if trace != nil {
		runtime.LockOSThread() // threadStat measures this goroutine
		defer runtime.UnlockOSThread()
	}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	commits := newTells()
	for {
		<-w.wake
		var sleepStart time.Time
		if trace != nil {
			sleepStart = time.Now()
		}
		w.mu.Lock()
		if trace != nil && w.wokeAt != 0 {
			d := time.Since(traceBase) - w.wokeAt
			w.wokeAt = 0
			trace.mu.Lock()
			trace.add(&trace.wakeup, d)
			trace.mu.Unlock()
		}
		if w.flyBlockedLocked() {
			w.mu.Unlock()
			continue // the write under way that holds it up wakes us
		}
		// Wait out the interval unless the batch is full, a flush was
		// asked for, we are closing, or the Writer is not under load
		// (PaceFrom).
		paced := w.opts.Interval > 0 && w.pace.paces(time.Now(), w.pendingLocked())
		for paced && w.pendingLocked() > 0 && w.pendingLocked() < w.opts.MaxBatch && len(w.waiters) == 0 && !w.closed {
			wait := w.pace.wait(time.Now())
			if wait <= 0 {
				break
			}
			w.mu.Unlock()
			var t0 time.Time
			if trace != nil {
				t0 = time.Now()
			}
			timer.Reset(wait)
			select {
			case <-timer.C:
				if trace != nil {
					trace.mu.Lock()
					trace.add(&trace.paceWant, wait)
					trace.add(&trace.paceLate, time.Since(t0)-wait)
					trace.mu.Unlock()
				}
			case <-w.wake:
				timer.Stop()
			}
			w.mu.Lock()
		}
		if paced {
			w.pace.start(time.Now())
		}
		var slept time.Duration
		if trace != nil {
			slept = time.Since(sleepStart)
		}
		if w.launchLocked(slept) {
			w.mu.Unlock()
			continue
		}
		w.landLocked() // a flush or Close: the writes under way end first
		w.tookLocked(w.pendingLocked())
		if trace != nil && !paced && w.opts.Interval > 0 && w.pendingLocked() > 0 {
			// A write that starts without its turn in the bucket. (With
			// more than one in flight PaceFrom is 0, so every write is
			// paced and launchLocked need not count.)
			trace.mu.Lock()
			trace.unpaced++
			trace.mu.Unlock()
		}
		events, tasks, waiters, closed := w.events, w.tasks, w.waiters, w.closed
		w.events, w.spare, w.tasks, w.waiters = w.spare, nil, nil, nil
		w.roomLocked()
		w.mu.Unlock()

		err := w.write(events, tasks, commits, slept)
		if err == nil {
			w.mu.Lock()
			err = w.flyErr // a write beside this one failed at Close
			w.mu.Unlock()
		}
		for _, ch := range waiters {
			ch <- err
		}
		if cap(events) <= 2*w.opts.MaxPending {
			// Reused for the batch after next: no regrowing the slice
			// for every batch. (Cleared: it must not keep events alive.)
			clear(events)
			w.mu.Lock()
			w.spare = events[:0]
			w.mu.Unlock()
		}
		if closed {
			w.mu.Lock()
			rest := w.waiters
			w.waiters = nil
			w.mu.Unlock()
			for _, ch := range rest {
				ch <- ErrWriterClosed
			}
			return
		}
		w.mu.Lock()
		if w.pendingLocked() > 0 || len(w.waiters) > 0 {
			select {
			case w.wake <- struct{}{}:
			default:
			}
		}
		w.mu.Unlock()
	}
}

// write applies one batch, retrying until it succeeds or the Writer is
// closed, then tells each log the highest seq now durable. While it is
// under way for longer than StuckAfter, or its last attempt failed, the
// Writer is unhealthy. Records that cannot be stored are set aside (see
// applyIsolating) and their tasks reported once the rest is durable.
func (w *Writer) write(events []pendingEvent, tasks []TaskRecord, commits *tells, slept time.Duration) error {
	if len(events) == 0 && len(tasks) == 0 {
		return nil
	}
	var taken time.Duration
	if trace != nil {
		taken = time.Since(traceBase)
	}
	j := newJob(events, tasks, w.opts.Logger.Error)
	w.mu.Lock()
	began := w.beganLocked()
	w.mu.Unlock()
	var cpu0, runq0 time.Duration
	var a0 time.Time
	if trace != nil {
		cpu0, runq0 = threadStat()
		a0 = time.Now()
	}
	err := w.applyIsolating(j, 0, j.size())
	if trace != nil {
		cpu1, runq1 := threadStat()
		wall := time.Since(a0)
		trace.mu.Lock()
		trace.add(&trace.applyCPU, cpu1-cpu0)
		trace.add(&trace.applyRunq, runq1-runq0)
		trace.add(&trace.applyBlocked, wall-(cpu1-cpu0)-(runq1-runq0))
		trace.mu.Unlock()
	}
	w.mu.Lock()
	w.endedLocked(began, err == nil)
	w.mu.Unlock()
	if err != nil {
		return err
	}
	j.replaceAll()
	var applied time.Duration
	if trace != nil {
		applied = time.Since(traceBase)
		w.traceWrite(events, taken, applied, slept)
	}
	for _, p := range events {
		commits.add(p.c, p.ev.GetSeq())
	}
	for _, t := range commits.list {
		t.c.Commit(t.seq)
		if trace != nil {
			d := time.Since(traceBase) - applied
			trace.mu.Lock()
			trace.add(&trace.tell, d)
			trace.mu.Unlock()
		}
	}
	commits.reset()
	w.notify(j)
	return nil
}

// tells gathers the Commit calls of one write: the highest seq of each log,
// in the order of the log's first event in the batch (the order the events
// were persisted). Commit wakes the log's readers, so after a write of many
// tasks' events the watchers run about in the order their events arrived
// and the event that waited longest is sent first. (A map's order is
// random: the oldest event of a 200-task write could be told last, behind
// 199 watchers' sends.)
type tells struct {
	at   map[eventlog.Committer]int // index in list
	list []tell
}

type tell struct {
	c   eventlog.Committer
	seq uint64
}

func newTells() *tells { return &tells{at: make(map[eventlog.Committer]int)} }

// add notes that c's events up to seq are in the write.
func (t *tells) add(c eventlog.Committer, seq uint64) {
	if i, ok := t.at[c]; ok {
		t.list[i].seq = max(t.list[i].seq, seq)
		return
	}
	t.at[c] = len(t.list)
	t.list = append(t.list, tell{c, seq})
}

// reset empties t for the next write (keeping list's array, cleared so
// that it does not keep logs alive).
func (t *tells) reset() {
	clear(t.at)
	clear(t.list)
	t.list = t.list[:0]
}

// traceWrite records a write's legs (see trace.go).
func (w *Writer) traceWrite(events []pendingEvent, taken, applied time.Duration, slept time.Duration) {
	trace.mu.Lock()
	defer trace.mu.Unlock()
	trace.writes++
	trace.add(&trace.apply, applied-taken)
	trace.add(&trace.slept, slept)
	if len(trace.sizes) < traceMax {
		trace.sizes = append(trace.sizes, len(events))
	}
	for _, p := range events {
		trace.add(&trace.queued, taken-p.at)
		trace.add(&trace.write, applied-taken)
	}
}

// apply writes b, retrying while the store fails (the Writer is unhealthy
// meanwhile, see Health). It returns nil; an error wrapping ErrRejected,
// at once, when the store refused a record of b (retrying would not help);
// or the store's error once the Writer is closed.
func (w *Writer) apply(b Batch) error {
	backoff := 50 * time.Millisecond
	failing := false // counted in w.failing
	defer func() {
		if failing {
			w.mu.Lock()
			w.failing--
			w.mu.Unlock()
		}
	}()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		err := w.st.Apply(ctx, b)
		cancel()
		if err == nil || errors.Is(err, ErrRejected) {
			return err
		}
		w.opts.Logger.Error("store write failed; retrying", "events", len(b.Events), "tasks", len(b.Tasks), "error", err)
		w.mu.Lock()
		if !failing {
			failing = true
			w.failing++
		}
		w.setHealthLocked(func() { w.writeErr = err })
		closed := w.closed
		w.mu.Unlock()
		if closed {
			return err
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, 2*time.Second)
	}
}

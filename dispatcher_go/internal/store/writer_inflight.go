package store

import (
	"runtime"
	"time"
)

// ConcurrentStore is a Store that gains from more than one write under way
// at once: a server database whose commits wait for a disk flush that
// several transactions share (PostgreSQL's group commit). WritesInFlight is
// how many the Writer should keep under way (WriterOptions.InFlight).
// SQLite has one writer: its store does not implement it.
type ConcurrentStore interface {
	WritesInFlight() int
}

// inFlight is WriterOptions.InFlight for st: asked, else what st asks
// for, else 1.
func inFlight(st Store, asked int) int {
	if asked > 0 {
		return asked
	}
	if c, ok := st.(ConcurrentStore); ok && c.WritesInFlight() > 1 {
		return c.WritesInFlight()
	}
	return 1
}

// flights are the Writer's writes under way when more than one may be
// (WriterOptions.InFlight > 1), all under Writer.mu. With one write at a
// time, events that arrive while a write commits wait for its commit (with
// durable commits on a busy disk, tens of ms at p99) and only then start
// their own; with more, they start at once, and the store's commits may
// share a disk flush.
//
// Order: a task's records are never in two writes under way. A write takes
// the pending records of the tasks no write under way holds (busy); the
// others stay pending, in order, for a later write. So one task's events
// are committed in seq order, its watchers are told (Committer.Commit) only
// after the commit and in seq order, a task record is written after the
// events queued before it, and a reader of the store never finds a later
// event of a task without the earlier ones. Writes of different tasks may
// commit in any order (they did not depend on each other before either:
// one write held them all, committed at once).
//
// Flush does not stop the flights (the bench's task churn flushes tens of
// times a second: draining every write under way for each made the
// writes one at a time again): each record is numbered as queued, and a
// flush waiter is answered once every record numbered up to the last one
// queued when the Writer took the flush (a little more than Flush needs)
// is written: none pending, none in a write under way (lowWaterLocked).
// Close waits for the writes under way to end, then writes everything
// pending in one write, as with InFlight 1. Health counts from the oldest
// write under way.
type flights struct {
	flying  int                 // writes under way on their own goroutines
	busy    map[string]int      // task id → records of it in writes under way
	landed  chan struct{}       // closed when flying drops to 0; nil unless someone waits
	underOn map[int64]time.Time // began (key: a write's number) of each write under way, for Health
	nextID  int64

	queued  uint64           // records numbered so far (InFlight > 1)
	taskN   []uint64         // the numbers of Writer.tasks, in order (InFlight > 1)
	lowest  map[int64]uint64 // flight → the lowest record number it writes
	flushes []flushWaiter    // Flush waiters taken by the flights
	nextF   int64

	// flyErr is the error of a write under way that failed (only once the
	// Writer is closed: writes retry until then); the flush waiters
	// answered after it get it, never nil for records it lost.
	flyErr error
	// failing counts the writes retrying a failed Apply (any InFlight): a
	// write that succeeds meanwhile leaves Health failing.
	failing int
}

type flushWaiter struct {
	ch   chan error
	upto uint64
}

// numberLocked numbers a record being queued (0 with InFlight 1).
func (w *Writer) numberLocked() uint64 {
	if w.opts.InFlight <= 1 {
		return 0
	}
	w.queued++
	return w.queued
}

// queuedTaskLocked numbers the task record just queued (Writer.tasks).
func (w *Writer) queuedTaskLocked() {
	if w.opts.InFlight > 1 {
		w.taskN = append(w.taskN, w.numberLocked())
	}
}

// lowWaterLocked is the lowest record number not written yet (queued+1
// when all are).
func (w *Writer) lowWaterLocked() uint64 {
	low := w.queued + 1
	if len(w.events) > 0 {
		low = min(low, w.events[0].n)
	}
	if len(w.taskN) > 0 {
		low = min(low, w.taskN[0])
	}
	for _, n := range w.lowest {
		low = min(low, n)
	}
	return low
}

// answerFlushesLocked answers the flush waiters whose records are written.
func (w *Writer) answerFlushesLocked() {
	if len(w.flushes) == 0 {
		return
	}
	low := w.lowWaterLocked()
	kept := w.flushes[:0]
	for _, f := range w.flushes {
		if f.upto < low {
			f.ch <- w.flyErr
		} else {
			kept = append(kept, f)
		}
	}
	clear(w.flushes[len(kept):])
	w.flushes = kept
}

// heldLocked: a new record of taskID cannot start a write now — every
// slot is taken, or a write under way holds the task — and the write
// under way wakes the Writer when it ends (waking it now would only make
// it scan the pending records again, for every record a busy task adds).
func (w *Writer) heldLocked(taskID string) bool {
	return w.concurrentLocked() && w.flying > 0 && (w.flying >= w.opts.InFlight || w.busy[taskID] > 0)
}

// slotFreeLocked: a write under way and room for another (a new record
// may start one now instead of waiting for it).
func (w *Writer) slotFreeLocked() bool {
	return w.flying > 0 && w.flying < w.opts.InFlight
}

// concurrentLocked: the next write may run beside others.
func (w *Writer) concurrentLocked() bool {
	return w.opts.InFlight > 1 && !w.closed
}

// flyBlockedLocked: no write can start now: every slot is taken, or every
// pending record belongs to a task a write under way holds. A write that
// ends wakes the Writer.
func (w *Writer) flyBlockedLocked() bool {
	if !w.concurrentLocked() || w.flying == 0 {
		return false
	}
	if w.flying >= w.opts.InFlight {
		return true
	}
	for i := range w.events {
		if w.busy[w.events[i].taskID] == 0 {
			return false
		}
	}
	for i := range w.tasks {
		if w.busy[w.tasks[i].ID] == 0 {
			return false
		}
	}
	return true
}

// launchLocked starts a write of the pending records of tasks no write
// under way holds, on its own goroutine, and reports true; false when the
// write must be the Writer's one (InFlight 1, a flush, Close) or there is
// nothing to write.
func (w *Writer) launchLocked(slept time.Duration) bool {
	if !w.concurrentLocked() {
		return false
	}
	for _, ch := range w.waiters {
		w.flushes = append(w.flushes, flushWaiter{ch: ch, upto: w.queued})
	}
	clear(w.waiters)
	w.waiters = w.waiters[:0]
	var events []pendingEvent
	var tasks []TaskRecord
	var taskN []uint64
	if w.flying == 0 {
		// Nothing held: all of it (the slices are not reused, as a
		// write of its own goroutine ends when it ends).
		events, tasks, taskN = w.events, w.tasks, w.taskN
		w.events, w.tasks, w.taskN = nil, nil, nil
	} else {
		kept := w.events[:0]
		for _, p := range w.events {
			if w.busy[p.taskID] > 0 {
				kept = append(kept, p)
			} else {
				events = append(events, p)
			}
		}
		clear(w.events[len(kept):])
		w.events = kept
		keptT, keptN := w.tasks[:0], w.taskN[:0]
		for i, t := range w.tasks {
			if w.busy[t.ID] > 0 {
				keptT, keptN = append(keptT, t), append(keptN, w.taskN[i])
			} else {
				tasks, taskN = append(tasks, t), append(taskN, w.taskN[i])
			}
		}
		clear(w.tasks[len(keptT):])
		w.tasks, w.taskN = keptT, keptN
	}
	if len(events) == 0 && len(tasks) == 0 {
		w.answerFlushesLocked()
		return true // nothing free: a write ending wakes the Writer
	}
	low := w.queued + 1
	if len(events) > 0 {
		low = events[0].n
	}
	if len(taskN) > 0 {
		low = min(low, taskN[0])
	}
	w.nextF++
	id := w.nextF
	if w.lowest == nil {
		w.lowest = map[int64]uint64{}
	}
	w.lowest[id] = low
	if w.busy == nil {
		w.busy = map[string]int{}
	}
	for _, p := range events {
		w.busy[p.taskID]++
	}
	for _, t := range tasks {
		w.busy[t.ID]++
	}
	w.flying++
	w.roomLocked()
	go w.fly(id, events, tasks, slept)
	return true
}

// fly is one write beside others (launchLocked).
func (w *Writer) fly(id int64, events []pendingEvent, tasks []TaskRecord, slept time.Duration) {
	if trace != nil {
		runtime.LockOSThread() // threadStat measures this goroutine
		defer runtime.UnlockOSThread()
	}
	// An error only once the Writer is closed (write retries until then):
	// the flush waiters answered after it, and Close's write, report it.
	err := w.write(events, tasks, newTells(), slept)
	w.mu.Lock()
	if err != nil && w.flyErr == nil {
		w.flyErr = err
	}
	for _, p := range events {
		w.unbusyLocked(p.taskID)
	}
	for _, t := range tasks {
		w.unbusyLocked(t.ID)
	}
	w.flying--
	delete(w.lowest, id)
	w.answerFlushesLocked()
	if w.flying == 0 && w.landed != nil {
		close(w.landed)
		w.landed = nil
	}
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *Writer) unbusyLocked(id string) {
	if w.busy[id] <= 1 {
		delete(w.busy, id)
	} else {
		w.busy[id]--
	}
}

// landLocked waits (releasing mu meanwhile) until no write is under way
// beside the Writer's own (Close); the flush waiters the flights took are
// then answered with the Writer's last write.
func (w *Writer) landLocked() {
	defer func() {
		for _, f := range w.flushes {
			w.waiters = append(w.waiters, f.ch)
		}
		w.flushes, w.taskN = nil, nil
	}()
	for w.flying > 0 {
		if w.landed == nil {
			w.landed = make(chan struct{})
		}
		landed := w.landed
		w.mu.Unlock()
		<-landed
		w.mu.Lock()
	}
}

// beganLocked records a write starting now and returns its number for
// endedLocked; writeBegan is the oldest write under way, and the stuck
// timer fires StuckAfter after it.
func (w *Writer) beganLocked() int64 {
	now := time.Now()
	if w.underOn == nil {
		w.underOn = map[int64]time.Time{}
	}
	w.nextID++
	w.underOn[w.nextID] = now
	if w.writeBegan.IsZero() {
		w.writeBegan = now
		w.stuckTimer.Reset(w.opts.StuckAfter)
	}
	return w.nextID
}

// endedLocked records the end of write id (ok: it succeeded, and Health
// turns nil unless an older write under way is stuck).
func (w *Writer) endedLocked(id int64, ok bool) {
	delete(w.underOn, id)
	var oldest time.Time
	for _, t := range w.underOn {
		if oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
	}
	if oldest.IsZero() {
		w.stuckTimer.Stop()
	} else {
		w.stuckTimer.Reset(max(0, w.opts.StuckAfter-time.Since(oldest)))
	}
	if !ok {
		return // unhealthy while it failed; writeBegan stays as it was
	}
	stuck := !oldest.IsZero() && time.Since(oldest) >= w.opts.StuckAfter
	w.setHealthLocked(func() {
		w.writeBegan, w.stuck = oldest, stuck
		if w.failing == 0 {
			w.writeErr = nil // else another write still fails and retries
		}
	})
}

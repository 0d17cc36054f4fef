package fleet

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// errView is the answer of a view's log to an append.
var errView = errors.New("fleet: a view of a task another replica runs records nothing")

// tailBlock is how long the tail hub's XREAD BLOCK waits, and how long a
// watcher waits for the hub before it looks at PostgreSQL again (also its
// poll interval while Redis is down).
const tailBlock = 500 * time.Millisecond

// tailPool is the size of the tail hub's own Redis pool: its one blocking
// read (and a spare while a read is being abandoned).
const tailPool = 2

// pingDownAfter is how many health pings in a row (every 500 ms, 500 ms
// each) must fail before the bus counts as down.
const pingDownAfter = 2

// remoteLog is the log of a task run by another replica, for its watchers
// here: events come from the task's Redis stream (the live tail, read for
// every watcher here by the replica's tail hub) and from PostgreSQL
// (history, and any gap: an entry trimmed, lost with Redis, or not
// published). Only durable events are ever in either, so a watcher
// resuming by seq on any replica neither misses nor repeats one.
type remoteLog struct {
	f       *Fleet
	taskID  string
	lastSeq uint64
	endSeq  atomic.Uint64 // seq of the terminal event, once read
	// live: the last wait was answered by the hub with the next events:
	// the next Read waits for the hub at once, without asking PostgreSQL
	// first (it does after tailBlock without news or on a gap, so an
	// entry lost on the bus costs at most that).
	live atomic.Bool
	// released: the hub was told the task runs here (tailHub.release).
	released atomic.Bool
}

func (l *remoteLog) Append(*dispatchv1.TaskEvent, eventlog.Class) (uint64, error) {
	return 0, errView
}
func (l *remoteLog) Fence(*dispatchv1.TaskEvent) (uint64, error) { return 0, errView }
func (l *remoteLog) Seal(*dispatchv1.TaskEvent) (uint64, error)  { return 0, errView }
func (l *remoteLog) LastSeq() uint64                             { return l.lastSeq }

// WhenDurable implements eventlog.Log: what a view reads is stored already.
func (l *remoteLog) WhenDurable(_ uint64, f func()) { f() }

// Read implements eventlog.Log.
func (l *remoteLog) Read(ctx context.Context, after uint64, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	limit := cap(dst)
	if limit == 0 {
		limit = 64
	}
	dst = dst[:0]
	hub := l.f.hub
	for {
		if end := l.endSeq.Load(); end != 0 && after >= end {
			return dst, io.EOF
		}
		// The task runs here now (this replica took it from the bus after
		// the view was made: a watch right after a submit): its own log,
		// without the bus, while this replica holds its lease. A batch read
		// after the lease was lost is dropped (a fenced write's events are
		// in the local log only, and the fence disowns before they show).
		if t := l.local(); t != nil {
			if !l.released.Swap(true) {
				hub.release(l.taskID)
			}
			cctx, cancel := context.WithTimeout(ctx, tailBlock)
			evs, err := t.Log().Read(cctx, after, dst)
			cancel()
			if l.local() != nil {
				switch {
				case len(evs) > 0:
					return l.seen(evs), nil
				case errors.Is(err, io.EOF):
					return evs, io.EOF
				case ctx.Err() != nil:
					return evs[:0], ctx.Err()
				}
				continue
			}
			dst = dst[:0]
		}
		// The tail the hub holds: contiguous entries are served as they are.
		if evs := hub.get(l.taskID, after, limit); len(evs) > 0 {
			return l.seen(append(dst, evs...)), nil
		}
		if !l.live.Load() {
			// History and gaps from PostgreSQL.
			evs, err := l.f.writer.ReadStored(ctx, l.taskID, after, limit)
			if err != nil && ctx.Err() == nil {
				l.f.log.Debug("watcher: store read failed; retrying", "task_id", l.taskID, "error", err)
				if !sleepCtx(ctx, tailBlock) {
					return dst, ctx.Err()
				}
				continue
			}
			if len(evs) > 0 {
				return l.seen(append(dst, evs...)), nil
			}
			if ctx.Err() != nil {
				return dst, ctx.Err()
			}
			// Nothing after `after`: over, or wait for the next event.
			if st, err := l.f.leases.Status(ctx, l.taskID); err == nil && task.Terminal(st) {
				// The end is stored after its events in one transaction:
				// read once more, then it is over.
				evs, err := l.f.writer.ReadStored(ctx, l.taskID, after, limit)
				if err == nil && len(evs) == 0 {
					return dst, io.EOF
				}
				if len(evs) > 0 {
					return l.seen(append(dst, evs...)), nil
				}
			}
		}
		evs, ch, done := hub.wait(l.taskID, after, limit)
		if len(evs) > 0 {
			done()
			return l.seen(append(dst, evs...)), nil
		}
		woke := false
		if ch == nil || !l.f.busUp() {
			sleepCtx(ctx, tailBlock)
		} else {
			t := time.NewTimer(tailBlock)
			select {
			case <-ch:
				woke = true
			case <-t.C:
			case <-ctx.Done():
			}
			t.Stop()
		}
		done()
		if ctx.Err() != nil {
			return dst, ctx.Err()
		}
		// Woken with the next events: served, and the next Read waits for
		// the hub at once. Woken without them (a gap: the hub's run does
		// not continue after `after`) or not woken: PostgreSQL next.
		if woke {
			if evs := hub.get(l.taskID, after, limit); len(evs) > 0 {
				if l.f.legs != nil {
					l.f.legs.add(legReader, hub.since(l.taskID))
				}
				l.live.Store(true)
				return l.seen(append(dst, evs...)), nil
			}
		}
		l.live.Store(false)
	}
}

// local is the task when this replica runs it and holds its lease.
func (l *remoteLog) local() *task.Task {
	if l.f.mgr == nil || l.f.fenced.attempt(l.taskID) == 0 {
		return nil
	}
	if t := l.f.mgr.Registry().Get(l.taskID); t != nil && !t.IsView() {
		return t
	}
	return nil
}

// seen notes a terminal event among evs.
func (l *remoteLog) seen(evs []*dispatchv1.TaskEvent) []*dispatchv1.TaskEvent {
	for _, ev := range evs {
		if s := ev.GetState(); s != nil && task.Terminal(s.GetStatus()) {
			l.endSeq.Store(ev.GetSeq())
		}
	}
	return evs
}

// sleepCtx waits d or until ctx ends (false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

package fleet

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// errView is the answer of a view's log to an append.
var errView = errors.New("fleet: a view of a task another replica runs records nothing")

// tailBlock is how long a watcher's XREAD BLOCK waits before it looks at
// PostgreSQL again (also its poll interval while Redis is down).
const tailBlock = 500 * time.Millisecond

// tailPool bounds the Redis connections a replica's remote watchers hold
// while they wait (one each): past it a watcher waits for the pool up to
// opTimeout, then reads PostgreSQL and tries again (slower, never lost).
const tailPool = 1024

// pingDownAfter is how many health pings in a row (every 500 ms, 500 ms
// each) must fail before the bus counts as down.
const pingDownAfter = 2

// remoteLog is the log of a task run by another replica, for its watchers
// here: events come from the task's Redis stream (the live tail, XREAD
// BLOCK) and from PostgreSQL (history, and any gap: an entry trimmed, lost
// with Redis, or not published). Only durable events are ever in either,
// so a watcher resuming by seq on any replica neither misses nor repeats
// one.
type remoteLog struct {
	f       *Fleet
	taskID  string
	lastSeq uint64
	endSeq  atomic.Uint64 // seq of the terminal event, once read
}

func (l *remoteLog) Append(*dispatchv1.TaskEvent, eventlog.Class) (uint64, error) {
	return 0, errView
}
func (l *remoteLog) Fence(*dispatchv1.TaskEvent) (uint64, error) { return 0, errView }
func (l *remoteLog) Seal(*dispatchv1.TaskEvent) (uint64, error)  { return 0, errView }
func (l *remoteLog) LastSeq() uint64                             { return l.lastSeq }

// Read implements eventlog.Log.
func (l *remoteLog) Read(ctx context.Context, after uint64, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error) {
	limit := cap(dst)
	if limit == 0 {
		limit = 64
	}
	dst = dst[:0]
	for {
		if end := l.endSeq.Load(); end != 0 && after >= end {
			return dst, io.EOF
		}
		// The tail from Redis, without waiting: contiguous entries are
		// served as they are.
		if evs := l.tail(ctx, after, limit, 0); len(evs) > 0 {
			return l.seen(append(dst, evs...)), nil
		}
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
		if evs := l.tail(ctx, after, limit, tailBlock); len(evs) > 0 {
			return l.seen(append(dst, evs...)), nil
		}
		if ctx.Err() != nil {
			return dst, ctx.Err()
		}
	}
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

// tail reads the task's Redis stream after seq after, waiting up to block
// (0: not at all), and returns the entries that continue after without a
// gap. Redis down: nothing, after the wait (so a watcher polls).
func (l *remoteLog) tail(ctx context.Context, after uint64, limit int, block time.Duration) []*dispatchv1.TaskEvent {
	if !l.f.busUp() {
		if block > 0 {
			sleepCtx(ctx, block)
		}
		return nil
	}
	args := &redis.XReadArgs{Streams: []string{eventsPrefix + l.taskID, eventID(after)}, Count: int64(limit), Block: -1}
	if block > 0 {
		args.Block = block
	}
	cctx, cancel := context.WithTimeout(ctx, block+opTimeout)
	defer cancel()
	res, err := l.f.tails.XRead(cctx, args).Result()
	if err != nil {
		if !errors.Is(err, redis.Nil) && ctx.Err() == nil && block > 0 {
			sleepCtx(ctx, block/4)
		}
		return nil
	}
	var out []*dispatchv1.TaskEvent
	next := after + 1
	for _, st := range res {
		for _, m := range st.Messages {
			seq, ok := seqOf(m.ID)
			if !ok || seq != next {
				return out // a gap: PostgreSQL fills it
			}
			raw, _ := m.Values["e"].(string)
			ev := &dispatchv1.TaskEvent{}
			if proto.Unmarshal([]byte(raw), ev) != nil {
				return out
			}
			ev.Seq = seq
			out = append(out, ev)
			next++
		}
	}
	return out
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

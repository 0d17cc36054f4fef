package fleet

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// announcer publishes the command channel's messages of a replica in
// batches: the messages that arrive while one batch is on its way go out
// together next, as one pipeline (one write, one read). A cancel storm (64
// CancelTask at once on one replica) took one PUBLISH round trip per
// cancel through a pool of 20 connections: on a busy machine Redis and
// the replica each waited for a CPU at every one of those rounds, and the
// stops reached their owner in clumps 30-45 ms apart. One message alone
// goes out at once, as before.
//
// There is no goroutine of its own: the caller whose message finds no
// batch on its way sends the batch (its message and those queued since),
// then hands the next batch, if any, to the first caller queued for it.
// Every caller returns once its own message was answered (or failed), as
// a plain Publish did, or once its ctx ended.
type announcer struct {
	rdb     *redis.Client
	channel string
	log     *slog.Logger // nil: failures not logged

	mu      sync.Mutex
	busy    bool // a batch is on its way (its sender has not handed over)
	pending []*announcement
}

// announcement is one message waiting to be published.
type announcement struct {
	payload  []byte
	deadline time.Time     // its caller's (zero: none)
	done     chan struct{} // closed once its batch was answered
	lead     chan struct{} // told to send the next batch (buffered 1)
}

// publish sends payload on the channel, batched with the messages
// published meanwhile; it returns once Redis answered the batch (or the
// batch failed: the command's row and the reconcile make up for a lost
// message), or once ctx ends: a message still queued then is dropped (as
// a Publish under ctx would have been). A batch is bounded by the latest
// deadline of its callers, at most opTimeout: a hung Redis holds no caller
// past its own deadline.
func (a *announcer) publish(ctx context.Context, payload []byte) {
	if ctx.Err() != nil {
		return
	}
	m := &announcement{payload: payload, done: make(chan struct{}), lead: make(chan struct{}, 1)}
	if d, ok := ctx.Deadline(); ok {
		m.deadline = d
	}
	a.mu.Lock()
	a.pending = append(a.pending, m)
	lead := !a.busy
	a.busy = true
	a.mu.Unlock()
	if !lead {
		select {
		case <-m.done:
			return
		case <-m.lead:
		case <-ctx.Done():
			a.mu.Lock()
			select {
			case <-m.lead: // handed the next batch: it sends it (without m)
				a.mu.Unlock()
			default:
				if i := slices.Index(a.pending, m); i >= 0 {
					a.pending = slices.Delete(a.pending, i, i+1)
				}
				// Dropped, or on its way in a batch nobody waits for.
				a.mu.Unlock()
				return
			}
		}
	}
	a.mu.Lock()
	batch := a.pending
	a.pending = nil
	a.mu.Unlock()
	if ctx.Err() != nil {
		batch = slices.DeleteFunc(batch, func(o *announcement) bool { return o == m })
	}
	a.send(batch)
}

// send publishes batch (in order) in one round trip, wakes its callers
// and hands the next batch to the first caller queued for it, even if the
// client panics (a wedged hand-over would hang every later command).
func (a *announcer) send(batch []*announcement) {
	defer func() {
		for _, m := range batch {
			close(m.done)
		}
		a.mu.Lock()
		if len(a.pending) > 0 {
			a.pending[0].lead <- struct{}{}
		} else {
			a.busy = false
		}
		a.mu.Unlock()
	}()
	if len(batch) == 0 {
		return
	}
	end := time.Now().Add(opTimeout)
	var last time.Time
	for _, m := range batch {
		if m.deadline.IsZero() {
			last = end
			break
		}
		if m.deadline.After(last) {
			last = m.deadline
		}
	}
	if last.After(end) {
		last = end
	}
	ctx, cancel := context.WithDeadline(context.Background(), last)
	defer cancel()
	var err error
	if len(batch) == 1 {
		err = a.rdb.Publish(ctx, a.channel, batch[0].payload).Err()
	} else {
		_, err = a.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range batch {
				p.Publish(ctx, a.channel, m.payload)
			}
			return nil
		})
	}
	if err != nil && a.log != nil {
		a.log.Debug("command announcements not published (the reconcile finds their rows)", "batch", len(batch), "err", err)
	}
}

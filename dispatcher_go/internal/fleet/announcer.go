package fleet

import (
	"context"
	"sync"

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
// a plain Publish did.
type announcer struct {
	rdb     *redis.Client
	channel string

	mu      sync.Mutex
	busy    bool // a batch is on its way (its sender has not handed over)
	pending []*announcement
}

// announcement is one message waiting to be published.
type announcement struct {
	payload []byte
	done    chan struct{} // closed once its batch was answered
	lead    chan struct{} // told to send the next batch (buffered 1)
}

// publish sends payload on the channel, batched with the messages
// published meanwhile; it returns once Redis answered the batch (or the
// batch failed: the command's row and the reconcile make up for a lost
// message). Each batch is bounded by opTimeout; a caller whose ctx has
// ended sends nothing (as a Publish under it would have).
func (a *announcer) publish(ctx context.Context, payload []byte) {
	if ctx.Err() != nil {
		return
	}
	m := &announcement{payload: payload, done: make(chan struct{}), lead: make(chan struct{}, 1)}
	a.mu.Lock()
	a.pending = append(a.pending, m)
	lead := !a.busy
	a.busy = true
	a.mu.Unlock()
	if !lead {
		// Never abandoned: the sender may hand the next batch to m.
		select {
		case <-m.done:
			return
		case <-m.lead:
		}
	}
	a.mu.Lock()
	batch := a.pending
	a.pending = nil
	a.mu.Unlock()
	a.send(batch)
	a.mu.Lock()
	if len(a.pending) > 0 {
		a.pending[0].lead <- struct{}{}
	} else {
		a.busy = false
	}
	a.mu.Unlock()
}

// send publishes batch (in order) in one round trip, then wakes its
// callers.
func (a *announcer) send(batch []*announcement) {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	if len(batch) == 1 {
		_ = a.rdb.Publish(ctx, a.channel, batch[0].payload).Err()
	} else {
		_, _ = a.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range batch {
				p.Publish(ctx, a.channel, m.payload)
			}
			return nil
		})
	}
	cancel()
	for _, m := range batch {
		close(m.done)
	}
}

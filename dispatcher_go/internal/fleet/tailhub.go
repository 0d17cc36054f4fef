package fleet

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Bounds of the tail hub.
const (
	// hubKeep is how many of a task's latest events the hub keeps for its
	// watchers here (a watcher further behind reads PostgreSQL).
	hubKeep = 256
	// hubTasks bounds the tasks the hub follows; past it a new watcher
	// polls PostgreSQL every tailBlock instead (slower, never lost).
	hubTasks = 4096
	// hubLinger is how long the hub keeps following a task nobody waits
	// on (its watchers are busy sending what they read).
	hubLinger = 5 * time.Second
	// hubCount bounds the entries one XREAD returns per stream.
	hubCount = 512
	// wakeMaxLen trims the replica's wake stream.
	wakeMaxLen = 16
)

// wakePrefix + a replica id is the replica's wake stream: an entry makes
// its tail hub read again with the tasks watched now.
const wakePrefix = "fleet:wake:"

// tailHub is this replica's one reader of the event streams of the tasks
// other replicas run: one blocking XREAD over every watched task's stream
// (and the replica's wake stream, written when a task is added, so the
// read is issued again with it), whose entries are decoded once and handed
// to every watcher here of that task. Before, each watcher held a Redis
// connection in its own XREAD BLOCK.
//
// It keeps, per task, the latest hubKeep events, contiguous (a gap in the
// stream starts the run again: watchers fill it from PostgreSQL), and a
// channel closed when events arrive. Memory is bounded by hubTasks ×
// hubKeep events; a task nobody waited on for hubLinger is forgotten.
// Redis down or slow: watchers wait tailBlock at most, then read
// PostgreSQL, as before.
type tailHub struct {
	f       *Fleet
	rdb     *redis.Client // its own: the XREAD holds a connection while it blocks
	wakeKey string

	mu    sync.Mutex
	tasks map[string]*hubTask
}

type hubTask struct {
	at     time.Time               // when the last events were delivered (leg stats)
	last   uint64                  // seq of the last entry read (the XREAD position)
	evs    []*dispatchv1.TaskEvent // contiguous, ending at last; at most hubKeep
	notify chan struct{}           // closed when events arrive
	users  int                     // Reads waiting now
	idle   time.Time               // when users last fell to 0
	// ended: the task's terminal event was delivered. Nothing follows it
	// in the stream (a watcher stops there: remoteLog.endSeq), so the
	// hub reads the task no more, and forgets it once nobody waits.
	ended bool
}

func newTailHub(f *Fleet, rdb *redis.Client) *tailHub {
	return &tailHub{f: f, rdb: rdb, wakeKey: wakePrefix + f.id, tasks: map[string]*hubTask{}}
}

// get returns the events after `after` the hub holds for task id (none if
// it holds none of them, or not the next one).
func (h *tailHub) get(id string, after uint64, limit int) []*dispatchv1.TaskEvent {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.getLocked(h.tasks[id], after, limit)
}

func (h *tailHub) getLocked(t *hubTask, after uint64, limit int) []*dispatchv1.TaskEvent {
	if t == nil || len(t.evs) == 0 || after >= t.last {
		return nil
	}
	first := t.evs[0].GetSeq()
	if after+1 < first {
		return nil // fallen behind what the hub keeps: PostgreSQL
	}
	i := int(after + 1 - first)
	j := min(len(t.evs), i+limit)
	return append([]*dispatchv1.TaskEvent(nil), t.evs[i:j]...)
}

// wait registers a Read of task id waiting for events after `after`: the
// events the hub holds after it (then no wait), or a channel closed when
// new ones arrive (nil: the hub is full; poll). done must be called once
// the wait is over.
func (h *tailHub) wait(id string, after uint64, limit int) (evs []*dispatchv1.TaskEvent, ch <-chan struct{}, done func()) {
	h.mu.Lock()
	t := h.tasks[id]
	added := false
	if t == nil {
		if len(h.tasks) >= hubTasks {
			h.mu.Unlock()
			return nil, nil, func() {}
		}
		t = &hubTask{last: after, notify: make(chan struct{})}
		h.tasks[id] = t
		added = true
	}
	if evs := h.getLocked(t, after, limit); len(evs) > 0 {
		h.mu.Unlock()
		return evs, nil, func() {}
	}
	if after > t.last {
		// The watcher is past what the hub read (it read PostgreSQL):
		// read on from there.
		t.last, t.evs = after, t.evs[:0]
	}
	t.users++
	ch = t.notify
	h.mu.Unlock()
	if added {
		h.wake()
	}
	return nil, ch, func() {
		h.mu.Lock()
		if t.users--; t.users == 0 {
			t.idle = time.Now()
		}
		h.mu.Unlock()
	}
}

// release forgets task id unless a Read waits on it now: the task runs on
// this replica now, and its watchers here read its own log (remoteLog).
// Kept, the hub would read and decode every event this replica itself
// publishes for the task's whole life (shorter than hubLinger for most).
func (h *tailHub) release(id string) {
	h.mu.Lock()
	if t := h.tasks[id]; t != nil && t.users == 0 {
		delete(h.tasks, id)
	}
	h.mu.Unlock()
}

// wake makes the hub's blocked XREAD return, so it reads again with the
// tasks watched now.
func (h *tailHub) wake() {
	if !h.f.busUp() {
		return
	}
	ctx, cancel := context.WithTimeout(h.f.ctx, opTimeout)
	defer cancel()
	if err := h.f.rdb.XAdd(ctx, &redis.XAddArgs{Stream: h.wakeKey, MaxLen: wakeMaxLen, Approx: true, Values: []any{"w", "1"}}).Err(); err != nil {
		h.f.log.Debug("tail hub wake-up not written; it reads again within its block time", "error", err)
	}
}

// snapshot is the XREAD streams and ids for the tasks followed now; tasks
// nobody waited on for hubLinger are forgotten, and ended tasks are not
// read (forgotten at once when nobody waits). Before, an ended task was
// read for hubLinger after its last watcher left: at 64 sessions cancelled
// every 1–3 s (the fleet bench), ~160 ended streams beside ~64 live ones
// in every XREAD, each issued again after every delivery.
func (h *tailHub) snapshot(wakeID string) []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	now := time.Now()
	keys := make([]string, 0, 2*len(h.tasks)+2)
	keys = append(keys, h.wakeKey)
	ids := make([]string, 0, len(h.tasks)+1)
	ids = append(ids, wakeID)
	for id, t := range h.tasks {
		if t.users == 0 && (t.ended || now.Sub(t.idle) > hubLinger) {
			delete(h.tasks, id)
			continue
		}
		if t.ended {
			continue
		}
		keys = append(keys, eventsPrefix+id)
		ids = append(ids, eventID(t.last))
	}
	return append(keys, ids...)
}

// deliver adds the entries read for task id and wakes its waiters.
func (h *tailHub) deliver(id string, msgs []redis.XMessage, read time.Time) {
	evs := make([]*dispatchv1.TaskEvent, 0, len(msgs))
	var seqs []uint64
	for _, m := range msgs {
		seq, ok := seqOf(m.ID)
		if !ok {
			continue
		}
		var sent time.Time
		if h.f.legs != nil {
			if us, err := strconv.ParseInt(fmt.Sprint(m.Values["t"]), 10, 64); err == nil {
				sent = time.UnixMicro(us)
				h.f.legs.addID(legXread, id+":"+strconv.FormatUint(seq, 10), read.Sub(sent))
			}
		}
		raw, _ := m.Values["e"].(string)
		ev := &dispatchv1.TaskEvent{}
		if proto.Unmarshal([]byte(raw), ev) != nil {
			continue // PostgreSQL has it: a watcher finds the gap there
		}
		ev.Seq = seq
		if h.f.legs != nil && ev.GetTime() != nil {
			h.f.legs.addID(legHub, id+":"+strconv.FormatUint(seq, 10), time.Since(ev.GetTime().AsTime()))
			if !sent.IsZero() {
				h.f.legs.addID(legToXadd, id+":"+strconv.FormatUint(seq, 10), sent.Sub(ev.GetTime().AsTime()))
			}
		}
		evs = append(evs, ev)
		seqs = append(seqs, seq)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.tasks[id]
	if t == nil {
		return
	}
	for i, ev := range evs {
		seq := seqs[i]
		if seq <= t.last {
			continue
		}
		if seq != t.last+1 {
			t.evs = t.evs[:0] // a gap (trimmed, lost, not published): a new run
		}
		if len(t.evs) == hubKeep {
			t.evs = append(t.evs[:0], t.evs[hubKeep/2:]...)
		}
		t.evs = append(t.evs, ev)
		t.last = seq
		if st := ev.GetState(); st != nil && task.Terminal(st.GetStatus()) {
			t.ended = true
		}
	}
	t.at = time.Now()
	close(t.notify)
	t.notify = make(chan struct{})
}

// since is how long ago the hub last delivered events of task id (leg
// stats; 0 when it holds none).
func (h *tailHub) since(id string) time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if t := h.tasks[id]; t != nil && !t.at.IsZero() {
		return time.Since(t.at)
	}
	return 0
}

// run is the hub's reader loop.
func (h *tailHub) run(ctx context.Context) {
	wakeID := ""
	for ctx.Err() == nil {
		if !h.f.busUp() {
			sleepCtx(ctx, 250*time.Millisecond)
			continue
		}
		if wakeID == "" {
			// The wake stream's position: an entry of our own, so no
			// wake-up written after it is missed.
			cctx, cancel := context.WithTimeout(ctx, opTimeout)
			id, err := h.rdb.XAdd(cctx, &redis.XAddArgs{Stream: h.wakeKey, MaxLen: wakeMaxLen, Approx: true, Values: []any{"w", "0"}}).Result()
			cancel()
			if err != nil {
				sleepCtx(ctx, 250*time.Millisecond)
				continue
			}
			wakeID = id
		}
		streams := h.snapshot(wakeID)
		cctx, cancel := context.WithTimeout(ctx, tailBlock+opTimeout)
		res, err := h.rdb.XRead(cctx, &redis.XReadArgs{Streams: streams, Count: hubCount, Block: tailBlock}).Result()
		cancel()
		read := time.Now()
		switch {
		case errors.Is(err, redis.Nil):
			continue
		case err != nil:
			if ctx.Err() == nil {
				h.f.log.Debug("tail hub read failed", "error", err)
				wakeID = "" // Redis may have lost the wake stream
				sleepCtx(ctx, 100*time.Millisecond)
			}
			continue
		}
		for _, st := range res {
			if st.Stream == h.wakeKey {
				if n := len(st.Messages); n > 0 {
					wakeID = st.Messages[n-1].ID
				}
				continue
			}
			if id, ok := strings.CutPrefix(st.Stream, eventsPrefix); ok && len(st.Messages) > 0 {
				h.deliver(id, st.Messages, read)
			}
		}
	}
}

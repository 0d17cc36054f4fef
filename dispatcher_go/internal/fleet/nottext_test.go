package fleet

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Ids PostgreSQL cannot hold as text (a NUL byte, invalid UTF-8): every
// query naming one fails with SQLSTATE 22021.
var notTextIDs = []string{"a\x00b", "\xff\xfe"}

// A client naming such a task (GET /api/tasks/a%00b, a gRPC task_id with a
// NUL) was answered UNAVAILABLE "the fleet's database did not answer", and
// retried for good: no task has that id, NOT_FOUND.
func TestNonTextTaskIDIsNotFound(t *testing.T) {
	pg := openStore(t)
	r := startReplica(t, pg, redisURL(t), "nt", &testSlot{finish: true})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, id := range notTextIDs {
		if _, err := r.f.Lookup(ctx, id); !errors.Is(err, task.ErrNotFound) {
			t.Errorf("Lookup(%q): %v, want task.ErrNotFound", id, err)
		}
		if _, err := r.mgr.CancelAs(ctx, tenant.Caller{Admin: true}, id, "x", false); !errors.Is(err, task.ErrNotFound) {
			t.Errorf("Cancel(%q): %v, want task.ErrNotFound", id, err)
		}
	}
}

// A bus entry naming such a task is poison: acknowledged once, never
// claimed again. Its claim used to fail like a PostgreSQL outage, so the
// entry stayed pending and was reclaimed every --fleet-reclaim-idle forever.
func TestBusEntryWithANonTextTaskIDIsPoison(t *testing.T) {
	pg := openStore(t)
	url := redisURL(t)
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	rdb := redis.NewClient(opt)
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q := queueName("chat", nil)
	stream := queuePrefix + q
	if err := ensureGroup(ctx, rdb, stream); err != nil {
		t.Fatal(err)
	}
	var last string
	for _, id := range notTextIDs {
		last, err = rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, Values: []any{"task", id}}).Result()
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := rdb.SAdd(ctx, queuesKey, q).Err(); err != nil {
		t.Fatal(err)
	}
	startReplica(t, pg, url, "nt", &testSlot{finish: true})
	delivered := func() bool {
		gs, err := rdb.XInfoGroups(ctx, stream).Result()
		return err == nil && len(gs) == 1 && gs[0].LastDeliveredID == last
	}
	pending := func() int64 {
		p, err := rdb.XPending(ctx, stream, group).Result()
		if err != nil {
			t.Fatal(err)
		}
		return p.Count
	}
	waitFor(t, "the entries to be read", 10*time.Second, delivered)
	// Past the reclaim idle time (1 s here): a failed claim leaves its
	// entry pending, an acknowledged one is gone for good.
	time.Sleep(2500 * time.Millisecond)
	if n := pending(); n != 0 {
		t.Fatalf("%d entries still pending: a poison entry is acknowledged, never reclaimed", n)
	}
}

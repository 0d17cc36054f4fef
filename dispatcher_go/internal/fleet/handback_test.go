package fleet

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// The hand-back of a task to the fleet's queue (giveBack, the requeue of a
// dead replica's unstarted task) and the bus's claim: no task may stay
// PENDING or RUNNING for good, run twice, or run after a client's cancel.

// endsWith waits for task id to end (stored) and checks its status and
// how often live's slot started it.
func endsWith(t *testing.T, live *replica, id string, want agentpb.TaskStatus, starts int32, d time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, msg := storedStatus(t, live, id)
		if task.Terminal(st) {
			if st != want || live.slot.started.Load() != starts {
				t.Fatalf("ended %s %q, started %d times on the live replica; want %s, %d starts", st, msg, live.slot.started.Load(), want, starts)
			}
			return msg
		}
		if time.Now().After(deadline) {
			t.Fatalf("task still %s %q after %s (started %d times on the live replica); want %s", st, msg, d, live.slot.started.Load(), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// startBystander starts a replica whose slot serves another planner and
// that never sweeps (it is marked draining: no takeover, no pull), so that
// the takeover under test is the hooked replica's; it still sends cancels
// and takes sessions over.
func startBystander(t *testing.T, pg *postgres.Store, url, id string) *replica {
	t.Helper()
	r := startReplica(t, pg, url, id, &testSlot{planner: "other"})
	r.f.draining.Store(true)
	return r
}

// A takeover that claimed an expired lease and then cannot read the task
// (PostgreSQL answers with an error: here the tasks table is renamed away
// for a second) does not release the lease — a released lease is never
// swept again, and the task stayed RUNNING for good — but leaves it to
// expire: the next sweep takes the task over.
func TestTakeOverThatCannotReadTheTaskLeavesTheLeaseToExpire(t *testing.T) {
	pg := openStore(t)
	url := redisURL(t)
	id := deadReplicaTask(t, pg, url, true)
	var renamed atomic.Bool
	back := make(chan error, 1)
	hooks := requeueHooks{claimed: func(tid string) {
		if tid != id || renamed.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := pg.Pool().Exec(ctx, `ALTER TABLE tasks RENAME TO tasks_away`); err != nil {
			t.Error(err)
			back <- err
			return
		}
		time.AfterFunc(time.Second, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := pg.Pool().Exec(ctx, `ALTER TABLE tasks_away RENAME TO tasks`)
			back <- err
		})
	}}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	select {
	case err := <-back:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the hook did not run")
	}
	msg := endsWith(t, live, id, agentpb.TaskStatus_FAILURE, 0, 30*time.Second)
	if !renamed.Load() || !strings.Contains(msg, "stopped renewing the task's lease") {
		t.Fatalf("renamed %v, message %q; want the takeover's FAILURE after the rename", renamed.Load(), msg)
	}
}

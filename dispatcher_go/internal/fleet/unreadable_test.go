package fleet

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// A dead replica's RUNNING task whose stored record cannot be read (its
// body does not decode: every takeover fails to load it) ends FAILURE,
// saying so, after DefaultMaxReadFailures takeovers, and is claimed no
// more. (Each takeover left the lease to expire and the next sweep tried
// again: claimed every lease + grace with a warning, RUNNING for good.)
func TestUnreadableTaskEndsFailureAfterTheMaxReadFailures(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id, ctx := d.pg, d.url, d.id, d.ctx
	d.exec(t, `UPDATE tasks SET body = convert_to('{"instruction": 5, "sealedConfig": "c2VhbGVk", "stop": {"reason": "r"}}', 'UTF8') WHERE id = '%[1]s'`)
	live := startReplica(t, pg, url, "live", &testSlot{finish: true})
	var status agentpb.TaskStatus
	waitFor(t, "the unreadable task to end", 45*time.Second, func() bool {
		st, err := live.f.leases.Status(ctx, id)
		status = st
		return err == nil && st != agentpb.TaskStatus_RUNNING
	})
	if status != agentpb.TaskStatus_FAILURE {
		t.Fatalf("ended %s, want FAILURE", status)
	}
	ls, _, err := live.f.leases.Lease(ctx, id)
	if err != nil || !ls.Released {
		t.Fatalf("lease %+v (%v), want released", ls, err)
	}
	var failures int
	if err := pg.Pool().QueryRow(ctx, `SELECT read_failures FROM fleet_leases WHERE task_id = $1`, id).Scan(&failures); err != nil || failures != DefaultMaxReadFailures {
		t.Fatalf("%d read failures (%v), want %d", failures, err, DefaultMaxReadFailures)
	}
	rows, err := pg.ReadEvents(ctx, id, 0, 1000)
	if err != nil || len(rows) == 0 {
		t.Fatalf("events %d (%v)", len(rows), err)
	}
	last := &dispatchv1.TaskEvent{}
	if err := proto.Unmarshal(rows[len(rows)-1].Data, last); err != nil {
		t.Fatal(err)
	}
	st := last.GetState()
	if st.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(st.GetMessage(), UnreadableMessage) ||
		last.GetSeq() != uint64(len(rows)) || rows[len(rows)-1].Seq != last.GetSeq() {
		t.Fatalf("last event seq %d (row %d of %d): %s %q; want FAILURE %q…", last.GetSeq(), rows[len(rows)-1].Seq, len(rows), st.GetStatus(), st.GetMessage(), UnreadableMessage)
	}
	var msg string
	var sealed, stop bool
	if err := pg.Pool().QueryRow(ctx, `SELECT b ->> 'message', b ? 'sealedConfig', b ? 'stop' FROM (SELECT convert_from(body, 'UTF8')::jsonb AS b FROM tasks WHERE id = $1) s`, id).
		Scan(&msg, &sealed, &stop); err != nil || msg != st.GetMessage() {
		t.Fatalf("stored message %q (%v), want the event's", msg, err)
	}
	if sealed || stop {
		t.Fatalf("the ended record keeps its sealed config (%v) or its stop (%v)", sealed, stop)
	}
	t.Logf("%s", msg)
	// Claimed no more: the lease stays released, the task FAILURE.
	time.Sleep(3 * (testLease + testGrace))
	if ls, _, err := live.f.leases.Lease(ctx, id); err != nil || !ls.Released || live.slot.started.Load() != 0 {
		t.Fatalf("lease %+v (%v), started %d times; want released, never started", ls, err, live.slot.started.Load())
	}
}

// A readable task whose adoptions from the bus fail for a while for a
// reason that says nothing of the task (here a connection reset, more
// times in a row than --fleet-max-read-failures) runs once they pass, and
// its count of failed reads (here 4 left from earlier failures) is reset
// by the read that succeeds. (Every failure was counted: the task ended
// FAILURE "could not be read" after 5 adoptions within milliseconds.)
func TestTransientReadFailuresDoNotEndAReadableTask(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var id atomic.Pointer[string]
	var calls atomic.Int32
	const failing = DefaultMaxReadFailures + 3
	hooks := requeueHooks{
		adopt: func(tid string) error {
			// The test's one task (the first adopted).
			if id.CompareAndSwap(nil, &tid); *id.Load() != tid {
				return nil
			}
			n := calls.Add(1)
			if n == 1 {
				// Failures left from earlier claims, fewer than the max.
				if _, err := pg.Pool().Exec(ctx, `UPDATE fleet_leases SET read_failures = $2 WHERE task_id = $1`, tid, DefaultMaxReadFailures-1); err != nil {
					t.Error(err)
				}
			}
			if n <= failing {
				return fmt.Errorf("store read failed: %w", &pgconn.PgError{Code: "08006", Message: "connection reset by peer"})
			}
			return nil
		},
	}
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	tk, err := live.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	tid := tk.ID()
	if msg := endsWith(t, live, tid, agentpb.TaskStatus_SUCCESS, 1, 30*time.Second); msg != "done" {
		t.Fatalf("message %q", msg)
	}
	if n := calls.Load(); n <= failing {
		t.Fatalf("%d adoptions, want more than the %d failed", n, failing)
	}
	var failures int
	if err := pg.Pool().QueryRow(ctx, `SELECT read_failures FROM fleet_leases WHERE task_id = $1`, tid).Scan(&failures); err != nil || failures != 0 {
		t.Fatalf("%d read failures counted (%v), want 0 after the read that succeeded", failures, err)
	}
}

// A PENDING task whose stored body does not decode, queued with a cancel
// asked for it (a cancel that came while it was handed back), ends
// CANCELLED with the cancel's reason when a replica claims it from the
// bus, without reading it, and its cancel is closed. (The claim's
// adoption failed and handed it back with its cancel, claimed again at
// once: PENDING for good, claimed at the bus's speed.)
func TestUnreadableQueuedTaskWithACancelEndsCancelled(t *testing.T) {
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	id := task.NewID()
	putTask(t, pg, id, agentpb.TaskStatus_PENDING)
	if _, err := pg.Pool().Exec(ctx, `UPDATE tasks SET body = convert_to('{"instruction": 5, "planner": "chat"}', 'UTF8') WHERE id = $1`, id); err != nil {
		t.Fatal(err)
	}
	if _, err := leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: "stopped by the test"}); err != nil {
		t.Fatal(err)
	}
	if err := leases.Enqueue(ctx, id, queueName("chat", nil)); err != nil {
		t.Fatal(err)
	}
	var adoptions atomic.Int32
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, requeueHooks{
		adopt: func(tid string) error {
			if tid == id {
				adoptions.Add(1)
			}
			return nil
		},
	})
	var status agentpb.TaskStatus
	waitFor(t, "the unreadable task to end", 20*time.Second, func() bool {
		st, err := leases.Status(ctx, id)
		status = st
		return err == nil && task.Terminal(st)
	})
	var msg string
	if err := pg.Pool().QueryRow(ctx, `SELECT convert_from(body, 'UTF8')::jsonb ->> 'message' FROM tasks WHERE id = $1`, id).Scan(&msg); err != nil {
		t.Fatal(err)
	}
	if status != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" || live.slot.started.Load() != 0 {
		t.Fatalf("ended %s %q, started %d times; want CANCELLED with the cancel's reason, never started", status, msg, live.slot.started.Load())
	}
	if n := adoptions.Load(); n != 1 {
		t.Fatalf("%d adoptions, want 1", n)
	}
	waitFor(t, "the cancel's row to be closed", 10*time.Second, func() bool {
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE task_id = $1 AND NOT done`, id).Scan(&n)
		return err == nil && n == 0
	})
	if ls, _, err := leases.Lease(ctx, id); err != nil || !ls.Released {
		t.Fatalf("lease %+v (%v), want released", ls, err)
	}
}

package fleet

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// stormSize is how many cancels the storm tests send at once (the fleet
// benchmark's storm: every slot of a 64-slot commander).
const stormSize = 64

// holdFirstPublish is a go-redis hook that holds the first PUBLISH sent
// alone until release is closed (held is closed once it is held), and
// counts the commands of every pipeline.
type holdFirstPublish struct {
	held, release chan struct{}
	once          sync.Once
	pipelines     atomic.Int32
	piped         atomic.Int32
}

func (h *holdFirstPublish) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *holdFirstPublish) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "publish" {
			h.once.Do(func() {
				close(h.held)
				<-h.release
			})
		}
		return next(ctx, cmd)
	}
}
func (h *holdFirstPublish) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if cmds[0].Name() == "publish" { // not a new connection's HELLO
			h.pipelines.Add(1)
			h.piped.Add(int32(len(cmds)))
		}
		return next(ctx, cmds)
	}
}

// The announcements made while one is on its way go out together, as one
// pipeline, in the order they were made, and each caller returns once its
// own was answered. (A storm of 64 cancels on one replica took 64 PUBLISH
// round trips through a pool of 20 connections: the stops reached their
// owner in clumps 30-45 ms apart on a busy machine.)
func TestAnnouncementsMadeMeanwhileGoOutAsOnePipeline(t *testing.T) {
	url := redisURL(t)
	rdb, err := newRedis(url, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sub := rdb.Subscribe(ctx, "storm-test")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil { // subscribed
		t.Fatal(err)
	}
	h := &holdFirstPublish{held: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(h)
	a := &announcer{rdb: rdb, channel: "storm-test"}

	var wg sync.WaitGroup
	var returned atomic.Int32
	wg.Go(func() {
		a.publish(ctx, []byte("0"))
		returned.Add(1)
	})
	<-h.held // the first is on its way (alone), held in the hook
	for i := 1; i < stormSize; i++ {
		wg.Go(func() {
			a.publish(ctx, fmt.Appendf(nil, "%d", i))
			returned.Add(1)
		})
	}
	waitFor(t, "every announcement to be queued", 10*time.Second, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.pending) == stormSize-1
	})
	want := []string{"0"} // the order they were queued in
	a.mu.Lock()
	for _, m := range a.pending {
		want = append(want, string(m.payload))
	}
	a.mu.Unlock()
	if n := returned.Load(); n != 0 {
		t.Fatalf("%d callers returned before their announcement went out", n)
	}
	close(h.release)
	wg.Wait()
	if p, n := h.pipelines.Load(), h.piped.Load(); p != 1 || n != stormSize-1 {
		t.Fatalf("%d pipelines of %d commands in all; want 1 of %d", p, n, stormSize-1)
	}
	for i, w := range want {
		m, err := sub.ReceiveMessage(ctx)
		if err != nil {
			t.Fatalf("received %d of %d: %v", i, stormSize, err)
		}
		if m.Payload != w {
			t.Fatalf("message %d is %q; want %q (the order they were made in)", i, m.Payload, w)
		}
	}
	a.mu.Lock()
	busy := a.busy
	a.mu.Unlock()
	if busy {
		t.Fatal("the announcer is still busy with nothing to send")
	}
	// Nothing on its way: the next goes out alone, at once.
	a.publish(ctx, []byte("last"))
	if m, err := sub.ReceiveMessage(ctx); err != nil || m.Payload != "last" {
		t.Fatalf("after the storm: %v %v", m, err)
	}
}

// stormOnOwner starts replica "owner" with stormSize slots whose commander
// acknowledges a stop at once, and a bystander "sender" (set runs on its
// Fleet before it starts); it submits stormSize tasks to the owner and
// waits until all run there.
func stormOnOwner(t *testing.T, set func(*Fleet)) (context.Context, *replica, *replica, []string) {
	t.Helper()
	pg, url := openStore(t), redisURL(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	t.Cleanup(cancel)
	owner := startReplicaWith(t, pg, url, "owner", &testSlot{upstream: true, stops: true}, func(*Fleet) {})
	slots := []*testSlot{owner.slot}
	for len(slots) < stormSize {
		s := &testSlot{upstream: true, stops: true}
		owner.sched.AddSlot(s)
		slots = append(slots, s)
	}
	sender := startReplicaWith(t, pg, url, "sender", &testSlot{planner: "other"}, set)
	sender.f.draining.Store(true) // a bystander (startBystander)
	ids := make([]string, stormSize)
	for i := range ids {
		tk, err := owner.mgr.Submit(task.Spec{Instruction: fmt.Sprintf("storm %d", i), Planner: "chat"})
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = tk.ID()
	}
	waitFor(t, "every task to run on the owner", 30*time.Second, func() bool {
		for _, id := range ids {
			lt := owner.mgr.Registry().Get(id)
			if lt == nil || lt.Status() != agentpb.TaskStatus_RUNNING {
				return false
			}
		}
		return true
	})
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	return ctx, owner, sender, ids
}

// cancelAll cancels every task of ids at once from sender (the fleet's
// Cancel, as CancelTask there, waiting for the end with wait) and fails
// the test unless each cancel is taken ("cancelled", or "stop sent" when
// the end took longer than the wait: the stored ends are checked after).
func cancelAll(t *testing.T, ctx context.Context, sender *replica, ids []string, wait bool) {
	t.Helper()
	outs := make([]task.CancelOutcome, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() { outs[i], errs[i] = sender.f.Cancel(ctx, nil, id, "storm", wait) })
	}
	wg.Wait()
	ended := 0
	for i := range ids {
		if errs[i] != nil || !outs[i].Cancelled {
			t.Errorf("cancel %d: %+v %v; want it taken", i, outs[i], errs[i])
		}
		if outs[i].Status == agentpb.TaskStatus_CANCELLED {
			ended++
		}
	}
	t.Logf("%d of %d cancels answered with the task's end", ended, len(ids))
}

// wantStormStored waits until every task of ids is stored CANCELLED with
// the storm's reason and its cancel row is closed with a result.
func wantStormStored(t *testing.T, ctx context.Context, owner *replica, ids []string) {
	t.Helper()
	waitFor(t, "every task's end to be stored", 20*time.Second, func() bool {
		for _, id := range ids {
			if st, _ := storedStatus(t, owner, id); !task.Terminal(st) {
				return false
			}
		}
		return true
	})
	for i, id := range ids {
		if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_CANCELLED || msg != "storm" {
			t.Errorf("task %d ended %s %q; want CANCELLED \"storm\"", i, st, msg)
		}
	}
	// A cancel whose stop landed before its replica read the task (the
	// announcement comes first) is answered from the stored end, without a
	// row: at most one row per task, each closed with a result once the end
	// is stored.
	pool := owner.f.pg.Pool()
	var rows, tasks, open, closed int
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT task_id), count(*) FILTER (WHERE NOT done),
			count(*) FILTER (WHERE done AND result IS NOT NULL)
			FROM fleet_commands WHERE kind = 'cancel' AND task_id = ANY($1)`, ids).Scan(&rows, &tasks, &open, &closed)
		if err == nil && open == 0 && closed == rows && rows == tasks {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("cancel rows: %d for %d tasks, %d open, %d closed with a result (%v); want at most one per task, all closed",
				rows, tasks, open, closed, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("%d cancels needed a row", rows)
}

// A storm: every task of a replica cancelled at once from another
// replica. Every cancel lands: each task ends CANCELLED with the cancel's
// reason, each CancelTask is answered "cancelled", and the cancels' rows
// are closed once the ends are stored.
func TestCancelStormFromAnotherReplicaEndsEveryTaskCancelled(t *testing.T) {
	ctx, owner, sender, ids := stormOnOwner(t, func(*Fleet) {})
	began := time.Now()
	cancelAll(t, ctx, sender, ids, true)
	t.Logf("%d cancels answered in %s", len(ids), time.Since(began))
	wantStormStored(t, ctx, owner, ids)
}

// The owner books the cancels announced meanwhile together (one
// statement, cmdBookLoop): each row gets its own result, and the rows
// stay open (closed only once the task's end is stored).
func TestCancelsQueuedForBookingGetTheirOwnResults(t *testing.T) {
	pg := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	book := make(chan cmdMessage, cmdBookQueue)
	ids := make([]int64, stormSize)
	for i := range ids {
		if ids[i], err = leases.AddCommand(ctx, fmt.Sprintf("book-%d", i), "cancel", cmdArgs{Reason: "storm"}); err != nil {
			t.Fatal(err)
		}
		book <- cmdMessage{ID: ids[i], TaskID: fmt.Sprintf("book-%d", i), Kind: "cancel",
			Result: &cmdResult{Err: fmt.Sprintf("result %d", i), ErrKind: "not_running"}}
	}
	f := &Fleet{leases: leases, fenced: &fencedStore{owned: map[string]int64{}}}
	lctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { f.cmdBookLoop(lctx, book) })
	defer func() { stop(); wg.Wait() }()
	waitFor(t, "every cancel to be booked", 10*time.Second, func() bool {
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE id = ANY($1) AND result IS NOT NULL`, ids).Scan(&n)
		return err == nil && n == len(ids)
	})
	for i, id := range ids {
		r, ok, err := leases.Result(ctx, id)
		if err != nil || !ok || r.Err != fmt.Sprintf("result %d", i) || r.ErrKind != "not_running" {
			t.Fatalf("row %d: %+v %v %v; want its own result", i, r, ok, err)
		}
	}
	var open int
	if err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM fleet_commands WHERE id = ANY($1) AND NOT done`, ids).Scan(&open); err != nil || open != len(ids) {
		t.Fatalf("%d of %d rows open (%v): a cancel's row stays open until its task's end is stored", open, len(ids), err)
	}
}

// The same storm with every announcement lost (the sender publishes on a
// channel nobody reads): the owner's reconcile finds the cancels' rows and
// carries every one out.
func TestCancelStormWithItsAnnouncementsLostLandsByTheReconcile(t *testing.T) {
	ctx, owner, sender, ids := stormOnOwner(t, func(f *Fleet) { f.ann.channel = "fleet:lost" })
	cancelAll(t, ctx, sender, ids, false)
	wantStormStored(t, ctx, owner, ids)
}

// A storm of cancels with a 300 ms deadline while Redis takes PUBLISH and
// never answers: each CancelTask returns near its deadline (the
// announcements' batch ran under context.Background()+opTimeout and held
// the cancels 2 s). The announcement takes the whole deadline then, as a
// Publish under the caller's ctx did before batching.
func TestCancelStormWithRedisHungReturnsByTheCallersDeadline(t *testing.T) {
	ctx, _, sender, ids := stormOnOwner(t, func(f *Fleet) { f.rdb.AddHook(&hangPublish{}) })
	const deadline = 300 * time.Millisecond
	took := make([]time.Duration, len(ids))
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, deadline)
			defer cancel()
			began := time.Now()
			_, errs[i] = sender.f.Cancel(cctx, nil, id, "storm", false)
			took[i] = time.Since(began)
		})
	}
	wg.Wait()
	worst := slices.Max(took)
	failed := 0
	for _, err := range errs {
		if err != nil {
			failed++
		}
	}
	t.Logf("slowest cancel answered after %v; %d of %d failed (their deadline)", worst, failed, len(ids))
	if worst > deadline+700*time.Millisecond {
		t.Fatalf("a cancel with a %v deadline answered after %v", deadline, worst)
	}
}

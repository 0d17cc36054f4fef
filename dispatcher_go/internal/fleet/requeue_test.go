package fleet

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// redisURL is the Redis of the tests that run whole replicas
// (REDIS_TEST_URL, set by `make test-fleet`), emptied first: the bus's
// keys are global.
func redisURL(t *testing.T) string {
	u := os.Getenv("REDIS_TEST_URL")
	if u == "" {
		t.Skip("REDIS_TEST_URL is not set: `make test-fleet` starts a server")
	}
	opt, err := redis.ParseURL(u)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	defer c.Close()
	if err := c.FlushDB(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

// testRunner is a session as far as a task goes.
type testRunner struct{}

func (testRunner) Stop(string, dispatchv1.StopCode) bool { return true }
func (testRunner) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, task.ErrNotRunning
}

// testSlot is a commander slot of the "chat" planner. It starts each task
// it is given (RUNNING is recorded: the start is "sent"); then, with
// finish, records one upstream packet (seq 1) and ends it SUCCESS; with
// upstream alone, records the packet and leaves it running; else leaves it
// running with nothing recorded (its commander never got the start).
//
// planner is the planner it serves ("" is "chat").
type testSlot struct {
	finish, upstream bool
	// stops: its sessions' commander acknowledges a stop at once
	// (stopRunner).
	stops bool
	// fences: its sessions record a stop (Task.Fence: the stop stored
	// with the task) and their commander never acknowledges it.
	fences  bool
	planner string
	started atomic.Int32
}

// stopRunner is a session whose commander acknowledges a stop at once: the
// task ends with the stop's reason, CANCELLED for a client's cancel (as the
// session's stopStatus), else FAILURE.
type stopRunner struct{ t *task.Task }

func (r stopRunner) Stop(reason string, code dispatchv1.StopCode) bool {
	st := agentpb.TaskStatus_FAILURE
	if code == dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		st = agentpb.TaskStatus_CANCELLED
	}
	return r.t.Finish(st, reason, "")
}

// fenceRunner is a session that records a stop (as the session's runner
// does before it sends it) whose commander never acknowledges it.
type fenceRunner struct{ t *task.Task }

func (r fenceRunner) Stop(reason string, code dispatchv1.StopCode) bool {
	_, _ = r.t.Fence(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{Reason: reason, Code: code}}})
	return true
}

func (fenceRunner) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, task.ErrNotRunning
}

func (stopRunner) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, task.ErrNotRunning
}

func (s *testSlot) plannerName() string {
	if s.planner == "" {
		return "chat"
	}
	return s.planner
}

func (s *testSlot) HasCapability(c string) bool {
	return c == scheduler.PlannerCapability(s.plannerName())
}
func (s *testSlot) PlannerCapabilities() []string {
	return []string{scheduler.PlannerCapability(s.plannerName())}
}
func (s *testSlot) ServesTenant(string) bool { return true }
func (s *testSlot) Deliver(t *task.Task) scheduler.Delivery {
	var r task.Runner = testRunner{}
	if s.stops {
		r = stopRunner{t: t}
	}
	if s.fences {
		r = fenceRunner{t: t}
	}
	if err := t.Start(r, "commander", fmt.Sprintf("session-%d", s.started.Add(1))); err != nil {
		return scheduler.TaskGone
	}
	if s.finish || s.upstream {
		ev := &dispatchv1.TaskEvent{UpstreamSeq: 1, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "hello"}}}
		if _, err := t.Record(ev, eventlog.Fenceable); err != nil {
			panic(err)
		}
	}
	if s.finish {
		t.Finish(agentpb.TaskStatus_SUCCESS, "done", "ok")
	}
	return scheduler.Started
}

// replica is one dispatcher replica in this process: its fleet, task
// manager, scheduler (with slot) and store writer.
type replica struct {
	f     *Fleet
	mgr   *task.Manager
	ts    *taskstore.Store
	w     *store.Writer
	sched *scheduler.Scheduler
	slot  *testSlot
	down  atomic.Bool
}

// lease and grace of the replicas here: short, so a dead one's tasks are
// taken over within about two seconds.
const (
	testLease = 900 * time.Millisecond
	testGrace = 300 * time.Millisecond
)

func startReplica(t *testing.T, pg *postgres.Store, url, id string, slot *testSlot) *replica {
	t.Helper()
	return startReplicaHooked(t, pg, url, id, slot, requeueHooks{})
}

func startReplicaHooked(t *testing.T, pg *postgres.Store, url, id string, slot *testSlot, hooks requeueHooks) *replica {
	t.Helper()
	return startReplicaWith(t, pg, url, id, slot, func(f *Fleet) { f.hooks = hooks })
}

// startReplicaWith is startReplica with set called on the fleet before it
// starts (hooks, the reconcile's period).
func startReplicaWith(t *testing.T, pg *postgres.Store, url, id string, slot *testSlot, set func(*Fleet)) *replica {
	t.Helper()
	return startReplicaLeased(t, pg, url, id, slot, testLease, testGrace, set)
}

// startReplicaLeased is startReplicaWith with the lease and grace given.
func startReplicaLeased(t *testing.T, pg *postgres.Store, url, id string, slot *testSlot, lease, grace time.Duration, set func(*Fleet)) *replica {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	f, err := New(ctx, pg, Options{RedisURL: url, ReplicaID: id, Lease: lease, Grace: grace,
		ReclaimIdle: time.Second, RequeueAfter: time.Second, StopGrace: 200 * time.Millisecond, Logger: testLogger(id)})
	if err != nil {
		t.Fatal(err)
	}
	set(f)
	w := store.NewWriter(f.Store(), store.WriterOptions{})
	ts, err := taskstore.New(taskstore.Options{Store: f.Store(), Writer: w, KeepRunning: true})
	if err != nil {
		t.Fatal(err)
	}
	mgr := task.NewManager(eventlog.NewDurable(eventlog.Limits{}, w), task.NewConfigStore(nil),
		task.ManagerOptions{DefaultPlanner: "chat", StopGrace: 200 * time.Millisecond, Persistence: ts})
	sched := scheduler.New(100)
	mgr.SetQueue(sched)
	mgr.SetFleet(f)
	f.Start(mgr, sched, ts, w)
	sched.AddSlot(slot)
	r := &replica{f: f, mgr: mgr, ts: ts, w: w, sched: sched, slot: slot}
	t.Cleanup(r.kill)
	return r
}

// kill stops the replica as kill -9 would, as far as the fleet sees it:
// no lease renewed, nothing written, nothing released.
func (r *replica) kill() {
	if r.down.Swap(true) {
		return
	}
	r.f.Close()
	r.w.Close()
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// storedStatus is task id's status in PostgreSQL.
func storedStatus(t *testing.T, r *replica, id string) (agentpb.TaskStatus, string) {
	t.Helper()
	snap, err := r.ts.Load(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return snap.Status, snap.Message
}

// deadTask is the set-up of the tests of a dead replica's task: a store of
// the test's own (pg), the bus (url), the task a replica "dead" left
// RUNNING (id, see deadReplicaTask), a context that ends with the test
// (ctx, 60 s at most) and the fleet's tables as a replica sees them
// (leases, with testLease).
type deadTask struct {
	pg     *postgres.Store
	url    string
	id     string
	ctx    context.Context
	leases *Leases
}

// newDeadTask sets a deadTask up; upstream as deadReplicaTask's.
func newDeadTask(t *testing.T, upstream bool) *deadTask {
	t.Helper()
	d := &deadTask{pg: openStore(t), url: redisURL(t)}
	d.id = deadReplicaTask(t, d.pg, d.url, upstream)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	d.ctx = ctx
	var err error
	if d.leases, err = NewLeases(ctx, d.pg.Pool(), testLease); err != nil {
		t.Fatal(err)
	}
	return d
}

// exec runs sql on the test's store (a trigger, a change of the stored
// task), each %[1]s in it the task's id; args are its parameters.
func (d *deadTask) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := d.pg.Pool().Exec(d.ctx, strings.ReplaceAll(sql, "%[1]s", d.id), args...); err != nil {
		t.Fatal(err)
	}
}

// ended waits up to within for the task to end as stored (read on r) and
// returns its status and message.
func (d *deadTask) ended(t *testing.T, r *replica, within time.Duration) (agentpb.TaskStatus, string) {
	t.Helper()
	waitFor(t, "the task to end", within, func() bool {
		st, _ := storedStatus(t, r, d.id)
		return task.Terminal(st)
	})
	return storedStatus(t, r, d.id)
}

// deadReplicaTask submits a task on a replica "dead" whose slot starts it
// (recording an upstream packet when upstream) and then dies with the
// task RUNNING; it returns the task's id once RUNNING is stored.
func deadReplicaTask(t *testing.T, pg *postgres.Store, url string, upstream bool) string {
	t.Helper()
	dead := startReplica(t, pg, url, "dead", &testSlot{upstream: upstream})
	tk, err := dead.mgr.Submit(task.Spec{Instruction: "hi", Planner: "chat"})
	if err != nil {
		t.Fatal(err)
	}
	id := tk.ID()
	waitFor(t, "the task to start on the dead replica", 10*time.Second, func() bool {
		lt := dead.mgr.Registry().Get(id) // tk is the fleet's view
		return dead.slot.started.Load() == 1 && lt != nil && lt.Status() == agentpb.TaskStatus_RUNNING
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := dead.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if st, _ := storedStatus(t, dead, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("stored status %s, want RUNNING", st)
	}
	dead.kill()
	return id
}

// watch follows task id's events from the start on r (a watcher of the
// fleet: the shared store and the live tail) until it ends.
func watch(ctx context.Context, r *replica, id string) ([]*dispatchv1.TaskEvent, error) {
	v, err := r.f.Lookup(ctx, id)
	if err != nil {
		return nil, err
	}
	var all []*dispatchv1.TaskEvent
	var after uint64
	for {
		evs, err := v.Log().Read(ctx, after, nil)
		for _, ev := range evs {
			all = append(all, ev)
			after = ev.GetSeq()
			if st := ev.GetState(); st != nil && task.Terminal(st.GetStatus()) {
				return all, nil
			}
		}
		if errors.Is(err, io.EOF) {
			return all, nil
		}
		if err != nil {
			return all, err
		}
	}
}

// A RUNNING task of a replica killed before its commander sent anything
// (nothing upstream recorded), that no session re-attached, goes back to
// the fleet's queue as PENDING (a state event with the requeue message,
// the requeue counted) and runs to SUCCESS on a live replica's slot; its
// watcher sees every event once, in order, the requeue among them.
func TestDeadReplicasUnstartedTaskIsRequeuedAndRuns(t *testing.T) {
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id

	live := startReplica(t, pg, url, "live", &testSlot{finish: true})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	type watched struct {
		evs []*dispatchv1.TaskEvent
		err error
	}
	got := make(chan watched, 1)
	go func() {
		evs, err := watch(ctx, live, id)
		got <- watched{evs, err}
	}()
	var w watched
	select {
	case w = <-got:
	case <-ctx.Done():
		t.Fatal("the task did not end")
	}
	if w.err != nil {
		t.Fatal(w.err)
	}
	var states []string
	for i, ev := range w.evs {
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("event %d has seq %d: an event lost, duplicated or reordered", i, ev.GetSeq())
		}
		if st := ev.GetState(); st != nil {
			states = append(states, st.GetStatus().String()+":"+st.GetMessage())
		}
	}
	want := []string{"PENDING", "RUNNING", "PENDING:" + RequeueTakenOverMessage, "RUNNING", "SUCCESS"}
	if len(states) != len(want) {
		t.Fatalf("states %q, want %q", states, want)
	}
	for i := range want {
		if !strings.HasPrefix(states[i], want[i]) {
			t.Fatalf("states %q, want %q", states, want)
		}
	}
	waitFor(t, "SUCCESS stored", 10*time.Second, func() bool {
		st, _ := storedStatus(t, live, id)
		return st == agentpb.TaskStatus_SUCCESS
	})
	snap, err := live.ts.Load(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Requeues != 1 || live.slot.started.Load() != 1 {
		t.Fatalf("requeues %d, starts on the live replica %d; want 1 and 1", snap.Requeues, live.slot.started.Load())
	}
	stored, err := pg.ReadEvents(ctx, id, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	if len(stored) != len(w.evs) {
		t.Fatalf("%d events stored, the watcher saw %d", len(stored), len(w.evs))
	}
}

// A RUNNING task of a dead replica whose commander sent something (an
// upstream packet is recorded) is not run again: it ends FAILURE.
func TestDeadReplicasStartedTaskStillFails(t *testing.T) {
	d := newDeadTask(t, true)
	live := startReplica(t, d.pg, d.url, "live", &testSlot{finish: true})
	st, msg := d.ended(t, live, 20*time.Second)
	if st != agentpb.TaskStatus_FAILURE || !strings.Contains(msg, "stopped renewing the task's lease") || live.slot.started.Load() != 0 {
		t.Fatalf("status %s %q, started %d times on the live replica; want FAILURE, never started", st, msg, live.slot.started.Load())
	}
}

// A task requeued task.MaxRequeues times already is not requeued again:
// FAILURE, saying so.
func TestDeadReplicasTaskPastTheRequeueLimitFails(t *testing.T) {
	d := newDeadTask(t, false)
	d.exec(t, `UPDATE tasks SET body = convert_to(jsonb_set(convert_from(body, 'UTF8')::jsonb, '{requeues}', to_jsonb($1::int))::text, 'UTF8') WHERE id = '%[1]s'`,
		task.MaxRequeues)
	live := startReplica(t, d.pg, d.url, "live", &testSlot{finish: true})
	st, msg := d.ended(t, live, 20*time.Second)
	if st != agentpb.TaskStatus_FAILURE || !strings.Contains(msg, "not requeued again") || live.slot.started.Load() != 0 {
		t.Fatalf("status %s %q, started %d times on the live replica; want FAILURE (not requeued again)", st, msg, live.slot.started.Load())
	}
}

// testLogger shows replica id's logs when REQUEUE_TEST_LOG is set.
func testLogger(id string) *slog.Logger {
	if os.Getenv("REQUEUE_TEST_LOG") == "" {
		return nil
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("replica", id)
}

// raceTask is deadReplicaTask with a live replica whose takeOver lets a
// late re-attach of the task's session (ClaimForSession, as a replica
// "other" would on the commander's hello) run at hook: the task ends
// SUCCESS on the live replica either way (the re-attached lease is never
// renewed, so it is swept again), and the events of the whole run are
// returned, checked 1..N.
func raceTask(t *testing.T, pick func(*requeueHooks, func(string))) (*replica, []*dispatchv1.TaskEvent, chan error) {
	t.Helper()
	d := newDeadTask(t, false)
	pg, url, id := d.pg, d.url, d.id
	claimed := make(chan error, 1)
	var once atomic.Bool
	leases := d.leases
	var hooks requeueHooks
	pick(&hooks, func(tid string) {
		if tid != id || once.Swap(true) {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := leases.ClaimForSession(ctx, id, "other", "session-1")
		claimed <- err
	})
	live := startReplicaHooked(t, pg, url, "live", &testSlot{finish: true}, hooks)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	evs, err := watch(ctx, live, id)
	if err != nil {
		t.Fatal(err)
	}
	for i, ev := range evs {
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("event %d has seq %d: an event lost, duplicated or reordered", i, ev.GetSeq())
		}
	}
	if st := evs[len(evs)-1].GetState(); st.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("ended %s, want SUCCESS", st.GetStatus())
	}
	return live, evs, claimed
}

// requeuesSeen counts the requeue state events in evs.
func requeuesSeen(evs []*dispatchv1.TaskEvent) int {
	n := 0
	for _, ev := range evs {
		if st := ev.GetState(); st.GetStatus() == agentpb.TaskStatus_PENDING && st.GetMessage() == RequeueTakenOverMessage {
			n++
		}
	}
	return n
}

// A re-attach that claims the task after the sweeper's claim but before
// its PENDING record is stored wins: the requeue's write is fenced (the
// attempt moved), nothing of it is stored and the task is not queued.
// (Here the re-attached session never shows up, so the task is swept and
// requeued later: one requeue in all, not two.)
func TestReattachBeforeTheRequeueIsWrittenWins(t *testing.T) {
	live, evs, claimed := raceTask(t, func(h *requeueHooks, f func(string)) { h.beforeWrite = f })
	select {
	case err := <-claimed:
		if err != nil {
			t.Fatalf("the re-attach before the requeue's write was refused: %v", err)
		}
	default:
		t.Fatal("the hook did not run")
	}
	if live.f.Fenced() == 0 {
		t.Fatal("the requeue's write was not fenced")
	}
	if n := requeuesSeen(evs); n != 1 {
		t.Fatalf("%d requeue events, want 1 (the fenced one is not stored)", n)
	}
}

// A re-attach after the PENDING record is stored is refused (the task's
// session is no longer RUNNING): the requeue wins, once.
func TestReattachAfterTheRequeueIsStoredIsRefused(t *testing.T) {
	live, evs, claimed := raceTask(t, func(h *requeueHooks, f func(string)) { h.stored = f })
	select {
	case err := <-claimed:
		if !errors.Is(err, ErrNotSession) {
			t.Fatalf("the re-attach after the requeue: %v, want ErrNotSession", err)
		}
	default:
		t.Fatal("the hook did not run")
	}
	if live.f.Fenced() != 0 {
		t.Fatalf("%d writes fenced, want none", live.f.Fenced())
	}
	if n := requeuesSeen(evs); n != 1 {
		t.Fatalf("%d requeue events, want 1", n)
	}
}

// A cancel asked while the dead replica still seemed to hold the task (a
// command row for its owner, or one a replica that stopped before the
// task's end was stored left open) is honoured by the takeover: CANCELLED
// with its reason, not requeued (unstarted) nor FAILURE (started: it ended
// FAILURE before, the cancel lost).
func TestDeadReplicasTaskWithACancelAskedIsCancelled(t *testing.T) {
	for name, upstream := range map[string]bool{"unstarted": false, "started": true} {
		t.Run(name, func(t *testing.T) {
			d := newDeadTask(t, upstream)
			if _, err := d.leases.AddCommand(d.ctx, d.id, "cancel", cmdArgs{Reason: "stopped by the test"}); err != nil {
				t.Fatal(err)
			}
			live := startReplica(t, d.pg, d.url, "live", &testSlot{finish: true})
			st, msg := d.ended(t, live, 20*time.Second)
			if st != agentpb.TaskStatus_CANCELLED || msg != "stopped by the test" || live.slot.started.Load() != 0 {
				t.Fatalf("status %s %q, started %d times on the live replica; want CANCELLED, never started", st, msg, live.slot.started.Load())
			}
		})
	}
}

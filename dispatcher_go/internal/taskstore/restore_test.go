package taskstore_test

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// readAll reads l from the start up to its newest event (or its end).
func readAll(t *testing.T, l eventlog.Log) []*dispatchv1.TaskEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var out []*dispatchv1.TaskEvent
	var after uint64
	for after < l.LastSeq() {
		evs, err := l.Read(ctx, after, nil)
		out = append(out, evs...)
		if len(evs) > 0 {
			after = evs[len(evs)-1].GetSeq()
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("read after %d: %v", after, err)
		}
	}
	return out
}

// setRecordStatus rewrites a stored record's status, as if the process had
// died before the record caught up with the task.
func setRecordStatus(t *testing.T, st store.Store, id string, s agentpb.TaskStatus) {
	t.Helper()
	ctx := context.Background()
	rec, err := st.GetTask(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	rec.Status, rec.EndedAt = int32(s), time.Time{}
	if err := st.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{rec}}); err != nil {
		t.Fatal(err)
	}
}

func TestRestoreJudgesEachTaskByItsLastDurableEvent(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)

	m1, q1, w1 := durableManager(t, st)
	submit := func(text string) *task.Task {
		tk, err := m1.Submit(task.Spec{Instruction: text})
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
	running, pending, done, lagged, neverStarted := submit("running"), submit("pending"), submit("done"), submit("lagged"), submit("never started")
	for _, tk := range []*task.Task{running, done, lagged} {
		startOn(t, q1, tk)
	}
	if _, err := running.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "half"}}}, eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	done.Finish(agentpb.TaskStatus_SUCCESS, "done", "the answer")
	lagged.Finish(agentpb.TaskStatus_SUCCESS, "done", "lagged answer")
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close() // the process ends here, without draining
	setRecordStatus(t, st, lagged.ID(), agentpb.TaskStatus_RUNNING)
	setRecordStatus(t, st, neverStarted.ID(), agentpb.TaskStatus_RUNNING)
	runningLast := running.Log().LastSeq()

	m2, q2, w2 := durableManager(t, st)
	rep, err := m2.Restore(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep != (task.RestoreReport{Loaded: 1, Requeued: 2, Failed: 1, Finished: 1}) {
		t.Fatalf("report %+v", rep)
	}
	get := func(id string) task.Info {
		tk, err := m2.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		return tk.Info()
	}
	if i := get(running.ID()); i.Status != agentpb.TaskStatus_FAILURE || i.Message != taskstore.RestartFailureMessage || i.LastSeq != runningLast+1 {
		t.Fatalf("running → %+v", i)
	}
	if i := get(done.ID()); i.Status != agentpb.TaskStatus_SUCCESS || i.Result != "the answer" {
		t.Fatalf("done → %+v", i)
	}
	if i := get(lagged.ID()); i.Status != agentpb.TaskStatus_SUCCESS || i.Result != "lagged answer" {
		t.Fatalf("lagged → %+v", i)
	}
	for _, id := range []string{pending.ID(), neverStarted.ID()} {
		if i := get(id); i.Status != agentpb.TaskStatus_PENDING || i.Message != taskstore.RequeuedMessage {
			t.Fatalf("pending %s → %+v", id, i)
		}
	}
	if q2.len() != 2 {
		t.Fatalf("queued after restart: %d", q2.len())
	}
	// The failed task's log: the old events from the store, then FAILURE.
	tk, _ := m2.Get(running.ID())
	evs := readAll(t, tk.Log())
	if len(evs) != int(runningLast+1) || evs[len(evs)-1].GetState().GetStatus() != agentpb.TaskStatus_FAILURE {
		t.Fatalf("failed task events: %v", evs)
	}
	// A requeued task's log continues: seq 1 from the store, seq 2 new.
	tk, _ = m2.Get(pending.ID())
	evs = readAll(t, tk.Log())
	if len(evs) != 2 || evs[1].GetSeq() != 2 || evs[1].GetState().GetMessage() != taskstore.RequeuedMessage {
		t.Fatalf("requeued task events: %v", evs)
	}
	// It runs to the end on the new process and is stored so.
	startOn(t, q2, tk)
	tk.Finish(agentpb.TaskStatus_SUCCESS, "done", "after restart")
	if err := w2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetTask(ctx, pending.ID())
	if err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("stored after finishing: %v %v", rec.Status, err)
	}
	// A task neither in memory nor in the store is not found.
	if _, err := m2.Get("nope"); !errors.Is(err, task.ErrNotFound) {
		t.Fatalf("unknown id: %v", err)
	}
}

// A task's own policy only tightens the global one; a restart must not drop
// it, or the requeued task would run looser than it was submitted.
func TestRequeuedTaskKeepsItsOwnPolicy(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)

	src := "rules:\n  - {id: no-secrets, phrases: [secret], action: stop}\n"
	pol, err := policy.Compile([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	m1, _, w1 := durableManager(t, st)
	tk, err := m1.Submit(task.Spec{Instruction: "tightened", Policy: pol})
	if err != nil {
		t.Fatal(err)
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close()

	m2, q2, _ := durableManager(t, st)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	back, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	if q2.len() != 1 || back.Policy() == nil || string(back.Policy().Source()) != src {
		t.Fatalf("requeued task policy: queued %d, policy %v", q2.len(), back.Policy())
	}
	if back.Policy().Version != pol.Version {
		t.Fatalf("policy version %s, want %s", back.Policy().Version, pol.Version)
	}
}

// A requeued task is stored PENDING and is queued again after a restart,
// with its requeue count.
func TestRequeuedTaskIsRestoredPending(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, q1, w1 := durableManager(t, st)
	tk, err := m1.Submit(task.Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	q1.Remove(tk)
	r := runner{}
	if err := tk.Start(r, "cmd", "ses"); err != nil {
		t.Fatal(err)
	}
	if err := tk.Requeue(r, ""); err != nil {
		t.Fatal(err)
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetTask(ctx, tk.ID())
	if err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_PENDING {
		t.Fatalf("stored %v %v", agentpb.TaskStatus(rec.Status), err)
	}
	w1.Close()

	m2, q2, _ := durableManager(t, st)
	rep, err := m2.Restore(ctx)
	if err != nil {
		t.Fatal(err)
	}
	back, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	if rep.Requeued != 1 || q2.len() != 1 || back.Status() != agentpb.TaskStatus_PENDING || back.Requeues() != 1 {
		t.Fatalf("restored: %+v queued %d status %v requeues %d", rep, q2.len(), back.Status(), back.Requeues())
	}
}

// The sandbox a session reported and kept comes back with its task, so a
// task continuing it after a restart runs on it.
func TestKeptSandboxIsRestoredForContinuation(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, q1, w1 := durableManager(t, st)
	prev, err := m1.Submit(task.Spec{Instruction: "open a terminal", Sandbox: &agentpb.Sandbox{ShapeName: "local-1024x768"}})
	if err != nil {
		t.Fatal(err)
	}
	startOn(t, q1, prev)
	prev.SetSandboxInUse(&agentpb.Sandbox{Id: "SBX-1"}, true)
	prev.Finish(agentpb.TaskStatus_SUCCESS, "ok", "done")
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close()

	m2, _, _ := durableManager(t, st)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	back, err := m2.Get(prev.ID())
	if err != nil {
		t.Fatal(err)
	}
	if back.ContinuedSandbox().GetId() != "SBX-1" || back.Info().Sandbox.GetId() != "SBX-1" || back.Sandbox().GetShapeName() != "local-1024x768" {
		t.Fatalf("restored sandbox %v / %v / %v", back.ContinuedSandbox(), back.Info().Sandbox, back.Sandbox())
	}
	next, err := m2.Submit(task.Spec{Instruction: "type in it", PreviousTaskID: prev.ID()})
	if err != nil {
		t.Fatal(err)
	}
	if next.Sandbox().GetId() != "SBX-1" {
		t.Fatalf("continuing task's sandbox %v", next.Sandbox())
	}
}

// observedLogs wraps a Durable as a metrics observer does: it sees every
// event appended to the logs it hands out, reopened ones included.
type observedLogs struct {
	*eventlog.Durable
	mu   sync.Mutex
	seen map[string][]agentpb.TaskStatus // state events per task
}

func (o *observedLogs) Create(id string) (eventlog.Log, error) {
	l, err := o.Durable.Create(id)
	return o.wrap(l, err)
}

func (o *observedLogs) Restore(id string, lastSeq uint64, sealed bool) (eventlog.Log, error) {
	l, err := o.Durable.Restore(id, lastSeq, sealed)
	return o.wrap(l, err)
}

func (o *observedLogs) wrap(l eventlog.Log, err error) (eventlog.Log, error) {
	if err != nil {
		return nil, err
	}
	return observedLog{Log: l, o: o}, nil
}

func (o *observedLogs) states(id string) []agentpb.TaskStatus {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.seen[id])
}

type observedLog struct {
	eventlog.Log
	o *observedLogs
}

func (l observedLog) see(ev *dispatchv1.TaskEvent) {
	if s := ev.GetState(); s != nil {
		l.o.mu.Lock()
		if l.o.seen == nil {
			l.o.seen = map[string][]agentpb.TaskStatus{}
		}
		l.o.seen[ev.GetTaskId()] = append(l.o.seen[ev.GetTaskId()], s.GetStatus())
		l.o.mu.Unlock()
	}
}

func (l observedLog) Append(ev *dispatchv1.TaskEvent, c eventlog.Class) (uint64, error) {
	seq, err := l.Log.Append(ev, c)
	if err == nil {
		l.see(ev)
	}
	return seq, err
}

func (l observedLog) Seal(ev *dispatchv1.TaskEvent) (uint64, error) {
	seq, err := l.Log.Seal(ev)
	if err == nil {
		l.see(ev)
	}
	return seq, err
}

// A task queued again after a restart logs through the Manager's own
// event-log store, wrappers included: an observer sees its requeue, its
// start and its end, as it would for a new task.
func TestRestoredTaskLogsThroughTheManagersStore(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, _, w1 := durableManager(t, st)
	tk, err := m1.Submit(task.Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	w1.Close()

	w2 := store.NewWriter(st, store.WriterOptions{Interval: time.Millisecond})
	t.Cleanup(w2.Close)
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w2, SecretKey: []byte("k")})
	if err != nil {
		t.Fatal(err)
	}
	logs := &observedLogs{Durable: eventlog.NewDurable(eventlog.Limits{}, w2)}
	m2 := task.NewManager(logs, task.NewConfigStore(nil), task.ManagerOptions{Persistence: ts})
	q2 := &fakeQueue{}
	m2.SetQueue(q2)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	back, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	startOn(t, q2, back)
	back.Finish(agentpb.TaskStatus_SUCCESS, "done", "")
	want := []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_SUCCESS}
	if got := logs.states(tk.ID()); !slices.Equal(got, want) {
		t.Fatalf("observed states of the restored task %v, want %v", got, want)
	}
}

// An event-log store that cannot reopen stored logs is refused at Restore
// rather than giving restored tasks logs from elsewhere.
func TestRestoreNeedsAReopeningEventLogStore(t *testing.T) {
	st := openSQLite(t)
	w := store.NewWriter(st, store.WriterOptions{Interval: time.Millisecond})
	t.Cleanup(w.Close)
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w})
	if err != nil {
		t.Fatal(err)
	}
	m := task.NewManager(eventlog.NewMemory(eventlog.Limits{}), task.NewConfigStore(nil), task.ManagerOptions{Persistence: ts})
	m.SetQueue(&fakeQueue{})
	if _, err := m.Restore(context.Background()); err == nil {
		t.Fatal("Restore accepted an event-log store that cannot reopen logs")
	}
}

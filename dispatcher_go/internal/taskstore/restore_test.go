package task

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

// durableManager is a Manager on st; its writer is closed at cleanup (or
// by the caller, to simulate the process ending).
func durableManager(t *testing.T, st store.Store) (*Manager, *fakeQueue, *store.Writer) {
	t.Helper()
	w := store.NewWriter(st, store.WriterOptions{Interval: time.Millisecond})
	t.Cleanup(w.Close)
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	q := &fakeQueue{}
	m := NewManager(logs, NewConfigStore(nil), ManagerOptions{
		StopGrace:   200 * time.Millisecond,
		Persistence: &Persistence{Store: st, Writer: w, Logs: logs, SecretKey: []byte("k")},
	})
	m.SetQueue(q)
	return m, q, w
}

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
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	m1, q1, w1 := durableManager(t, st)
	submit := func(text string) *Task {
		tk, err := m1.Submit(Spec{Instruction: text})
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
	running, pending, done, lagged, neverStarted := submit("running"), submit("pending"), submit("done"), submit("lagged"), submit("never started")
	for _, tk := range []*Task{running, done, lagged} {
		q1.take(tk)
		if err := tk.Start(&fakeRunner{t: tk}, "c", "s"); err != nil {
			t.Fatal(err)
		}
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

	m2, q2, _ := durableManager(t, st)
	rep, err := m2.Restore(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep != (RestoreReport{Loaded: 1, Requeued: 2, Failed: 1, Finished: 1}) {
		t.Fatalf("report %+v", rep)
	}
	get := func(id string) Info {
		tk, err := m2.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		return tk.Info()
	}
	if i := get(running.ID()); i.Status != agentpb.TaskStatus_FAILURE || i.Message != RestartFailureMessage || i.LastSeq != runningLast+1 {
		t.Fatalf("running → %+v", i)
	}
	if i := get(done.ID()); i.Status != agentpb.TaskStatus_SUCCESS || i.Result != "the answer" {
		t.Fatalf("done → %+v", i)
	}
	if i := get(lagged.ID()); i.Status != agentpb.TaskStatus_SUCCESS || i.Result != "lagged answer" {
		t.Fatalf("lagged → %+v", i)
	}
	for _, id := range []string{pending.ID(), neverStarted.ID()} {
		if i := get(id); i.Status != agentpb.TaskStatus_PENDING || i.Message != requeuedMessage {
			t.Fatalf("pending %s → %+v", id, i)
		}
	}
	if len(q2.tasks) != 2 {
		t.Fatalf("queued after restart: %d", len(q2.tasks))
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
	if len(evs) != 2 || evs[1].GetSeq() != 2 || evs[1].GetState().GetMessage() != requeuedMessage {
		t.Fatalf("requeued task events: %v", evs)
	}
	// It runs to the end on the new process and is stored so.
	q2.take(tk)
	if err := tk.Start(&fakeRunner{t: tk}, "c2", "s2"); err != nil {
		t.Fatal(err)
	}
	tk.Finish(agentpb.TaskStatus_SUCCESS, "done", "after restart")
	if err := m2.persist.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetTask(ctx, pending.ID())
	if err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("stored after finishing: %v %v", rec.Status, err)
	}
	// A task neither in memory nor in the store is not found.
	if _, err := m2.Get("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown id: %v", err)
	}
}

// A task's own policy only tightens the global one; a restart must not drop
// it, or the requeued task would run looser than it was submitted.
func TestRequeuedTaskKeepsItsOwnPolicy(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	src := "rules:\n  - {id: no-secrets, phrases: [secret], action: stop}\n"
	pol, err := policy.Compile([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	m1, _, w1 := durableManager(t, st)
	tk, err := m1.Submit(Spec{Instruction: "tightened", Policy: pol})
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
	if len(q2.tasks) != 1 || back.Policy() == nil || string(back.Policy().Source()) != src {
		t.Fatalf("requeued task policy: queued %d, policy %v", len(q2.tasks), back.Policy())
	}
	if back.Policy().Version != pol.Version {
		t.Fatalf("policy version %s, want %s", back.Policy().Version, pol.Version)
	}
}

package taskstore_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// keepingManager is managerOn with KeepRunning and a hand-over window, the
// store as the Claimer, as the dispatcher wires it for hand-over.
func keepingManager(t *testing.T, st store.Store, window time.Duration) (*task.Manager, *store.Writer) {
	t.Helper()
	w := store.NewWriter(st, store.WriterOptions{Interval: time.Millisecond})
	t.Cleanup(w.Close)
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w, SecretKey: []byte("k"), KeepRunning: true})
	if err != nil {
		t.Fatal(err)
	}
	m := task.NewManager(eventlog.NewDurable(eventlog.Limits{}, w), task.NewConfigStore(nil), task.ManagerOptions{
		StopGrace: 200 * time.Millisecond, Persistence: ts, HandOverWindow: window, Claimer: ts,
	})
	m.SetQueue(&fakeQueue{})
	return m, w
}

// TestRunningTaskWaitsForItsSessionAfterARestart: with KeepRunning a task
// that was RUNNING comes back RUNNING, waiting; its highest upstream seq is
// read back from its log (past events that have none); the re-attach claims
// it with the attempt after the stored one, which is stored in turn.
func TestRunningTaskWaitsForItsSessionAfterARestart(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, w1 := keepingManager(t, st, time.Minute)
	tk, err := m1.Submit(task.Spec{Instruction: "long"})
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.Start(runner{}, "cmd", "ses"); err != nil {
		t.Fatal(err)
	}
	for i := uint64(1); i <= 70; i++ {
		ev := &dispatchv1.TaskEvent{UpstreamSeq: i, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "c"}}}
		if _, err := tk.Record(ev, eventlog.Capped); err != nil {
			t.Fatal(err)
		}
	}
	// More than a page of the dispatcher's own events after the last packet.
	for range 100 {
		ev := &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stage{Stage: &dispatchv1.StageChange{Stage: "x"}}}
		if _, err := tk.Record(ev, eventlog.Capped); err != nil {
			t.Fatal(err)
		}
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close() // kill -9

	m2, w2 := keepingManager(t, st, time.Minute)
	rep, err := m2.Restore(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Waiting != 1 || rep.Failed != 0 {
		t.Fatalf("report %+v", rep)
	}
	tk2, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	if tk2.Status() != agentpb.TaskStatus_RUNNING || !tk2.HandingOver() || tk2.Attempt() != 1 {
		t.Fatalf("restored: %v handing over %v attempt %d", tk2.Status(), tk2.HandingOver(), tk2.Attempt())
	}
	got, err := m2.Reattach(ctx, tk.ID(), "ses", "cmd", nil, func(*task.Task) task.Runner { return runner{} })
	if err != nil {
		t.Fatal(err)
	}
	if got.UpstreamSeq != 70 || got.Attempt != 2 {
		t.Fatalf("re-attached at seq %d attempt %d, want 70 and 2", got.UpstreamSeq, got.Attempt)
	}
	if err := w2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	ts, _ := taskstore.New(taskstore.Options{Store: st, Writer: w2})
	if next, err := ts.Claim(ctx, tk.ID()); err != nil || next != 3 {
		t.Fatalf("the next claim: %d %v (the stored attempt must be 2)", next, err)
	}
}

// TestRestoredTaskFailsAfterTheWindow: nobody re-attaches: FAILURE with the
// reason, stored so.
func TestRestoredTaskFailsAfterTheWindow(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, w1 := keepingManager(t, st, time.Minute)
	tk, err := m1.Submit(task.Spec{Instruction: "long"})
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.Start(runner{}, "cmd", "ses"); err != nil {
		t.Fatal(err)
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close()

	m2, w2 := keepingManager(t, st, 50*time.Millisecond)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	tk2, _ := m2.Get(tk.ID())
	select {
	case <-tk2.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("still RUNNING after the window")
	}
	if i := tk2.Info(); i.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(i.Message, "did not re-attach within 50ms") {
		t.Fatalf("after the window: %v %q", i.Status, i.Message)
	}
	if err := w2.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetTask(ctx, tk.ID())
	if err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_FAILURE {
		t.Fatalf("stored: %v %v", rec.Status, err)
	}
}

// TestStopDecidedBeforeARestartIsCarriedOver: a cancel decided just before
// the crash is kept with the task: the re-attach hands it to the new runner
// (which stops the session again), and with nobody re-attaching the task
// ends as the stop decided (CANCELLED), not as a lost session.
func TestStopDecidedBeforeARestartIsCarriedOver(t *testing.T) {
	ctx := context.Background()
	for _, reattach := range []bool{true, false} {
		st := openSQLite(t)
		m1, w1 := keepingManager(t, st, time.Minute)
		tk, err := m1.Submit(task.Spec{Instruction: "long"})
		if err != nil {
			t.Fatal(err)
		}
		if err := tk.Start(runner{}, "cmd", "ses"); err != nil {
			t.Fatal(err)
		}
		stop := &dispatchv1.StopSignal{Reason: "cancelled by client", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}
		if _, err := tk.Fence(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: stop}}); err != nil {
			t.Fatal(err)
		}
		if err := w1.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		w1.Close()

		m2, _ := keepingManager(t, st, 50*time.Millisecond)
		if _, err := m2.Restore(ctx); err != nil {
			t.Fatal(err)
		}
		tk2, _ := m2.Get(tk.ID())
		if reattach {
			got, err := m2.Reattach(ctx, tk.ID(), "ses", "cmd", nil, func(*task.Task) task.Runner { return runner{} })
			if err != nil {
				t.Fatal(err)
			}
			if got.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || got.Stop.GetReason() != "cancelled by client" {
				t.Fatalf("re-attached with stop %v", got.Stop)
			}
			continue
		}
		select {
		case <-tk2.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("still RUNNING after the window")
		}
		if i := tk2.Info(); i.Status != agentpb.TaskStatus_CANCELLED || !strings.HasPrefix(i.Message, "cancelled by client") {
			t.Fatalf("after the window: %v %q", i.Status, i.Message)
		}
	}
}

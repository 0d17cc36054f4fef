package task

import (
	"context"
	"errors"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// submit submits a task to m; it must be accepted.
func submit(t *testing.T, m *Manager) *Task {
	t.Helper()
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

// startOn takes tk off the queue and starts it on a new runner, as the
// scheduler does.
func startOn(t *testing.T, q *fakeQueue, tk *Task) *fakeRunner {
	t.Helper()
	q.take(tk)
	r := &fakeRunner{t: tk}
	if err := tk.Start(r, "cmd", "ses"); err != nil {
		t.Fatal(err)
	}
	return r
}

func stateTrail(t *testing.T, tk *Task) (statuses []agentpb.TaskStatus, messages []string) {
	t.Helper()
	for _, ev := range events(t, tk) {
		if st := ev.GetState(); st != nil {
			statuses = append(statuses, st.GetStatus())
			messages = append(messages, st.GetMessage())
		}
	}
	return statuses, messages
}

func TestRequeueBackToPendingAndBounded(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	tk := submit(t, m)
	for i := range MaxRequeues {
		r := startOn(t, q, tk)
		if err := tk.Requeue(&fakeRunner{t: tk}, ""); !errors.Is(err, ErrNotRunning) {
			t.Fatalf("requeue by another runner: %v", err)
		}
		if err := tk.Requeue(r, ""); err != nil {
			t.Fatalf("requeue %d: %v", i+1, err)
		}
		info := tk.Info()
		if info.Status != agentpb.TaskStatus_PENDING || info.Message != RequeueMessage || !info.StartedAt.IsZero() || info.CommanderID != "" || info.SessionID != "" {
			t.Fatalf("after requeue %d: %+v", i+1, info)
		}
		if r2, _ := tk.runnerState(); r2 != nil {
			t.Fatal("runner kept after requeue")
		}
		if err := tk.Requeue(r, ""); !errors.Is(err, ErrNotRunning) {
			t.Fatalf("requeue of a pending task: %v", err)
		}
		q.Enqueue(tk)
	}
	// The limit: the task stays RUNNING for the caller to fail it.
	r := startOn(t, q, tk)
	if err := tk.Requeue(r, ""); !errors.Is(err, ErrRequeueLimit) {
		t.Fatalf("requeue beyond the limit: %v", err)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || tk.Requeues() != MaxRequeues {
		t.Fatalf("status %v requeues %d", tk.Status(), tk.Requeues())
	}
	tk.Finish(agentpb.TaskStatus_FAILURE, "lost", "")
	statuses, messages := stateTrail(t, tk)
	want := []agentpb.TaskStatus{agentpb.TaskStatus_PENDING}
	for range MaxRequeues {
		want = append(want, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_PENDING)
	}
	want = append(want, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_FAILURE)
	if len(statuses) != len(want) {
		t.Fatalf("states %v, want %v", statuses, want)
	}
	for i := range want {
		if statuses[i] != want[i] {
			t.Fatalf("states %v, want %v", statuses, want)
		}
	}
	if messages[2] != RequeueMessage {
		t.Fatalf("requeue state message %q", messages[2])
	}
}

// A cancel that comes while the slot is dying wins: the task is not put
// back in the queue.
func TestRequeueRefusedAfterCancel(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{StopGrace: 50 * time.Millisecond})
	tk := submit(t, m)
	r := startOn(t, q, tk)
	// The runner was already claimed by its dying slot: the stop does
	// nothing, as with a real session.
	r.stopped = true
	out, err := m.Cancel(context.Background(), tk.ID(), "no longer needed", false)
	if err != nil || out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if err := tk.Requeue(r, ""); !errors.Is(err, ErrCancelRequested) {
		t.Fatalf("requeue after cancel: %v", err)
	}
	if reason, ok := tk.CancelRequested(); !ok || reason != "no longer needed" {
		t.Fatalf("cancel reason %q %v", reason, ok)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("status %v", tk.Status())
	}
}

func TestRequeueRefusedWhileDraining(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{StopGrace: 50 * time.Millisecond})
	tk := submit(t, m)
	r := startOn(t, q, tk)
	r.onStop = func(r *fakeRunner, reason string, _ dispatchv1.StopCode) {}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() { m.Shutdown(ctx); close(done) }()
	testutil.WaitFor(t, testutil.Wait, m.Closed, "the manager to close")
	if err := tk.Requeue(r, ""); !errors.Is(err, ErrClosed) {
		t.Fatalf("requeue while draining: %v", err)
	}
	tk.Finish(agentpb.TaskStatus_FAILURE, "lost", "")
	testutil.Done(t, done, testutil.Wait, "Shutdown to return")
}

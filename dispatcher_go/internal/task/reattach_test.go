package task

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// fixedClaimer answers every claim with attempt (or err).
type fixedClaimer struct {
	attempt int64
	err     error
	claims  int
}

func (c *fixedClaimer) Claim(context.Context, string) (int64, error) {
	c.claims++
	return c.attempt, c.err
}

// detached starts a task on a fake runner and detaches its session, as a
// drain does: RUNNING, waiting for the session to re-attach.
func detached(t *testing.T, m *Manager, q *fakeQueue) (*Task, *fakeRunner) {
	t.Helper()
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	r := startOn(t, q, tk)
	if !tk.Detach(r, 7) {
		t.Fatal("Detach refused a running task")
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
		t.Fatalf("detached task: %v handing over %v", tk.Status(), tk.HandingOver())
	}
	return tk, r
}

// TestReattachTakesTheWaitingTask: the session that re-attaches gets the
// task with the claimed attempt and the upstream seq it left off at; the
// watchers see a RUNNING state event saying so; a second re-attach, another
// session's, or one after the task ended is refused.
func TestReattachTakesTheWaitingTask(t *testing.T) {
	cl := &fixedClaimer{attempt: 5}
	m, q := newManager(t, ManagerOptions{Claimer: cl})
	tk, _ := detached(t, m, q)
	if _, err := m.Reattach(context.Background(), tk.ID(), "other-session", "c2", nil, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("re-attach of another session: %v", err)
	}
	// A commander that does not serve the task's tenant is answered as for
	// an unknown task, and claims nothing.
	notMine := func(string) bool { return false }
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", notMine, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotFound) || cl.claims != 0 {
		t.Fatalf("re-attach by a commander of another tenant: %v (claims %d)", err, cl.claims)
	}
	r2 := &fakeRunner{t: tk}
	got, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", nil, func(*Task) Runner { return r2 })
	if err != nil {
		t.Fatal(err)
	}
	if got.Task != tk || got.Attempt != 5 || got.UpstreamSeq != 7 || tk.Attempt() != 5 || cl.claims != 1 {
		t.Fatalf("reattached %+v, attempt %d, claims %d", got, tk.Attempt(), cl.claims)
	}
	if tk.HandingOver() || tk.Info().CommanderID != "c2" {
		t.Fatalf("after re-attach: handing over %v, commander %q", tk.HandingOver(), tk.Info().CommanderID)
	}
	_, msgs := stateTrail(t, tk)
	if last := msgs[len(msgs)-1]; !strings.Contains(last, "re-attached (attempt 5)") {
		t.Fatalf("state messages %q", msgs)
	}
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c3", nil, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("second re-attach: %v", err)
	}
	// A cancel now reaches the new runner (a session to stop).
	if out, err := m.Cancel(context.Background(), tk.ID(), "", false); err != nil || !out.Cancelled || !r2.stopped {
		t.Fatalf("cancel after re-attach: %+v %v stopped=%v", out, err, r2.stopped)
	}
}

// TestReattachFailsWhenTheClaimFails: the task keeps waiting.
func TestReattachFailsWhenTheClaimFails(t *testing.T) {
	m, q := newManager(t, ManagerOptions{Claimer: &fixedClaimer{err: errors.New("lease held by replica 2")}})
	tk, _ := detached(t, m, q)
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", nil, func(*Task) Runner { return nil }); err == nil || !strings.Contains(err.Error(), "lease held") {
		t.Fatalf("re-attach with a failing claim: %v", err)
	}
	if !tk.HandingOver() || tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatal("the task no longer waits after a failed claim")
	}
}

// TestHandOverWindowExpires: nobody re-attaches within the window: FAILURE
// with the reason, never RUNNING for ever; a late re-attach is refused.
func TestHandOverWindowExpires(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	tk, _ := detached(t, m, q)
	tk.waitForReattach(30 * time.Millisecond)
	select {
	case <-tk.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("task still RUNNING after its hand-over window")
	}
	info := tk.Info()
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "did not re-attach within 30ms") {
		t.Fatalf("after the window: %v %q", info.Status, info.Message)
	}
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", nil, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("late re-attach: %v", err)
	}
}

// TestCancelWhileHandingOver: there is no session to stop, so the cancel
// ends the task at once, and says so.
func TestCancelWhileHandingOver(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	tk, _ := detached(t, m, q)
	out, err := m.Cancel(context.Background(), tk.ID(), "", true)
	if err != nil || !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	if msg := tk.Info().Message; !strings.Contains(msg, "handed over") {
		t.Fatalf("message %q", msg)
	}
	if _, _, err := m.Interject(context.Background(), tk.ID(), "hi"); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("interject after the end: %v", err)
	}
}

// TestShutdownLeavesHandedOverTasks: a manager that hands over (a store and
// a window) leaves waiting and pending tasks as they are.
func TestShutdownLeavesHandedOverTasks(t *testing.T) {
	m, q := newManager(t, ManagerOptions{HandOverWindow: time.Second})
	m.persist = nopPersistence{}
	tk, _ := detached(t, m, q)
	pending, err := m.Submit(Spec{Instruction: "queued"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	begun := time.Now()
	m.Shutdown(ctx)
	if waited := time.Since(begun); waited > time.Second {
		t.Fatalf("Shutdown waited %s for tasks it hands over", waited)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || pending.Status() != agentpb.TaskStatus_PENDING {
		t.Fatalf("after shutdown: detached %v, pending %v", tk.Status(), pending.Status())
	}
}

// nopPersistence stores nothing (only HandsOver looks at it here).
type nopPersistence struct{ Persistence }

func (nopPersistence) Save(*Snapshot)                          {}
func (nopPersistence) Health() error                           { return nil }
func (nopPersistence) FlushWhileHealthy(context.Context) error { return nil }

// TestLinkLostSessionReattachesWithinTheWindow: a session whose stream
// broke waits for its commander (RUNNING, interjections refused as during
// any hand-over); its re-attach continues it from the seq it left off at,
// and the window's timer no longer ends it.
func TestLinkLostSessionReattachesWithinTheWindow(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	r := startOn(t, q, tk)
	if tk.DetachLinkLost(&fakeRunner{t: tk}, 3, time.Second) {
		t.Fatal("DetachLinkLost let go of a runner the task does not run on")
	}
	if tk.DetachLinkLost(r, 3, 0) {
		t.Fatal("DetachLinkLost without a window")
	}
	window := 100 * time.Millisecond
	if !tk.DetachLinkLost(r, 3, window) {
		t.Fatal("DetachLinkLost refused a running task")
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
		t.Fatalf("after the link loss: %v handing over %v", tk.Status(), tk.HandingOver())
	}
	if _, _, err := m.Interject(context.Background(), tk.ID(), "hi"); !errors.Is(err, ErrHandOver) {
		t.Fatalf("interject while the link is lost: %v", err)
	}
	r2 := &fakeRunner{t: tk}
	got, err := m.Reattach(context.Background(), tk.ID(), "ses", "c", nil, func(*Task) Runner { return r2 })
	if err != nil || got.UpstreamSeq != 3 || got.Attempt != 2 {
		t.Fatalf("re-attach: %+v %v", got, err)
	}
	// Past the window the task still runs on its new runner.
	deadline := time.After(5 * window)
	for tk.Status() == agentpb.TaskStatus_RUNNING {
		select {
		case <-deadline:
			if tk.HandingOver() {
				t.Fatal("re-attached task waits again")
			}
			return
		case <-tk.Done():
		}
	}
	t.Fatalf("re-attached task ended %v: %q", tk.Status(), tk.Info().Message)
}

// TestLinkLostWindowExpires: the commander never comes back (it died):
// FAILURE after the window, saying the link was lost; a stop while waiting
// ends the task at once instead.
func TestLinkLostWindowExpires(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	r := startOn(t, q, tk)
	begun := time.Now()
	if !tk.DetachLinkLost(r, 0, 50*time.Millisecond) {
		t.Fatal("DetachLinkLost refused a running task")
	}
	select {
	case <-tk.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("task still RUNNING after its link-loss window")
	}
	info := tk.Info()
	if info.Status != agentpb.TaskStatus_FAILURE || info.Message != "commander link lost; session did not re-attach within 50ms" {
		t.Fatalf("after the window: %v %q", info.Status, info.Message)
	}
	if waited := time.Since(begun); waited < 50*time.Millisecond {
		t.Fatalf("ended %s after the link loss, before the window", waited)
	}

	tk2, err := m.Submit(Spec{Instruction: "y"})
	if err != nil {
		t.Fatal(err)
	}
	r2 := startOn(t, q, tk2)
	if !tk2.DetachLinkLost(r2, 0, time.Hour) {
		t.Fatal("DetachLinkLost refused a running task")
	}
	out, err := m.Cancel(context.Background(), tk2.ID(), "", false)
	if err != nil || !out.Cancelled || tk2.Status() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel while the link is lost: %+v %v %v", out, err, tk2.Status())
	}
}

// TestReattachOfAnotherTenantsRequeuedTaskIsNotFound: a commander that
// does not serve the tenant of a task that was requeued and runs again in
// a new session is answered as for an unknown task — not told that it was
// requeued, nor the session it runs in now (what a claim for that session
// needs) — and a refusal to one that serves it names no session but its
// own.
func TestReattachOfAnotherTenantsRequeuedTaskIsNotFound(t *testing.T) {
	cl := &fixedClaimer{attempt: 5}
	m, q := newManager(t, ManagerOptions{Claimer: cl})
	tk := submit(t, m)
	r := startOn(t, q, tk)
	if err := tk.Requeue(r, ""); err != nil {
		t.Fatal(err)
	}
	q.take(tk)
	if err := tk.Start(&fakeRunner{t: tk}, "cmd", "ses-new"); err != nil {
		t.Fatal(err)
	}
	notMine := func(string) bool { return false }
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", notMine, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotFound) || cl.claims != 0 {
		t.Fatalf("re-attach by a commander of another tenant: %v (claims %d); want ErrNotFound", err, cl.claims)
	}
	_, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", nil, func(*Task) Runner { return nil })
	if !errors.Is(err, ErrNotRunning) || !strings.Contains(err.Error(), "requeued") || strings.Contains(err.Error(), "ses-new") {
		t.Fatalf("re-attach of the requeued session: %v; want ErrNotRunning saying requeued, without the new session's id", err)
	}
	// An ended task of another tenant is not found either.
	tk.Finish(agentpb.TaskStatus_SUCCESS, "done", "")
	if _, err := m.Reattach(context.Background(), tk.ID(), "ses", "c2", notMine, func(*Task) Runner { return nil }); !errors.Is(err, ErrNotFound) {
		t.Fatalf("re-attach of another tenant's ended task: %v; want ErrNotFound", err)
	}
}

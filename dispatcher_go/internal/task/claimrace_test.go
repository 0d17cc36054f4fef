package task

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// heldClaimer is a claim that takes until release gives its answer:
// claiming is closed once the claim began.
type heldClaimer struct {
	claiming chan struct{}
	release  chan error
}

func newHeldClaimer() *heldClaimer {
	return &heldClaimer{claiming: make(chan struct{}), release: make(chan error)}
}

func (c *heldClaimer) Claim(ctx context.Context, _ string) (int64, error) {
	close(c.claiming)
	select {
	case err := <-c.release:
		if err != nil {
			return 0, err
		}
		return 9, nil
	case <-ctx.Done():
		return 0, ctx.Err()
	}
}

// linkLostWhileClaiming runs a task whose link broke (window) and starts a
// re-attach whose claim is held: the task, the claimer, and the
// re-attach's outcome (once the claim is released).
func linkLostWhileClaiming(t *testing.T, window time.Duration) (*Manager, *Task, *heldClaimer, <-chan error, <-chan Reattached) {
	t.Helper()
	cl := newHeldClaimer()
	m, q := newManager(t, ManagerOptions{Claimer: cl})
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	r := startOn(t, q, tk)
	if !tk.DetachLinkLost(r, 3, window) {
		t.Fatal("DetachLinkLost refused a running task")
	}
	errs := make(chan error, 1)
	got := make(chan Reattached, 1)
	go func() {
		info, err := m.Reattach(context.Background(), tk.ID(), "ses", "c", nil, func(tk *Task) Runner { return &fakeRunner{t: tk} })
		got <- info
		errs <- err
	}()
	select {
	case <-cl.claiming:
	case <-time.After(5 * time.Second):
		t.Fatal("the re-attach did not claim")
	}
	return m, tk, cl, errs, got
}

// The window runs out while a re-attach's claim runs, and the claim
// fails: the task ends FAILURE then. Before, the timer's expiry did
// nothing while the claim ran, and nothing ended the task afterwards: it
// stayed RUNNING for good (in a fleet, its lease renewed until the replica
// stopped).
func TestWindowThatRanOutDuringAFailedClaimEndsTheTask(t *testing.T) {
	window := 30 * time.Millisecond
	_, tk, cl, errs, _ := linkLostWhileClaiming(t, window)
	time.Sleep(10 * window)
	cl.release <- errors.New("store unavailable")
	if err := <-errs; err == nil {
		t.Fatal("re-attach with a failing claim succeeded")
	}
	select {
	case <-tk.Done():
	case <-time.After(5 * time.Second):
		t.Fatalf("task still %s %q after its window ran out during a failed claim", tk.Status(), tk.Info().Message)
	}
	if info := tk.Info(); info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "did not re-attach within 30ms") {
		t.Fatalf("ended %s %q", info.Status, info.Message)
	}
}

// A cancel while a re-attach claims the task waits for the claim: the
// re-attached session is stopped with it (Reattached.Stop) and the task
// is recorded as cancelled. Before, the cancel ended the task while the
// claim ran (in a fleet, writing its end with the attempt the claim was
// moving on: refused by the store).
func TestCancelDuringASuccessfulClaimStopsTheReattachedSession(t *testing.T) {
	m, tk, cl, errs, got := linkLostWhileClaiming(t, time.Minute)
	out, err := m.Cancel(context.Background(), tk.ID(), "stop it", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel during the claim: %+v %v", out, err)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the cancel ended the task (%s) while the claim ran", tk.Status())
	}
	cl.release <- nil
	if err := <-errs; err != nil {
		t.Fatalf("re-attach: %v", err)
	}
	info := <-got
	if info.Attempt != 9 || info.Stop == nil || info.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || info.Stop.GetReason() != "stop it" {
		t.Fatalf("re-attached %+v, want attempt 9 with the cancel as its stop", info)
	}
	if reason, ok := tk.CancelRequested(); !ok || reason != "stop it" {
		t.Fatalf("cancel recorded: %q %v", reason, ok)
	}
}

// A cancel while a re-attach claims the task, whose claim then fails: the
// task ends CANCELLED, as the cancel decided.
func TestCancelDuringAFailedClaimEndsTheTaskCancelled(t *testing.T) {
	m, tk, cl, errs, _ := linkLostWhileClaiming(t, time.Minute)
	if out, err := m.Cancel(context.Background(), tk.ID(), "stop it", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel during the claim: %+v %v", out, err)
	}
	cl.release <- errors.New("lease held by replica 2")
	if err := <-errs; err == nil {
		t.Fatal("re-attach with a failing claim succeeded")
	}
	if info := tk.Info(); info.Status != agentpb.TaskStatus_CANCELLED || !strings.Contains(info.Message, "stop it") {
		t.Fatalf("ended %s %q", info.Status, info.Message)
	}
}

// A copy waiting for its session that this fleet replica lost the lease
// of (disowned: Fleet.lost) ends nothing before Manager.DropCopy gets to
// it, nor after: not when its window runs out, not by a stop through a
// pointer held to it (a cancel, Fail, Shutdown). The attempt the fenced
// store writes with may be a newer copy's by then (a re-attach took the
// task afresh), so such an end was stored and overwrote that copy's
// RUNNING. Before, the window's timer ended the disowned copy FAILURE.
func TestADisownedWaitingCopyEndsNothing(t *testing.T) {
	p := &memPersist{saved: map[string]Snapshot{}}
	window := 30 * time.Millisecond
	m := NewManager(eventlog.NewDurable(eventlog.Limits{}, nowSink{}), NewConfigStore(nil),
		ManagerOptions{DefaultPlanner: "chat", StopGrace: 100 * time.Millisecond, Persistence: p, HandOverWindow: window})
	m.SetQueue(&fakeQueue{})
	m.SetFleet(&fakeFleet{p: p, requests: map[string]string{}})
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
		CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}}
	tk, err := m.AdoptWaiting(s, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	if m.Disown(s.ID) != tk {
		t.Fatal("Disown did not return the copy")
	}
	time.Sleep(10 * window)
	if tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the disowned copy ended itself when its window ran out: %s %q", tk.Status(), tk.Info().Message)
	}
	r, _ := tk.runnerState()
	if r.Stop("shutting down", dispatchv1.StopCode_STOP_CODE_SHUTDOWN) || tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("a stop of the disowned copy was decided: %s %q", tk.Status(), tk.Info().Message)
	}
	if st := p.last(s.ID).Status; Terminal(st) {
		t.Fatalf("the disowned copy recorded its end: %s", st)
	}
}

// Two streams of one session re-attach at once to a fleet replica that
// does not hold the task: one takes it over (Fleet.TakeSession), the other
// finds that copy and is refused (its session is attached). Before, both
// took the task afresh, each with an attempt of its own, and the second
// take forgot the first's copy while its session ran (two sessions, the
// first's records written with the second's attempt).
func TestTwoStreamsOfASessionTakeTheTaskOnce(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	id := NewID()
	var takes atomic.Int32
	entered := make(chan struct{}, 2)
	release := make(chan struct{})
	f.take = func(_ context.Context, tid, ses string, _ func(string) bool) error {
		takes.Add(1)
		entered <- struct{}{}
		<-release
		s := Snapshot{Summary: Summary{ID: tid, Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
			CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: ses}}
		_, err := m.AdoptWaiting(s, 3, int64(1+takes.Load()))
		return err
	}
	errs := make(chan error, 2)
	for range 2 {
		go func() {
			_, err := m.Reattach(context.Background(), id, "ses-1", "c", nil, func(tk *Task) Runner { return &fakeRunner{t: tk} })
			errs <- err
		}()
	}
	<-entered
	select {
	case <-entered:
		// Both take: let them, the outcome shows the harm.
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	var ok, refused int
	for range 2 {
		switch err := <-errs; {
		case err == nil:
			ok++
		case errors.Is(err, ErrNotRunning):
			refused++
		default:
			t.Fatalf("re-attach: %v", err)
		}
	}
	if n := takes.Load(); n != 1 || ok != 1 || refused != 1 {
		t.Fatalf("%d take(s), %d re-attach(es) succeeded, %d refused; want 1, 1, 1", n, ok, refused)
	}
}

// A second re-attach of the session while the first's claim still runs
// (the commander gave the first stream up, the claim waits for a slow
// store) is refused for now (ErrClaimUnderWay, which the session answers
// UNAVAILABLE: the commander tries again), not as a session attached to
// another stream (final: the commander would give the session up).
// Once the first claim fails, the next try succeeds.
func TestReattachWhileAnotherClaimRunsIsRefusedForNow(t *testing.T) {
	m, tk, cl, errs, _ := linkLostWhileClaiming(t, time.Minute)
	_, err := m.Reattach(context.Background(), tk.ID(), "ses", "c", nil, func(tk *Task) Runner { return &fakeRunner{t: tk} })
	if !errors.Is(err, ErrClaimUnderWay) || errors.Is(err, ErrNotRunning) {
		t.Fatalf("re-attach during another's claim: %v, want ErrClaimUnderWay (not ErrNotRunning)", err)
	}
	cl.release <- errors.New("store unavailable")
	if err := <-errs; err == nil {
		t.Fatal("the first re-attach succeeded on a failed claim")
	}
	// The claimer answers once more: this try gets it.
	cl.claiming = make(chan struct{})
	go func() { cl.release <- nil }()
	info, err := m.Reattach(context.Background(), tk.ID(), "ses", "c", nil, func(tk *Task) Runner { return &fakeRunner{t: tk} })
	if err != nil || info.Attempt != 9 {
		t.Fatalf("the next try: %+v %v, want attempt 9", info, err)
	}
}

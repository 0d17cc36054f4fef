package task

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

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

package eventlog

import (
	"errors"
	"sync/atomic"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// waitingSink is a full sink that counts the appends waiting in WaitRoom.
type waitingSink struct {
	fullSink
	waiting atomic.Int32
}

func (f *waitingSink) WaitRoom(abort <-chan struct{}) {
	f.waiting.Add(1)
	defer f.waiting.Add(-1)
	f.fullSink.WaitRoom(abort)
}

// waitUntil polls cond until it holds, failing the test after a while.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// returnsWithin runs f and fails the test if it does not return in time.
func returnsWithin(t *testing.T, what string, f func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- f() }()
	select {
	case err := <-done:
		return err
	case <-time.After(5 * time.Second):
		t.Fatalf("%s waited for the sink's room", what)
		return nil
	}
}

// TestControlEventsNeverWaitForRoom: with the sink's buffer full, Control
// appends (a task's state changes) and the seal go through at once, and
// content is still held back.
func TestControlEventsNeverWaitForRoom(t *testing.T) {
	sink := &fullSink{room: make(chan struct{})}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	contentDone := make(chan error, 1)
	go func() {
		_, err := l.Append(content("held"), Capped|Fenceable)
		contentDone <- err
	}()
	if err := returnsWithin(t, "a Control append", func() error {
		_, err := l.Append(&dispatchv1.TaskEvent{}, Control)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-contentDone:
		t.Fatalf("content appended without room: %v", err)
	default:
	}
	close(sink.room)
	if err := <-contentDone; err != nil {
		t.Fatal(err)
	}
	sink.room = make(chan struct{})
	if err := returnsWithin(t, "Seal", func() error {
		_, err := l.Seal(&dispatchv1.TaskEvent{})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got := l.LastSeq(); got != 3 {
		t.Fatalf("LastSeq %d, want 3", got)
	}
}

// TestWaitingContentIsReleasedByFenceAndSeal: content already waiting for
// room when the stop fences the log gives up at once with ErrFenced (so the
// session's stopped is not held up behind it); content that the fence does
// not refuse (Capped only, e.g. usage) waits until the seal, then gets
// ErrSealed.
func TestWaitingContentIsReleasedByFenceAndSeal(t *testing.T) {
	sink := &waitingSink{fullSink: fullSink{room: make(chan struct{})}}
	defer close(sink.room)
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	output := make(chan error, 1)
	usage := make(chan error, 1)
	go func() {
		_, err := l.Append(content("output"), Capped|Fenceable)
		output <- err
	}()
	go func() {
		_, err := l.Append(content("usage"), Capped)
		usage <- err
	}()
	waitUntil(t, "both appends wait for room", func() bool { return sink.waiting.Load() == 2 })
	if _, err := l.Fence(&dispatchv1.TaskEvent{}); err != nil {
		t.Fatal(err)
	}
	if err := returnsWithin(t, "a Fenceable append after the fence", func() error { return <-output }); !errors.Is(err, ErrFenced) {
		t.Fatalf("waiting output after the fence: %v, want ErrFenced", err)
	}
	select {
	case err := <-usage:
		t.Fatalf("usage released by the fence: %v", err)
	default:
	}
	if _, err := l.Seal(&dispatchv1.TaskEvent{}); err != nil {
		t.Fatal(err)
	}
	if err := returnsWithin(t, "a Capped append after the seal", func() error { return <-usage }); !errors.Is(err, ErrSealed) {
		t.Fatalf("waiting usage after the seal: %v, want ErrSealed", err)
	}
}

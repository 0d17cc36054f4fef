package testutil

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// Wait is a default deadline for things that should happen at once: long
// enough for a loaded machine running -race, short enough that a hang fails
// quickly.
const Wait = 5 * time.Second

// Poll backoff of WaitFor: the first re-check comes after minPoll, each next
// one after twice as long, never more than maxPoll apart.
const (
	minPoll = time.Millisecond
	maxPoll = 50 * time.Millisecond
)

// describe renders the optional message of a helper: a format string and
// its arguments, or nothing.
func describe(what string, msgAndArgs []any) string {
	if len(msgAndArgs) == 0 {
		return what
	}
	if format, ok := msgAndArgs[0].(string); ok {
		return fmt.Sprintf(format, msgAndArgs[1:]...)
	}
	return fmt.Sprint(msgAndArgs...)
}

// WaitFor polls cond, with a short backoff, until it reports true; if it
// still does not after timeout, the test fails with msgAndArgs (a format
// string and its arguments) as the thing that did not happen.
func WaitFor(t testing.TB, timeout time.Duration, cond func() bool, msgAndArgs ...any) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	pause := minPoll
	for !cond() {
		left := time.Until(deadline)
		if left <= 0 {
			t.Fatalf("timed out after %s waiting for %s", timeout, describe("a condition", msgAndArgs))
			return
		}
		timer := time.NewTimer(min(pause, left))
		<-timer.C
		pause = min(2*pause, maxPoll)
	}
}

// Recv receives one value from ch. The test fails if none comes within
// timeout or if ch is closed; msgAndArgs say what was awaited.
func Recv[T any](t testing.TB, ch <-chan T, timeout time.Duration, msgAndArgs ...any) T {
	t.Helper()
	v, ok := RecvOK(t, ch, timeout, msgAndArgs...)
	if !ok {
		t.Fatalf("channel closed while waiting for %s", describe("a value", msgAndArgs))
	}
	return v
}

// RecvOK receives one value from ch, or notices that it is closed (ok
// false): the bounded form of `v, ok := <-ch`. The test fails if neither
// happens within timeout.
func RecvOK[T any](t testing.TB, ch <-chan T, timeout time.Duration, msgAndArgs ...any) (v T, ok bool) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case v, ok = <-ch:
		return v, ok
	case <-timer.C:
		t.Fatalf("nothing received within %s: %s", timeout, describe("a value", msgAndArgs))
		return v, false
	}
}

// Done waits until ch yields a value or is closed: the bounded form of a
// bare `<-done`. The test fails if neither happens within timeout.
func Done[T any](t testing.TB, ch <-chan T, timeout time.Duration, msgAndArgs ...any) {
	t.Helper()
	RecvOK(t, ch, timeout, msgAndArgs...)
}

// NoRecv fails the test if a value arrives on ch (or ch is closed) within
// d. It waits the whole of d: keep d short, and use it only to show that
// something does not happen.
func NoRecv[T any](t testing.TB, ch <-chan T, d time.Duration, msgAndArgs ...any) {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case v, ok := <-ch:
		if !ok {
			t.Fatalf("channel closed within %s: %s", d, describe("expected nothing", msgAndArgs))
		}
		t.Fatalf("unexpected %v within %s: %s", v, d, describe("expected nothing", msgAndArgs))
	case <-timer.C:
	}
}

// Send sends v on ch. The test fails if nobody takes it within timeout.
func Send[T any](t testing.TB, ch chan<- T, v T, timeout time.Duration, msgAndArgs ...any) {
	t.Helper()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case ch <- v:
	case <-timer.C:
		t.Fatalf("nobody received within %s: %s", timeout, describe("a value", msgAndArgs))
	}
}

// Context returns a context that ends after timeout or when the test ends,
// whichever comes first.
func Context(t testing.TB, timeout time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	t.Cleanup(cancel)
	return ctx
}

// Result is what a call returned.
type Result[T any] struct {
	V   T
	Err error
}

// Async calls f on a goroutine of its own; the channel yields what it
// returned, once. It is how a test makes a blocking call (a cancel that
// waits for the stop's outcome, a stream read to its end) while it goes on
// doing the other side; receive the result with Recv, so that the wait is
// bounded. f must not call t.Fatal: it does not run on the test's goroutine.
func Async[T any](f func() (T, error)) <-chan Result[T] {
	ch := make(chan Result[T], 1)
	go func() {
		v, err := f()
		ch <- Result[T]{v, err}
	}()
	return ch
}

// Waited returns a channel closed when wg.Wait returns: the bounded form
// of wg.Wait is Done(t, Waited(&wg), timeout, ...).
func Waited(wg *sync.WaitGroup) <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		wg.Wait()
		close(ch)
	}()
	return ch
}

package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
)

func faultyWriter(t *testing.T, opts store.WriterOptions) (*store.Writer, *storetest.Faulty) {
	t.Helper()
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	f := storetest.NewFaulty(st)
	w := store.NewWriter(f, opts)
	t.Cleanup(func() {
		f.Heal()
		w.Close()
		_ = st.Close()
	})
	return w, f
}

func record(id string) store.TaskRecord {
	return store.TaskRecord{ID: id, Status: 1, CreatedAt: time.Now(), Body: []byte("{}")}
}

// changedWithin waits for ch (a HealthChanged channel) to close.
func changedWithin(t *testing.T, ch <-chan struct{}, what string) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(5 * time.Second):
		t.Fatalf("health did not change: %s", what)
	}
}

// TestWriterHealthWhenAWriteIsStuck: a write under way for longer than
// StuckAfter makes the Writer unhealthy (HealthChanged tells), a
// FlushWhileHealthy waiting for it gives up then, and one called meanwhile
// returns at once; once the store answers, the Writer is healthy again and
// everything queued is written.
func TestWriterHealthWhenAWriteIsStuck(t *testing.T) {
	w, f := faultyWriter(t, store.WriterOptions{Interval: time.Millisecond, StuckAfter: 50 * time.Millisecond})
	ctx := context.Background()
	if err := w.Health(); err != nil {
		t.Fatalf("new writer: %v", err)
	}
	changed := w.HealthChanged()
	f.Block(time.Minute)
	w.SaveTask(record("a"))
	start := time.Now()
	err := w.FlushWhileHealthy(ctx)
	if !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("FlushWhileHealthy on a stuck store: %v", err)
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("gave up after %s, before StuckAfter", d)
	}
	changedWithin(t, changed, "to unhealthy")
	if err := w.Health(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Health while stuck: %v", err)
	}
	start = time.Now()
	if err := w.FlushWhileHealthy(ctx); !errors.Is(err, store.ErrUnavailable) || time.Since(start) > time.Second {
		t.Fatalf("FlushWhileHealthy while unhealthy: %v after %s", err, time.Since(start))
	}
	changed = w.HealthChanged()
	f.Heal()
	changedWithin(t, changed, "back to healthy")
	if err := w.Health(); err != nil {
		t.Fatalf("Health after recovery: %v", err)
	}
	if err := w.FlushWhileHealthy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Store().GetTask(ctx, "a"); err != nil {
		t.Fatalf("record queued while stuck: %v", err)
	}
}

// TestWriterHealthWhenWritesFail: a failed write makes the Writer unhealthy
// at once (it keeps retrying); the first write that succeeds makes it
// healthy again.
func TestWriterHealthWhenWritesFail(t *testing.T) {
	w, f := faultyWriter(t, store.WriterOptions{Interval: time.Millisecond})
	ctx := context.Background()
	changed := w.HealthChanged()
	f.Fail(time.Minute)
	w.SaveTask(record("b"))
	changedWithin(t, changed, "to unhealthy")
	err := w.Health()
	if !errors.Is(err, store.ErrUnavailable) || errors.Is(err, storetest.ErrInjected) {
		t.Fatalf("Health while failing: %v (must not carry the store's error)", err)
	}
	start := time.Now()
	if err := w.FlushWhileHealthy(ctx); !errors.Is(err, store.ErrUnavailable) || time.Since(start) > time.Second {
		t.Fatalf("FlushWhileHealthy while failing: %v after %s", err, time.Since(start))
	}
	changed = w.HealthChanged()
	f.Heal()
	changedWithin(t, changed, "back to healthy")
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Store().GetTask(ctx, "b"); err != nil {
		t.Fatalf("record retried after the failure: %v", err)
	}
}

// TestWaitRoomEndsOnAbort: a producer waiting for room in a full buffer
// leaves when its abort channel closes.
func TestWaitRoomEndsOnAbort(t *testing.T) {
	w, f := faultyWriter(t, store.WriterOptions{Interval: time.Millisecond, MaxBatch: 1, MaxPending: 1})
	f.Block(time.Minute)
	w.SaveTask(record("c")) // taken into the stuck write
	deadline := time.Now().Add(5 * time.Second)
	for w.Pending() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the first record was not taken into a write")
		}
		time.Sleep(time.Millisecond)
	}
	w.SaveTask(record("d")) // fills the buffer
	abort := make(chan struct{})
	done := make(chan struct{})
	go func() {
		w.WaitRoom(abort)
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("WaitRoom returned with the buffer full")
	case <-time.After(20 * time.Millisecond):
	}
	close(abort)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WaitRoom did not end on abort")
	}
}

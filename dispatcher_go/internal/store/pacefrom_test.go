package store_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
)

// seqStore takes every write and remembers the highest event seq applied.
type seqStore struct {
	store.Store
	applied atomic.Uint64
}

func (s *seqStore) Apply(_ context.Context, b store.Batch) error {
	for _, e := range b.Events {
		if e.Seq > s.applied.Load() {
			s.applied.Store(e.Seq)
		}
	}
	return nil
}

// durableCommitter fails the test if told of a seq its store has not
// applied yet, and passes each Commit on.
type durableCommitter struct {
	t  *testing.T
	st *seqStore
	ch chan uint64
}

func (c durableCommitter) Commit(seq uint64) {
	if got := c.st.applied.Load(); got < seq {
		c.t.Errorf("told of seq %d before it was written (store has %d)", seq, got)
	}
	c.ch <- seq
}

func (durableCommitter) Replace(uint64, *dispatchv1.TaskEvent) {}

// TestWriterPacesOnlyUnderLoad: with PaceFrom an event at a moderate rate
// is written as soon as it is queued, even with an Interval of an hour (no
// pacing wait on its way), and only after it is applied is its log told;
// a flood is paced: once the burst is used up, its events wait for the
// Interval (here: until Flush).
func TestWriterPacesOnlyUnderLoad(t *testing.T) {
	st := &seqStore{}
	w := store.NewWriter(st, store.WriterOptions{Interval: time.Hour, PaceFrom: 8})
	defer w.Close()
	c := durableCommitter{t: t, st: st, ch: make(chan uint64, 4096)}
	seq := uint64(0)
	// Lone events (the load decays over 8 hours here: at most 8*8 records
	// in all before the Writer counts as loaded).
	for range 10 {
		seq++
		w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: seq})
		select {
		case got := <-c.ch:
			if got != seq {
				t.Fatalf("told %d, want %d", got, seq)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("lone event %d not written within 10 s (pending %d): paced", seq, w.Pending())
		}
	}
	// A flood: 100 events a round. The bucket lets 4 writes go back to
	// back, then the rest waits for the Interval.
	for range 20 {
		for range 100 {
			seq++
			w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: seq})
		}
		time.Sleep(time.Millisecond)
	}
	time.Sleep(100 * time.Millisecond)
	if w.Pending() == 0 {
		t.Fatal("a flood of 2 000 events is all written: not paced")
	}
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := st.applied.Load(); got != seq {
		t.Fatalf("applied up to %d, want %d", got, seq)
	}
}

// TestWriterWithoutPaceFromHoldsALoneEvent: PaceFrom 0 keeps Interval for
// every write (the test above would fail on its first event).
func TestWriterWithoutPaceFromHoldsALoneEvent(t *testing.T) {
	st := &seqStore{}
	w := store.NewWriter(st, store.WriterOptions{Interval: time.Hour})
	defer w.Close()
	c := durableCommitter{t: t, st: st, ch: make(chan uint64, 1)}
	w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: 1})
	select {
	case <-c.ch:
		t.Fatal("a lone event was written before the Interval with PaceFrom 0")
	case <-time.After(100 * time.Millisecond):
	}
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := <-c.ch; got != 1 {
		t.Fatalf("told %d", got)
	}
}

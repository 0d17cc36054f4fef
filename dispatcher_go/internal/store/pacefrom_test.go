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
	// A flood: 100 events a round. The first writes are not paced, until
	// the load with the pending events counts 8 or more per Interval; the
	// first paced write waits its turn in the bucket, about an Interval
	// (an hour) after NewWriter: here until Flush.
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

// writeCounter counts the writes and the events they hold.
type writeCounter struct {
	store.Store
	writes, events atomic.Int64
}

func (s *writeCounter) Apply(_ context.Context, b store.Batch) error {
	s.writes.Add(1)
	s.events.Add(int64(len(b.Events)))
	return nil
}

type nopCommitter struct{}

func (nopCommitter) Commit(uint64)                         {}
func (nopCommitter) Replace(uint64, *dispatchv1.TaskEvent) {}

// TestWriterPacesASteadyRateAboveFrom: events at from+2 per Interval in
// bursts of 2, so that no more than a few are pending at once, are paced
// once the load has built up (about a dozen Intervals): by then a write
// holds about an Interval's events, not one burst. The pending events
// alone never reach the threshold (from*paceTau): only the load counted
// as writes take their records does.
func TestWriterPacesASteadyRateAboveFrom(t *testing.T) {
	const (
		iv     = 20 * time.Millisecond
		from   = 4
		burst  = 2
		perIv  = (from + 2) / burst // bursts per Interval
		rounds = 40 * perIv         // 40 Intervals
	)
	st := &writeCounter{}
	w := store.NewWriter(st, store.WriterOptions{Interval: iv, PaceFrom: from})
	defer w.Close()
	seq := uint64(0)
	start := time.Now()
	var writes0, events0 int64
	for i := range rounds {
		time.Sleep(time.Until(start.Add(time.Duration(i) * iv / perIv)))
		if i == rounds/2 {
			writes0, events0 = st.writes.Load(), st.events.Load()
		}
		for range burst {
			seq++
			w.Persist(nopCommitter{}, "a", &dispatchv1.TaskEvent{Seq: seq})
		}
	}
	writes, events := st.writes.Load()-writes0, st.events.Load()-events0
	if writes == 0 {
		t.Fatal("no write in the second half")
	}
	// Paced: about from+2 events a write (one write per Interval); not
	// paced: about one burst (2) a write.
	if per := float64(events) / float64(writes); per < 4 {
		t.Fatalf("second half: %d events in %d writes (%.1f a write): not paced", events, writes, per)
	}
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// concurrentSeqStore is a seqStore that asks for several writes in flight
// (as PostgreSQL's store does).
type concurrentSeqStore struct{ *seqStore }

func (concurrentSeqStore) WritesInFlight() int { return 8 }

// TestWriterPaceFromOnlyWithOneInFlight: with more than one write in
// flight (asked for, or a ConcurrentStore's) PaceFrom is ignored and the
// bucket applies to every write: a lone event waits for the Interval (an
// hour, here until Flush), as with PaceFrom 0.
func TestWriterPaceFromOnlyWithOneInFlight(t *testing.T) {
	for _, tc := range []struct {
		name     string
		inFlight int
		backend  func(*seqStore) store.Store
	}{
		{"InFlight 4", 4, func(s *seqStore) store.Store { return s }},
		{"ConcurrentStore", 0, func(s *seqStore) store.Store { return concurrentSeqStore{s} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &seqStore{}
			w := store.NewWriter(tc.backend(st), store.WriterOptions{Interval: time.Hour, PaceFrom: 8, InFlight: tc.inFlight})
			defer w.Close()
			c := durableCommitter{t: t, st: st, ch: make(chan uint64, 1)}
			w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: 1})
			select {
			case <-c.ch:
				t.Fatal("a lone event was written before the Interval: PaceFrom applied with several writes in flight")
			case <-time.After(100 * time.Millisecond):
			}
			if err := w.Flush(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := <-c.ch; got != 1 {
				t.Fatalf("told %d", got)
			}
		})
	}
}

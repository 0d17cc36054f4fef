package store

import (
	"context"
	"sync"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// countStore takes every write and counts them.
type countStore struct {
	Store
	mu      sync.Mutex
	writes  int
	applied uint64
}

func (s *countStore) Apply(_ context.Context, b Batch) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	for _, e := range b.Events {
		s.applied = max(s.applied, e.Seq)
	}
	return nil
}

// timedCommitter records when each seq was told durable.
type timedCommitter struct {
	mu   sync.Mutex
	told map[uint64]time.Time
}

func (c *timedCommitter) Commit(seq uint64) {
	c.mu.Lock()
	c.told[seq] = time.Now()
	c.mu.Unlock()
}

func (*timedCommitter) Replace(uint64, *dispatchv1.TaskEvent) {}

// TestWriterPacesAheadWithoutWakeUps: under load (a steady stream above
// PaceFrom) the Writer sleeps out its pacing turn right after each write,
// so a record arriving meanwhile sends no wake-up (before: about one per
// write, the first record after each write), and still every record is
// written at its turn: none waits much more than an Interval.
func TestWriterPacesAheadWithoutWakeUps(t *testing.T) {
	const iv = 20 * time.Millisecond
	st := &countStore{}
	w := NewWriter(st, WriterOptions{Interval: iv, PaceFrom: 1})
	defer w.Close()
	c := &timedCommitter{told: map[uint64]time.Time{}}
	queued := map[uint64]time.Time{}
	start := time.Now()
	var seq uint64
	var wakes0, writes0 int
	for i := range 150 { // one event every 2 ms for 300 ms: 10 per Interval
		time.Sleep(time.Until(start.Add(time.Duration(i) * 2 * time.Millisecond)))
		if i == 50 { // the load has built up
			w.mu.Lock()
			wakes0 = w.wakes
			w.mu.Unlock()
			st.mu.Lock()
			writes0 = st.writes
			st.mu.Unlock()
		}
		seq++
		queued[seq] = time.Now()
		w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: seq})
	}
	w.mu.Lock()
	wakes := w.wakes - wakes0
	w.mu.Unlock()
	st.mu.Lock()
	writes := st.writes - writes0
	st.mu.Unlock()
	if writes < 3 {
		t.Fatalf("%d writes in the last 200 ms at a 20 ms Interval", writes)
	}
	if wakes*4 > writes {
		t.Fatalf("%d wake-ups for %d writes under load: the Writer is woken to start its pacing wait", wakes, writes)
	}
	// Every record is written without anybody waking the Writer: at its turn.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c.mu.Lock()
		n := len(c.told)
		c.mu.Unlock()
		st.mu.Lock()
		applied := st.applied
		st.mu.Unlock()
		if applied == seq && n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("applied up to %d of %d 10 s after the last record: nobody started the write", applied, seq)
		}
		time.Sleep(time.Millisecond)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	var late int
	for s, q := range queued {
		told, ok := c.told[s]
		if !ok {
			// told with a later seq of the same write (Commit gets the highest)
			for s2 := s + 1; s2 <= seq && !ok; s2++ {
				told, ok = c.told[s2]
			}
		}
		if !ok || told.Sub(q) > 5*iv {
			late++
		}
	}
	// A loaded machine may be late now and then; most must be at their turn.
	if late > len(queued)/10 {
		t.Fatalf("%d of %d records told more than %s after they were queued", late, len(queued), 5*iv)
	}
}

// TestWriterPacingAheadLetsFlushAndCloseThrough: a Writer sleeping out a
// long pacing turn (an hour) after a write still answers Flush at once,
// and Close ends it at once.
func TestWriterPacingAheadLetsFlushAndCloseThrough(t *testing.T) {
	st := &countStore{}
	w := NewWriter(st, WriterOptions{Interval: time.Hour}) // PaceFrom 0: always paced
	c := &timedCommitter{told: map[uint64]time.Time{}}
	w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: 1})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	// Now pacing ahead: the next write's turn is hours away.
	deadline := time.Now().Add(10 * time.Second)
	for {
		w.mu.Lock()
		pacing := w.pacing
		w.mu.Unlock()
		if pacing {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the Writer did not sleep out its turn after a paced write")
		}
		time.Sleep(time.Millisecond)
	}
	w.mu.Lock()
	wakes0 := w.wakes
	w.mu.Unlock()
	w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: 2})
	w.mu.Lock()
	wakes := w.wakes - wakes0
	w.mu.Unlock()
	if wakes != 0 {
		t.Fatalf("%d wake-ups sent while the Writer was pacing", wakes)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatalf("Flush while pacing: %v", err)
	}
	st.mu.Lock()
	applied := st.applied
	st.mu.Unlock()
	if applied != 2 {
		t.Fatalf("applied up to %d after Flush, want 2", applied)
	}
	w.Persist(c, "a", &dispatchv1.TaskEvent{Seq: 3})
	done := make(chan struct{})
	go func() { w.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close while pacing did not return")
	}
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.applied != 3 {
		t.Fatalf("applied up to %d after Close, want 3", st.applied)
	}
}

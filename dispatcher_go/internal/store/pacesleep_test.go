package store_test

import (
	"context"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

// commitTimes is a Committer that sends each Commit's seq.
type commitTimes chan uint64

func (c commitTimes) Commit(seq uint64)                     { c <- seq }
func (c commitTimes) Replace(uint64, *dispatchv1.TaskEvent) {}

func seqEvent(seq uint64) *dispatchv1.TaskEvent {
	ev := content("x")
	ev.Seq = seq
	return ev
}

// TestWriterSleepsOutPacingAfterWrite: once the pacing bucket is empty the
// Writer sleeps out the wait right after a write, and a record queued
// meanwhile (which no longer wakes it) is written when the timer fires;
// a Flush still cuts the sleep short.
func TestWriterSleepsOutPacingAfterWrite(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()

	t.Run("timer", func(t *testing.T) {
		const iv = 60 * time.Millisecond
		w := store.NewWriter(st, store.WriterOptions{Interval: iv, Burst: 1})
		defer w.Close()
		c := make(commitTimes, 4)
		w.Persist(c, "paced", seqEvent(1))
		if err := w.Flush(ctx); err != nil { // the first write, at once
			t.Fatal(err)
		}
		<-c
		wrote := time.Now()
		// The Writer is now asleep until wrote+iv: this record does not
		// wake it, the timer writes it.
		w.Persist(c, "paced", seqEvent(2))
		select {
		case seq := <-c:
			if seq != 2 {
				t.Fatalf("committed %d, want 2", seq)
			}
			if d := time.Since(wrote); d < iv/2 {
				t.Fatalf("written %v after the previous write, want about the interval %v", d, iv)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a record queued during the pacing sleep was never written")
		}
	})

	t.Run("flush", func(t *testing.T) {
		w := store.NewWriter(st, store.WriterOptions{Interval: time.Hour, Burst: 1})
		c := make(commitTimes, 4)
		w.Persist(c, "flushed", seqEvent(1))
		if err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		<-c
		w.Persist(c, "flushed", seqEvent(2)) // paced an hour away
		select {
		case <-c:
			t.Fatal("written before the pacing wait or a flush")
		case <-time.After(50 * time.Millisecond):
		}
		fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := w.Flush(fctx); err != nil {
			t.Fatalf("flush during the pacing sleep: %v", err)
		}
		if seq := <-c; seq != 2 {
			t.Fatalf("committed %d, want 2", seq)
		}
		w.Persist(c, "flushed", seqEvent(3))
		closed := make(chan struct{})
		go func() { w.Close(); close(closed) }()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Fatal("Close waited out the pacing sleep")
		}
		if seq := <-c; seq != 3 {
			t.Fatalf("Close committed %d, want 3", seq)
		}
		if last, _ := st.LastSeq(ctx, "flushed"); last != 3 {
			t.Fatalf("stored up to %d, want 3", last)
		}
	})
}

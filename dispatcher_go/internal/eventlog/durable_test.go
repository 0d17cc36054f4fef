package eventlog

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// fakeSink holds persisted events until the test commits them; stored are
// the events "on disk": from a previous run, or committed since.
type fakeSink struct {
	mu      sync.Mutex
	pending []struct {
		c  Committer
		ev *dispatchv1.TaskEvent
	}
	stored []*dispatchv1.TaskEvent
}

func (f *fakeSink) WaitRoom(<-chan struct{}) {}

func (f *fakeSink) Persist(c Committer, _ string, ev *dispatchv1.TaskEvent) {
	f.mu.Lock()
	f.pending = append(f.pending, struct {
		c  Committer
		ev *dispatchv1.TaskEvent
	}{c, ev})
	f.mu.Unlock()
}

func (f *fakeSink) commitAll() {
	f.mu.Lock()
	p := f.pending
	f.pending = nil
	for _, x := range p {
		f.stored = append(f.stored, x.ev)
	}
	f.mu.Unlock()
	for _, x := range p {
		x.c.Commit(x.ev.GetSeq())
	}
}

func (f *fakeSink) ReadStored(_ context.Context, _ string, after uint64, limit int) ([]*dispatchv1.TaskEvent, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []*dispatchv1.TaskEvent
	for _, ev := range f.stored {
		if ev.GetSeq() > after && len(out) < limit {
			out = append(out, ev)
		}
	}
	return out, nil
}

func TestDurableReadersSeeOnlyCommittedEvents(t *testing.T) {
	sink := &fakeSink{}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	if seq, _ := l.Append(content("a"), Capped); seq != 1 {
		t.Fatalf("seq %d", seq)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if evs, err := l.Read(ctx, 0, nil); len(evs) != 0 || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("uncommitted event visible: %v %v", evs, err)
	}
	got := make(chan int, 1)
	go func() {
		evs, _ := l.Read(context.Background(), 0, nil)
		got <- len(evs)
	}()
	waitForReader(t)
	sink.commitAll()
	if n := testutil.Recv(t, got, testutil.Wait, "the reader to be woken by the commit"); n != 1 {
		t.Fatalf("read %d", n)
	}
	// The terminal event: EOF only once it is committed too.
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	if _, err := l.Read(ctx2, 1, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("sealed but uncommitted: %v", err)
	}
	sink.commitAll()
	evs, err := l.Read(context.Background(), 1, nil)
	if err != nil || len(evs) != 1 || evs[0].GetSeq() != 2 {
		t.Fatalf("terminal: %v %v", evs, err)
	}
	if _, err := l.Read(context.Background(), 2, nil); !errors.Is(err, io.EOF) {
		t.Fatalf("after terminal: %v", err)
	}
}

func TestDurableRestoreContinuesSeqAndReadsOlderFromStore(t *testing.T) {
	sink := &fakeSink{}
	for i := 1; i <= 3; i++ {
		ev := content("old")
		ev.Seq = uint64(i)
		sink.stored = append(sink.stored, ev)
	}
	d := NewDurable(Limits{}, sink)
	l, err := d.Restore("t", 3, false)
	if err != nil {
		t.Fatal(err)
	}
	if seq, _ := l.Append(content("new"), Capped); seq != 4 {
		t.Fatalf("seq after restore %d", seq)
	}
	sink.commitAll()
	var seqs []uint64
	var after uint64
	buf := make([]*dispatchv1.TaskEvent, 0, 2)
	for after < 4 {
		evs, err := l.Read(context.Background(), after, buf)
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			seqs = append(seqs, ev.GetSeq())
			after = ev.GetSeq()
		}
	}
	if len(seqs) != 4 || seqs[0] != 1 || seqs[3] != 4 {
		t.Fatalf("seqs %v", seqs)
	}
	// A stored (finished) log reads only the store, then ends.
	s := d.Stored("t", 3)
	if evs, err := s.Read(context.Background(), 0, nil); err != nil || len(evs) != 3 {
		t.Fatalf("stored read %v %v", evs, err)
	}
	if _, err := s.Read(context.Background(), 3, nil); !errors.Is(err, io.EOF) {
		t.Fatalf("stored end %v", err)
	}
	// Events the store lost (retention) are reported, not looped on.
	sink.stored = nil
	if _, err := s.Read(context.Background(), 0, nil); !errors.Is(err, ErrTrimmed) {
		t.Fatalf("trimmed: %v", err)
	}
	if _, err := d.Restore("t", 0, false); !errors.Is(err, ErrExists) {
		t.Fatalf("restore twice: %v", err)
	}
}

// A finished task's events are dropped from memory once all are durable
// (here at once: no memory for finished logs), so memory does not grow
// with the logs of finished tasks; readers, including one that was
// half-way through, get the rest from the store.
func TestDurableReleasesFinishedLogToStore(t *testing.T) {
	sink := &fakeSink{}
	d := NewDurable(Limits{}, sink)
	d.retainBytes = 0
	l, err := d.Create("t")
	if err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		if _, err := l.Append(content(string(rune('a'+i))), Capped); err != nil {
			t.Fatal(err)
		}
	}
	sink.commitAll()
	half, err := l.Read(context.Background(), 0, make([]*dispatchv1.TaskEvent, 0, 5))
	if err != nil || len(half) != 5 {
		t.Fatalf("first half: %d %v", len(half), err)
	}
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	sink.commitAll()
	ml := l.(*memLog)
	ml.mu.RLock()
	held := len(ml.events)
	ml.mu.RUnlock()
	if held != 0 {
		t.Fatalf("finished log still holds %d events in memory", held)
	}
	if got := l.LastSeq(); got != 11 {
		t.Fatalf("LastSeq %d after release", got)
	}
	var seqs []uint64
	after := half[len(half)-1].GetSeq()
	for {
		evs, err := l.Read(context.Background(), after, nil)
		for _, ev := range evs {
			seqs = append(seqs, ev.GetSeq())
			after = ev.GetSeq()
		}
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if len(seqs) != 6 || seqs[0] != 6 || seqs[5] != 11 {
		t.Fatalf("rest of the log from the store: %v", seqs)
	}
	if evs, err := l.Read(context.Background(), 0, nil); err != nil || len(evs) == 0 || evs[0].GetSeq() != 1 {
		t.Fatalf("late reader from 0: %v %v", evs, err)
	}
}

// fullSink is a sink whose buffer stays full: WaitRoom blocks until room is
// closed (or the caller aborts).
type fullSink struct {
	fakeSink
	room chan struct{}
}

func (f *fullSink) WaitRoom(abort <-chan struct{}) {
	select {
	case <-f.room:
	case <-abort:
	}
}

// TestFenceAndFencedAppendDoNotWaitForRoom: with the sink full, the stop's
// Fence and every later Fenceable append (refused anyway) return at once, so
// a stopped session's queued output never waits for the store writer.
func TestFenceAndFencedAppendDoNotWaitForRoom(t *testing.T) {
	sink := &fullSink{room: make(chan struct{})}
	defer close(sink.room)
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		if _, err := l.Fence(&dispatchv1.TaskEvent{}); err != nil {
			done <- err
			return
		}
		_, err := l.Append(&dispatchv1.TaskEvent{}, Capped|Fenceable)
		done <- err
	}()
	if err := testutil.Recv(t, done, testutil.Wait, "Fence and a fenced Append to return without waiting for the sink's room"); !errors.Is(err, ErrFenced) {
		t.Fatalf("append after the fence: %v, want ErrFenced", err)
	}
}

// countingSink counts the reads that go to the store.
type countingSink struct {
	fakeSink
	reads int
}

func (c *countingSink) ReadStored(ctx context.Context, task string, after uint64, limit int) ([]*dispatchv1.TaskEvent, error) {
	c.mu.Lock()
	c.reads++
	c.mu.Unlock()
	return c.fakeSink.ReadStored(ctx, task, after, limit)
}

// TestDurableKeepsFinishedTailInMemory: the watchers of a task that just
// ended read its events from memory, not from the store, as long as the
// finished logs held fit in the Durable's bound; past it the oldest lets
// its events go and is read from the store.
func TestDurableKeepsFinishedTailInMemory(t *testing.T) {
	sink := &countingSink{}
	d := NewDurable(Limits{}, sink)
	d.retainBytes = 64 * 15 // one log of 11 events (64 bytes each, estimated), not two
	fill := func(id string) Log {
		l, err := d.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		for i := range 10 {
			if _, err := l.Append(content(string(rune('a'+i))), Capped); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := l.Seal(content("end")); err != nil {
			t.Fatal(err)
		}
		sink.commitAll()
		return l
	}
	readAll := func(l Log) int {
		var n int
		var after uint64
		for {
			evs, err := l.Read(context.Background(), after, nil)
			n += len(evs)
			if len(evs) > 0 {
				after = evs[len(evs)-1].GetSeq()
			}
			if errors.Is(err, io.EOF) {
				return n
			}
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	a := fill("a")
	if n := readAll(a); n != 11 || sink.reads != 0 {
		t.Fatalf("finished log a: read %d events, %d from the store", n, sink.reads)
	}
	b := fill("b") // a no longer fits beside b: a lets go
	if n := readAll(b); n != 11 || sink.reads != 0 {
		t.Fatalf("finished log b: read %d events, %d from the store", n, sink.reads)
	}
	a.(*memLog).mu.RLock()
	held := len(a.(*memLog).events)
	a.(*memLog).mu.RUnlock()
	if held != 0 {
		t.Fatalf("the older finished log still holds %d events", held)
	}
	if n := readAll(a); n != 11 || sink.reads == 0 {
		t.Fatalf("released log a: read %d events, %d from the store", n, sink.reads)
	}
}

// WhenDurable calls back once the event is committed — after the commit,
// in any order of registration — and at once for an event already
// committed, or in a Memory log, where every event is.
func TestWhenDurable(t *testing.T) {
	sink := &fakeSink{}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	var got []uint64
	for range 3 {
		if _, err := l.Append(&dispatchv1.TaskEvent{}, Capped); err != nil {
			t.Fatal(err)
		}
	}
	l.WhenDurable(3, func() { got = append(got, 3) })
	l.WhenDurable(1, func() { got = append(got, 1) })
	if len(got) != 0 {
		t.Fatalf("called before the commit: %v", got)
	}
	sink.mu.Lock()
	first := sink.pending[0]
	sink.pending = sink.pending[1:]
	sink.mu.Unlock()
	first.c.Commit(first.ev.GetSeq())
	if len(got) != 1 || got[0] != 1 {
		t.Fatalf("after committing 1: %v", got)
	}
	sink.commitAll()
	if len(got) != 2 || got[1] != 3 {
		t.Fatalf("after committing all: %v", got)
	}
	sink.commitAll() // nothing left to call
	l.WhenDurable(2, func() { got = append(got, 2) })
	if len(got) != 3 || got[2] != 2 {
		t.Fatalf("committed already: %v", got)
	}

	m, err := NewMemory(Limits{}).Create("m")
	if err != nil {
		t.Fatal(err)
	}
	seq, _ := m.Append(&dispatchv1.TaskEvent{}, Capped)
	called := false
	m.WhenDurable(seq, func() { called = true })
	if !called {
		t.Fatal("a Memory log did not call back at once")
	}
}

// An event the store did not keep (a placeholder replaced it before the
// commit) never calls its WhenDurable callbacks: a tool call held for it
// is not invoked. Others of the same commit still are.
func TestWhenDurableNotForAReplacedEvent(t *testing.T) {
	sink := &fakeSink{}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := l.Append(&dispatchv1.TaskEvent{}, Capped); err != nil {
			t.Fatal(err)
		}
	}
	var got []uint64
	l.WhenDurable(1, func() { got = append(got, 1) })
	l.WhenDurable(2, func() { got = append(got, 2) })
	l.(Committer).Replace(1, &dispatchv1.TaskEvent{})
	sink.commitAll()
	if len(got) != 1 || got[0] != 2 {
		t.Fatalf("called back %v, want only [2] (1 was replaced)", got)
	}
}

package eventlog

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func content(text string) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: text}}}
}

// waitForReader waits until a reader has found nothing new in the log and
// waits for the next append (or commit). Tests of this package run one at a
// time, so the reader is the test's own.
func waitForReader(t *testing.T) {
	t.Helper()
	testutil.WaitFor(t, testutil.Wait, func() bool { return testutil.Blocked("eventlog.(*memLog).Read") },
		"a reader to wait in Read")
}

func newLog(t *testing.T, limits Limits) Log {
	t.Helper()
	l, err := NewMemory(limits).Create("t1")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func TestAppendNumbersFromOne(t *testing.T) {
	l := newLog(t, Limits{})
	for i := 1; i <= 3; i++ {
		seq, err := l.Append(content("x"), Capped)
		if err != nil || seq != uint64(i) {
			t.Fatalf("append %d: seq=%d err=%v", i, seq, err)
		}
	}
	if got := l.LastSeq(); got != 3 {
		t.Fatalf("LastSeq = %d, want 3", got)
	}
}

func TestCreateTwiceFails(t *testing.T) {
	m := NewMemory(Limits{})
	if _, err := m.Create("a"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("a"); !errors.Is(err, ErrExists) {
		t.Fatalf("second Create: %v, want ErrExists", err)
	}
	m.Remove("a")
	if m.Len() != 0 {
		t.Fatalf("Len after Remove = %d", m.Len())
	}
}

func TestReadHistoryThenLiveThenEOF(t *testing.T) {
	l := newLog(t, Limits{})
	_, _ = l.Append(content("a"), Capped)
	_, _ = l.Append(content("b"), Capped)

	ctx := context.Background()
	evs, err := l.Read(ctx, 0, nil)
	if err != nil || len(evs) != 2 || evs[0].GetSeq() != 1 || evs[1].GetSeq() != 2 {
		t.Fatalf("history: %v %v", evs, err)
	}
	got := make(chan []*dispatchv1.TaskEvent, 1)
	go func() {
		evs, _ := l.Read(ctx, 2, nil)
		got <- evs
	}()
	waitForReader(t)
	_, _ = l.Append(content("c"), Capped)
	if evs := testutil.Recv(t, got, testutil.Wait, "the reader to be woken by the append"); len(evs) != 1 || evs[0].GetContent().GetText() != "c" {
		t.Fatalf("live read: %v", evs)
	}
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	evs, err = l.Read(ctx, 3, nil)
	if err != nil || len(evs) != 1 || evs[0].GetSeq() != 4 {
		t.Fatalf("terminal read: %v %v", evs, err)
	}
	if _, err := l.Read(ctx, 4, nil); !errors.Is(err, io.EOF) {
		t.Fatalf("after terminal: %v, want EOF", err)
	}
	if _, err := l.Append(content("late"), Control); !errors.Is(err, ErrSealed) {
		t.Fatalf("append after seal: %v", err)
	}
}

func TestReadRespectsBatchCapacity(t *testing.T) {
	l := newLog(t, Limits{})
	for range 10 {
		_, _ = l.Append(content("x"), Capped)
	}
	buf := make([]*dispatchv1.TaskEvent, 0, 4)
	var after uint64
	var seen []uint64
	for after < 10 {
		evs, err := l.Read(context.Background(), after, buf)
		if err != nil {
			t.Fatal(err)
		}
		if len(evs) > 4 {
			t.Fatalf("batch of %d > cap 4", len(evs))
		}
		for _, ev := range evs {
			seen = append(seen, ev.GetSeq())
			after = ev.GetSeq()
		}
	}
	for i, s := range seen {
		if s != uint64(i+1) {
			t.Fatalf("gap or duplicate: %v", seen)
		}
	}
}

func TestReadEndsOnContext(t *testing.T) {
	l := newLog(t, Limits{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := l.Read(ctx, 0, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Read = %v, want deadline", err)
	}
}

func TestFenceRefusesPlannerOutputButNotControl(t *testing.T) {
	l := newLog(t, Limits{})
	if _, err := l.Fence(content("stop")); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Append(content("late"), Capped|Fenceable); !errors.Is(err, ErrFenced) {
		t.Fatalf("fenceable after fence: %v", err)
	}
	if _, err := l.Append(content("usage"), Capped); err != nil {
		t.Fatalf("capped, not fenceable: %v", err)
	}
	if _, err := l.Append(content("result"), Control); err != nil {
		t.Fatalf("control: %v", err)
	}
	if _, err := l.Fence(content("again")); !errors.Is(err, ErrFenced) {
		t.Fatalf("second fence: %v", err)
	}
}

func TestLimitsRefuseNotDrop(t *testing.T) {
	l := newLog(t, Limits{MaxEvents: 2})
	for range 2 {
		if _, err := l.Append(content("x"), Capped); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Append(content("x"), Capped); !errors.Is(err, ErrFull) {
		t.Fatalf("3rd capped: %v, want ErrFull", err)
	}
	// Control events (the stop, the terminal state) still get in.
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	evs, _ := l.Read(context.Background(), 0, nil)
	if len(evs) != 3 {
		t.Fatalf("log holds %d events, want 3 (nothing dropped silently)", len(evs))
	}

	b := newLog(t, Limits{MaxBytes: 100})
	if _, err := b.Append(content(strings.Repeat("x", 50)), Capped); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Append(content(strings.Repeat("x", 60)), Capped); !errors.Is(err, ErrFull) {
		t.Fatalf("over byte limit: %v", err)
	}
}

// A reader that never reads must not slow the writer, and many readers each
// see every event exactly once.
func TestSlowAndManyReaders(t *testing.T) {
	l := newLog(t, Limits{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	const readers, events = 8, 2000
	var wg sync.WaitGroup
	results := make([][]uint64, readers)
	for r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]*dispatchv1.TaskEvent, 0, 16)
			var after uint64
			for {
				evs, err := l.Read(ctx, after, buf)
				for _, ev := range evs {
					results[r] = append(results[r], ev.GetSeq())
					after = ev.GetSeq()
				}
				if err != nil {
					return
				}
				if r == 0 {
					time.Sleep(time.Millisecond) // the slow one
				}
			}
		}()
	}
	start := time.Now()
	for range events - 1 {
		if _, err := l.Append(content("x"), Capped); err != nil {
			t.Fatal(err)
		}
	}
	_, _ = l.Seal(content("end"))
	if d := time.Since(start); d > time.Second {
		t.Fatalf("writer took %s: readers slowed it down", d)
	}
	testutil.Done(t, testutil.Waited(&wg), 4*testutil.Wait, "every reader to reach the end of the log")
	for r, seqs := range results {
		if len(seqs) != events {
			t.Fatalf("reader %d saw %d events, want %d", r, len(seqs), events)
		}
		for i, s := range seqs {
			if s != uint64(i+1) {
				t.Fatalf("reader %d: gap/duplicate at %d", r, i)
			}
		}
	}
}

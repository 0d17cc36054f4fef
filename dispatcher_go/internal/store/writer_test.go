package store_test

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func content(s string) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: s}}}
}

// TestWriterBatchesUnderBackPressure: with a buffer far smaller than what is
// appended, every event still reaches the store once, in order, readers see
// them all, and nothing deadlocks.
func TestWriterBatchesUnderBackPressure(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	w := store.NewWriter(st, store.WriterOptions{MaxBatch: 16, MaxPending: 32, Interval: time.Millisecond})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	const n = 2000
	done := make(chan error, 4)
	for i := range 4 {
		l, err := logs.Create(string(rune('a' + i)))
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			for range n {
				if _, err := l.Append(content("x"), eventlog.Capped); err != nil {
					done <- err
					return
				}
			}
			_, _ = l.Seal(content("end"))
			var after uint64
			for {
				evs, err := l.Read(ctx, after, nil)
				for _, ev := range evs {
					if ev.GetSeq() != after+1 {
						done <- errors.New("gap")
						return
					}
					after = ev.GetSeq()
				}
				if errors.Is(err, io.EOF) {
					done <- nil
					return
				}
				if err != nil {
					done <- err
					return
				}
			}
		}()
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w.Close()
	for i := range 4 {
		if last, _ := st.LastSeq(ctx, string(rune('a'+i))); last != n+1 {
			t.Fatalf("stored %d events, want %d", last, n+1)
		}
	}
	rec := store.TaskRecord{ID: "x", Status: 1, CreatedAt: time.Now(), Body: []byte("{}")}
	if err := w.Flush(ctx); !errors.Is(err, store.ErrWriterClosed) {
		t.Fatalf("flush after close: %v", err)
	}
	w.SaveTask(rec) // ignored after close, must not panic or block
}

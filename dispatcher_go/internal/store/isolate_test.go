package store_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

// refusingStore refuses, as a database refuses a row (ErrRejected), every
// batch that holds the task record of refusedTask or a content event of
// refusedEventTask at seq refusedSeq (its placeholder is accepted).
type refusingStore struct {
	store.Store
	applies atomic.Int64
}

const (
	refusedTask      = "bad-record"
	refusedEventTask = "bad-event"
	refusedSeq       = 2
)

func (s *refusingStore) Apply(ctx context.Context, b store.Batch) error {
	s.applies.Add(1)
	for _, t := range b.Tasks {
		if t.ID == refusedTask {
			return store.Rejected(errors.New("CHECK constraint failed: task " + t.ID))
		}
	}
	for _, e := range b.Events {
		if e.TaskID != refusedEventTask || e.Seq != refusedSeq {
			continue
		}
		ev := &dispatchv1.TaskEvent{}
		if proto.Unmarshal(e.Data, ev) != nil || ev.GetError() == nil {
			return store.Rejected(errors.New("CHECK constraint failed: event"))
		}
	}
	return s.Store.Apply(ctx, b)
}

// TestRefusedRecordsAreSetAside: a record the store refuses used to make
// the writer retry its whole batch for ever (no event of any task became
// readable, Flush never returned). Now the batch is split until the
// refused records are found: a refused event is stored (and served live)
// as a placeholder at its seq, a refused task record is left out, their
// tasks are reported once each, everything else is written in a bounded
// number of transactions, and the writer stays healthy.
func TestRefusedRecordsAreSetAside(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rs := &refusingStore{Store: st}
	var mu sync.Mutex
	reported := map[string][]string{}
	// A long interval: everything below goes in one batch, at the Flush.
	w := store.NewWriter(rs, store.WriterOptions{Interval: time.Hour, OnRejected: func(taskID, reason string) {
		mu.Lock()
		reported[taskID] = append(reported[taskID], reason)
		mu.Unlock()
	}})
	defer w.Close()
	logs := eventlog.NewDurable(eventlog.Limits{}, w)

	var good []eventlog.Log
	for _, id := range []string{"a", "b", refusedEventTask, "c"} {
		l, err := logs.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		for _, text := range []string{"one", "two", "three"} {
			if _, err := l.Append(content(text), eventlog.Capped); err != nil {
				t.Fatal(err)
			}
		}
		if id != refusedEventTask {
			good = append(good, l)
		}
		w.SaveTask(record(id))
	}
	w.SaveTask(record(refusedTask))
	fctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := w.Flush(fctx); err != nil {
		t.Fatalf("flush: %v", err)
	}

	for _, l := range good {
		if evs, err := l.Read(fctx, 0, nil); err != nil || len(evs) != 3 {
			t.Fatalf("a good task's events: %v %v", evs, err)
		}
	}
	for _, id := range []string{"a", "b", refusedEventTask, "c"} {
		if _, err := st.GetTask(ctx, id); err != nil {
			t.Fatalf("record of %s: %v", id, err)
		}
	}
	if _, err := st.GetTask(ctx, refusedTask); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the refused record: %v, want it not stored", err)
	}
	evs, err := logs.Stored(refusedEventTask, 3).Read(fctx, 0, nil)
	if err != nil || len(evs) != 3 || evs[0].GetContent().GetText() != "one" || evs[2].GetContent().GetText() != "three" {
		t.Fatalf("the task with the refused event, from the store: %v %v", evs, err)
	}
	wantPlaceholder(t, evs[1], refusedSeq, store.EventNotStored)

	mu.Lock()
	defer mu.Unlock()
	if len(reported) != 2 || len(reported[refusedTask]) != 1 || len(reported[refusedEventTask]) != 1 {
		t.Fatalf("reported %v, want each refused task once", reported)
	}
	if err := w.Health(); err != nil {
		t.Fatalf("a refused record made the writer unhealthy: %v", err)
	}
	// 17 items, two refused: the whole batch, then two halves per level of
	// the splits that find them (18 transactions with the placeholder's):
	// bounded, never a retry of the same batch.
	if n := rs.applies.Load(); n > 2*17 {
		t.Fatalf("%d transactions to isolate two records", n)
	}
}

// TestRefusedEventIsReplacedForLiveReaders: a live reader of the task (the
// in-memory log) gets the placeholder too, not the event the store could
// not keep.
func TestRefusedEventIsReplacedForLiveReaders(t *testing.T) {
	ctx := context.Background()
	st, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	w := store.NewWriter(&refusingStore{Store: st}, store.WriterOptions{})
	defer w.Close()
	l, err := eventlog.NewDurable(eventlog.Limits{}, w).Create(refusedEventTask)
	if err != nil {
		t.Fatal(err)
	}
	for _, text := range []string{"one", "two", "three"} {
		if _, err := l.Append(content(text), eventlog.Capped); err != nil {
			t.Fatal(err)
		}
	}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var got []*dispatchv1.TaskEvent
	for len(got) < 3 {
		evs, err := l.Read(rctx, uint64(len(got)), nil)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, evs...)
	}
	wantPlaceholder(t, got[1], refusedSeq, store.EventNotStored)
	if got[0].GetContent().GetText() != "one" || got[2].GetContent().GetText() != "three" {
		t.Fatalf("events around the refused one: %v", got)
	}
}

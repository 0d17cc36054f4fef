package store_test

import (
	"context"
	"database/sql"
	"errors"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// sqliteWriter is a Writer on a fresh SQLite store in dir, closed (writer,
// then store) when the test ends.
func sqliteWriter(t *testing.T, dir string, opts store.WriterOptions) (*store.Writer, *sqlite.Store) {
	t.Helper()
	st, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	w := store.NewWriter(st, opts)
	t.Cleanup(func() {
		w.Close()
		_ = st.Close()
	})
	return w, st
}

// readAll reads log from the start until io.EOF (the log must be sealed),
// failing the test on any other error or after testutil.Wait.
func readAll(t *testing.T, log eventlog.Log) []*dispatchv1.TaskEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
	defer cancel()
	var out []*dispatchv1.TaskEvent
	for {
		evs, err := log.Read(ctx, uint64(len(out)), nil)
		for _, ev := range evs {
			if ev.GetSeq() != uint64(len(out))+1 {
				t.Fatalf("read seq %d after %d events: a gap", ev.GetSeq(), len(out))
			}
			out = append(out, ev)
		}
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("reading after seq %d: %v", len(out), err)
		}
	}
}

// wantPlaceholder fails unless ev is the error event that stands for an
// event the store could not keep or give back, with code.
func wantPlaceholder(t *testing.T, ev *dispatchv1.TaskEvent, seq uint64, code string) {
	t.Helper()
	e := ev.GetError()
	if ev.GetSeq() != seq || e.GetCode() != code || e.GetMessage() == "" {
		t.Fatalf("event %d = %v, want an error event %q saying why", seq, ev, code)
	}
}

// TestUnencodableEventIsStoredAsPlaceholder: an event that cannot be
// encoded (a string that is not UTF-8) used to be stored as the bytes
// protobuf had produced so far, which no reader could decode again: the
// task's whole history became unreadable. Now the store keeps, at its seq,
// an error event that says so; the events around it, and every other
// task's, are readable, live and from the store.
func TestUnencodableEventIsStoredAsPlaceholder(t *testing.T) {
	dir := t.TempDir()
	w, _ := sqliteWriter(t, dir, store.WriterOptions{})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	bad, err := logs.Create("bad")
	if err != nil {
		t.Fatal(err)
	}
	good, err := logs.Create("good")
	if err != nil {
		t.Fatal(err)
	}
	for _, text := range []string{"before", "cut in the middle of \xe6\x96", "after"} {
		if _, err := bad.Append(content(text), eventlog.Capped); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := bad.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	if _, err := good.Append(content("fine"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if _, err := good.Seal(content("end")); err != nil {
		t.Fatal(err)
	}

	for _, l := range []eventlog.Log{good, logs.Stored("good", 2)} {
		if evs := readAll(t, l); len(evs) != 2 || evs[0].GetContent().GetText() != "fine" {
			t.Fatalf("good task: %v", evs)
		}
	}
	for _, l := range []eventlog.Log{bad, logs.Stored("bad", 4)} {
		evs := readAll(t, l)
		if len(evs) != 4 || evs[0].GetContent().GetText() != "before" || evs[2].GetContent().GetText() != "after" {
			t.Fatalf("bad task: %v", evs)
		}
		wantPlaceholder(t, evs[1], 2, "event_not_stored")
	}
	if err := w.Health(); err != nil {
		t.Fatalf("a record's fault made the writer unhealthy: %v", err)
	}
}

// TestRecordWithoutBodyDoesNotBlockOtherTasks: a task record that the store
// refuses (a body the task codec could not produce: nil, NOT NULL in the
// schema) used to be retried with its whole batch for ever: no event of any
// task became readable again, and every Flush (Submit) hung. Now the record
// is set aside and everything else is written.
func TestRecordWithoutBodyDoesNotBlockOtherTasks(t *testing.T) {
	w, st := sqliteWriter(t, t.TempDir(), store.WriterOptions{})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	good, err := logs.Create("good")
	if err != nil {
		t.Fatal(err)
	}
	w.SaveTask(store.TaskRecord{ID: "bad", Status: 1, CreatedAt: time.Now()}) // no body
	if _, err := good.Append(content("fine"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	w.SaveTask(record("good"))

	ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
	defer cancel()
	if evs, err := good.Read(ctx, 0, nil); err != nil || len(evs) != 1 {
		t.Fatalf("the other task's event: %v %v", evs, err)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatalf("flush: %v", err)
	}
	if _, err := st.GetTask(ctx, "good"); err != nil {
		t.Fatalf("the other task's record: %v", err)
	}
	if _, err := st.GetTask(ctx, "bad"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("the refused record: %v, want it not stored", err)
	}
	if err := w.Health(); err != nil {
		t.Fatalf("a record's fault made the writer unhealthy: %v", err)
	}
}

// TestCorruptStoredEventIsReported: a stored event that cannot be decoded
// (garbage written into the database) used to end every read of the
// task's history at that row. Now it is read as an error event at its seq
// that says so (a client resuming by seq sees the gap explained), and the
// events after it are read as before; so is an event missing from the store.
func TestCorruptStoredEventIsReported(t *testing.T) {
	dir := t.TempDir()
	w, st := sqliteWriter(t, dir, store.WriterOptions{})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	l, err := logs.Create("t")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// One write per event, so that each is a run of its own in the
	// database (sqlite/runs.go) and can be spoiled alone.
	for _, text := range []string{"one", "two", "three", "four"} {
		if _, err := l.Append(content(text), eventlog.Capped); err != nil {
			t.Fatal(err)
		}
		if err := w.Flush(ctx); err != nil {
			t.Fatal(err)
		}
		if err := st.Fold(ctx); err != nil { // a run per event (sqlite/journal.go)
			t.Fatal(err)
		}
	}
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := st.Fold(ctx); err != nil {
		t.Fatal(err)
	}

	db, err := sql.Open("sqlite", filepath.Join(dir, sqlite.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	for q, arg := range map[string]any{
		`UPDATE event_runs SET data = ? WHERE task_id = 't' AND first_seq = 2 AND last_seq = 2`: []byte{0xff, 0xff, 0xff, 0xff},
		`DELETE FROM event_runs WHERE task_id = 't' AND first_seq = 4 AND last_seq = ?`:         4,
	} {
		if res, err := db.ExecContext(ctx, q, arg); err != nil {
			t.Fatal(err)
		} else if n, _ := res.RowsAffected(); n != 1 {
			t.Fatalf("%s: %d rows", q, n)
		}
	}

	evs := readAll(t, logs.Stored("t", 5))
	if len(evs) != 5 || evs[0].GetContent().GetText() != "one" || evs[2].GetContent().GetText() != "three" || evs[4].GetContent().GetText() != "end" {
		t.Fatalf("history around the bad rows: %v", evs)
	}
	wantPlaceholder(t, evs[1], 2, "event_undecodable")
	wantPlaceholder(t, evs[3], 4, "event_missing")

	// A reader resuming right before the bad row gets the placeholder too.
	rctx, cancel := context.WithTimeout(ctx, testutil.Wait)
	defer cancel()
	got, err := logs.Stored("t", 5).Read(rctx, 1, nil)
	if err != nil || len(got) == 0 {
		t.Fatalf("resume after seq 1: %v %v", got, err)
	}
	wantPlaceholder(t, got[0], 2, "event_undecodable")
}

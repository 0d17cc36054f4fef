package sqlite

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// TestJournalReads: events read the same from the journal, from event_runs
// and from both (a fold between two writes), a batch written twice is
// read once, and the journal is empty after a fold.
func TestJournalReads(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.fold(ctx); err != nil { // the background fold has no say below
		t.Fatal(err)
	}
	s.lastFold = s.lastFold.AddDate(100, 0, 0)
	apply := func(evs ...store.Event) {
		t.Helper()
		if err := s.Apply(ctx, store.Batch{Events: evs}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(stage string) {
		t.Helper()
		got, err := s.ReadEvents(ctx, "a", 0, 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 6 {
			t.Fatalf("%s: read %d events: %+v", stage, len(got), got)
		}
		for i, e := range got {
			if want := fmt.Sprintf("a-%d", i+1); e.Seq != uint64(i+1) || string(e.Data) != want {
				t.Fatalf("%s: event %d is %d %q, want %q", stage, i, e.Seq, e.Data, want)
			}
		}
		if got, _ := s.ReadEvents(ctx, "a", 2, 3); len(got) != 3 || got[0].Seq != 3 || got[2].Seq != 5 {
			t.Fatalf("%s: after 2, limit 3: %+v", stage, got)
		}
		if n, err := s.LastSeq(ctx, "a"); err != nil || n != 6 {
			t.Fatalf("%s: LastSeq %d %v", stage, n, err)
		}
		if got, _ := s.ReadEvents(ctx, "b", 0, 100); len(got) != 2 || got[1].Seq != 2 {
			t.Fatalf("%s: task b: %+v", stage, got)
		}
	}
	apply(ev("a", 1), ev("b", 1), ev("a", 2), ev("a", 3))
	apply(ev("a", 1), ev("b", 1), ev("a", 2), ev("a", 3)) // again: a no-op for readers
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	apply(ev("a", 4), ev("b", 2))
	apply(ev("a", 5), ev("a", 6))
	check("runs and journal")
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	check("runs")
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_journal`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("journal rows after a fold: %d %v", n, err)
	}
	if got := s.journaled.Load(); got != 0 {
		t.Fatalf("journaled %d after a fold", got)
	}
}

// TestJournalOnly: events still in the journal only (nothing folded) read
// as from event_runs, also after a reopen, which folds them into one run.
func TestJournalOnly(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	s.lastFold = s.lastFold.AddDate(3000, 0, 0) // no background fold
	for i := range 3 {
		if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("t", uint64(2*i+1)), ev("t", uint64(2*i+2))}}); err != nil {
			t.Fatal(err)
		}
	}
	read := func(s *Store) {
		t.Helper()
		got, err := s.ReadEvents(ctx, "t", 1, 100)
		if err != nil || len(got) != 5 || got[0].Seq != 2 || string(got[4].Data) != "t-6" {
			t.Fatalf("read: %+v %v", got, err)
		}
	}
	read(s)
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_runs`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("event_runs rows before a fold: %d %v", n, err)
	}
	s.Close() // folds
	s, err = Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	read(s)
	// The three writes' consecutive events are one run.
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_runs`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("event_runs rows after a reopen: %d %v", n, err)
	}
}

// TestJournalDirectRuns: a long run goes straight into event_runs, a
// short one into the journal, also between two long ones of its task;
// reads see every event once, in order, before and after the fold.
func TestJournalDirectRuns(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.lastFold = s.lastFold.AddDate(3000, 0, 0) // no background fold
	seq := uint64(0)
	write := func(n int) {
		t.Helper()
		evs := make([]store.Event, n)
		for i := range evs {
			seq++
			evs[i] = ev("x", seq)
		}
		if err := s.Apply(ctx, store.Batch{Events: evs}); err != nil {
			t.Fatal(err)
		}
	}
	count := func(table string) int {
		t.Helper()
		var n int
		if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM `+table).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	write(directRunEvents) // straight into event_runs
	if r, j := count("event_runs"), count("event_journal"); r != 1 || j != 0 {
		t.Fatalf("after a long run: %d runs, %d journal rows", r, j)
	}
	write(1)               // journal
	write(directRunEvents) // straight: after an event in the journal
	write(2)               // journal
	if r, j := count("event_runs"), count("event_journal"); r != 2 || j != 2 {
		t.Fatalf("after short and long runs: %d runs, %d journal rows", r, j)
	}
	check := func(stage string) {
		t.Helper()
		got, err := s.ReadEvents(ctx, "x", 0, 1000)
		if err != nil || len(got) != int(seq) {
			t.Fatalf("%s: read %d of %d events: %v", stage, len(got), seq, err)
		}
		for i, e := range got {
			if e.Seq != uint64(i+1) {
				t.Fatalf("%s: event %d has seq %d", stage, i, e.Seq)
			}
		}
		if n, err := s.LastSeq(ctx, "x"); err != nil || n != seq {
			t.Fatalf("%s: LastSeq %d %v", stage, n, err)
		}
	}
	check("before the fold")
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	write(directRunEvents) // straight again
	if r, j := count("event_runs"), count("event_journal"); r != 5 || j != 0 {
		t.Fatalf("after the fold and a long run: %d runs, %d journal rows", r, j)
	}
	check("after the fold")
}

// TestJournalCorruptRow: a journal row spoiled in the database gives what
// decodes, the fold moves that and empties the journal (it does not fail
// for ever), and the rest reads as missing.
func TestJournalCorruptRow(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.lastFold = s.lastFold.AddDate(3000, 0, 0) // no background fold
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("t", 1), ev("u", 1), ev("t", 2), ev("t", 3)}}); err != nil {
		t.Fatal(err)
	}
	// The row: t's run 1..3 (framed), then u's. Spoil the length of t's
	// second event: t keeps event 1, its others have no data.
	var data []byte
	if err := s.db.QueryRowContext(ctx, `SELECT data FROM event_journal`).Scan(&data); err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(data, []byte("t-1")) + len("t-1")
	data[i] = 0x7f
	if _, err := s.db.ExecContext(ctx, `UPDATE event_journal SET data = ?`, data); err != nil {
		t.Fatal(err)
	}
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_journal`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("journal rows after the fold: %d %v", n, err)
	}
	if got, err := s.ReadEvents(ctx, "t", 0, 10); err != nil || len(got) != 1 || string(got[0].Data) != "t-1" {
		t.Fatalf("t: %+v %v", got, err)
	}
	if got, err := s.ReadEvents(ctx, "u", 0, 10); err != nil || len(got) != 1 || string(got[0].Data) != "u-1" {
		t.Fatalf("u: %+v %v", got, err)
	}
}

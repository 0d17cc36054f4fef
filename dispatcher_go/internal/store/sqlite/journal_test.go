package sqlite

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

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
	s.lastFold = time.Now().AddDate(100, 0, 0) // no background fold (year 101 was in the past)
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

// journalMany writes events 1..perTask of tasks t000..t(tasks-1) in
// writes of 4 events of different tasks (all journaled) and returns the
// task ids.
func journalMany(t *testing.T, s *Store, tasks, perTask int) []string {
	t.Helper()
	ids := make([]string, tasks)
	for i := range ids {
		ids[i] = fmt.Sprintf("t%03d", i)
	}
	var batch []store.Event
	for seq := 1; seq <= perTask; seq++ {
		for _, id := range ids {
			batch = append(batch, ev(id, uint64(seq)))
			if len(batch) == 4 {
				if err := s.Apply(context.Background(), store.Batch{Events: batch}); err != nil {
					t.Fatal(err)
				}
				batch = nil
			}
		}
	}
	if len(batch) > 0 {
		if err := s.Apply(context.Background(), store.Batch{Events: batch}); err != nil {
			t.Fatal(err)
		}
	}
	return ids
}

// checkEvents fails unless task id reads exactly events 1..n.
func checkEvents(t *testing.T, s *Store, id string, n int) {
	t.Helper()
	got, err := s.ReadEvents(context.Background(), id, 0, 10*n+10)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != n {
		t.Fatalf("task %s: read %d events, want %d: %+v", id, len(got), n, got)
	}
	for i, e := range got {
		if want := fmt.Sprintf("%s-%d", id, i+1); e.Seq != uint64(i+1) || string(e.Data) != want {
			t.Fatalf("task %s: event %d is %d %q, want %q", id, i, e.Seq, e.Data, want)
		}
	}
	if last, err := s.LastSeq(context.Background(), id); err != nil || last != uint64(n) {
		t.Fatalf("task %s: LastSeq %d %v, want %d", id, last, err, n)
	}
}

// TestFoldLetsWritesIn: a fold gives the write lock up between two pieces
// to an Apply waiting for it (the Apply commits before the fold's next
// piece), and the events of both come out once each.
func TestFoldLetsWritesIn(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.fold(ctx); err != nil { // the background fold has no say below
		t.Fatal(err)
	}
	s.lastFold = time.Now().AddDate(100, 0, 0) // (before any Apply kicks the checkpointer)
	s.foldHandoff = time.Minute                // however slow the machine, the Apply gets in
	ids := journalMany(t, s, 40, 8)            // 40 runs: 5 pieces, then 80 rows: 2 pieces of deletes
	late := 0
	var prev chan struct{}
	s.foldPieceHook = func() {
		// The previous piece's Apply got in before this piece.
		if prev != nil {
			select {
			case <-prev:
			case <-time.After(10 * time.Second):
				t.Fatalf("the Apply waiting after piece %d did not get the write lock before the next piece", late)
			}
		}
		late++
		done := make(chan struct{})
		prev = done
		go func(seq uint64) {
			defer close(done)
			if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("late", seq)}}); err != nil {
				t.Error(err)
			}
		}(uint64(late))
		deadline := time.Now().Add(10 * time.Second)
		for s.applyWaiting.Load() == 0 {
			if time.Now().After(deadline) {
				t.Fatal("the Apply did not wait for the write lock")
			}
			runtime.Gosched()
		}
	}
	if _, err := s.foldOnce(ctx, foldMaxEvents); err != nil {
		t.Fatal(err)
	}
	s.foldPieceHook = nil
	<-prev
	if late < 6 {
		t.Fatalf("%d pieces, want at least 6", late)
	}
	for _, id := range ids {
		checkEvents(t, s, id, 8)
	}
	checkEvents(t, s, "late", late)
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_journal`).Scan(&n); err != nil || n != 0 {
		t.Fatalf("journal rows after the folds: %d %v", n, err)
	}
	if got := s.journaled.Load(); got != 0 {
		t.Fatalf("journaled %d after the folds", got)
	}
	checkEvents(t, s, "late", late)
}

// TestFoldCutShort: a fold that fails after some of its pieces were
// committed (as a crash would leave it) leaves those events in both
// tables: they read once, and the next fold (here at a reopen) moves the
// rest.
func TestFoldCutShort(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	s.lastFold = time.Now().AddDate(100, 0, 0) // (before any Apply kicks the checkpointer)
	ids := journalMany(t, s, 40, 3)
	// A waiting Apply makes the fold commit after each piece; the third
	// piece's statements then fail (cancelled).
	fctx, cancel := context.WithCancel(ctx)
	pieces := 0
	s.applyWaiting.Add(1) // as if an Apply waited: each piece commits
	s.foldPieceHook = func() {
		if pieces++; pieces == 3 { // the first two pieces are committed
			cancel()
		}
	}
	if _, err := s.foldOnce(fctx, foldMaxEvents); err == nil {
		t.Fatal("the cancelled fold did not fail")
	}
	s.applyWaiting.Add(-1)
	s.foldPieceHook = nil
	var runs, rows int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_runs`).Scan(&runs); err != nil || runs != 2*foldPieceRuns {
		t.Fatalf("runs committed by the cut fold: %d %v, want %d", runs, err, 2*foldPieceRuns)
	}
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_journal`).Scan(&rows); err != nil || rows != 30 {
		t.Fatalf("journal rows after the cut fold: %d %v, want all 30", rows, err)
	}
	for _, id := range ids {
		checkEvents(t, s, id, 3)
	}
	if err := s.Close(); err != nil { // folds; a crash would leave it to Open
		t.Fatal(err)
	}
	if s, err = Open(ctx, dir); err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_journal`).Scan(&rows); err != nil || rows != 0 {
		t.Fatalf("journal rows after a reopen: %d %v", rows, err)
	}
	for _, id := range ids {
		checkEvents(t, s, id, 3)
	}
}

// TestRetentionFoldsWhatCameMeanwhile: events an Apply journals between
// retention's fold and its delete are deleted with their ended task, not
// left in the journal (nor folded back into event_runs after the delete).
func TestRetentionFoldsWhatCameMeanwhile(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ended := store.TaskRecord{ID: "old", Status: 3, CreatedAt: time.UnixMicro(1), EndedAt: time.UnixMicro(10), Body: []byte{0}}
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("old", 1), ev("keep", 1)}, Tasks: []store.TaskRecord{ended}}); err != nil {
		t.Fatal(err)
	}
	s.retentionHook = func() {
		if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("old", 2), ev("keep", 2)}}); err != nil {
			t.Error(err)
		}
	}
	if n, err := s.DeleteEndedBefore(ctx, time.UnixMicro(11)); err != nil || n != 1 {
		t.Fatalf("retention: %d %v", n, err)
	}
	s.retentionHook = nil
	if last, err := s.LastSeq(ctx, "old"); err != nil || last != 0 {
		t.Fatalf("the removed task's LastSeq %d %v", last, err)
	}
	if err := s.fold(ctx); err != nil {
		t.Fatal(err)
	}
	if last, err := s.LastSeq(ctx, "old"); err != nil || last != 0 {
		t.Fatalf("the removed task's LastSeq after a fold %d %v", last, err)
	}
	checkEvents(t, s, "keep", 2)
	if got := s.journaled.Load(); got != 0 {
		t.Fatalf("journaled %d", got)
	}
}

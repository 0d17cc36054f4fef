package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

func ev(task string, seq uint64) store.Event {
	return store.Event{TaskID: task, Seq: seq, Data: []byte(fmt.Sprintf("%s-%d", task, seq))}
}

// TestGroupRuns: each task's consecutive events become one run, cut at a
// gap, at maxRunEvents, and around an event without data.
func TestGroupRuns(t *testing.T) {
	var in []store.Event
	for s := uint64(1); s <= maxRunEvents+2; s++ {
		in = append(in, ev("a", s), ev("b", s))
	}
	in = append(in, ev("a", maxRunEvents+4), store.Event{TaskID: "b", Seq: maxRunEvents + 3}, ev("b", maxRunEvents+4))
	type span struct {
		task        string
		first, last uint64
	}
	var got []span
	for _, r := range groupRuns(in) {
		got = append(got, span{r.taskID, r.first, r.last})
	}
	want := []span{{"a", 1, maxRunEvents}, {"b", 1, maxRunEvents}, {"a", maxRunEvents + 1, maxRunEvents + 2},
		{"b", maxRunEvents + 1, maxRunEvents + 2}, {"a", maxRunEvents + 4, maxRunEvents + 4},
		{"b", maxRunEvents + 3, maxRunEvents + 3}, {"b", maxRunEvents + 4, maxRunEvents + 4}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("runs %v, want %v", got, want)
	}
	// Each run's data gives back its events.
	var back []store.Event
	for _, r := range groupRuns(in) {
		back = unpack(back, r.taskID, r.first, r.last, r.data, 0, len(in))
	}
	sort.SliceStable(in, func(i, j int) bool { return in[i].TaskID < in[j].TaskID })
	sort.SliceStable(back, func(i, j int) bool { return back[i].TaskID < back[j].TaskID })
	if len(back) != len(in) {
		t.Fatalf("unpacked %d events of %d", len(back), len(in))
	}
	for i := range in {
		if back[i].TaskID != in[i].TaskID || back[i].Seq != in[i].Seq || !bytes.Equal(back[i].Data, in[i].Data) {
			t.Fatalf("unpacked %+v, want %+v", back[i], in[i])
		}
	}
}

// TestCorruptRun: a run whose data does not split into its events is read
// as events without data (the Writer reads them as undecodable), and the
// runs around it as stored.
func TestCorruptRun(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, b := range [][]store.Event{{ev("t", 1)}, {ev("t", 2), ev("t", 3), ev("t", 4)}, {ev("t", 5), ev("t", 6)}} {
		if err := s.Apply(ctx, store.Batch{Events: b}); err != nil {
			t.Fatal(err)
		}
		if err := s.fold(ctx); err != nil { // a run per write
			t.Fatal(err)
		}
	}
	// Spoil the middle run: its second event's length runs past the end.
	res, err := s.db.ExecContext(ctx, `UPDATE event_runs SET data = x'01410f41' WHERE task_id = 't' AND first_seq = 2`)
	if n, _ := res.RowsAffected(); err != nil || n != 1 {
		t.Fatalf("spoil: %v %d", err, n)
	}
	got, err := s.ReadEvents(ctx, "t", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"t-1", "A", "", "", "t-5", "t-6"}
	if len(got) != len(want) {
		t.Fatalf("read %d events: %+v", len(got), got)
	}
	for i, e := range got {
		if e.Seq != uint64(i+1) || string(e.Data) != want[i] {
			t.Fatalf("event %d: %+v, want seq %d data %q", i, e, i+1, want[i])
		}
	}
	// A read starting inside the spoiled run.
	if got, _ := s.ReadEvents(ctx, "t", 3, 1); len(got) != 1 || got[0].Seq != 4 || got[0].Data != nil {
		t.Fatalf("after 3: %+v", got)
	}
	if n, _ := s.LastSeq(ctx, "t"); n != 6 {
		t.Fatalf("LastSeq %d", n)
	}
}

// TestMigrateEventsToRuns: a database of version 1 (one row per event)
// keeps its events through migration 2.
func TestMigrateEventsToRuns(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`,
		migrations[0],
		`INSERT INTO schema_migrations VALUES (1, 0)`,
		`INSERT INTO events VALUES ('old', 1, 'old-1'), ('old', 2, 'old-2'), ('old', 3, 'old-3')`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()
	s, err := OpenFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("old", 4), ev("old", 5)}}); err != nil {
		t.Fatal(err)
	}
	got, err := s.ReadEvents(ctx, "old", 1, 10)
	if err != nil || len(got) != 4 {
		t.Fatalf("read %+v %v", got, err)
	}
	for i, e := range got {
		if want := fmt.Sprintf("old-%d", i+2); e.Seq != uint64(i+2) || !bytes.Equal(e.Data, []byte(want)) {
			t.Fatalf("event %+v, want %s", e, want)
		}
	}
}

// TestMigrateRunsToRowidTable: a database of version 3 (event_runs
// WITHOUT ROWID, events also in the journal) keeps its events through
// migration 4, which moves the runs into a rowid table keyed by a unique
// index: a run written again is still a no-op, and reads, LastSeq and
// retention use the index.
func TestMigrateRunsToRowidTable(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), FileName)
	db, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	one := func(task string, seq int) []byte { return []byte(fmt.Sprintf("%s-%d", task, seq)) }
	// A run of seqs 2..3 framed as runs.go frames it.
	two := append(append([]byte{byte(len(one("old", 2)))}, one("old", 2)...), append([]byte{byte(len(one("old", 3)))}, one("old", 3)...)...)
	// A journal row holding old's seq 4 (journal.go's framing).
	jr := journalRows([]run{{taskID: "old", first: 4, last: 4, data: one("old", 4), n: 1}})[0]
	for _, q := range []string{
		`CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`,
		migrations[0], migrations[1], migrations[2],
		`INSERT INTO schema_migrations VALUES (1, 0), (2, 0), (3, 0)`,
		`INSERT INTO tasks VALUES ('ended', 3, 1, 10, x'00')`,
	} {
		if _, err := db.ExecContext(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct {
		task        string
		first, last int
		data        []byte
	}{{"old", 1, 1, one("old", 1)}, {"old", 2, 3, two}, {"ended", 1, 1, one("ended", 1)}} {
		if _, err := db.ExecContext(ctx, `INSERT INTO event_runs VALUES (?, ?, ?, ?)`, r.task, r.first, r.last, r.data); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := db.ExecContext(ctx, `INSERT INTO event_journal (data) VALUES (?)`, jr); err != nil {
		t.Fatal(err)
	}
	db.Close()

	s, err := OpenFile(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var v int
	if err := s.db.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_migrations`).Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("version %d %v, want %d", v, err, len(migrations))
	}
	var withoutRowid int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM pragma_table_list WHERE name = 'event_runs' AND wr = 1`).Scan(&withoutRowid); err != nil || withoutRowid != 0 {
		t.Fatalf("event_runs still WITHOUT ROWID: %d %v", withoutRowid, err)
	}
	// The same run again (a retried batch) is a no-op; a new one is added.
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("old", 5), ev("old", 6), ev("old", 7), ev("old", 8), ev("old", 9), ev("old", 10), ev("old", 11), ev("old", 12)}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{ev("old", 5), ev("old", 6), ev("old", 7), ev("old", 8), ev("old", 9), ev("old", 10), ev("old", 11), ev("old", 12)}}); err != nil {
		t.Fatal(err)
	}
	var rows int
	if err := s.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM event_runs WHERE task_id = 'old'`).Scan(&rows); err != nil || rows != 4 {
		t.Fatalf("old's runs: %d %v, want 4 (1, 2-3, 4 folded at open, 5-12 once)", rows, err)
	}
	got, err := s.ReadEvents(ctx, "old", 1, 100)
	if err != nil || len(got) != 11 {
		t.Fatalf("read %+v %v", got, err)
	}
	for i, e := range got {
		if want := fmt.Sprintf("old-%d", i+2); e.Seq != uint64(i+2) || string(e.Data) != want {
			t.Fatalf("event %d is %d %q, want %s", i, e.Seq, e.Data, want)
		}
	}
	if n, err := s.LastSeq(ctx, "old"); err != nil || n != 12 {
		t.Fatalf("LastSeq %d %v", n, err)
	}
	// The plan of a read goes through the index, not a scan of the table.
	prows, err := s.db.QueryContext(ctx, `EXPLAIN QUERY PLAN
		SELECT first_seq, last_seq, data FROM event_runs WHERE task_id = ? AND first_seq > ? AND last_seq > ? ORDER BY first_seq, last_seq`, "old", 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	var plan string
	for prows.Next() {
		var id, parent, unused int
		var detail string
		if err := prows.Scan(&id, &parent, &unused, &detail); err != nil {
			t.Fatal(err)
		}
		plan += detail + "; "
	}
	prows.Close()
	if !strings.Contains(plan, "event_runs_key") {
		t.Fatalf("read plan %q does not use event_runs_key", plan)
	}
	if n, err := s.DeleteEndedBefore(ctx, time.UnixMicro(11)); err != nil || n != 1 {
		t.Fatalf("retention: %d %v", n, err)
	}
	if got, err := s.ReadEvents(ctx, "ended", 0, 10); err != nil || len(got) != 0 {
		t.Fatalf("ended task's events after retention: %+v %v", got, err)
	}
}

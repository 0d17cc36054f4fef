package sqlite

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// The journal: Apply writes a write's events as one row of event_journal
// (rowid in write order) instead of a row per task in event_runs, and a
// fold moves them into event_runs later, once a second, off the
// watchers' path.
//
// Why: event_runs is ordered by task, so a write touches one B-tree leaf
// per task it holds events of, and each touched page costs a WAL frame
// (two pwrites, a checksum), its statement-journal copy and now and then a
// split. At relay rates every event of a write belongs to another task:
// a write of 64 events cost ~0.9 ms of CPU and one of 200 ~3 ms
// (BenchmarkApplySmall), and every watcher of those 200 tasks waited for
// it. The same writes as one journal row (appended at the end of one
// B-tree) cost ~0.05 and ~0.07 ms (BenchmarkJournalSmall). The fold then
// touches each task's leaf once per fold instead of once per write.
//
// Runs of directRunEvents or more (a flood: few tasks, many events per
// write) still go straight into event_runs: a page or so per run either
// way, and the journal would only add a copy. So a task's events may be
// in either table, in any order; readers read both in one snapshot (a
// read transaction) and merge them by seq.
//
// What it risks: nothing of durability (the journal row is committed in
// the same transaction as before, and survives like any row); reads of
// the store (ReadEvents, LastSeq) also scan the journal, at most about a
// fold's worth of writes (foldEvery, foldMaxEvents). They are rare: live
// watchers read the committed tail from memory.
//
// A row's data is a sequence of runs (groupRuns), each framed as
// uvarint(len(task id)) task id uvarint(first) uvarint(last)
// uvarint(len(data)) data, data as in event_runs.

// directRunEvents is the least events of a run that Apply writes straight
// into event_runs (a page or so per run either way; see Apply).
const directRunEvents = 8

// foldEvery is the least time between two folds (checkpointLoop). A fold
// holds the write lock for about one leaf write per task it moves events
// of (~15 µs each): once a second, few writes wait behind it.
const foldEvery = time.Second

// foldSoonEvents starts a fold before foldEvery when the journal holds
// this many events, so that reads scan a bounded journal.
const foldSoonEvents = 8192

// foldMaxEvents bounds the events one fold transaction moves.
const foldMaxEvents = 1 << 16

// The background fold (foldPaced) moves about foldChunkEvents events per
// chunk and pauses foldPause between two. A chunk writes about one index
// leaf per task it holds events of, so its cost per event falls with its
// size: BenchmarkFoldRelay (200 tasks, 4 000 events/s) measured 6–8 µs
// of CPU per event folded in chunks of 512, 1.7–2.5 µs in chunks of 4096.
// Since the fold holds the write lock only in short pieces (foldOnce),
// a large chunk no longer delays the writes behind it; before that, one
// fold of a second's journal in one transaction (~10 ms at 64 sessions ×
// 50 events/s) delayed the next burst of events: relay p99 12 → 29 ms at
// 64 sessions in an A/B pair, and chunks of 512 were the compromise.
const (
	foldChunkEvents = 4096
	foldPause       = time.Millisecond
)

// foldPieceRuns and foldPieceRows are how many runs the fold inserts,
// and how many journal rows it deletes, between two looks at whether an
// Apply waits for the write lock (foldOnce): a few index leaves, ~0.1 ms.
const (
	foldPieceRuns = 8
	foldPieceRows = 64
)

// foldHandoff bounds how long a fold that gave the write lock up waits
// for the waiting Apply to take it (see foldOnce): only a machine too
// busy to run that Apply for this long makes the fold go on first.
const foldHandoff = 20 * time.Millisecond

// journalRowBytes ends a journal row past this size (a row of SQLite
// holds at most 1e9 bytes); a write then takes several rows.
const journalRowBytes = 16 << 20

// journalRows frames runs into journal rows.
func journalRows(runs []run) [][]byte {
	size := 0
	for _, r := range runs {
		size += 4*binary.MaxVarintLen64 + len(r.taskID) + len(r.data)
	}
	buf := make([]byte, 0, min(size, journalRowBytes+binary.MaxVarintLen64*4+len(runs)))
	var rows [][]byte
	for _, r := range runs {
		if len(buf) > 0 && len(buf)+len(r.data) > journalRowBytes {
			rows = append(rows, buf)
			buf = make([]byte, 0, min(size, journalRowBytes))
		}
		buf = binary.AppendUvarint(buf, uint64(len(r.taskID)))
		buf = append(buf, r.taskID...)
		buf = binary.AppendUvarint(buf, r.first)
		buf = binary.AppendUvarint(buf, r.last)
		buf = binary.AppendUvarint(buf, uint64(len(r.data)))
		buf = append(buf, r.data...)
		size -= 4*binary.MaxVarintLen64 + len(r.taskID) + len(r.data)
	}
	if len(buf) > 0 {
		rows = append(rows, buf)
	}
	return rows
}

var errJournalCorrupt = errors.New("sqlite: journal row does not decode")

// eachRun calls fn for each run framed in a journal row's data. The
// slices passed share data. A row that does not decode (corrupted in the
// database) gives its runs up to the damage, and errJournalCorrupt: its
// other events are then missing, which readers are told of (the Writer
// reads a missing seq as an event_missing placeholder).
func eachRun(data []byte, fn func(taskID []byte, first, last uint64, data []byte)) error {
	next := func() (uint64, bool) {
		v, k := binary.Uvarint(data)
		if k <= 0 {
			return 0, false
		}
		data = data[k:]
		return v, true
	}
	for len(data) > 0 {
		n, ok := next()
		if !ok || n > uint64(len(data)) {
			return errJournalCorrupt
		}
		id := data[:n]
		data = data[n:]
		first, ok1 := next()
		last, ok2 := next()
		size, ok3 := next()
		if !ok1 || !ok2 || !ok3 || last < first || size > uint64(len(data)) {
			return errJournalCorrupt
		}
		fn(id, first, last, data[:size])
		data = data[size:]
	}
	return nil
}

// journalOf is every event of taskID with seq > after held in the
// journal, in write order.
func (s *Store) journalOf(ctx context.Context, tx *sql.Tx, taskID string, after uint64) ([]store.Event, error) {
	rows, err := tx.QueryContext(ctx, `SELECT data FROM event_journal ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("sqlite: read journal: %w", err)
	}
	defer rows.Close()
	var out []store.Event
	for rows.Next() {
		var data []byte
		if err := rows.Scan(&data); err != nil {
			return nil, fmt.Errorf("sqlite: read journal: %w", err)
		}
		// A corrupt row: what decodes is read (see eachRun).
		_ = eachRun(data, func(id []byte, first, last uint64, d []byte) {
			if last > after && string(id) == taskID {
				out = unpack(out, taskID, first, last, d, after, int(^uint(0)>>1))
			}
		})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlite: read journal: %w", err)
	}
	return out, nil
}

// mergeEvents is the first limit events of a ∪ b by seq, each seq once
// (the first found: a's before b's). a is in seq order.
func mergeEvents(a, b []store.Event, limit int) []store.Event {
	all := append(slices.Clip(a), b...)
	slices.SortStableFunc(all, func(x, y store.Event) int {
		switch {
		case x.Seq < y.Seq:
			return -1
		case x.Seq > y.Seq:
			return 1
		}
		return 0
	})
	out := all[:0]
	for _, e := range all {
		if len(out) > 0 && out[len(out)-1].Seq == e.Seq {
			continue
		}
		out = append(out, e)
		if len(out) == limit {
			break
		}
	}
	return out
}

// Fold moves what the journal holds into event_runs now (the store does
// it by itself about once a second; tests that look at event_runs call
// it).
func (s *Store) Fold(ctx context.Context) error { return s.fold(ctx) }

// fold moves the journal into event_runs, in transactions of at most
// about foldMaxEvents events, each under writeMu.
func (s *Store) fold(ctx context.Context) error {
	for {
		n, err := s.foldOnce(ctx, foldMaxEvents)
		if err != nil || n == 0 {
			return err
		}
	}
}

// foldPaced is the background fold: chunks of foldChunkEvents with a
// pause between them (none while the journal holds foldSoonEvents or
// more: then it must catch up), until the journal is empty or stop is
// closed.
func (s *Store) foldPaced(ctx context.Context, stop <-chan struct{}) error {
	pause := time.NewTimer(0)
	<-pause.C
	defer pause.Stop()
	for {
		n, err := s.foldOnce(ctx, foldChunkEvents)
		if err != nil || n == 0 {
			return err
		}
		if s.journaled.Load() >= foldSoonEvents {
			continue
		}
		pause.Reset(foldPause)
		select {
		case <-pause.C:
		case <-stop:
			return nil
		}
	}
}

// foldOnce moves the oldest journal rows, up to about maxEvents events,
// into event_runs and returns how many rows. A task's consecutive events
// from several writes become one run (groupRuns): at relay rates a second
// of writes holds dozens of one-event runs per task, and inserting them
// one by one held the write lock (and every write behind it) for tens of
// milliseconds once a second.
//
// The write lock is held in short pieces: the journal rows are read
// before it is taken (only a fold deletes them, and foldMu keeps two
// folds apart), the runs are inserted foldPieceRuns at a time and the
// rows deleted foldPieceRows at a time, and when an Apply waits for the
// lock after a piece (applyWaiting) the fold commits what it has, lets
// that Apply write, and goes on in a new transaction. Without that a
// chunk of 200 tasks' events held the lock for ~3–7 ms (one index leaf
// per task), which the writes behind it waited out: the relay's p99 at
// 200 sessions. The rows are deleted only once all their runs are
// committed, so a fold cut short (a crash between two of its
// transactions) leaves events in both tables, which readers merge (each
// seq once), and the next fold writes them again (ON CONFLICT DO
// NOTHING, or a second run of the same seqs, which readers take once).
func (s *Store) foldOnce(ctx context.Context, maxEvents int) (int, error) {
	s.foldMu.Lock()
	defer s.foldMu.Unlock()
	return s.foldOnceLocked(ctx, maxEvents)
}

// foldOnceLocked is foldOnce with foldMu held.
func (s *Store) foldOnceLocked(ctx context.Context, maxEvents int) (int, error) {
	events, ids, err := s.journalHead(ctx, s.db, maxEvents)
	if err != nil || len(ids) == 0 {
		return 0, err
	}
	s.writeMu.Lock()
	locked := true
	defer func() {
		if locked {
			s.writeMu.Unlock()
		}
	}()
	tx, err := s.wconn.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("sqlite: fold: %w", err)
	}
	defer func() {
		if tx != nil {
			_ = tx.Rollback()
		}
	}()
	// yield lets a waiting Apply write between two pieces.
	yield := func() error {
		if s.foldPieceHook != nil {
			s.foldPieceHook()
		}
		if s.applyWaiting.Load() == 0 {
			return nil
		}
		err := tx.Commit()
		tx = nil
		if err != nil {
			return err
		}
		select {
		case <-s.applyIn: // stale: an Apply that took the lock when no fold waited
		default:
		}
		s.writeMu.Unlock()
		locked = false
		// The Apply woken by Unlock takes the lock (and says so) before
		// this fold asks for it again: sync.Mutex would let this
		// goroutine, running, take it back first.
		handoff := time.NewTimer(s.foldHandoff)
		select {
		case <-s.applyIn:
		case <-handoff.C:
		}
		handoff.Stop()
		s.writeMu.Lock()
		locked = true
		tx, err = s.wconn.BeginTx(ctx, nil)
		return err
	}
	// An event a corrupt run could not give (no data) is left out: it
	// reads as missing, and the NOT NULL column would refuse the fold.
	moved := len(events)
	events = slices.DeleteFunc(events, func(e store.Event) bool { return e.Data == nil })
	for runs := groupRuns(events); len(runs) > 0; {
		k := min(len(runs), foldPieceRuns)
		if err := s.insertRuns(ctx, tx, runs[:k]); err != nil {
			return 0, fmt.Errorf("sqlite: fold: %w", err)
		}
		runs = runs[k:]
		if err := yield(); err != nil {
			return 0, fmt.Errorf("sqlite: fold: %w", err)
		}
	}
	for rest := ids; len(rest) > 0; {
		k := min(len(rest), foldPieceRows)
		if _, err := tx.ExecContext(ctx, `DELETE FROM event_journal WHERE id BETWEEN ? AND ?`, rest[0], rest[k-1]); err != nil {
			return 0, fmt.Errorf("sqlite: fold: %w", err)
		}
		if rest = rest[k:]; len(rest) > 0 {
			if err := yield(); err != nil {
				return 0, fmt.Errorf("sqlite: fold: %w", err)
			}
		}
	}
	err = tx.Commit()
	tx = nil
	if err != nil {
		return 0, fmt.Errorf("sqlite: fold: %w", err)
	}
	s.journaled.Add(-int64(moved))
	return len(ids), nil
}

// journalHead reads the oldest journal rows, up to about maxEvents
// events, through q: their events and their ids, in order.
func (s *Store) journalHead(ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, maxEvents int) ([]store.Event, []int64, error) {
	rows, err := q.QueryContext(ctx, `SELECT id, data FROM event_journal ORDER BY id`)
	if err != nil {
		return nil, nil, fmt.Errorf("sqlite: fold: %w", err)
	}
	defer rows.Close()
	var events []store.Event
	var ids []int64
	interned := make(map[string]string)
	for len(events) < maxEvents && rows.Next() {
		var id int64
		var data []byte
		if err := rows.Scan(&id, &data); err != nil {
			return nil, nil, fmt.Errorf("sqlite: fold: %w", err)
		}
		ids = append(ids, id)
		// A corrupt row: what decodes is moved, the rest is gone as
		// it is for readers already (see eachRun).
		_ = eachRun(data, func(id []byte, first, last uint64, d []byte) {
			taskID, ok := interned[string(id)]
			if !ok {
				taskID = string(id)
				interned[taskID] = taskID
			}
			events = unpack(events, taskID, first, last, d, 0, int(^uint(0)>>1))
		})
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("sqlite: fold: %w", err)
	}
	return events, ids, nil
}

// foldRest moves every row of the journal into event_runs in tx, in one
// piece (the caller holds foldMu and writeMu, and has just folded: this
// is what Applies journaled since, a few writes' worth), and returns how
// many events it moved; the caller subtracts them from journaled once tx
// is committed.
func (s *Store) foldRest(ctx context.Context, tx *sql.Tx) (int, error) {
	events, ids, err := s.journalHead(ctx, tx, int(^uint(0)>>1))
	if err != nil || len(ids) == 0 {
		return 0, err
	}
	moved := len(events)
	events = slices.DeleteFunc(events, func(e store.Event) bool { return e.Data == nil })
	if err := s.insertRuns(ctx, tx, groupRuns(events)); err != nil {
		return 0, fmt.Errorf("sqlite: fold: %w", err)
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM event_journal WHERE id <= ?`, ids[len(ids)-1]); err != nil {
		return 0, fmt.Errorf("sqlite: fold: %w", err)
	}
	return moved, nil
}

// Package sqlite is the embedded store: one SQLite file in the data
// directory, through a pure-Go driver (no cgo, no server).
//
// Durability settings, and what they risk:
//   - journal_mode=WAL, synchronous=NORMAL: a commit is a write() of its
//     pages to the WAL file, with no fsync. It survives a crash of the
//     process (kill -9, a panic, the OOM killer): the data is in the
//     kernel's page cache and the WAL is replayed at the next open. A
//     power loss or a kernel crash may take back the commits since the
//     last checkpoint (at most about checkpointEvery, 100 ms, of writes,
//     plus whatever the kernel had not written out), never corrupting the
//     file. So "durable" (what a watcher is shown) means "survives the
//     dispatcher's death", not "survives the machine's". synchronous=FULL
//     would close that window at one fsync per commit (a few ms on most
//     disks), which is the relay latency the store writer was made to
//     avoid; synchronous=OFF was not chosen: in WAL mode it skips the
//     checkpoint's fsyncs too, and a power loss can then corrupt the file.
//   - wal_autocheckpoint=0 and a background checkpointer (checkpointLoop):
//     the WAL is copied into the database, with its two fsyncs, on its own
//     connection beside the writer instead of inside the commit that
//     crossed SQLite's 1000-page mark (which stalled every watcher waiting
//     for that commit). The WAL is bounded by walRestartFrames (32 MiB).
//   - temp_store=MEMORY: a statement's journal (SQLite keeps one for each
//     multi-row INSERT inside a transaction, so that a failing statement
//     can be undone alone) stays in memory instead of spilling past 64 KiB
//     into a temporary file: a write touching 64 tasks' pages wrote ~280
//     extra 4-byte and 4 KiB pwrites into that file (strace), ~25 % of the
//     write's CPU (BenchmarkApplySmall). It holds nothing durable: the
//     journal only serves a rollback of the statement, never recovery. Its
//     memory is the original of each page one statement changes (at most
//     runChunk runs' pages, a few MiB), freed at the statement's end.
//
// Events are stored as runs, one row per run of a task's consecutive
// events (runs.go). A write puts its events into the journal first, one
// row per write in write order, and a fold moves them into the runs about
// once a second (journal.go): a write then costs a page or two instead of
// a page per task. The package must not interpret event or task bodies.
package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	sqlitedrv "modernc.org/sqlite" // driver "sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// FileName is the database file inside the data directory.
const FileName = "dispatcher.db"

// migrations are applied in order, each once; the index+1 is the version.
// Never edit one that has shipped: append a new one.
var migrations = []string{
	`CREATE TABLE tasks (
		id TEXT PRIMARY KEY,
		status INTEGER NOT NULL,
		created_at INTEGER NOT NULL,
		ended_at INTEGER NOT NULL DEFAULT 0,
		body BLOB NOT NULL
	);
	CREATE INDEX tasks_status_created ON tasks(status, created_at);
	CREATE INDEX tasks_ended ON tasks(ended_at) WHERE ended_at > 0;
	CREATE INDEX tasks_created ON tasks(created_at);
	CREATE TABLE events (
		task_id TEXT NOT NULL,
		seq INTEGER NOT NULL,
		data BLOB NOT NULL,
		PRIMARY KEY (task_id, seq)
	) WITHOUT ROWID;
	CREATE TABLE configs (
		id TEXT PRIMARY KEY,
		data BLOB NOT NULL,
		updated_at INTEGER NOT NULL
	);`,
	// Events as runs (runs.go): one row per run of consecutive events of
	// a task instead of one per event.
	`CREATE TABLE event_runs (
		task_id TEXT NOT NULL,
		first_seq INTEGER NOT NULL,
		last_seq INTEGER NOT NULL,
		data BLOB NOT NULL,
		PRIMARY KEY (task_id, first_seq, last_seq)
	) WITHOUT ROWID;
	INSERT INTO event_runs (task_id, first_seq, last_seq, data) SELECT task_id, seq, seq, data FROM events;
	DROP TABLE events;`,
	// The write-ordered journal (journal.go): a write's events as one row,
	// folded into event_runs later.
	`CREATE TABLE event_journal (
		id INTEGER PRIMARY KEY,
		data BLOB NOT NULL
	);`,
	// event_runs as a rowid table with its key in an index (runs.go):
	// the WITHOUT ROWID table kept each run's data in its key B-tree.
	`CREATE TABLE event_runs_v4 (
		task_id TEXT NOT NULL,
		first_seq INTEGER NOT NULL,
		last_seq INTEGER NOT NULL,
		data BLOB NOT NULL
	);
	INSERT INTO event_runs_v4 (task_id, first_seq, last_seq, data)
		SELECT task_id, first_seq, last_seq, data FROM event_runs ORDER BY task_id, first_seq, last_seq;
	DROP TABLE event_runs;
	ALTER TABLE event_runs_v4 RENAME TO event_runs;
	CREATE UNIQUE INDEX event_runs_key ON event_runs (task_id, first_seq, last_seq);`,
}

// runChunk is how many runs one INSERT writes (4 parameters each, well
// under SQLite's 32766).
const runChunk = 500

func runInsert(n int) string {
	return `INSERT INTO event_runs (task_id, first_seq, last_seq, data) VALUES (?, ?, ?, ?)` +
		strings.Repeat(`, (?, ?, ?, ?)`, n-1) + ` ON CONFLICT DO NOTHING`
}

// Store is the SQLite store.
type Store struct {
	db   *sql.DB
	lock *os.File // the data dir's lock (Open only)
	// inserts holds the multi-row INSERT of runs prepared once per size in
	// chunkSizes: parsing a 500-row statement on every write was 7% of the
	// dispatcher's CPU under load (perf, docs/benchmarks.md).
	inserts map[int]*sql.Stmt

	// The background checkpointer (see checkpointLoop): Apply kicks it
	// after each commit; walFull asks Apply to finish a checkpoint itself.
	ckptKick, ckptStop, ckptDone chan struct{}
	stopOnce                     sync.Once
	walFull                      atomic.Bool

	// The journal (journal.go). writeMu serializes the write
	// transactions of Apply and of the fold, so that Apply waits on a Go
	// mutex for the (short) fold instead of in SQLite's busy handler,
	// which sleeps in steps of milliseconds. journaled counts the events
	// written to the journal and not folded yet; lastFold is when the
	// fold last ran (checkpointLoop's goroutine only).
	writeMu sync.Mutex
	// applyWaiting counts the Applies waiting for writeMu: the fold
	// gives the lock up to them between two pieces (foldOnce), and waits
	// (at most foldHandoff) for the Apply to say on applyIn that it took
	// it. foldMu serializes the folds.
	applyWaiting atomic.Int32
	applyIn      chan struct{}
	foldHandoff  time.Duration
	foldMu       sync.Mutex
	// lockWaits counts the Applies that found writeMu taken, lockWaited
	// their wait in ns (benchmarks read them).
	lockWaits, lockWaited atomic.Int64
	// foldPieceHook, if set (tests), runs after each piece of a fold;
	// retentionHook between DeleteEndedBefore's fold and its delete.
	foldPieceHook, retentionHook func()
	// wconn is the connection of the writes under writeMu (Apply, the
	// fold, retention): one connection, so that its page cache stays
	// valid between writes. Taken from the pool, a write often got
	// another connection than the last one (the checkpointer's, a
	// reader's), whose cache SQLite then threw away (another connection
	// had committed) and read back page by page: pager_reset and pread
	// were ~6 % of the dispatcher's CPU under a flood (pprof).
	wconn      *sql.Conn
	insJournal *sql.Stmt
	raw        *rawStmts // Apply's statements on wconn (rawapply.go; under writeMu)
	journaled  atomic.Int64
	lastFold   time.Time
}

// checkpointEvery is the least time between two background checkpoints:
// pages written many times meanwhile (the last leaf of a busy task) are
// copied into the database once. It is also about the most a power loss
// can take back (see the package doc).
const checkpointEvery = 100 * time.Millisecond

// walRestartFrames bounds the WAL: once a background checkpoint finds it
// holding this many frames (pages, 32 MiB at 4 KiB), the next Apply first
// checkpoints the few frames the background one could not, so that its
// write starts the WAL over. Under a steady stream of writes the WAL never
// empties by itself: the background checkpoint always trails the writer by
// the writes made while it ran.
const walRestartFrames = 8192

// chunkSizes are the row counts of the prepared event INSERTs, largest
// first: a batch is written as full chunks, then smaller ones, so a few
// statements serve every batch size.
var chunkSizes = [...]int{runChunk, 64, 8, 1}

var _ store.Store = (*Store)(nil)

// Open opens (creating if needed) the database in dir and migrates it.
func Open(ctx context.Context, dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("sqlite: data dir: %w", err)
	}
	lock, err := lockDir(dir)
	if err != nil {
		return nil, err
	}
	s, err := OpenFile(ctx, filepath.Join(dir, FileName))
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		return nil, err
	}
	s.lock = lock
	return s, nil
}

// OpenFile opens the database file path and migrates it.
func OpenFile(ctx context.Context, path string) (*Store, error) {
	q := url.Values{}
	// wal_autocheckpoint(0): no connection checkpoints at commit; the
	// background checkpointer does (checkpointLoop). cache_size: 8 MiB of
	// pages per connection instead of 2 MiB, so the B-tree pages a batch
	// touches stay cached between writes. temp_store(MEMORY): see the
	// package doc.
	for _, p := range []string{"journal_mode(WAL)", "synchronous(NORMAL)", "wal_autocheckpoint(0)", "cache_size(-8192)", "temp_store(MEMORY)", "busy_timeout(10000)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("sqlite: open: %w", err)
	}
	// One writer at a time is SQLite's model; a few connections let
	// readers run beside it (WAL).
	db.SetMaxOpenConns(4)
	s := &Store{db: db, inserts: make(map[int]*sql.Stmt, len(chunkSizes)),
		ckptKick: make(chan struct{}, 1), ckptStop: make(chan struct{}), ckptDone: make(chan struct{}),
		applyIn: make(chan struct{}, 1), foldHandoff: foldHandoff}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	if s.wconn, err = db.Conn(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("sqlite: open: %w", err)
	}
	go s.checkpointLoop()
	for _, n := range chunkSizes {
		st, err := db.PrepareContext(ctx, runInsert(n))
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("sqlite: prepare: %w", err)
		}
		s.inserts[n] = st
	}
	if s.insJournal, err = db.PrepareContext(ctx, `INSERT INTO event_journal (data) VALUES (?)`); err != nil {
		s.Close()
		return nil, fmt.Errorf("sqlite: prepare: %w", err)
	}
	// What the journal holds from before (a crash) is folded now, so
	// that restoring tasks reads event_runs alone.
	if err := s.fold(ctx); err != nil {
		s.Close()
		return nil, err
	}
	return s, nil
}

// checkpointLoop copies the WAL into the database file, off the writer's
// path: a checkpoint fsyncs the WAL and the database (synchronous=NORMAL
// syncs nowhere else), and at SQLite's default, in the commit that crosses
// 1000 pages, it stalled that commit and every watcher waiting for it. A
// PASSIVE checkpoint runs beside the writer (it never blocks it), once
// kicked by a commit and at most every checkpointEvery.
func (s *Store) checkpointLoop() {
	defer close(s.ckptDone)
	pause := time.NewTimer(checkpointEvery)
	pause.Stop()
	for {
		select {
		case <-s.ckptKick:
		case <-s.ckptStop:
			return
		}
		if time.Since(s.lastFold) >= foldEvery || s.journaled.Load() >= foldSoonEvents {
			s.lastFold = time.Now()
			_ = s.foldPaced(context.Background(), s.ckptStop) // an error: the next fold does the work
		}
		if frames, err := s.checkpoint(context.Background()); err == nil && frames >= walRestartFrames {
			s.walFull.Store(true)
		}
		pause.Reset(checkpointEvery)
		select {
		case <-pause.C:
		case <-s.ckptStop:
			pause.Stop()
			return
		}
	}
}

// checkpoint runs a PASSIVE checkpoint and returns how many frames the
// WAL holds. An error (another checkpoint under way, a busy database) is
// not reported: the next one does the work.
func (s *Store) checkpoint(ctx context.Context) (int, error) {
	var busy, frames, done int
	err := s.db.QueryRowContext(ctx, `PRAGMA wal_checkpoint(PASSIVE)`).Scan(&busy, &frames, &done)
	return frames, err
}

// kickCheckpoint tells the checkpointer that something was committed.
func (s *Store) kickCheckpoint() {
	select {
	case s.ckptKick <- struct{}{}:
	default:
	}
}

func (s *Store) migrate(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("sqlite: migrate: %w", err)
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)`); err != nil {
		return fmt.Errorf("sqlite: migrate: %w", err)
	}
	var v int
	if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v); err != nil {
		return fmt.Errorf("sqlite: migrate: %w", err)
	}
	err = store.Migrate("sqlite", migrations, v, func(stmt string) error {
		_, err := tx.ExecContext(ctx, stmt)
		return err
	}, func(version int, appliedAt int64) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`, version, appliedAt)
		return err
	})
	if err != nil {
		return err
	}
	return tx.Commit()
}

// Apply implements store.Store. The events go into the journal, one row
// (journal.go); the fold moves them into event_runs later.
//
// ctx's cancellation is not passed to SQLite's statements: modernc's driver
// starts a goroutine for each statement run under a context that can end
// (to interrupt it), three a write (BEGIN, INSERT, COMMIT), and their
// start and wake-up were a measurable part of a write's CPU at one write a
// millisecond (rest-vs-grpc's live phase). Nothing is lost: the statements
// are short inserts into a database only this process writes, a wait for
// its lock ends at busy_timeout (10 s, then an error the Writer retries),
// and an interrupt cannot end a write stalled in the kernel anyway; the
// Writer reports a write under way too long (StuckAfter) either way.
func (s *Store) Apply(ctx context.Context, b store.Batch) error {
	ctx = context.WithoutCancel(ctx)
	for _, e := range b.Events {
		if e.Data == nil {
			// What the NOT NULL column of event_runs refused before
			// the journal: a record the store cannot hold.
			return store.Rejected(fmt.Errorf("sqlite: apply events: event %d of task %s has no data", e.Seq, e.TaskID))
		}
	}
	if !s.writeMu.TryLock() {
		t0 := time.Now()
		s.applyWaiting.Add(1)
		s.writeMu.Lock()
		s.applyWaiting.Add(-1)
		select {
		case s.applyIn <- struct{}{}: // to a fold that gave the lock up
		default:
		}
		s.lockWaits.Add(1)
		s.lockWaited.Add(int64(time.Since(t0)))
	}
	defer s.writeMu.Unlock()
	if s.walFull.Swap(false) {
		// The background checkpoint copied all but the last few frames:
		// copy those too, so that this write starts the WAL over.
		_, _ = s.checkpoint(ctx)
	}
	// Long runs (a flood: few tasks, many events each) go straight into
	// event_runs, where they cost a page or so per run anyway; short ones
	// (relay rates: a run per task per write, of an event or two) into
	// the journal, one row per write. Readers merge both in one snapshot
	// (ReadEvents), so a task's events may be in either, in any order.
	var direct, journal []run
	for _, r := range groupRuns(b.Events) {
		if r.n >= directRunEvents {
			direct = append(direct, r)
		} else {
			journal = append(journal, r)
		}
	}
	var rows [][]byte
	if len(journal) > 0 {
		rows = journalRows(journal)
	}
	if err := s.applyRaw(ctx, direct, rows, b.Tasks); err != nil { // rawapply.go
		return err
	}
	n := 0
	for _, r := range journal {
		n += r.n
	}
	s.journaled.Add(int64(n))
	s.kickCheckpoint()
	return nil
}

// insertRuns writes runs into event_runs in tx: multi-row INSERTs, one
// statement per chunk of runs (the per-statement and per-row costs
// dominate small rows).
func (s *Store) insertRuns(ctx context.Context, tx *sql.Tx, runs []run) error {
	args := make([]any, 0, 4*min(len(runs), runChunk))
	for len(runs) > 0 {
		n := chunkSizes[len(chunkSizes)-1]
		for _, c := range chunkSizes {
			if c <= len(runs) {
				n = c
				break
			}
		}
		args = args[:0]
		for _, r := range runs[:n] {
			args = append(args, r.taskID, int64(r.first), int64(r.last), r.data)
		}
		if _, err := tx.StmtContext(ctx, s.inserts[n]).ExecContext(ctx, args...); err != nil {
			return err
		}
		runs = runs[n:]
	}
	return nil
}

// applyError is err under what, marked store.Rejected when SQLite refused
// a record's data (a constraint, a value too big or of the wrong type)
// rather than failed (disk full, I/O error, busy).
func applyError(what string, err error) error {
	err = fmt.Errorf("%s: %w", what, err)
	var se *sqlitedrv.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff { // the primary result code
		case sqlite3.SQLITE_CONSTRAINT, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH:
			return store.Rejected(err)
		}
	}
	return err
}

// GetTask implements store.Store.
func (s *Store) GetTask(ctx context.Context, id string) (store.TaskRecord, error) {
	r, err := store.ScanTask(s.db.QueryRowContext(ctx, `SELECT `+store.TaskColumns+` FROM tasks WHERE id = ?`, id))
	return r, store.ReadError(err, sql.ErrNoRows, "sqlite: get task")
}

// ListTasks implements store.Store.
func (s *Store) ListTasks(ctx context.Context, statuses []int32, limit int) ([]store.TaskRecord, error) {
	return s.ListTasksBefore(ctx, statuses, nil, limit)
}

// ListTasksBefore implements store.Store. SQLite compares TEXT byte by byte
// (BINARY collation), as TaskKey does.
func (s *Store) ListTasksBefore(ctx context.Context, statuses []int32, before *store.TaskKey, limit int) ([]store.TaskRecord, error) {
	q := `SELECT ` + store.TaskColumns + ` FROM tasks WHERE 1 = 1`
	args := make([]any, 0, len(statuses)+4)
	if len(statuses) > 0 {
		q += ` AND status IN (?` + strings.Repeat(`, ?`, len(statuses)-1) + `)`
		for _, st := range statuses {
			args = append(args, st)
		}
	}
	if before != nil {
		c := store.Micros(before.CreatedAt)
		q += ` AND (created_at < ? OR (created_at = ? AND id < ?))`
		args = append(args, c, c, before.ID)
	}
	q += ` ORDER BY created_at DESC, id DESC`
	if limit > 0 {
		q += ` LIMIT ?`
		args = append(args, limit)
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("sqlite: list tasks: %w", err)
	}
	defer rows.Close()
	return store.Collect(rows, store.ScanTask, "sqlite: list tasks")
}

// ReadEvents implements store.Store.
func (s *Store) ReadEvents(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]store.Event, error) {
	limit = store.EventLimit(limit)
	// The journal and the runs in one snapshot (a read transaction): a
	// fold between two reads would otherwise move events out of sight.
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true}) // BEGIN DEFERRED
	if err != nil {
		return nil, fmt.Errorf("sqlite: read events: %w", err)
	}
	defer tx.Rollback()
	journal, err := s.journalOf(ctx, tx, taskID, afterSeq)
	if err != nil {
		return nil, err
	}
	out, err := s.readRuns(ctx, tx, taskID, afterSeq, limit)
	if err != nil || len(journal) == 0 {
		return out, err
	}
	return mergeEvents(out, journal, limit), nil
}

// readRuns is ReadEvents of event_runs alone.
func (s *Store) readRuns(ctx context.Context, tx *sql.Tx, taskID string, afterSeq uint64, limit int) ([]store.Event, error) {
	// The run holding afterSeq+1 starts at most maxRunEvents-1 before it.
	from := int64(afterSeq) - maxRunEvents
	rows, err := tx.QueryContext(ctx, `SELECT first_seq, last_seq, data FROM event_runs
		WHERE task_id = ? AND first_seq > ? AND last_seq > ? ORDER BY first_seq, last_seq`, taskID, from, int64(afterSeq))
	if err != nil {
		return nil, fmt.Errorf("sqlite: read events: %w", err)
	}
	defer rows.Close()
	var out []store.Event
	next := afterSeq // the last seq taken: a seq in two runs is taken once
	for len(out) < limit && rows.Next() {
		var first, last int64
		var data []byte
		if err := rows.Scan(&first, &last, &data); err != nil {
			return out, fmt.Errorf("sqlite: read events: %w", err)
		}
		if uint64(last) <= next {
			continue
		}
		out = unpack(out, taskID, uint64(first), uint64(last), data, next, limit)
		next = out[len(out)-1].Seq
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("sqlite: read events: %w", err)
	}
	return out, nil
}

// LastSeq implements store.Store.
func (s *Store) LastSeq(ctx context.Context, taskID string) (uint64, error) {
	// One snapshot (see ReadEvents).
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return 0, fmt.Errorf("sqlite: last seq: %w", err)
	}
	defer tx.Rollback()
	journal, err := s.journalOf(ctx, tx, taskID, 0)
	if err != nil {
		return 0, err
	}
	var last uint64
	for _, e := range journal {
		last = max(last, e.Seq)
	}
	var seq int64
	// The run holding the last seq starts at most maxRunEvents-1 before
	// the last run starts.
	if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(last_seq), 0) FROM event_runs WHERE task_id = ?1
		AND first_seq > (SELECT COALESCE(MAX(first_seq), 0) FROM event_runs WHERE task_id = ?1) - ?2`,
		taskID, maxRunEvents).Scan(&seq); err != nil {
		return 0, fmt.Errorf("sqlite: last seq: %w", err)
	}
	return max(last, uint64(seq)), nil
}

// PutConfig implements store.Store.
func (s *Store) PutConfig(ctx context.Context, id string, data []byte) error {
	_, err := s.db.ExecContext(ctx, `INSERT INTO configs (id, data, updated_at) VALUES (?, ?, ?)
		ON CONFLICT (id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at`, id, data, time.Now().UnixMicro())
	if err != nil {
		return fmt.Errorf("sqlite: put config: %w", err)
	}
	return nil
}

// GetConfig implements store.Store.
func (s *Store) GetConfig(ctx context.Context, id string) ([]byte, error) {
	var data []byte
	err := s.db.QueryRowContext(ctx, `SELECT data FROM configs WHERE id = ?`, id).Scan(&data)
	if err := store.ReadError(err, sql.ErrNoRows, "sqlite: get config"); err != nil {
		return nil, err
	}
	return data, nil
}

// DeleteEndedBefore implements store.Store.
func (s *Store) DeleteEndedBefore(ctx context.Context, cutoff time.Time) (int64, error) {
	// Events still in the journal are folded first: none of an ended
	// task's may come back into event_runs after its runs were deleted.
	// foldMu is held throughout, so that no fold that read journal rows
	// before the delete inserts their runs after it; what Applies
	// journaled meanwhile is folded in the delete's own transaction,
	// under the write lock, so none is left behind it either.
	s.foldMu.Lock()
	defer s.foldMu.Unlock()
	for {
		n, err := s.foldOnceLocked(ctx, foldMaxEvents)
		if err != nil {
			return 0, fmt.Errorf("sqlite: retention: %w", err)
		}
		if n == 0 {
			break
		}
	}
	if s.retentionHook != nil {
		s.retentionHook()
	}
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	tx, err := s.wconn.BeginTx(ctx, nil)
	if err != nil {
		return 0, fmt.Errorf("sqlite: retention: %w", err)
	}
	defer tx.Rollback()
	moved, err := s.foldRest(ctx, tx)
	if err != nil {
		return 0, fmt.Errorf("sqlite: retention: %w", err)
	}
	c := store.Micros(cutoff)
	if _, err := tx.ExecContext(ctx, `DELETE FROM event_runs WHERE task_id IN (SELECT id FROM tasks WHERE ended_at > 0 AND ended_at < ?)`, c); err != nil {
		return 0, fmt.Errorf("sqlite: retention: %w", err)
	}
	res, err := tx.ExecContext(ctx, `DELETE FROM tasks WHERE ended_at > 0 AND ended_at < ?`, c)
	if err != nil {
		return 0, fmt.Errorf("sqlite: retention: %w", err)
	}
	n, _ := res.RowsAffected()
	if err := tx.Commit(); err != nil {
		return 0, fmt.Errorf("sqlite: retention: %w", err)
	}
	s.journaled.Add(-int64(moved))
	return n, nil
}

// Close implements store.Store.
func (s *Store) Close() error {
	s.stopOnce.Do(func() { close(s.ckptStop) }) // Close may be called twice
	<-s.ckptDone
	if s.insJournal != nil {
		_ = s.fold(context.Background()) // tidy; the next Open folds otherwise
		s.insJournal.Close()
	}
	for _, st := range s.inserts {
		st.Close()
	}
	if s.wconn != nil {
		// writeMu is held until wconn is closed: an Apply in between would
		// prepare statements that nothing finalizes (the connection would
		// close as a zombie and leave its WAL); after, its Raw fails.
		s.writeMu.Lock()
		if s.raw != nil {
			_ = s.wconn.Raw(func(any) error { s.raw.close(); return nil })
			s.raw = nil
		}
		s.wconn.Close()
		s.writeMu.Unlock()
	}
	err := s.db.Close()
	if s.lock != nil {
		s.lock.Close() // releases the flock
	}
	return err
}

// Package postgres is the production store: PostgreSQL through pgx v5. The
// schema is the same as the embedded store's (see package store); migrations
// run on Open under an advisory lock, so replicas starting together apply
// each migration once.
package postgres

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// migrationLock is the pg_advisory_xact_lock key of migrations ("dispatch").
const migrationLock = 0x6469737061746368

// migrations are applied in order, each once; the index+1 is the version.
// Never edit one that has shipped: append a new one.
var migrations = []string{
	`CREATE TABLE tasks (
		id TEXT PRIMARY KEY,
		status INTEGER NOT NULL,
		created_at BIGINT NOT NULL,
		ended_at BIGINT NOT NULL DEFAULT 0,
		body BYTEA NOT NULL
	);
	CREATE INDEX tasks_status_created ON tasks(status, created_at);
	CREATE INDEX tasks_ended ON tasks(ended_at) WHERE ended_at > 0;
	CREATE INDEX tasks_created ON tasks(created_at);
	CREATE TABLE events (
		task_id TEXT NOT NULL,
		seq BIGINT NOT NULL,
		data BYTEA NOT NULL,
		PRIMARY KEY (task_id, seq)
	);
	CREATE TABLE configs (
		id TEXT PRIMARY KEY,
		data BYTEA NOT NULL,
		updated_at BIGINT NOT NULL
	);`,
}

// Store is the PostgreSQL store.
type Store struct {
	pool     *pgxpool.Pool
	inFlight int
}

// DefaultWritesInFlight is how many writes the store.Writer keeps under way
// on PostgreSQL (store.ConcurrentStore): with durable commits a write is
// mostly the wait for its WAL flush, and one at a time made every event
// that arrived meanwhile wait for that flush and then for a flush of its
// own; with more, the next writes go out at once (each of other tasks than
// those under way) and PostgreSQL's commits share flushes. In the fleet
// bench (64 sessions, durable commits, interleaved pairs) 4 beat 2 and 8
// beat 4 (relay p99 about 0.6x and 0.45x); 16 was no better than 8. The
// pool gets InFlight+3 connections. Environment
// DISPATCHER_PG_WRITES_IN_FLIGHT (1-16) overrides it (1: one write at a
// time, as before).
const DefaultWritesInFlight = 8

// WritesInFlight implements store.ConcurrentStore.
func (s *Store) WritesInFlight() int { return s.inFlight }

func writesInFlight() int {
	if v, err := strconv.Atoi(os.Getenv("DISPATCHER_PG_WRITES_IN_FLIGHT")); err == nil && v >= 1 && v <= 16 {
		return v
	}
	return DefaultWritesInFlight
}

var _ store.Store = (*Store)(nil)

// Open connects to dsn (a libpq connection string or URL) and migrates.
func Open(ctx context.Context, dsn string) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	inFlight := writesInFlight()
	if !strings.Contains(dsn, "pool_max_conns") && cfg.MaxConns < int32(inFlight)+3 {
		// Room for the writes under way beside the reads (pgx's default
		// is max(4, CPUs)), unless the DSN says how many.
		cfg.MaxConns = int32(inFlight) + 3
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("postgres: connect: %w", err)
	}
	s := &Store{pool: pool, inFlight: inFlight}
	if err := s.migrate(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return s, nil
}

func (s *Store) migrate(ctx context.Context) error {
	return pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLock)); err != nil {
			return fmt.Errorf("postgres: migrate: %w", err)
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
			return fmt.Errorf("postgres: migrate: %w", err)
		}
		var v int
		if err := tx.QueryRow(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_migrations`).Scan(&v); err != nil {
			return fmt.Errorf("postgres: migrate: %w", err)
		}
		return store.Migrate("postgres", migrations, v, func(stmt string) error {
			_, err := tx.Exec(ctx, stmt)
			return err
		}, func(version int, appliedAt int64) error {
			_, err := tx.Exec(ctx, `INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)`, version, appliedAt)
			return err
		})
	})
}

// Apply implements store.Store: all events in one INSERT … SELECT unnest
// (one round trip whatever the batch size), then the task upserts, in one
// transaction.
func (s *Store) Apply(ctx context.Context, b store.Batch) error {
	if len(b.Events) == 0 && len(b.Tasks) == 0 {
		return nil
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if len(b.Events) > 0 {
			taskIDs := make([]string, len(b.Events))
			seqs := make([]int64, len(b.Events))
			data := make([][]byte, len(b.Events))
			for i, e := range b.Events {
				taskIDs[i], seqs[i], data[i] = e.TaskID, int64(e.Seq), e.Data
			}
			if _, err := tx.Exec(ctx, `INSERT INTO events (task_id, seq, data)
				SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) ON CONFLICT DO NOTHING`,
				taskIDs, seqs, data); err != nil {
				return applyError("postgres: apply events", err)
			}
		}
		if len(b.Tasks) > 0 {
			var pb pgx.Batch
			for _, t := range b.Tasks {
				pb.Queue(`INSERT INTO tasks (id, status, created_at, ended_at, body) VALUES ($1, $2, $3, $4, $5)
					ON CONFLICT (id) DO UPDATE SET status = excluded.status, created_at = excluded.created_at,
					ended_at = excluded.ended_at, body = excluded.body`,
					t.ID, t.Status, store.Micros(t.CreatedAt), store.Micros(t.EndedAt), t.Body)
			}
			if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
				return applyError("postgres: apply tasks", err)
			}
		}
		return nil
	})
	return err
}

// applyError is err under what, marked store.Rejected when PostgreSQL
// refused a record's data rather than failed: SQLSTATE class 22 (data
// exception, e.g. a text that is not UTF-8), 23 (integrity constraint,
// e.g. NOT NULL) or 54000 (a value over a limit).
func applyError(what string, err error) error {
	err = fmt.Errorf("%s: %w", what, err)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "22") || strings.HasPrefix(pe.Code, "23") || pe.Code == "54000") {
		return store.Rejected(err)
	}
	return err
}

// GetTask implements store.Store.
func (s *Store) GetTask(ctx context.Context, id string) (store.TaskRecord, error) {
	r, err := store.ScanTask(s.pool.QueryRow(ctx, `SELECT `+store.TaskColumns+` FROM tasks WHERE id = $1`, id))
	return r, store.ReadError(err, pgx.ErrNoRows, "postgres: get task")
}

// GetTaskAndLastSeq is GetTask and LastSeq in one statement (one round
// trip, one snapshot): a fleet replica's look-up of a task another one
// runs.
func (s *Store) GetTaskAndLastSeq(ctx context.Context, id string) (store.TaskRecord, uint64, error) {
	var last int64
	r, err := store.ScanTask(withLast{s.pool.QueryRow(ctx, `SELECT `+store.TaskColumns+`,
		(SELECT COALESCE(MAX(seq), 0) FROM events WHERE task_id = $1) FROM tasks WHERE id = $1`, id), &last})
	return r, uint64(last), store.ReadError(err, pgx.ErrNoRows, "postgres: get task")
}

// withLast scans a row of store.TaskColumns and one more column into last.
type withLast struct {
	row  pgx.Row
	last *int64
}

func (w withLast) Scan(dest ...any) error { return w.row.Scan(append(dest, w.last)...) }

// ListTasks implements store.Store.
func (s *Store) ListTasks(ctx context.Context, statuses []int32, limit int) ([]store.TaskRecord, error) {
	return s.ListTasksBefore(ctx, statuses, nil, limit)
}

// ListTasksBefore implements store.Store. Ids are compared in the "C"
// collation (byte by byte, as TaskKey does), whatever the database's.
func (s *Store) ListTasksBefore(ctx context.Context, statuses []int32, before *store.TaskKey, limit int) ([]store.TaskRecord, error) {
	if statuses == nil {
		statuses = []int32{}
	}
	q := `SELECT ` + store.TaskColumns + ` FROM tasks
		WHERE (cardinality($1::int[]) = 0 OR status = ANY($1::int[]))`
	args := []any{statuses}
	if before != nil {
		q += ` AND (created_at < $2 OR (created_at = $2 AND id COLLATE "C" < $3))`
		args = append(args, store.Micros(before.CreatedAt), before.ID)
	}
	q += ` ORDER BY created_at DESC, id COLLATE "C" DESC`
	if limit > 0 {
		q += fmt.Sprintf(` LIMIT $%d`, len(args)+1)
		args = append(args, limit)
	}
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("postgres: list tasks: %w", err)
	}
	defer rows.Close()
	return store.Collect(rows, store.ScanTask, "postgres: list tasks")
}

// ReadEvents implements store.Store.
func (s *Store) ReadEvents(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]store.Event, error) {
	rows, err := s.pool.Query(ctx, `SELECT seq, data FROM events WHERE task_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`, taskID, int64(afterSeq), store.EventLimit(limit))
	if err != nil {
		return nil, fmt.Errorf("postgres: read events: %w", err)
	}
	defer rows.Close()
	return store.Collect(rows, store.EventScanner(taskID), "postgres: read events")
}

// LastSeq implements store.Store.
func (s *Store) LastSeq(ctx context.Context, taskID string) (uint64, error) {
	var seq int64
	if err := s.pool.QueryRow(ctx, `SELECT COALESCE(MAX(seq), 0) FROM events WHERE task_id = $1`, taskID).Scan(&seq); err != nil {
		return 0, fmt.Errorf("postgres: last seq: %w", err)
	}
	return uint64(seq), nil
}

// PutConfig implements store.Store.
func (s *Store) PutConfig(ctx context.Context, id string, data []byte) error {
	_, err := s.pool.Exec(ctx, `INSERT INTO configs (id, data, updated_at) VALUES ($1, $2, $3)
		ON CONFLICT (id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at`, id, data, time.Now().UnixMicro())
	if err != nil {
		return fmt.Errorf("postgres: put config: %w", err)
	}
	return nil
}

// GetConfig implements store.Store.
func (s *Store) GetConfig(ctx context.Context, id string) ([]byte, error) {
	var data []byte
	err := s.pool.QueryRow(ctx, `SELECT data FROM configs WHERE id = $1`, id).Scan(&data)
	if err := store.ReadError(err, pgx.ErrNoRows, "postgres: get config"); err != nil {
		return nil, err
	}
	return data, nil
}

// DeleteEndedBefore implements store.Store.
func (s *Store) DeleteEndedBefore(ctx context.Context, cutoff time.Time) (int64, error) {
	var n int64
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		c := store.Micros(cutoff)
		if _, err := tx.Exec(ctx, `DELETE FROM events WHERE task_id IN (SELECT id FROM tasks WHERE ended_at > 0 AND ended_at < $1)`, c); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, `DELETE FROM tasks WHERE ended_at > 0 AND ended_at < $1`, c)
		n = tag.RowsAffected()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("postgres: retention: %w", err)
	}
	return n, nil
}

// Close implements store.Store.
func (s *Store) Close() error {
	s.pool.Close()
	return nil
}

// Pool is the store's connection pool, for a fleet (package fleet) that
// keeps its leases and commands in the same database.
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

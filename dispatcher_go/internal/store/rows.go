package store

import (
	"errors"
	"fmt"
	"time"
)

// Scanner is one result row. database/sql's *Row and *Rows and pgx's Row
// and Rows all are.
type Scanner interface {
	Scan(dest ...any) error
}

// Rows is a result set being read, as database/sql's *Rows and pgx's Rows
// are. Closing it is the caller's (their Close methods differ).
type Rows interface {
	Scanner
	Next() bool
	Err() error
}

// TaskColumns are the columns ScanTask reads, in its order.
const TaskColumns = `id, status, created_at, ended_at, body`

// ScanTask reads one row of TaskColumns.
func ScanTask(sc Scanner) (TaskRecord, error) {
	var r TaskRecord
	var created, ended int64
	if err := sc.Scan(&r.ID, &r.Status, &created, &ended, &r.Body); err != nil {
		return r, err
	}
	r.CreatedAt, r.EndedAt = FromMicros(created), FromMicros(ended)
	return r, nil
}

// EventScanner reads rows of (seq, data) as events of taskID.
func EventScanner(taskID string) func(Scanner) (Event, error) {
	return func(sc Scanner) (Event, error) {
		e := Event{TaskID: taskID}
		var seq int64
		if err := sc.Scan(&seq, &e.Data); err != nil {
			return e, err
		}
		e.Seq = uint64(seq)
		return e, nil
	}
}

// Collect reads every row of rows with scan. On an error it returns the
// rows read before it, and the error under what ("sqlite: list tasks").
func Collect[T any](rows Rows, scan func(Scanner) (T, error), what string) ([]T, error) {
	var out []T
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return out, fmt.Errorf("%s: %w", what, err)
		}
		out = append(out, v)
	}
	if err := rows.Err(); err != nil {
		return out, fmt.Errorf("%s: %w", what, err)
	}
	return out, nil
}

// EventLimit is the number of events ReadEvents returns at most when
// asked for limit (<= 0: a default).
func EventLimit(limit int) int {
	if limit <= 0 {
		return 64
	}
	return limit
}

// ReadError is how a backend reports the error of a read of one row:
// ErrNotFound when it is the driver's noRows, nil when err is nil, else err
// under what ("sqlite: get task").
func ReadError(err, noRows error, what string) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, noRows):
		return ErrNotFound
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Migrate brings a schema at version (the highest applied, 0 for none) up
// to date: it applies migrations[version:] in order, each with apply and
// then record(its version, now in Unix seconds). name prefixes its errors
// ("sqlite"). A schema newer than migrations is an error: this binary is
// older than the database.
func Migrate(name string, migrations []string, version int, apply func(stmt string) error, record func(version int, appliedAt int64) error) error {
	if version > len(migrations) {
		return fmt.Errorf("%s: database schema version %d is newer than this dispatcher (%d)", name, version, len(migrations))
	}
	for i := version; i < len(migrations); i++ {
		if err := apply(migrations[i]); err != nil {
			return fmt.Errorf("%s: migration %d: %w", name, i+1, err)
		}
		if err := record(i+1, time.Now().Unix()); err != nil {
			return fmt.Errorf("%s: migration %d: %w", name, i+1, err)
		}
	}
	return nil
}

package sqlite

import (
	"context"
	"database/sql/driver"
	"fmt"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// Apply's transaction runs on the driver's connection itself (sql.Conn.Raw),
// not through database/sql: a sql.Tx starts a goroutine per transaction
// (Tx.awaitDone, which watches a context of its own even when the caller's
// cannot end), and each tx.StmtContext finds the connection's copy of a
// prepared statement under the statement's lock and wraps it in a new
// sql.Stmt. At a write a millisecond those were a part of each write's CPU
// (BenchmarkApplySmall). The statements below are prepared once on the
// write connection (wconn, used only under writeMu) and closed with it; the transaction is the driver's own (BEGIN IMMEDIATE, as
// _txlock asks, and COMMIT), the same SQL as before.

// rawConn is what Apply needs of modernc's connection.
type rawConn interface {
	driver.ConnBeginTx
	driver.ConnPrepareContext
}

// rawStmt is what Apply needs of a statement prepared on that connection
// (checked once, at prepare: a driver without it is an error, not a panic).
type rawStmt interface {
	driver.Stmt
	driver.StmtExecContext
}

// rawStmts are Apply's statements prepared on wconn (nil until the first
// Apply; under writeMu).
type rawStmts struct {
	inserts map[int]rawStmt     // the multi-row INSERT of runs per size in chunkSizes
	journal rawStmt             // one journal row
	task    rawStmt             // a task record's upsert
	args    []driver.NamedValue // reused for each statement's arguments
}

// taskUpsert is a task record's upsert (Apply).
const taskUpsert = `INSERT INTO tasks (id, status, created_at, ended_at, body) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (id) DO UPDATE SET status = excluded.status, created_at = excluded.created_at,
			ended_at = excluded.ended_at, body = excluded.body`

func (s *Store) prepareRaw(ctx context.Context, c rawConn) (*rawStmts, error) {
	r := &rawStmts{inserts: make(map[int]rawStmt, len(chunkSizes))}
	prep := func(q string) (rawStmt, error) {
		st, err := c.PrepareContext(ctx, q)
		if err != nil {
			r.close()
			return nil, fmt.Errorf("sqlite: prepare: %w", err)
		}
		rs, ok := st.(rawStmt)
		if !ok {
			st.Close()
			r.close()
			return nil, fmt.Errorf("sqlite: prepare: driver statement %T cannot execute with a context", st)
		}
		return rs, nil
	}
	var err error
	for _, n := range chunkSizes {
		if r.inserts[n], err = prep(runInsert(n)); err != nil {
			return nil, err
		}
	}
	if r.journal, err = prep(`INSERT INTO event_journal (data) VALUES (?)`); err != nil {
		return nil, err
	}
	if r.task, err = prep(taskUpsert); err != nil {
		return nil, err
	}
	return r, nil
}

// close finalizes the statements (on wconn: under writeMu, inside Raw).
func (r *rawStmts) close() {
	for _, st := range r.inserts {
		if st != nil {
			st.Close()
		}
	}
	if r.journal != nil {
		r.journal.Close()
	}
	if r.task != nil {
		r.task.Close()
	}
}

// exec runs st with vals as its arguments.
func (r *rawStmts) exec(ctx context.Context, st rawStmt, vals ...driver.Value) error {
	r.args = r.args[:0]
	for i, v := range vals {
		r.args = append(r.args, driver.NamedValue{Ordinal: i + 1, Value: v})
	}
	_, err := st.ExecContext(ctx, r.args)
	clear(r.args) // keeps no event data alive
	return err
}

// applyRaw writes one Apply's runs and task records in one transaction on
// wconn's driver connection. Called under writeMu.
func (s *Store) applyRaw(ctx context.Context, direct []run, journal [][]byte, tasks []store.TaskRecord) error {
	return s.wconn.Raw(func(dc any) error {
		c, ok := dc.(rawConn)
		if !ok {
			return fmt.Errorf("sqlite: apply: driver connection %T cannot begin a transaction", dc)
		}
		if s.raw == nil {
			r, err := s.prepareRaw(ctx, c)
			if err != nil {
				return err
			}
			s.raw = r
		}
		r := s.raw
		tx, err := c.BeginTx(ctx, driver.TxOptions{})
		if err != nil {
			return fmt.Errorf("sqlite: apply: %w", err)
		}
		if err := r.writeIn(ctx, direct, journal, tasks); err != nil {
			_ = tx.Rollback()
			return err
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("sqlite: commit: %w", err) // modernc rolls back a commit that failed
		}
		return nil
	})
}

func (r *rawStmts) writeIn(ctx context.Context, direct []run, journal [][]byte, tasks []store.TaskRecord) error {
	for runs := direct; len(runs) > 0; {
		n := chunkSizes[len(chunkSizes)-1]
		for _, c := range chunkSizes {
			if c <= len(runs) {
				n = c
				break
			}
		}
		r.args = r.args[:0]
		for i, x := range runs[:n] {
			r.args = append(r.args,
				driver.NamedValue{Ordinal: 4*i + 1, Value: x.taskID},
				driver.NamedValue{Ordinal: 4*i + 2, Value: int64(x.first)},
				driver.NamedValue{Ordinal: 4*i + 3, Value: int64(x.last)},
				driver.NamedValue{Ordinal: 4*i + 4, Value: x.data})
		}
		_, err := r.inserts[n].ExecContext(ctx, r.args)
		clear(r.args)
		if err != nil {
			return applyError("sqlite: apply events", err)
		}
		runs = runs[n:]
	}
	for _, row := range journal {
		if err := r.exec(ctx, r.journal, row); err != nil {
			return applyError("sqlite: apply events", err)
		}
	}
	for _, t := range tasks {
		if err := r.exec(ctx, r.task, t.ID, int64(t.Status), store.Micros(t.CreatedAt), store.Micros(t.EndedAt), t.Body); err != nil {
			return applyError("sqlite: apply task", err)
		}
	}
	return nil
}

package fleet

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// holdReader opens a transaction on conn that reads fleet_leases (as
// pg_dump does: ACCESS SHARE until it ends) and keeps it open until end
// is called.
func holdReader(t *testing.T, ctx context.Context, conn *pgx.Conn) (end func()) {
	t.Helper()
	tx, err := conn.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	end = func() { _ = tx.Rollback(context.Background()) }
	if _, err := tx.Exec(ctx, `SELECT count(*) FROM fleet_leases`); err != nil {
		end()
		t.Fatal(err)
	}
	return end
}

// A replica's start, with the schema up to date, takes no lock that an
// open reader or writer of fleet_leases holds off: it returns at once, and a lease
// statement of another replica (the fenced write's FOR SHARE) is not
// queued behind it. (ALTER TABLE ... ADD COLUMN IF NOT EXISTS took ACCESS
// EXCLUSIVE before it found the column: the start waited for the reader
// and every lease statement waited for the start.)
func TestSchemaSetUpWaitsForNoReader(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	if _, err := NewLeases(ctx, st.Pool(), time.Minute); err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", 0)
	if _, err := st.Pool().Exec(ctx, `INSERT INTO fleet_leases (task_id, owner, attempt, expires_at) VALUES
		('t1', 'r1', 1, now() + interval '1 minute'), ('t2', 'r1', 1, now() + interval '1 minute')`); err != nil {
		t.Fatal(err)
	}
	reader, err := st.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Release()
	defer holdReader(t, ctx, reader.Conn())()
	// And a renewal of another lease under way (ROW EXCLUSIVE: CREATE
	// INDEX IF NOT EXISTS waited for it, holding its SHARE lock queued).
	writer, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = writer.Rollback(context.Background()) }()
	if _, err := writer.Exec(ctx, `UPDATE fleet_leases SET expires_at = now() + interval '1 minute' WHERE task_id = 't2'`); err != nil {
		t.Fatal(err)
	}
	setUp := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		_, err := NewLeases(sctx, st.Pool(), time.Minute)
		setUp <- err
	}()
	time.Sleep(200 * time.Millisecond)
	start := time.Now()
	qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	var attempt int64
	err = pgx.BeginFunc(qctx, st.Pool(), func(tx pgx.Tx) error {
		return tx.QueryRow(qctx, `SELECT attempt FROM fleet_leases WHERE task_id = 't1' FOR SHARE`).Scan(&attempt)
	})
	if err != nil || attempt != 1 {
		t.Fatalf("a lease row FOR SHARE beside the set-up: attempt %d, %v after %s", attempt, err, time.Since(start))
	}
	select {
	case err := <-setUp:
		if err != nil {
			t.Fatalf("set-up with an open reader: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the set-up waits for the open reader")
	}
}

// The first start after the upgrade that adds read_failures fails fast,
// saying what to do, when an open transaction holds fleet_leases, rather
// than queue every lease statement behind its lock.
func TestSchemaMigrationBehindAReaderFailsFast(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	if _, err := NewLeases(ctx, st.Pool(), time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Pool().Exec(ctx, `ALTER TABLE fleet_leases DROP COLUMN read_failures`); err != nil {
		t.Fatal(err)
	}
	old := schemaLockTimeout
	schemaLockTimeout = 300 * time.Millisecond
	defer func() { schemaLockTimeout = old }()
	reader, err := st.Pool().Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer reader.Release()
	end := holdReader(t, ctx, reader.Conn())
	start := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	_, err = NewLeases(sctx, st.Pool(), time.Minute)
	if err == nil || errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "docs/operations.md") || time.Since(start) > 3*time.Second {
		end()
		t.Fatalf("migration behind a reader: %v after %s; want the lock timeout's error at once", err, time.Since(start))
	}
	t.Logf("%v", err)
	end()
	// Once the reader is gone, the start adds the column.
	if _, err := NewLeases(ctx, st.Pool(), time.Minute); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Pool().Exec(ctx, `SELECT read_failures FROM fleet_leases`); err != nil {
		t.Fatal(err)
	}
}

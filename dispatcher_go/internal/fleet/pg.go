package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Errors of Claim.
var (
	// ErrLeaseHeld means another replica holds a live lease on the task.
	ErrLeaseHeld = errors.New("fleet: the task's lease is held by another replica")
	// ErrTaskEnded means the task is terminal: nobody claims it again.
	ErrTaskEnded = errors.New("fleet: the task has ended")
)

// schemaLock is the pg_advisory_xact_lock key of the fleet's schema
// ("fleet!!!").
const schemaLock = 0x666c656574212121

// schema is the fleet's tables, beside the store's (tasks, events,
// configs). Each statement is idempotent.
const schema = `
CREATE TABLE IF NOT EXISTS fleet_leases (
	task_id TEXT PRIMARY KEY,
	owner TEXT NOT NULL,
	attempt BIGINT NOT NULL,
	expires_at TIMESTAMPTZ NOT NULL,
	released BOOLEAN NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS fleet_queue (
	task_id TEXT PRIMARY KEY,
	queue TEXT NOT NULL,
	placed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS fleet_commands (
	id BIGSERIAL PRIMARY KEY,
	task_id TEXT NOT NULL,
	kind TEXT NOT NULL,
	args JSONB NOT NULL,
	created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
	done BOOLEAN NOT NULL DEFAULT false,
	result JSONB
);
CREATE TABLE IF NOT EXISTS fleet_requests (
	request_id TEXT PRIMARY KEY,
	task_id TEXT NOT NULL,
	created_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);`

// addMissing adds the fleet's indexes and fleet_leases.read_failures (a
// column newer than the table) only when they are missing: ALTER TABLE
// takes an ACCESS EXCLUSIVE lock, and CREATE INDEX a SHARE lock, before
// either looks whether its object exists, so an unconditional
// ALTER ... ADD COLUMN IF NOT EXISTS at every replica start queued behind
// any open reader of the table (a pg_dump) and queued every lease
// statement behind itself meanwhile (the fenced writes' FOR SHARE, the
// renewals): the fleet stalled past its leases. The checks read the
// catalogue only.
const addMissing = `DO $$
BEGIN
	IF to_regclass('fleet_leases_live') IS NULL THEN
		CREATE INDEX fleet_leases_live ON fleet_leases (expires_at) WHERE NOT released;
	END IF;
	IF to_regclass('fleet_commands_open') IS NULL THEN
		CREATE INDEX fleet_commands_open ON fleet_commands (task_id) WHERE NOT done;
	END IF;
	IF NOT EXISTS (SELECT 1 FROM pg_attribute
		WHERE attrelid = 'fleet_leases'::regclass AND attname = 'read_failures' AND NOT attisdropped) THEN
		ALTER TABLE fleet_leases ADD COLUMN read_failures INTEGER NOT NULL DEFAULT 0;
	END IF;
END $$`

// schemaLockTimeout bounds the wait of the schema's one locking change
// (addMissing: the first start after an upgrade): it fails fast with
// a clear error rather than queue every lease statement behind itself.
var schemaLockTimeout = 5 * time.Second

// Leases is the fleet's state in PostgreSQL: who runs a task (owner
// replica, lease expiry, attempt number as the fencing token), the queue of
// tasks nobody runs yet (what the bus is rebuilt from), the commands sent to
// a task's owner, and the client request ids seen. Times are PostgreSQL's
// clock (clock_timestamp()), so replicas' clocks never disagree on expiry.
type Leases struct {
	pool *pgxpool.Pool
	ttl  time.Duration
	// claimQueuedStep, when set (tests), is called inside ClaimQueued's
	// transaction after its first statement.
	claimQueuedStep func(ctx context.Context, tx pgx.Tx)
	// failedBefore holds, by task id, the attempt of a claim of this
	// replica's that found failed reads counted (readFailed), so that
	// readOK resets the count only then (no statement otherwise).
	failedBefore sync.Map
}

// NewLeases creates the fleet's tables if needed. ttl is the lease length.
func NewLeases(ctx context.Context, pool *pgxpool.Pool, ttl time.Duration) (*Leases, error) {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(schemaLock)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, schema); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`SET LOCAL lock_timeout = %d`, schemaLockTimeout.Milliseconds())); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, addMissing); err != nil {
			var pe *pgconn.PgError
			if errors.As(err, &pe) && pe.Code == "55P03" { // lock_not_available
				return fmt.Errorf("adding column fleet_leases.read_failures needs a lock on fleet_leases that a long transaction holds (waited %s); "+
					"end that transaction or add the column by hand (see docs/operations.md), then start again: %w", schemaLockTimeout, err)
			}
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("fleet: schema: %w", err)
	}
	return &Leases{pool: pool, ttl: ttl}, nil
}

func micros(d time.Duration) int64 { return d.Microseconds() }

var terminalCodes = []int32{int32(agentpb.TaskStatus_SUCCESS), int32(agentpb.TaskStatus_FAILURE), int32(agentpb.TaskStatus_CANCELLED)}

// Claim takes the lease of taskID for replica with the next attempt
// number, when nobody holds it: no lease yet, released (the owner finished
// with it or handed it over), or expired. It fails with ErrLeaseHeld when a
// live lease is held, ErrTaskEnded for a terminal task and task.ErrNotFound
// for an unknown one. A claimed task leaves the fleet's queue. The attempt
// is the fencing token: every write of the new owner is checked against it
// (see fencedStore), so the previous owner can no longer write.
//
// The session hand-over (a commander re-attaching a running session to
// another replica) calls it too, and then writes with the new attempt.
func (l *Leases) Claim(ctx context.Context, taskID, replica string) (int64, error) {
	return l.claim(ctx, taskID, replica, 0)
}

// takeFreeLease takes task $1's lease for replica $2 for $3 µs with the
// next attempt when it is free: no row, released, or expired more than $4
// µs ago (RETURNING attempt and the failed reads counted, see readFailed;
// no row: held).
const takeFreeLease = `INSERT INTO fleet_leases (task_id, owner, attempt, expires_at)
	VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 microsecond')
	ON CONFLICT (task_id) DO UPDATE SET owner = excluded.owner, attempt = fleet_leases.attempt + 1,
		expires_at = excluded.expires_at, released = false
	WHERE fleet_leases.released OR fleet_leases.expires_at < clock_timestamp() - $4 * interval '1 microsecond'
	RETURNING attempt, read_failures`

// claim is Claim where an expired lease counts as free only once it
// expired more than grace ago (the sweep's takeover).
//
// The lease is taken first, then the status read, in one READ COMMITTED
// transaction, as ClaimQueued does: a write of the owner (its lease
// expired, but it is alive) holds the lease row FOR SHARE, so the take
// waits for that write and then reads what it committed (an end: refused,
// rolled back), or the write waits for the claim and is fenced. Read
// before the take (as it was), the status was the one from before the
// owner's write: a task the owner stored ended while the claim waited was
// claimed and adopted again by the sweep.
func (l *Leases) claim(ctx context.Context, taskID, replica string, grace time.Duration) (int64, error) {
	var attempt int64
	var failures int
	err := pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		err := tx.QueryRow(ctx, takeFreeLease, taskID, replica, micros(l.ttl), micros(grace)).Scan(&attempt, &failures)
		held := errors.Is(err, pgx.ErrNoRows)
		if err != nil && !held {
			return err
		}
		// Any refusal below rolls the take back. A task that does not
		// exist or ended says so even when its lease is held.
		if _, err := claimable(ctx, tx, taskID); err != nil {
			return err
		}
		if held {
			return ErrLeaseHeld
		}
		_, err = tx.Exec(ctx, `DELETE FROM fleet_queue WHERE task_id = $1`, taskID)
		return err
	})
	if err == nil {
		l.claimedAfterFailures(taskID, attempt, failures)
	}
	return attempt, err
}

// claimable reads taskID's status in a claim's transaction: an error
// (task.ErrNotFound, ErrTaskEnded, or the read's) refuses the claim.
func claimable(ctx context.Context, tx pgx.Tx, taskID string) (agentpb.TaskStatus, error) {
	var status int32
	err := tx.QueryRow(ctx, `SELECT status FROM tasks WHERE id = $1`, taskID).Scan(&status)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, task.ErrNotFound
	}
	if err != nil {
		return 0, err
	}
	if st := agentpb.TaskStatus(status); task.Terminal(st) {
		return st, ErrTaskEnded
	}
	return agentpb.TaskStatus(status), nil
}

// readCommitted begins the claims that read a row after waiting for its
// lock (ClaimQueued, ClaimForSession): each statement must see what the
// transaction it waited for committed, whatever the server's
// default_transaction_isolation (under REPEATABLE READ the read after the
// wait saw the snapshot from before it: a RUNNING task claimed as
// PENDING).
var readCommitted = pgx.TxOptions{IsoLevel: pgx.ReadCommitted}

// ErrNotPending means the bus's claim (ClaimQueued) found the task not
// PENDING: its entry is stale (the task was taken from another entry and
// runs, or ran, elsewhere).
var ErrNotPending = errors.New("fleet: the task is not pending")

// ClaimQueued is Claim for a bus entry: the task must be PENDING (else
// ErrNotPending, nothing claimed: a RUNNING task whose lease expired is
// the sweeper's to take over, after the grace, not a task to run again).
// It returns too the oldest cancel asked for the task and not done yet
// (nil: none), which the claimer must carry out instead of running it.
//
// The lease is taken first, then the status read, in one transaction: a
// write of the task's owner (its lease expired, but it is alive) holds
// the lease row FOR SHARE (fencedStore), so the take waits for that write
// and then reads what it committed (RUNNING: refused, rolled back), or the
// write waits for the claim and is fenced. Read before the take, a RUNNING
// record committed in between was claimed as a PENDING task.
func (l *Leases) ClaimQueued(ctx context.Context, taskID, replica string) (int64, *command, error) {
	var attempt int64
	var failures int
	var cancel *command
	err := pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		cancel = nil
		err := tx.QueryRow(ctx, takeFreeLease, taskID, replica, micros(l.ttl), 0).Scan(&attempt, &failures)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrLeaseHeld
		}
		if err != nil {
			return err
		}
		if l.claimQueuedStep != nil {
			l.claimQueuedStep(ctx, tx)
		}
		// Any refusal below rolls the take back.
		st, err := claimable(ctx, tx, taskID)
		if err != nil {
			return err
		}
		if st != agentpb.TaskStatus_PENDING {
			return ErrNotPending
		}
		// The queue row goes in the same round trip as the cancel is read.
		cancel, err = openCancel(ctx, tx, `WITH d AS (DELETE FROM fleet_queue WHERE task_id = $1) `, taskID)
		return err
	})
	if err == nil {
		l.claimedAfterFailures(taskID, attempt, failures)
	}
	return attempt, cancel, err
}

// ErrNotSession means a re-attach named a session the task does not run
// (it is not RUNNING, or its stored session id is another).
var ErrNotSession = errors.New("fleet: the task is not running that session")

// ClaimForSession takes the lease of taskID for replica with the next
// attempt number for a session re-attaching here: the task must be RUNNING
// with sessionID as its stored session. Unlike Claim it takes the lease
// whoever holds it and whether or not it expired: the session's commander
// left the old owner (crashed, draining, cut off), and the new attempt
// fences that owner's later writes. It fails with ErrNotSession,
// ErrTaskEnded or task.ErrNotFound. The lease row is locked while the
// task is read and the lease moves, so a write of the old owner is either
// before the claim (and seen by it) or refused.
func (l *Leases) ClaimForSession(ctx context.Context, taskID, replica, sessionID string) (int64, error) {
	attempt, _, err := l.claimSession(ctx, taskID, replica, sessionID)
	return attempt, err
}

// claimSession is ClaimForSession that returns too the oldest cancel asked
// for the task and not done yet (nil: none), read in the same transaction:
// a cancel whose owner stopped before the task's end was stored (killed,
// or its store refusing the end), which the session's new owner must carry
// out (Fleet.TakeSession: the re-attached session is stopped with it).
func (l *Leases) claimSession(ctx context.Context, taskID, replica, sessionID string) (int64, *command, error) {
	var attempt int64
	var cancel *command
	err := pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		cancel = nil
		// The lease row first (the fenced store's order: lease, then
		// task): a write of the old owner waits for this claim, or this
		// claim for the write.
		var one int
		err := tx.QueryRow(ctx, `SELECT 1 FROM fleet_leases WHERE task_id = $1 FOR UPDATE`, taskID).Scan(&one)
		if err != nil && !errors.Is(err, pgx.ErrNoRows) {
			return err
		}
		var status int32
		var body []byte
		err = tx.QueryRow(ctx, `SELECT status, body FROM tasks WHERE id = $1`, taskID).Scan(&status, &body)
		if errors.Is(err, pgx.ErrNoRows) {
			return task.ErrNotFound
		}
		if err != nil {
			return err
		}
		st := agentpb.TaskStatus(status)
		if task.Terminal(st) {
			return ErrTaskEnded
		}
		if st != agentpb.TaskStatus_RUNNING || storedSession(body) != sessionID {
			return ErrNotSession
		}
		err = tx.QueryRow(ctx, `INSERT INTO fleet_leases (task_id, owner, attempt, expires_at)
			VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 microsecond')
			ON CONFLICT (task_id) DO UPDATE SET owner = excluded.owner, attempt = fleet_leases.attempt + 1,
				expires_at = excluded.expires_at, released = false
			RETURNING attempt`, taskID, replica, micros(l.ttl)).Scan(&attempt)
		if err != nil {
			return err
		}
		cancel, err = openCancel(ctx, tx, "", taskID)
		return err
	})
	return attempt, cancel, err
}

// openCancel is the oldest cancel asked for taskID and not done yet (nil:
// none); with, if not empty, a WITH clause of the same statement (on $1).
func openCancel(ctx context.Context, tx pgx.Tx, with, taskID string) (*command, error) {
	var c command
	var b []byte
	err := tx.QueryRow(ctx, with+`SELECT id, task_id, kind, args FROM fleet_commands WHERE task_id = $1 AND NOT done AND kind = 'cancel' ORDER BY id LIMIT 1`,
		taskID).Scan(&c.ID, &c.TaskID, &c.Kind, &b)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	_ = json.Unmarshal(b, &c.Args)
	return &c, nil
}

// storedSession is the session id in a task record's body (the
// taskstore's JSON; "" when it has none or cannot be read).
func storedSession(body []byte) string {
	var b struct {
		SessionID string `json:"sessionId"`
	}
	if json.Unmarshal(body, &b) != nil {
		return ""
	}
	return b.SessionID
}

// Release gives up the lease of taskID taken with attempt (the owner
// finished with the task, or hands it over: the next Claim succeeds at
// once). It is a no-op if the lease moved on.
func (l *Leases) Release(ctx context.Context, taskID string, attempt int64) error {
	_, err := l.pool.Exec(ctx, `UPDATE fleet_leases SET released = true WHERE task_id = $1 AND attempt = $2`, taskID, attempt)
	return err
}

// Renew extends the unreleased leases replica holds of the tasks held (the
// ones it runs, fencedStore.ownedTasks) and returns them (task id →
// attempt). A lease row of replica's that is not in held is left to
// expire: a session this replica dropped (its lease could not be renewed
// for a whole lease, PostgreSQL down) or a task of an earlier process with
// the same --replica-id (restarted after a kill -9) runs nowhere here, and
// renewing its row kept the task RUNNING forever, out of every sweeper's
// reach. The rows a write of the task holds now (the fenced
// store's FOR SHARE) are skipped by the statement over all of them and
// renewed one at a time after it: renewing every lease in one statement
// that waited for those writes made it hold the rows it had already
// updated meanwhile, so every next write of those tasks waited for the
// writes before it and for its commit (20-130 ms stalls of a replica's
// relay every third of the lease on a busy machine, seen with
// log_lock_waits in the fleet benchmark). Now a write waits at most for
// one renewal's commit, and only its own row's renewal waits for it.
func (l *Leases) Renew(ctx context.Context, replica string, held []string) (map[string]int64, error) {
	out := map[string]int64{}
	if len(held) == 0 {
		return out, nil
	}
	scan := func(rows pgx.Rows) error {
		defer rows.Close()
		for rows.Next() {
			var id string
			var a int64
			if err := rows.Scan(&id, &a); err != nil {
				return err
			}
			out[id] = a
		}
		return rows.Err()
	}
	rows, err := l.pool.Query(ctx, `UPDATE fleet_leases SET expires_at = clock_timestamp() + $2 * interval '1 microsecond'
		WHERE task_id IN (SELECT task_id FROM fleet_leases WHERE owner = $1 AND NOT released AND task_id = ANY($3) FOR NO KEY UPDATE SKIP LOCKED)
		AND owner = $1 AND NOT released RETURNING task_id, attempt`, replica, micros(l.ttl), held)
	if err == nil {
		err = scan(rows)
	}
	if err != nil {
		return nil, err
	}
	var skipped []string
	rows, err = l.pool.Query(ctx, `SELECT task_id FROM fleet_leases WHERE owner = $1 AND NOT released AND task_id = ANY($2)`, replica, held)
	if err == nil {
		for rows.Next() {
			var id string
			if err = rows.Scan(&id); err != nil {
				break
			}
			if _, ok := out[id]; !ok {
				skipped = append(skipped, id)
			}
		}
		rows.Close()
		if err == nil {
			err = rows.Err()
		}
	}
	if err != nil {
		return nil, err
	}
	for _, id := range skipped {
		rows, err := l.pool.Query(ctx, `UPDATE fleet_leases SET expires_at = clock_timestamp() + $3 * interval '1 microsecond'
			WHERE task_id = $2 AND owner = $1 AND NOT released RETURNING task_id, attempt`, replica, id, micros(l.ttl))
		if err == nil {
			err = scan(rows)
		}
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// lease is a lease row.
type lease struct {
	TaskID   string
	Owner    string
	Attempt  int64
	Released bool
	Expired  bool
}

// Expired lists up to n unreleased leases that expired more than grace
// ago, except those self holds of the tasks held (the ones it runs): a
// row of self's that it does not run (a session it dropped, a task of an
// earlier process with the same replica id) is swept as another's.
func (l *Leases) Expired(ctx context.Context, self string, held []string, grace time.Duration, n int) ([]lease, error) {
	if held == nil {
		held = []string{}
	}
	rows, err := l.pool.Query(ctx, `SELECT task_id, owner, attempt FROM fleet_leases
		WHERE NOT released AND (owner <> $1 OR NOT task_id = ANY($4)) AND expires_at < clock_timestamp() - $2 * interval '1 microsecond'
		ORDER BY expires_at LIMIT $3`, self, micros(grace), n, held)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []lease
	for rows.Next() {
		var r lease
		if err := rows.Scan(&r.TaskID, &r.Owner, &r.Attempt); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// Lease returns taskID's lease row (ok false: none).
func (l *Leases) Lease(ctx context.Context, taskID string) (lease, bool, error) {
	r := lease{TaskID: taskID}
	err := l.pool.QueryRow(ctx, `SELECT owner, attempt, released, expires_at < clock_timestamp() FROM fleet_leases WHERE task_id = $1`, taskID).
		Scan(&r.Owner, &r.Attempt, &r.Released, &r.Expired)
	if errors.Is(err, pgx.ErrNoRows) {
		return r, false, nil
	}
	return r, err == nil, err
}

// readFailed counts a claim of taskID by replica (with attempt) after
// which the task could not be read (a takeover, or an adoption from the
// bus, that found its stored body undecodable) and returns how many there
// were in a row, by any replica (0: the lease moved on meanwhile; nothing
// counted). It runs READ COMMITTED, as the claims do: it must count on
// the row the claim just committed, whatever the server's default.
func (l *Leases) readFailed(ctx context.Context, taskID, replica string, attempt int64) (int, error) {
	l.failedBefore.Delete(taskID)
	var n int
	err := pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `UPDATE fleet_leases SET read_failures = read_failures + 1
			WHERE task_id = $1 AND owner = $2 AND attempt = $3 AND NOT released RETURNING read_failures`,
			taskID, replica, attempt).Scan(&n)
	})
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, nil
	}
	return n, err
}

// claimedAfterFailures notes a claim (attempt) of taskID that found
// failures failed reads counted (see readOK).
func (l *Leases) claimedAfterFailures(taskID string, attempt int64, failures int) {
	if failures > 0 {
		l.failedBefore.Store(taskID, attempt)
	} else {
		l.failedBefore.Delete(taskID)
	}
}

// readOK resets taskID's count of failed reads (readFailed) after this
// replica's claim (attempt) read it: only failures in a row count. It
// writes only when that claim found some counted.
func (l *Leases) readOK(ctx context.Context, taskID, replica string, attempt int64) error {
	if a, ok := l.failedBefore.Load(taskID); !ok || a.(int64) != attempt {
		return nil
	}
	l.failedBefore.Delete(taskID)
	return pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, `UPDATE fleet_leases SET read_failures = 0
			WHERE task_id = $1 AND owner = $2 AND attempt = $3 AND read_failures > 0`, taskID, replica, attempt)
		return err
	})
}

// failUnread ends taskID FAILURE with msg without loading it (it could not
// be read, see readFailed), under the lease replica holds with attempt: in
// one transaction the lease row is locked and checked, the task's stored
// status and end time set (and its message, when its body is a JSON
// object), a terminal state event appended after its last stored one, and
// the lease released. It returns the event stored; nil if the task had
// ended already or the lease moved on (nothing written, the lease left as
// it is unless the task had ended).
func (l *Leases) failUnread(ctx context.Context, taskID, replica string, attempt int64, msg string) (*store.Event, error) {
	return l.endUnread(ctx, taskID, replica, attempt, agentpb.TaskStatus_FAILURE, msg)
}

// endUnread is failUnread ending the task with status (CANCELLED: a
// cancel asked for a task that cannot be read, see cancelQueued).
func (l *Leases) endUnread(ctx context.Context, taskID, replica string, attempt int64, status agentpb.TaskStatus, msg string) (*store.Event, error) {
	var out *store.Event
	err := pgx.BeginTxFunc(ctx, l.pool, readCommitted, func(tx pgx.Tx) error {
		out = nil
		var one int
		err := tx.QueryRow(ctx, `SELECT 1 FROM fleet_leases WHERE task_id = $1 AND owner = $2 AND attempt = $3 AND NOT released FOR UPDATE`,
			taskID, replica, attempt).Scan(&one)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil
		}
		if err != nil {
			return err
		}
		var stored int32
		var body []byte
		err = tx.QueryRow(ctx, `SELECT status, body FROM tasks WHERE id = $1 FOR UPDATE`, taskID).Scan(&stored, &body)
		if errors.Is(err, pgx.ErrNoRows) {
			return task.ErrNotFound
		}
		if err != nil {
			return err
		}
		if !task.Terminal(agentpb.TaskStatus(stored)) {
			var fields map[string]json.RawMessage
			if json.Unmarshal(body, &fields) == nil && fields != nil {
				// An ended task keeps no secrets and no stop to carry
				// out, as the store's encoder writes it.
				delete(fields, "sealedConfig")
				delete(fields, "stop")
				fields["message"], _ = json.Marshal(msg)
				body, _ = json.Marshal(fields)
			}
			var last int64
			if err := tx.QueryRow(ctx, `SELECT COALESCE(MAX(seq), 0) FROM events WHERE task_id = $1`, taskID).Scan(&last); err != nil {
				return err
			}
			now := time.Now()
			ev := &dispatchv1.TaskEvent{TaskId: taskID, Seq: uint64(last) + 1, Time: timestamppb.New(now),
				Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: status, Message: msg}}}
			data, err := proto.Marshal(ev)
			if err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `INSERT INTO events (task_id, seq, data) VALUES ($1, $2, $3)`, taskID, last+1, data); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, `UPDATE tasks SET status = $2, ended_at = $3, body = $4 WHERE id = $1`,
				taskID, int32(status), store.Micros(now), body); err != nil {
				return err
			}
			out = &store.Event{TaskID: taskID, Seq: uint64(last) + 1, Data: data}
		}
		_, err = tx.Exec(ctx, `UPDATE fleet_leases SET released = true WHERE task_id = $1`, taskID)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// markReleased releases an ended task's lease whatever its attempt (the
// sweeper found its owner gone after the end was stored).
func (l *Leases) markReleased(ctx context.Context, taskID string) error {
	_, err := l.pool.Exec(ctx, `UPDATE fleet_leases SET released = true WHERE task_id = $1`, taskID)
	return err
}

// Status is taskID's stored status.
func (l *Leases) Status(ctx context.Context, taskID string) (agentpb.TaskStatus, error) {
	var st int32
	err := l.pool.QueryRow(ctx, `SELECT status FROM tasks WHERE id = $1`, taskID).Scan(&st)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, task.ErrNotFound
	}
	return agentpb.TaskStatus(st), err
}

// holder is what Holder reads of a task.
type holder struct {
	Status agentpb.TaskStatus
	// Ended is when it ended (zero while it has not).
	Ended time.Time
	// Owner holds a live lease on it (not released, not expired); "" none.
	Owner string
	// Tenant owns the task ("" the default tenant).
	Tenant string
}

// Holder is taskID's stored status, end, owner and tenant: one query, so a
// cancel sent to another replica need not look the task up for the
// caller's tenant first, nor try to claim it.
//
// The tenant is read from the task's stored body, the JSON of package
// taskstore (its "tenant" field, absent for the default tenant):
// TestHolderReadsTheTenantTaskstoreStored pins the two together.
func (l *Leases) Holder(ctx context.Context, taskID string) (holder, error) {
	var st int32
	var ended int64
	var owner, tenant *string
	err := l.pool.QueryRow(ctx, `SELECT t.status, t.ended_at, l.owner, convert_from(t.body, 'UTF8')::json ->> 'tenant' FROM tasks t
		LEFT JOIN fleet_leases l ON l.task_id = t.id AND NOT l.released AND l.expires_at >= clock_timestamp()
		WHERE t.id = $1`, taskID).Scan(&st, &ended, &owner, &tenant)
	if errors.Is(err, pgx.ErrNoRows) {
		return holder{}, task.ErrNotFound
	}
	if err != nil {
		return holder{}, err
	}
	h := holder{Status: agentpb.TaskStatus(st), Ended: store.FromMicros(ended)}
	if owner != nil {
		h.Owner = *owner
	}
	if tenant != nil {
		h.Tenant = *tenant
	}
	return h, nil
}

// Enqueue records that taskID waits in queue (the bus is rebuilt from
// these rows).
func (l *Leases) Enqueue(ctx context.Context, taskID, queue string) error {
	_, err := l.pool.Exec(ctx, `INSERT INTO fleet_queue (task_id, queue) VALUES ($1, $2)
		ON CONFLICT (task_id) DO UPDATE SET queue = excluded.queue, placed_at = clock_timestamp()`, taskID, queue)
	return err
}

// Dequeue removes taskID from the queue rows.
func (l *Leases) Dequeue(ctx context.Context, taskID string) error {
	_, err := l.pool.Exec(ctx, `DELETE FROM fleet_queue WHERE task_id = $1`, taskID)
	return err
}

// queued is a queue row.
type queued struct{ TaskID, Queue string }

// Queued lists the queue rows placed longer than olderThan ago (0: all),
// and marks them placed now (the caller puts them on the bus again).
func (l *Leases) Queued(ctx context.Context, olderThan time.Duration, n int) ([]queued, error) {
	rows, err := l.pool.Query(ctx, `UPDATE fleet_queue SET placed_at = clock_timestamp()
		WHERE task_id IN (SELECT task_id FROM fleet_queue WHERE placed_at <= clock_timestamp() - $1 * interval '1 microsecond'
			ORDER BY placed_at LIMIT $2)
		RETURNING task_id, queue`, micros(olderThan), n)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []queued
	for rows.Next() {
		var q queued
		if err := rows.Scan(&q.TaskID, &q.Queue); err != nil {
			return nil, err
		}
		out = append(out, q)
	}
	return out, rows.Err()
}

// Reserve maps requestID to taskID unless it maps to a task already, whose
// id it then returns.
func (l *Leases) Reserve(ctx context.Context, requestID, taskID string) (string, error) {
	var got string
	err := l.pool.QueryRow(ctx, `INSERT INTO fleet_requests (request_id, task_id) VALUES ($1, $2)
		ON CONFLICT (request_id) DO UPDATE SET request_id = excluded.request_id RETURNING task_id`, requestID, taskID).Scan(&got)
	if err != nil {
		return "", err
	}
	if got == taskID {
		return "", nil
	}
	return got, nil
}

// command is a request for a task's owner (cancel, interject, approve).
type command struct {
	ID     int64
	TaskID string
	Kind   string
	Args   cmdArgs
}

// cmdArgs are a command's arguments.
type cmdArgs struct {
	Reason  string `json:"reason,omitempty"`
	Text    string `json:"text,omitempty"`
	CallID  string `json:"call_id,omitempty"`
	Approve bool   `json:"approve,omitempty"`
}

// cmdResult is what the owner answered.
type cmdResult struct {
	Err       string `json:"err,omitempty"`
	ErrKind   string `json:"err_kind,omitempty"`
	MessageID string `json:"message_id,omitempty"`
	Seq       uint64 `json:"seq,omitempty"`
	Outcome   int32  `json:"outcome,omitempty"`
}

// AddCommand stores a command for taskID's owner and returns its id.
func (l *Leases) AddCommand(ctx context.Context, taskID, kind string, args cmdArgs) (int64, error) {
	b, _ := json.Marshal(args)
	var id int64
	err := l.pool.QueryRow(ctx, `INSERT INTO fleet_commands (task_id, kind, args) VALUES ($1, $2, $3) RETURNING id`, taskID, kind, b).Scan(&id)
	return id, err
}

// OpenCommands lists the commands not done yet of the given tasks, oldest
// first.
func (l *Leases) OpenCommands(ctx context.Context, taskIDs []string) ([]command, error) {
	rows, err := l.pool.Query(ctx, `SELECT id, task_id, kind, args FROM fleet_commands WHERE NOT done AND task_id = ANY($1) ORDER BY id`, taskIDs)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []command
	for rows.Next() {
		var c command
		var b []byte
		if err := rows.Scan(&c.ID, &c.TaskID, &c.Kind, &b); err != nil {
			return nil, err
		}
		_ = json.Unmarshal(b, &c.Args)
		out = append(out, c)
	}
	return out, rows.Err()
}

// TakeCommand marks command id done before it is carried out (so it runs
// at most once); false if somebody took it already. For interject and
// approve only: a cancel's row is never taken, it stays open until the
// task's end is stored (closeIfEnded, CloseEnded), so that the task's next
// owner carries it out if this one stops before that.
func (l *Leases) TakeCommand(ctx context.Context, id int64) (bool, error) {
	tag, err := l.pool.Exec(ctx, `UPDATE fleet_commands SET done = true WHERE id = $1 AND NOT done`, id)
	return tag.RowsAffected() == 1, err
}

// closeIfEnded marks command id done with result r if its task is
// stored ended (nothing otherwise). For a command carried out by ending
// its task, not taken before (TakeCommand): the row stays open until the
// end is stored.
func (l *Leases) closeIfEnded(ctx context.Context, id int64, r cmdResult) error {
	b, _ := json.Marshal(r)
	_, err := l.pool.Exec(ctx, `UPDATE fleet_commands c SET done = true, result = $2
		FROM tasks t WHERE c.id = $1 AND NOT c.done AND t.id = c.task_id AND t.status = ANY($3)`, id, b, terminalCodes)
	return err
}

// SetResult stores what command id did.
func (l *Leases) SetResult(ctx context.Context, id int64, r cmdResult) error {
	b, _ := json.Marshal(r)
	_, err := l.pool.Exec(ctx, `UPDATE fleet_commands SET result = $2 WHERE id = $1`, id, b)
	return err
}

// Result returns command id's result once there is one (ok false: not yet).
func (l *Leases) Result(ctx context.Context, id int64) (cmdResult, bool, error) {
	var b []byte
	err := l.pool.QueryRow(ctx, `SELECT result FROM fleet_commands WHERE id = $1`, id).Scan(&b)
	if err != nil || b == nil {
		return cmdResult{}, false, err
	}
	var r cmdResult
	return r, true, json.Unmarshal(b, &r)
}

// CloseEnded marks done the open commands of tasks that ended (nobody will
// carry them out), and the cancels carried out (their result stored, the
// row left open until then) whose task's end is stored now.
func (l *Leases) CloseEnded(ctx context.Context) error {
	_, err := l.pool.Exec(ctx, `UPDATE fleet_commands c SET done = true, result = COALESCE(c.result, '{"err":"the task ended","err_kind":"not_running"}')
		FROM tasks t WHERE c.task_id = t.id AND NOT c.done AND t.status = ANY($1)`, terminalCodes)
	return err
}

// GC removes what the fleet no longer needs: leases and commands of tasks
// retention removed, commands done for an hour, request ids older than a
// day.
func (l *Leases) GC(ctx context.Context) error {
	_, err := l.pool.Exec(ctx, `
		DELETE FROM fleet_leases f WHERE released AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = f.task_id);
		DELETE FROM fleet_commands c WHERE (done AND created_at < clock_timestamp() - interval '1 hour')
			OR NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = c.task_id);
		DELETE FROM fleet_requests WHERE created_at < clock_timestamp() - interval '1 day';`)
	return err
}

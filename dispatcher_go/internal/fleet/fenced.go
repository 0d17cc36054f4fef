package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
)

// fencedStore is the PostgreSQL store with every write fenced: in the
// transaction that writes a batch, the lease rows of the batch's tasks are
// read (FOR SHARE, so a concurrent Claim waits for the write or the write
// for the Claim) and only the records of tasks this replica may write are
// written: a task with no lease row (a new task, before anybody claimed
// it), or one whose lease this replica holds with the attempt it claimed.
// The others are fenced: left out, and reported (onFenced) so the replica
// drops their session. Reads go to the store as they are.
type fencedStore struct {
	*postgres.Store
	pool     *pgxpool.Pool
	replica  string
	onFenced func(taskID string)
	// onWritten is told of the events written (after the commit): they go
	// to the bus for watchers on other replicas.
	onWritten func([]store.Event)

	mu    sync.Mutex
	owned map[string]int64 // task id → attempt this replica holds
}

var _ store.Store = (*fencedStore)(nil)

// own records that this replica holds taskID's lease with attempt.
func (s *fencedStore) own(taskID string, attempt int64) {
	s.mu.Lock()
	s.owned[taskID] = attempt
	s.mu.Unlock()
}

// disown forgets taskID's lease (released or lost); false if it was not
// held (with attempt, unless attempt is 0).
func (s *fencedStore) disown(taskID string, attempt int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.owned[taskID]
	if !ok || (attempt != 0 && a != attempt) {
		return false
	}
	delete(s.owned, taskID)
	return true
}

// attempt is the attempt this replica holds taskID with (0: none).
func (s *fencedStore) attempt(taskID string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.owned[taskID]
}

// ownedTasks is a copy of the leases held.
func (s *fencedStore) ownedTasks() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.owned))
	for k, v := range s.owned {
		out[k] = v
	}
	return out
}

// Apply implements store.Store with the fence (see fencedStore).
func (s *fencedStore) Apply(ctx context.Context, b store.Batch) error {
	if len(b.Events) == 0 && len(b.Tasks) == 0 {
		return nil
	}
	ids := make([]string, 0, len(b.Tasks)+4)
	seen := map[string]bool{}
	for _, e := range b.Events {
		if !seen[e.TaskID] {
			seen[e.TaskID] = true
			ids = append(ids, e.TaskID)
		}
	}
	for _, t := range b.Tasks {
		if !seen[t.ID] {
			seen[t.ID] = true
			ids = append(ids, t.ID)
		}
	}
	owned := s.ownedTasks()
	var fenced map[string]bool
	var written []store.Event
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		fenced = map[string]bool{}
		rows, err := tx.Query(ctx, `SELECT task_id, owner, attempt FROM fleet_leases WHERE task_id = ANY($1) FOR SHARE`, ids)
		if err != nil {
			return fmt.Errorf("fleet: read leases: %w", err)
		}
		for rows.Next() {
			var id, owner string
			var attempt int64
			if err := rows.Scan(&id, &owner, &attempt); err != nil {
				rows.Close()
				return fmt.Errorf("fleet: read leases: %w", err)
			}
			if owner != s.replica || owned[id] != attempt {
				fenced[id] = true
			}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("fleet: read leases: %w", err)
		}
		written = written[:0]
		var taskIDs []string
		var seqs []int64
		var data [][]byte
		for _, e := range b.Events {
			if fenced[e.TaskID] {
				continue
			}
			written = append(written, e)
			taskIDs, seqs, data = append(taskIDs, e.TaskID), append(seqs, int64(e.Seq)), append(data, e.Data)
		}
		if len(taskIDs) > 0 {
			if _, err := tx.Exec(ctx, `INSERT INTO events (task_id, seq, data)
				SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[]) ON CONFLICT DO NOTHING`,
				taskIDs, seqs, data); err != nil {
				return applyError("fleet: apply events", err)
			}
		}
		var pb pgx.Batch
		for _, t := range b.Tasks {
			if fenced[t.ID] {
				continue
			}
			pb.Queue(`INSERT INTO tasks (id, status, created_at, ended_at, body) VALUES ($1, $2, $3, $4, $5)
				ON CONFLICT (id) DO UPDATE SET status = excluded.status, created_at = excluded.created_at,
				ended_at = excluded.ended_at, body = excluded.body`,
				t.ID, t.Status, store.Micros(t.CreatedAt), store.Micros(t.EndedAt), t.Body)
		}
		if pb.Len() > 0 {
			if err := tx.SendBatch(ctx, &pb).Close(); err != nil {
				return applyError("fleet: apply tasks", err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for id := range fenced {
		if s.onFenced != nil {
			s.onFenced(id)
		}
	}
	if len(written) > 0 && s.onWritten != nil {
		s.onWritten(written)
	}
	return nil
}

// applyError is err under what, marked store.Rejected when PostgreSQL
// refused a record's data (as the postgres store does).
func applyError(what string, err error) error {
	err = fmt.Errorf("%s: %w", what, err)
	var pe *pgconn.PgError
	if errors.As(err, &pe) && (strings.HasPrefix(pe.Code, "22") || strings.HasPrefix(pe.Code, "23") || pe.Code == "54000") {
		return store.Rejected(err)
	}
	return err
}

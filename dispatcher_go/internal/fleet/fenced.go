package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
)

// fencedStore is the PostgreSQL store with every write fenced: in the
// transaction that writes a batch, the lease rows of the batch's tasks are
// read (FOR SHARE, so a concurrent Claim waits for the write or the write
// for the Claim) and only the records this replica may write are written:
// those of a task with no lease row (a new task, before anybody claimed
// it), and those that carry (store.Event.Token, store.TaskRecord.Token)
// the attempt of the task's lease when this replica holds it. A record
// carries the attempt its copy of the task was given (task.Manager.Adopt,
// Task.SetFenceToken), not the one this replica holds when the record is
// written: a copy this replica dropped, forgot or replaced (a session
// re-attaching here took the task afresh, a sweep adopted it again) may
// still record, and its records must not pass with a newer copy's
// attempt. The others are fenced: left out, and reported (onFenced) with
// the attempt they carry, so the replica drops that copy's session. Reads
// go to the store as they are.
type fencedStore struct {
	*postgres.Store
	pool    *pgxpool.Pool
	replica string
	// onFenced is told of a task whose records were refused, with the
	// attempt they carry (0: none; once per attempt).
	onFenced func(taskID string, attempt int64)
	// onWritten is told of the events written (after the commit): they go
	// to the bus for watchers on other replicas.
	onWritten func([]store.Event)
	legs      *legStats

	mu    sync.Mutex
	owned map[string]int64 // task id → attempt this replica holds (renewed)
}

var _ store.Store = (*fencedStore)(nil)

// own records that this replica holds taskID's lease with attempt. Never
// a lower attempt than the one held: a claim overtaken by a newer one of
// this replica's (a session re-attaching here) does not take the newer
// attempt's place.
func (s *fencedStore) own(taskID string, attempt int64) {
	s.mu.Lock()
	if attempt > s.owned[taskID] {
		s.owned[taskID] = attempt
	}
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

// lastSeqSlot, put in a context under lastSeqKey, asks GetTask for the
// task's last stored seq too, read in the same statement (Fleet.Lookup).
type lastSeqSlot struct {
	seq uint64
	ok  bool
}

type lastSeqKey struct{}

// GetTask implements store.Store; with a lastSeqSlot in ctx it fills it in
// the same round trip.
func (s *fencedStore) GetTask(ctx context.Context, id string) (store.TaskRecord, error) {
	slot, _ := ctx.Value(lastSeqKey{}).(*lastSeqSlot)
	if slot == nil {
		return s.Store.GetTask(ctx, id)
	}
	rec, last, err := s.Store.GetTaskAndLastSeq(ctx, id)
	if err == nil {
		slot.seq, slot.ok = last, true
	}
	return rec, err
}

// Apply implements store.Store with the fence (see fencedStore), in one
// round trip to PostgreSQL: the statements go out as one pipelined batch,
// which PostgreSQL runs as one implicit transaction (all or nothing, locks
// held to its end). The first locks the lease rows of the batch's tasks
// (FOR SHARE: a concurrent Claim waits for this write, or this write sees
// the Claim); each write then carries the fence as a condition (no lease
// row, or this replica's with the attempt the record carries), so nothing
// waits for a decision made in Go. The events inserted come back (RETURNING) and
// only they go to the bus; the lease rows read tell which tasks were
// fenced. Before, this was BEGIN, the lease read, the event insert, the
// task upserts and COMMIT: five round trips, each a wait on a busy machine.
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
	// A record whose attempt this replica does not hold (any more) is
	// refused here too, even while the lease row still names it: a copy
	// dropped when its lease ran out (renewals failing) must not store its
	// end while nobody has claimed the task yet — its session is to be
	// taken over, not ended by the copy that gave it up.
	s.mu.Lock()
	heldAs := func(id string, token int64) int64 {
		if token != 0 && s.owned[id] != token {
			return -1
		}
		return token
	}
	evAttempts := make([]int64, len(b.Events))
	for i, e := range b.Events {
		evAttempts[i] = heldAs(e.TaskID, e.Token)
	}
	taskAttempts := make([]int64, len(b.Tasks))
	for i, t := range b.Tasks {
		taskAttempts[i] = heldAs(t.ID, t.Token)
	}
	s.mu.Unlock()
	var pb pgx.Batch
	pb.Queue(`SELECT task_id, owner, attempt FROM fleet_leases WHERE task_id = ANY($1) FOR SHARE`, ids)
	if len(b.Events) > 0 {
		taskIDs := make([]string, len(b.Events))
		seqs := make([]int64, len(b.Events))
		data := make([][]byte, len(b.Events))
		attempts := make([]int64, len(b.Events))
		for i, e := range b.Events {
			taskIDs[i], seqs[i], data[i], attempts[i] = e.TaskID, int64(e.Seq), e.Data, evAttempts[i]
		}
		pb.Queue(`INSERT INTO events (task_id, seq, data)
			SELECT e.task_id, e.seq, e.data FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bigint[]) AS e(task_id, seq, data, attempt)
			WHERE NOT EXISTS (SELECT 1 FROM fleet_leases l WHERE l.task_id = e.task_id AND (l.owner <> $5 OR l.attempt <> e.attempt))
			ON CONFLICT DO NOTHING RETURNING task_id, seq`,
			taskIDs, seqs, data, attempts, s.replica)
	}
	for i, t := range b.Tasks {
		pb.Queue(`INSERT INTO tasks (id, status, created_at, ended_at, body)
			SELECT $1, $2, $3, $4, $5
			WHERE NOT EXISTS (SELECT 1 FROM fleet_leases l WHERE l.task_id = $1 AND (l.owner <> $6 OR l.attempt <> $7))
			ON CONFLICT (id) DO UPDATE SET status = excluded.status, created_at = excluded.created_at,
			ended_at = excluded.ended_at, body = excluded.body`,
			t.ID, t.Status, store.Micros(t.CreatedAt), store.Micros(t.EndedAt), t.Body, s.replica, taskAttempts[i])
	}
	type row struct {
		owner   string
		attempt int64
	}
	leases := map[string]row{}
	var written []store.Event
	began := time.Now()
	err := func() error {
		br := s.pool.SendBatch(ctx, &pb)
		defer br.Close()
		rows, err := br.Query()
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
			leases[id] = row{owner, attempt}
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return fmt.Errorf("fleet: read leases: %w", err)
		}
		if len(b.Events) > 0 {
			rows, err := br.Query()
			if err != nil {
				return applyError("fleet: apply events", err)
			}
			type key struct {
				id  string
				seq int64
			}
			in := map[key]bool{}
			for rows.Next() {
				var k key
				if err := rows.Scan(&k.id, &k.seq); err != nil {
					rows.Close()
					return applyError("fleet: apply events", err)
				}
				in[k] = true
			}
			rows.Close()
			if err := rows.Err(); err != nil {
				return applyError("fleet: apply events", err)
			}
			for _, e := range b.Events {
				if in[key{e.TaskID, int64(e.Seq)}] {
					written = append(written, e)
				}
			}
		}
		for range b.Tasks {
			if _, err := br.Exec(); err != nil {
				return applyError("fleet: apply tasks", err)
			}
		}
		// Close reads the end of the implicit transaction: its commit.
		if err := br.Close(); err != nil {
			return applyError("fleet: apply", err)
		}
		return nil
	}()
	if err != nil {
		return err
	}
	applied := time.Now()
	s.legs.add(legApply, applied.Sub(began))
	if len(leases) > 0 && s.onFenced != nil {
		// The records refused: each task's, once per attempt they carry.
		type key struct {
			id      string
			attempt int64
		}
		var fenced []key
		check := func(id string, token int64) {
			l, ok := leases[id]
			if !ok || l.owner == s.replica && l.attempt == token {
				return
			}
			if k := (key{id, token}); !slices.Contains(fenced, k) {
				fenced = append(fenced, k)
			}
		}
		if len(written) < len(b.Events) { // else none was refused
			for _, e := range b.Events {
				check(e.TaskID, e.Token)
			}
		}
		for _, t := range b.Tasks {
			check(t.ID, t.Token)
		}
		for _, k := range fenced {
			s.onFenced(k.id, k.attempt)
		}
	}
	if len(written) > 0 && s.onWritten != nil {
		s.onWritten(written)
	}
	if s.legs != nil && len(b.Events) > 0 {
		// How long the batch's first event, and every event, waited
		// before this write (decoded after it: off the write's path).
		for i, e := range b.Events {
			ev := &dispatchv1.TaskEvent{}
			if proto.Unmarshal(e.Data, ev) == nil && ev.GetTime() != nil {
				if i == 0 {
					s.legs.add(legQueued, began.Sub(ev.GetTime().AsTime()))
				}
				key := e.TaskID + ":" + strconv.FormatUint(e.Seq, 10)
				s.legs.addID(legQueuedEv, key, began.Sub(ev.GetTime().AsTime()))
				s.legs.addID(legStored, key, applied.Sub(ev.GetTime().AsTime()))
				if ev.GetStopped() != nil {
					s.legs.stopped(e.TaskID, ev.GetTime().AsTime())
					s.legs.addID(legStoppedDone, e.TaskID, applied.Sub(ev.GetTime().AsTime()))
				}
			}
		}
		s.legs.add(legBatchEvents, time.Duration(len(b.Events))*time.Millisecond)
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

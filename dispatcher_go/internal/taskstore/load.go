package taskstore

import (
	"context"
	"errors"
	"fmt"
	"slices"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Finished implements task.Persistence.
func (s *Store) Finished(ctx context.Context, id string) (task.Snapshot, error) {
	rec, err := s.st.GetTask(ctx, id)
	if err == nil && !task.Terminal(agentpb.TaskStatus(rec.Status)) {
		// Live tasks are always in memory, so this one ended and was
		// evicted (a small --max-tasks-kept under load) before the writer
		// stored its final record and events: let it catch up.
		if err = s.w.FlushWhileHealthy(ctx); err == nil {
			rec, err = s.st.GetTask(ctx, id)
		}
	}
	if errors.Is(err, store.ErrNotFound) {
		return task.Snapshot{}, task.ErrNotFound
	}
	if err != nil {
		return task.Snapshot{}, fmt.Errorf("store read failed: %w", err)
	}
	if !task.Terminal(agentpb.TaskStatus(rec.Status)) {
		return task.Snapshot{}, task.ErrNotFound
	}
	return s.load(rec)
}

// ListFinished implements task.Persistence. Rows of tasks in memory are
// skipped; as they match the same filter, they are at most n down to floor
// (or all of them are, without one), so the reading stays within a few
// pages.
func (s *Store) ListFinished(ctx context.Context, statuses []agentpb.TaskStatus, after, floor *task.ListKey, n int, inMemory func(id string) bool) ([]task.Info, error) {
	var want []int32
	for _, st := range terminalStatuses {
		if len(statuses) == 0 || slices.Contains(statuses, st) {
			want = append(want, int32(st))
		}
	}
	if len(want) == 0 {
		return nil, nil
	}
	if n := s.evicted.Load(); n != s.listFlushed.Load() {
		// A task evicted from memory right after it ended may not have its
		// final record in the store yet: it would be in neither list.
		if err := s.w.FlushWhileHealthy(ctx); err != nil {
			return nil, fmt.Errorf("list stored tasks: %w", err)
		}
		s.listFlushed.Store(n)
	}
	var out []task.Info
	for len(out) < n {
		recs, err := s.st.ListTasksBefore(ctx, want, after, n)
		if err != nil {
			return nil, fmt.Errorf("list stored tasks: %w", err)
		}
		for _, rec := range recs {
			if inMemory(rec.ID) {
				continue // in memory: listed from there, as it is now
			}
			snap, _, err := decode(rec)
			if err != nil {
				s.log.Warn("stored task unreadable", "task_id", rec.ID, "error", err)
				continue
			}
			out = append(out, snap.Info())
		}
		if len(recs) < n {
			break
		}
		k := store.KeyOf(recs[len(recs)-1])
		if floor != nil && k.Before(*floor) {
			break
		}
		after = &k
	}
	return out, nil
}

// Load reads task id as stored, whatever its status (a fleet replica
// reads the tasks other replicas run, and adopts the ones it claims). It
// does not flush the writer: the caller knows whose writes it waits for.
func (s *Store) Load(ctx context.Context, id string) (task.Snapshot, error) {
	rec, err := s.st.GetTask(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return task.Snapshot{}, task.ErrNotFound
	}
	if err != nil {
		return task.Snapshot{}, fmt.Errorf("store read failed: %w", err)
	}
	return s.load(rec)
}

// ListAll lists up to n stored tasks whose status is in statuses (empty:
// any), newest first after after (nil: from the newest): a fleet's
// listing, where every task is in the shared store.
func (s *Store) ListAll(ctx context.Context, statuses []agentpb.TaskStatus, after *task.ListKey, n int) ([]task.Info, error) {
	recs, err := s.st.ListTasksBefore(ctx, statusCodes(statuses), after, n)
	if err != nil {
		return nil, fmt.Errorf("list stored tasks: %w", err)
	}
	out := make([]task.Info, 0, len(recs))
	for _, rec := range recs {
		snap, _, err := decode(rec)
		if err != nil {
			s.log.Warn("stored task unreadable", "task_id", rec.ID, "error", err)
			continue
		}
		out = append(out, snap.Info())
	}
	return out, nil
}

// Global reads the stored global config and its raw document (nil, nil:
// none stored): a fleet replica follows the config another replica set.
func (s *Store) Global(ctx context.Context) (*agentpb.CommonConfig, []byte, error) {
	data, err := s.st.GetConfig(ctx, task.GlobalConfigID)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, err
	}
	return s.decodeConfig(data), data, nil
}

package task

import (
	"context"
	"fmt"
	"slices"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// ListKey is a task's place in List's order: newest first by creation time
// (to the microsecond, as stored), then by id descending. A page ends at the
// key of its last task; the next page starts after it.
type ListKey = store.TaskKey

type listed struct {
	key  ListKey
	info Info
}

// List returns up to limit tasks whose status is in statuses (empty: any),
// newest first, starting after the key after (nil: from the newest). With a
// store, it lists the tasks in memory and the finished tasks that are only
// in the store (evicted beyond MaxTasksKept, or from earlier runs) as one
// sequence; a task in memory is shown as it is there. next is the key to
// pass for the following page, nil when there is none.
//
// Only the tasks the caller in ctx sees are listed (tenant.FromContext: its
// own tenant's, every tenant's for an admin; without a caller, the default
// tenant's).
func (m *Manager) List(ctx context.Context, statuses []agentpb.TaskStatus, limit int, after *ListKey) (infos []Info, next *ListKey, err error) {
	if limit <= 0 {
		return nil, nil, fmt.Errorf("%w: limit must be positive", ErrInvalidArgument)
	}
	if m.fleet != nil {
		return m.fleet.List(ctx, statuses, limit, after, m.reg.Get)
	}
	// Tasks that have not ended are all in memory; finished ones may be
	// only in the store. While the store is unavailable, a listing that can
	// include finished tasks fails at once (UNAVAILABLE) rather than wait
	// for the store or silently leave out what only it holds; one of
	// pending and running tasks only is answered from memory.
	if err := m.storeHealth(); err != nil && wantsStored(statuses) {
		return nil, nil, err
	}
	caller := tenant.FromContext(ctx)
	// limit+1 of each source tell whether there is a next page.
	items := m.reg.listAfter(statuses, caller, after, limit+1)
	if m.persist != nil && wantsStored(statuses) {
		// Stored tasks older than the oldest of a full memory page cannot
		// make it into the page: the store is read only down to there.
		var floor *ListKey
		if len(items) == limit+1 {
			floor = &items[limit].key
		}
		stored, err := m.listStored(ctx, caller, statuses, after, floor, limit+1)
		if err != nil {
			return nil, nil, err
		}
		seen := make(map[string]bool, len(items))
		for _, it := range items {
			seen[it.info.ID] = true
		}
		for _, info := range stored {
			if !seen[info.ID] {
				items = append(items, listed{key: ListKey{CreatedAt: info.CreatedAt, ID: info.ID}, info: info})
			}
		}
		slices.SortFunc(items, newestFirst)
	}
	if len(items) > limit {
		items = items[:limit]
		k := items[limit-1].key
		next = &k
	}
	infos = make([]Info, len(items))
	for i, it := range items {
		infos[i] = it.info
	}
	return infos, next, nil
}

// listStored reads up to n finished tasks that caller sees and that are
// only in the store, after the key after and down to floor (see
// Persistence.ListFinished). Another tenant's tasks are skipped, and the
// store is read on past them until n are found or it has no more.
func (m *Manager) listStored(ctx context.Context, caller tenant.Caller, statuses []agentpb.TaskStatus, after, floor *ListKey, n int) ([]Info, error) {
	inMemory := func(id string) bool { return m.reg.Get(id) != nil }
	var out []Info
	for len(out) < n {
		batch, err := m.persist.ListFinished(ctx, statuses, after, floor, n, inMemory)
		if err != nil {
			return nil, err
		}
		for _, info := range batch {
			if caller.Sees(info.Tenant) {
				out = append(out, info)
			}
		}
		if len(batch) < n {
			break // the store has no more (or the floor was reached)
		}
		last := ListKey{CreatedAt: batch[len(batch)-1].CreatedAt, ID: batch[len(batch)-1].ID}
		if floor != nil && last.Before(*floor) {
			break
		}
		after = &last
	}
	return out, nil
}

// wantsStored reports whether a listing filtered by statuses (empty: any)
// can include finished tasks, which may be only in the store.
func wantsStored(statuses []agentpb.TaskStatus) bool {
	return len(statuses) == 0 || slices.ContainsFunc(statuses, Terminal)
}

// newestFirst orders listed items as List returns them.
func newestFirst(a, b listed) int {
	switch {
	case b.key.Before(a.key):
		return -1
	case a.key.Before(b.key):
		return 1
	}
	return 0
}

// listAfter returns up to n tasks in memory whose status is in statuses
// (empty: any) and that come after the key after (nil: from the newest),
// newest first.
func (r *Registry) listAfter(statuses []agentpb.TaskStatus, caller tenant.Caller, after *ListKey, n int) []listed {
	type cand struct {
		key ListKey
		t   *Task
	}
	r.mu.RLock()
	var cands []cand
	for _, e := range r.byID {
		k := ListKey{CreatedAt: e.t.createdAt, ID: e.t.id}
		if after != nil && !k.Before(*after) || !caller.Sees(e.t.tenant) {
			continue
		}
		if len(statuses) > 0 && !containsStatus(statuses, e.t.Status()) {
			continue
		}
		cands = append(cands, cand{k, e.t})
	}
	r.mu.RUnlock()
	slices.SortFunc(cands, func(a, b cand) int { return newestFirst(listed{key: a.key}, listed{key: b.key}) })
	out := make([]listed, 0, min(n, len(cands)))
	for _, c := range cands[:min(n, len(cands))] {
		out = append(out, listed{key: c.key, info: c.t.Info()})
	}
	return out
}

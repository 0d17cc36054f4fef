package taskstore_test

import (
	"context"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// listAll pages through m.List and returns the ids and statuses.
func listAll(t *testing.T, m *task.Manager, statuses []agentpb.TaskStatus, size int) (ids []string, st []agentpb.TaskStatus) {
	t.Helper()
	var after *task.ListKey
	for range 100 {
		infos, next, err := m.List(context.Background(), statuses, size, after)
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) > size {
			t.Fatalf("page of %d, size %d", len(infos), size)
		}
		for _, in := range infos {
			ids = append(ids, in.ID)
			st = append(st, in.Status)
		}
		if next == nil {
			return ids, st
		}
		after = next
	}
	t.Fatal("paging does not end")
	return nil, nil
}

// Finished tasks evicted from memory (MaxTasksKept) are listed from the
// store, in one newest-first sequence with the tasks in memory.
func TestListIncludesEvictedTasksFromTheStore(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m, q, w := managerOn(t, st, task.ManagerOptions{MaxTasksKept: 2}, store.WriterOptions{})

	var all []*task.Task
	for i := range 7 {
		tk, err := m.Submit(task.Spec{Instruction: fmt.Sprint("task ", i)})
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, tk)
	}
	// The 5 oldest finish (3 of them are evicted), the newest 2 stay pending.
	for i, tk := range all[:5] {
		startOn(t, q, tk)
		status := agentpb.TaskStatus_SUCCESS
		if i%2 == 1 {
			status = agentpb.TaskStatus_FAILURE
		}
		tk.Finish(status, "done", "r")
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if n := m.Registry().Len(); n != 4 {
		t.Fatalf("%d tasks in memory, want 4", n)
	}
	var want []string
	for _, tk := range slices.Backward(all) {
		want = append(want, tk.ID())
	}
	for _, size := range []int{1, 2, 3, 100} {
		ids, _ := listAll(t, m, nil, size)
		if fmt.Sprint(ids) != fmt.Sprint(want) {
			t.Fatalf("pages of %d: %v\nwant %v", size, ids, want)
		}
	}
	ids, sts := listAll(t, m, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS, agentpb.TaskStatus_PENDING}, 2)
	wantIDs := []string{all[6].ID(), all[5].ID(), all[4].ID(), all[2].ID(), all[0].ID()}
	if fmt.Sprint(ids) != fmt.Sprint(wantIDs) {
		t.Fatalf("SUCCESS|PENDING: %v %v\nwant %v", ids, sts, wantIDs)
	}
	ids, _ = listAll(t, m, []agentpb.TaskStatus{agentpb.TaskStatus_FAILURE}, 1)
	if fmt.Sprint(ids) != fmt.Sprint([]string{all[3].ID(), all[1].ID()}) {
		t.Fatalf("FAILURE: %v", ids)
	}
	// An evicted task's snapshot comes from its record.
	infos, _, err := m.List(ctx, nil, 100, nil)
	if err != nil {
		t.Fatal(err)
	}
	old := infos[6]
	if old.ID != all[0].ID() || old.Instruction != "task 0" || old.Status != agentpb.TaskStatus_SUCCESS || old.Result != "r" ||
		old.Message != "done" || old.CommanderID != "cmd" || old.StartedAt.IsZero() || old.EndedAt.IsZero() || old.LastSeq != 3 {
		t.Fatalf("evicted task listed as %+v", old)
	}
	if _, _, err := m.List(ctx, nil, 0, nil); err == nil {
		t.Fatal("limit 0 accepted")
	}
}

// countingStore counts ListTasksBefore calls.
type countingStore struct {
	store.Store
	lists atomic.Int32
}

func (c *countingStore) ListTasksBefore(ctx context.Context, statuses []int32, before *store.TaskKey, limit int) ([]store.TaskRecord, error) {
	c.lists.Add(1)
	return c.Store.ListTasksBefore(ctx, statuses, before, limit)
}

// With every finished task still in memory (and in the store), a page reads
// the store only down to the page's end, not through every stored task.
func TestListReadsTheStoreOnlyForThePage(t *testing.T) {
	ctx := context.Background()
	sq, err := sqlite.Open(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sq.Close() })
	st := &countingStore{Store: sq}
	m, q, w := managerOn(t, st, task.ManagerOptions{}, store.WriterOptions{})
	var ids []string
	for range 40 {
		tk, err := m.Submit(task.Spec{Instruction: "x"})
		if err != nil {
			t.Fatal(err)
		}
		startOn(t, q, tk)
		tk.Finish(agentpb.TaskStatus_SUCCESS, "done", "")
		ids = append(ids, tk.ID())
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	st.lists.Store(0)
	infos, next, err := m.List(ctx, nil, 3, nil)
	if err != nil || len(infos) != 3 || next == nil || infos[0].ID != ids[39] || infos[2].ID != ids[37] {
		t.Fatalf("page %v next %v err %v", infos, next, err)
	}
	if n := st.lists.Load(); n > 3 {
		t.Fatalf("%d store reads for one page of 3", n)
	}
}

// TestEvictedBeforeItsRecordIsStored: a task evicted from memory right after
// it ended, while the writer still holds its final record, is found by id
// and listed, with its final state.
func TestEvictedBeforeItsRecordIsStored(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	// The writer writes only when flushed: the final record stays pending.
	m, _, _ := managerOn(t, st, task.ManagerOptions{MaxTasksKept: 1}, store.WriterOptions{Interval: time.Hour})
	a, err := m.Submit(task.Spec{Instruction: "a"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Submit(task.Spec{Instruction: "b"})
	if err != nil {
		t.Fatal(err)
	}
	a.Finish(agentpb.TaskStatus_SUCCESS, "done", "answer a")
	b.Finish(agentpb.TaskStatus_SUCCESS, "done", "answer b") // evicts a
	if m.Registry().Get(a.ID()) != nil {
		t.Fatal("a is still in memory; the test needs it evicted")
	}
	got, err := m.Get(a.ID())
	if err != nil || got.Status() != agentpb.TaskStatus_SUCCESS || got.Info().Result != "answer a" {
		t.Fatalf("Get after eviction: %v %v", got, err)
	}
	infos, _, err := m.List(ctx, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, 10, nil)
	if err != nil || len(infos) != 2 {
		t.Fatalf("List after eviction: %d tasks, %v", len(infos), err)
	}
}

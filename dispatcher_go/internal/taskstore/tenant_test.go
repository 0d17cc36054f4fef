package taskstore_test

import (
	"context"
	"errors"
	"testing"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// TestTenantIsStoredAndListedFromTheStore: a task's tenant is part of its
// record — after a restart (and for tasks evicted from memory) it is read
// back, a tenant lists only its own stored tasks, page by page, however
// many of another tenant's lie between them, and an admin lists them all.
func TestTenantIsStoredAndListedFromTheStore(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m, q, w := managerOn(t, st, task.ManagerOptions{MaxTasksKept: 2}, store.WriterOptions{})
	a, b := tenant.Caller{Tenant: "team-a"}, tenant.Caller{Tenant: "team-b"}
	var aIDs []string
	for i := range 30 {
		c := b
		if i%10 == 0 {
			c = a
		}
		tk, err := m.Submit(task.Spec{Instruction: "x", Caller: c})
		if err != nil {
			t.Fatal(err)
		}
		startOn(t, q, tk)
		tk.Finish(agentpb.TaskStatus_SUCCESS, "done", "")
		if c == a {
			aIDs = append(aIDs, tk.ID())
		}
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w.Close()

	// A new process on the same store.
	m2, _, _ := durableManager(t, st)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	got, err := m2.Get(aIDs[0])
	if err != nil || got.Tenant() != "team-a" || got.Info().Tenant != "team-a" {
		t.Fatalf("tenant after restart: %v %v", got, err)
	}
	if _, err := m2.GetAs(b, aIDs[0]); !errors.Is(err, task.ErrNotFound) {
		t.Fatalf("team-b got team-a's task: %v", err)
	}
	var listed []string
	var after *task.ListKey
	for {
		infos, next, err := m2.List(tenant.WithCaller(ctx, a), nil, 2, after)
		if err != nil {
			t.Fatal(err)
		}
		for _, info := range infos {
			if info.Tenant != "team-a" {
				t.Fatalf("team-a listed %s of %q", info.ID, info.Tenant)
			}
			listed = append(listed, info.ID)
		}
		if next == nil {
			break
		}
		after = next
	}
	if len(listed) != 3 || listed[0] != aIDs[2] || listed[2] != aIDs[0] {
		t.Fatalf("team-a listed %v, want %v newest first", listed, aIDs)
	}
	all, _, err := m2.List(tenant.WithCaller(ctx, tenant.Caller{Admin: true}), nil, 100, nil)
	if err != nil || len(all) != 30 {
		t.Fatalf("admin listed %d, %v", len(all), err)
	}
	none, _, err := m2.List(ctx, nil, 100, nil)
	if err != nil || len(none) != 0 {
		t.Fatalf("the default tenant listed %d tasks of others, %v", len(none), err)
	}
}

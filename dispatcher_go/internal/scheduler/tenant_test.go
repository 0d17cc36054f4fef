package scheduler

import (
	"testing"

	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

func submitAs(t *testing.T, m *task.Manager, owner string) *task.Task {
	t.Helper()
	tk, err := m.Submit(task.Spec{Instruction: "x", Planner: "chat", Caller: tenant.Caller{Tenant: owner}})
	if err != nil {
		t.Fatal(err)
	}
	return tk
}

// TestTasksRunOnlyOnSlotsThatServeTheirTenant: a task of a tenant goes only
// to a slot that serves it (or serves every tenant); it waits in the queue
// while only other tenants' slots are idle, without holding up the tasks
// behind it that those slots can run.
func TestTasksRunOnlyOnSlotsThatServeTheirTenant(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 10)
	slotA := newSlot("a", "planner:chat")
	slotA.tenants = []string{"team-a"}
	s.AddSlot(slotA)

	taskB := submitAs(t, m, "team-b")
	if len(slotA.got()) != 0 {
		t.Fatal("team-a's slot took team-b's task")
	}
	taskA := submitAs(t, m, "team-a")
	if got := slotA.got(); len(got) != 1 || got[0] != taskA {
		t.Fatalf("team-a's slot got %v; team-b's task must not block team-a's", got)
	}
	// The default tenant's task (the one-tenant case) runs only on a slot
	// without a tenant restriction, not on team-a's.
	def := submitAs(t, m, "")
	slotB := newSlot("b", "planner:chat")
	slotB.tenants = []string{"team-b", "team-c"}
	s.AddSlot(slotB)
	if got := slotB.got(); len(got) != 1 || got[0] != taskB {
		t.Fatalf("team-b's slot got %v", got)
	}
	s.Release(slotA)
	if got := slotA.got(); len(got) != 1 {
		t.Fatalf("team-a's slot took another tenant's task: %v", got)
	}
	open := newSlot("any", "planner:chat")
	s.AddSlot(open)
	if got := open.got(); len(got) != 1 || got[0] != def {
		t.Fatalf("the unrestricted slot got %v", got)
	}
	// A slot that names no tenant serves every tenant.
	s.Release(open)
	taskC := submitAs(t, m, "team-c")
	if got := open.got(); len(got) != 2 || got[1] != taskC {
		t.Fatalf("the unrestricted slot got %v", got)
	}
}

package scheduler

import (
	"errors"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// TestQueueBoundIsPerTenant: a tenant whose tasks wait (no commander of
// its own connected, or a flood) fills only its own share of the queue:
// another tenant can still submit. The bound still holds for each tenant,
// and a place freed (a task placed, or removed) is the tenant's again.
func TestQueueBoundIsPerTenant(t *testing.T) {
	t.Parallel()
	s, m := setup(t, 2)
	as := func(owner string) (*task.Task, error) {
		return m.Submit(task.Spec{Instruction: "x", Planner: "chat", Caller: tenant.Caller{Tenant: owner}})
	}
	a1 := submitAs(t, m, "team-a")
	submitAs(t, m, "team-a")
	if _, err := as("team-a"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("team-a's third queued task: %v, want ErrQueueFull", err)
	}
	b1 := submitAs(t, m, "team-b")
	submitAs(t, m, "")
	if _, err := as("team-b"); err != nil {
		t.Fatalf("team-b's second task: %v", err)
	}
	if _, err := as("team-b"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("team-b's third queued task: %v, want ErrQueueFull", err)
	}
	// team-a's place freed by a cancel, team-b's by a slot taking its task.
	if !s.Remove(a1) {
		t.Fatal("a1 not queued")
	}
	submitAs(t, m, "team-a")
	slotB := newSlot("b", "planner:chat")
	slotB.tenants = []string{"team-b"}
	s.AddSlot(slotB)
	if got := slotB.got(); len(got) != 1 || got[0] != b1 {
		t.Fatalf("team-b's slot got %v", got)
	}
	submitAs(t, m, "team-b")
	if _, err := as("team-b"); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("team-b over its share again: %v, want ErrQueueFull", err)
	}
	// team-a 2, team-b 2, the default tenant 1.
	if st := s.Stats(); st.Queued != 5 {
		t.Fatalf("queued %d, want 5", st.Queued)
	}
}

func (s *fakeSlot) Tenants() []string { return s.tenants }

// TestTenantSlotsCountsByTenant: what a fleet replica publishes for
// GetAgentInfo — open slots once, a slot serving two tenants for each.
func TestTenantSlotsCountsByTenant(t *testing.T) {
	t.Parallel()
	s, _ := setup(t, 2)
	a := newSlot("a", "planner:chat")
	a.tenants = []string{"team-a"}
	ab := newSlot("ab", "planner:chat")
	ab.tenants = []string{"team-a", "team-b"}
	s.AddSlot(a)
	s.AddSlot(ab)
	s.AddSlot(newSlot("open", "planner:chat"))
	open, per := s.TenantSlots()
	if open != 1 || per["team-a"] != 2 || per["team-b"] != 1 || len(per) != 2 {
		t.Fatalf("open %d, per tenant %v", open, per)
	}
	if got := s.SlotsServing("team-b", false); got != open+per["team-b"] {
		t.Fatalf("SlotsServing(team-b) %d, want %d", got, open+per["team-b"])
	}
}

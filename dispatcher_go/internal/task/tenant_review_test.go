package task

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// outagePersistence is a store that holds nothing and whose health the
// test sets.
type outagePersistence struct {
	Persistence // nil: methods the test does not reach
	down        atomic.Bool
}

func (p *outagePersistence) Save(*Snapshot)                          {}
func (p *outagePersistence) FlushWhileHealthy(context.Context) error { return p.Health() }
func (p *outagePersistence) Health() error {
	if p.down.Load() {
		return fmt.Errorf("%w: test outage", store.ErrUnavailable)
	}
	return nil
}
func (p *outagePersistence) Finished(context.Context, string) (Snapshot, error) {
	return Snapshot{}, ErrNotFound
}

// TestForeignTaskAnswersAsUnknownDuringAnOutage: while the store is
// unavailable, an id the dispatcher does not hold in memory is UNAVAILABLE
// (it may be stored). Another tenant's live task must be answered the same
// way, not NOT_FOUND: the difference would tell that it exists.
func TestForeignTaskAnswersAsUnknownDuringAnOutage(t *testing.T) {
	t.Parallel()
	p := &outagePersistence{}
	m, _ := newManager(t, ManagerOptions{Persistence: p})
	b, err := m.Submit(Spec{Instruction: "b's", Planner: "chat", Caller: tenant.Caller{Tenant: "team-b"}})
	if err != nil {
		t.Fatal(err)
	}
	p.down.Store(true)
	a := tenant.Caller{Tenant: "team-a"}
	_, errUnknown := m.GetAs(a, "00000000-0000-4000-8000-000000000000")
	_, errForeign := m.GetAs(a, b.ID())
	if !errors.Is(errUnknown, store.ErrUnavailable) || !errors.Is(errForeign, store.ErrUnavailable) {
		t.Fatalf("unknown id: %v; another tenant's task: %v — both must be UNAVAILABLE", errUnknown, errForeign)
	}
	_, errUnknown = m.ConfigByIDAs(a, "00000000-0000-4000-8000-000000000000")
	_, errForeign = m.ConfigByIDAs(a, b.ID())
	if errors.Is(errUnknown, store.ErrUnavailable) != errors.Is(errForeign, store.ErrUnavailable) || errors.Is(errUnknown, ErrNotFound) != errors.Is(errForeign, ErrNotFound) {
		t.Fatalf("config: unknown id: %v; another tenant's task: %v — must answer alike", errUnknown, errForeign)
	}
	_, errForeign = m.Submit(Spec{Instruction: "go on", Planner: "chat", Caller: a, PreviousTaskID: b.ID()})
	_, errUnknown = m.Submit(Spec{Instruction: "go on", Planner: "chat", Caller: a, PreviousTaskID: "00000000-0000-4000-8000-000000000000"})
	if errors.Is(errUnknown, store.ErrUnavailable) != errors.Is(errForeign, store.ErrUnavailable) {
		t.Fatalf("continue: unknown id: %v; another tenant's task: %v — must answer alike", errUnknown, errForeign)
	}
	// Its owner still reads it from memory.
	if _, err := m.GetAs(tenant.Caller{Tenant: "team-b"}, b.ID()); err != nil {
		t.Fatal(err)
	}
}

package taskstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// TestStoreUnavailable: once the store writer is unhealthy, Submit is
// refused at once, Get answers from memory (UNAVAILABLE for a task not
// there), List answers live tasks from memory and refuses a listing that
// needs the store; a submission accepted just before the store failed keeps
// its id. All is back to normal once the store recovers.
func TestStoreUnavailable(t *testing.T) {
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	f := storetest.NewFaulty(st)
	m, _, w := durableManager(t, f)
	t.Cleanup(f.Heal) // before the writer is closed (cleanups run last first)
	ctx := context.Background()

	f.Fail(time.Minute)
	accepted, err := m.Submit(task.Spec{Instruction: "accepted as the store fails"})
	if err != nil {
		t.Fatalf("submission accepted while the writer was healthy: %v", err)
	}
	if w.Health() == nil {
		t.Fatal("writer healthy after its write failed")
	}
	if _, err := m.Submit(task.Spec{Instruction: "refused"}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Submit while unavailable: %v", err)
	}
	if got, err := m.Get(accepted.ID()); err != nil || got != accepted {
		t.Fatalf("Get of a task in memory: %v %v", got, err)
	}
	if _, err := m.Get(task.NewID()); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Get of a task not in memory: %v, want unavailable", err)
	}
	if _, _, err := m.List(ctx, nil, 10, nil); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("List of all tasks: %v, want unavailable", err)
	}
	if _, _, err := m.List(ctx, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, 10, nil); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("List of finished tasks: %v, want unavailable", err)
	}
	live, _, err := m.List(ctx, []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING}, 10, nil)
	if err != nil || len(live) != 1 || live[0].ID != accepted.ID() {
		t.Fatalf("List of live tasks: %v %v", live, err)
	}
	out, err := m.Cancel(ctx, accepted.ID(), "", false)
	if err != nil || !out.Cancelled {
		t.Fatalf("Cancel while unavailable: %+v %v", out, err)
	}

	changed := w.HealthChanged()
	f.Heal()
	select {
	case <-changed:
	case <-time.After(10 * time.Second):
		t.Fatal("writer not healthy again after the store recovered")
	}
	if _, err := m.Submit(task.Spec{Instruction: "accepted again"}); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if rec, err := st.GetTask(ctx, accepted.ID()); err != nil || rec.Status != int32(agentpb.TaskStatus_CANCELLED) {
		t.Fatalf("record written after the outage: %v %v", rec.Status, err)
	}
}

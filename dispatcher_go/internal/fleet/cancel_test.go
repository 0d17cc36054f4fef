package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// slotQueue keeps the tasks a Manager queues (no slot ever takes them).
type slotQueue struct {
	mu    sync.Mutex
	tasks []*task.Task
}

func (q *slotQueue) Enqueue(t *task.Task) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.tasks = append(q.tasks, t)
	return nil
}

func (q *slotQueue) Remove(t *task.Task) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := slices.Index(q.tasks, t)
	if i < 0 {
		return false
	}
	q.tasks = slices.Delete(q.tasks, i, i+1)
	return true
}

// ownerFleet is a replica's Fleet as far as its command listener goes: a
// Manager whose tasks are queued here, and the leases it holds.
func ownerFleet(t *testing.T) (*Fleet, *task.Manager) {
	t.Helper()
	m := task.NewManager(eventlog.NewMemory(eventlog.Limits{}), task.NewConfigStore(nil),
		task.ManagerOptions{DefaultPlanner: "chat", StopGrace: 200 * time.Millisecond})
	m.SetQueue(&slotQueue{})
	return &Fleet{mgr: m, fenced: &fencedStore{owned: map[string]int64{}}}, m
}

func payload(t *testing.T, m cmdMessage) string {
	t.Helper()
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A cancel announced before its caller was checked (kindCancelFor) stops
// the task only when the caller sees it: another tenant's, one without a
// caller, or one with a row id is dropped, and the task keeps its status;
// its own tenant's and an admin's stop it. A plain cancel announcement
// (sent once its caller was checked, or by an older replica) stops it as
// before, and nothing is acted on for a task this replica does not hold.
func TestCancelForIsCarriedOutOnlyForACallerWhoSeesTheTask(t *testing.T) {
	f, m := ownerFleet(t)
	ctx := context.Background()
	book := make(chan cmdMessage, 8)
	submit := func(tn string) *task.Task {
		tk, err := m.Submit(task.Spec{Instruction: "x", Caller: tenant.Caller{Tenant: tn}})
		if err != nil {
			t.Fatal(err)
		}
		f.fenced.own(tk.ID(), 1)
		return tk
	}
	acme := submit("acme")
	for _, c := range []cmdMessage{
		{TaskID: acme.ID(), Kind: kindCancelFor, Caller: &cmdCaller{Tenant: "globex"}},
		{TaskID: acme.ID(), Kind: kindCancelFor, Caller: &cmdCaller{}}, // the default tenant
		{TaskID: acme.ID(), Kind: kindCancelFor},                       // no caller
		{ID: 7, TaskID: acme.ID(), Kind: kindCancelFor, Caller: &cmdCaller{Tenant: "acme"}},
	} {
		f.onMessage(ctx, payload(t, c), book)
		if st := acme.Status(); st != agentpb.TaskStatus_PENDING || len(book) != 0 {
			t.Fatalf("after %+v (caller %+v): status %s, %d rows booked; want it untouched", c, c.Caller, st, len(book))
		}
	}
	f.onMessage(ctx, payload(t, cmdMessage{TaskID: acme.ID(), Kind: kindCancelFor, Caller: &cmdCaller{Tenant: "acme"}, Args: cmdArgs{Reason: "by acme"}}), book)
	if st := acme.Status(); st != agentpb.TaskStatus_CANCELLED || len(book) != 0 {
		t.Fatalf("its tenant's cancel: status %s, %d rows booked", st, len(book))
	}

	admin := submit("globex")
	f.onMessage(ctx, payload(t, cmdMessage{TaskID: admin.ID(), Kind: kindCancelFor, Caller: &cmdCaller{Tenant: "acme", Admin: true}}), book)
	if st := admin.Status(); st != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("an admin's cancel: status %s", st)
	}

	plain := submit("acme")
	notHeld, err := m.Submit(task.Spec{Instruction: "x", Caller: tenant.Caller{Tenant: "acme"}})
	if err != nil {
		t.Fatal(err)
	}
	f.onMessage(ctx, payload(t, cmdMessage{TaskID: notHeld.ID(), Kind: kindCancelFor, Caller: &cmdCaller{Tenant: "acme"}}), book)
	f.onMessage(ctx, payload(t, cmdMessage{TaskID: notHeld.ID(), Kind: "cancel"}), book)
	if st := notHeld.Status(); st != agentpb.TaskStatus_PENDING {
		t.Fatalf("a task this replica holds no lease on: status %s", st)
	}
	f.onMessage(ctx, payload(t, cmdMessage{TaskID: plain.ID(), Kind: "cancel"}), book)
	if st := plain.Status(); st != agentpb.TaskStatus_CANCELLED || len(book) != 0 {
		t.Fatalf("a checked cancel announced before its row: status %s, %d rows booked", st, len(book))
	}
}

// An end announced on the channel wakes the cancels waiting for that task
// (and only those) with its status; awaitEnd returns it without reading
// PostgreSQL (this Fleet has no database: a read would fail the test).
func TestEndedWakesTheCancelsWaitingForIt(t *testing.T) {
	f, _ := ownerFleet(t)
	f.busOK.Store(true)
	f.opts.StopGrace = time.Minute
	a1, a2, b := f.ends.add("a"), f.ends.add("a"), f.ends.add("b")
	f.onMessage(context.Background(), payload(t, cmdMessage{TaskID: "a", Kind: kindEnded, Status: int32(agentpb.TaskStatus_CANCELLED)}), nil)
	for i, ch := range []chan agentpb.TaskStatus{a1, a2} {
		select {
		case st := <-ch:
			if st != agentpb.TaskStatus_CANCELLED {
				t.Fatalf("waiter %d told %s", i, st)
			}
		default:
			t.Fatalf("waiter %d of the task not told of its end", i)
		}
	}
	select {
	case st := <-b:
		t.Fatalf("a waiter of another task told %s", st)
	default:
	}
	f.ends.remove("a", a1)
	f.ends.remove("a", a2)
	f.onMessage(context.Background(), payload(t, cmdMessage{TaskID: "b", Kind: kindEnded, Status: int32(agentpb.TaskStatus_SUCCESS)}), nil)
	if st := f.awaitEnd(context.Background(), "b", agentpb.TaskStatus_RUNNING, b); st != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("awaitEnd: %s", st)
	}
	f.ends.remove("b", b)
	f.ends.mu.Lock()
	left := len(f.ends.m)
	f.ends.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d tasks still have waiters after every one was removed", left)
	}
}

// Holder reads the tenant from the body package taskstore stores (the
// fleet's cancel checks the caller with it, without loading the task), with
// the status, the end and the live lease's owner.
func TestHolderReadsTheTenantTaskstoreStored(t *testing.T) {
	st := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	w := store.NewWriter(st, store.WriterOptions{})
	defer w.Close()
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ts.Save(&task.Snapshot{Summary: task.Summary{ID: "acme-1", Instruction: "x", Tenant: "acme", Status: agentpb.TaskStatus_RUNNING, CreatedAt: now}})
	ts.Save(&task.Snapshot{Summary: task.Summary{ID: "default-1", Instruction: "x", Status: agentpb.TaskStatus_CANCELLED, CreatedAt: now, EndedAt: now}})
	if err := ts.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := l.Claim(ctx, "acme-1", "r1"); err != nil {
		t.Fatal(err)
	}
	h, err := l.Holder(ctx, "acme-1")
	if err != nil || h.Tenant != "acme" || h.Status != agentpb.TaskStatus_RUNNING || h.Owner != "r1" || !h.Ended.IsZero() {
		t.Fatalf("Holder of acme's running task: %+v %v", h, err)
	}
	h, err = l.Holder(ctx, "default-1")
	if err != nil || h.Tenant != "" || h.Status != agentpb.TaskStatus_CANCELLED || h.Owner != "" || h.Ended.UnixMicro() != now.UnixMicro() {
		t.Fatalf("Holder of the default tenant's ended task: %+v %v", h, err)
	}
	if _, err := l.Holder(ctx, "nope"); !errors.Is(err, task.ErrNotFound) {
		t.Fatalf("Holder of no task: %v", err)
	}
}

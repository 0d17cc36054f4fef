package task

import (
	"errors"
	"sync"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// countPersist is memPersist counting the records queued.
type countPersist struct {
	memPersist
	mu    sync.Mutex
	saves int
}

func (p *countPersist) Save(s *Snapshot) {
	p.mu.Lock()
	p.saves++
	p.mu.Unlock()
	p.memPersist.Save(s)
}

func (p *countPersist) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.saves
}

// runningWithRecords is a RUNNING task whose records p counts.
func runningWithRecords(t *testing.T) (*Task, *countPersist) {
	t.Helper()
	p := &countPersist{memPersist: memPersist{saved: map[string]Snapshot{}}}
	m, q := newManager(t, ManagerOptions{Persistence: p})
	tk, err := m.Submit(Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	q.take(tk)
	if err := tk.Start(&fakeRunner{t: tk}, "c1", "s1"); err != nil {
		t.Fatal(err)
	}
	return tk, p
}

func stopEvent(reason string) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{
		Reason: reason, Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}}}
}

// FenceSaveLater fences the log and keeps the stop on the task at once;
// the record with the stop is queued by save, once.
func TestFenceSaveLaterQueuesTheStopOnSave(t *testing.T) {
	t.Parallel()
	tk, p := runningWithRecords(t)
	before := p.count()

	_, save, err := tk.FenceSaveLater(stopEvent("bye"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tk.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "late"}}},
		eventlog.Capped|eventlog.Fenceable); !errors.Is(err, eventlog.ErrFenced) {
		t.Fatalf("content after the fence: err = %v, want ErrFenced", err)
	}
	tk.mu.Lock()
	kept := tk.stop.GetReason()
	tk.mu.Unlock()
	if kept != "bye" {
		t.Fatalf("stop kept on the task before save: %q", kept)
	}
	if n := p.count(); n != before || p.last(tk.ID()).Stop != nil {
		t.Fatalf("before save: %d records queued (had %d), stored stop %v", n, before, p.last(tk.ID()).Stop)
	}

	save()
	if n := p.count(); n != before+1 || p.last(tk.ID()).Stop.GetReason() != "bye" {
		t.Fatalf("after save: %d records queued (had %d), stored stop %v", n, before, p.last(tk.ID()).Stop)
	}
	save()
	if n := p.count(); n != before+1 {
		t.Fatalf("a second save queued another record: %d, want %d", n, before+1)
	}
	// Fence (the two steps in one) queues its record at once.
	tk2, p2 := runningWithRecords(t)
	before2 := p2.count()
	if _, err := tk2.Fence(stopEvent("now")); err != nil {
		t.Fatal(err)
	}
	if n := p2.count(); n != before2+1 || p2.last(tk2.ID()).Stop.GetReason() != "now" {
		t.Fatalf("Fence: %d records queued (had %d), stored stop %v", n, before2, p2.last(tk2.ID()).Stop)
	}
}

// A record queued between the fence and save (here the task's end)
// carries the stop already: save queues nothing more, and the newest
// record stays the newest state.
func TestFenceSaveLaterAfterALaterRecord(t *testing.T) {
	t.Parallel()
	tk, p := runningWithRecords(t)
	_, save, err := tk.FenceSaveLater(stopEvent("bye"))
	if err != nil {
		t.Fatal(err)
	}
	if !tk.Finish(agentpb.TaskStatus_CANCELLED, "bye", "") {
		t.Fatal("Finish refused")
	}
	ended := p.count()
	save()
	if n := p.count(); n != ended {
		t.Fatalf("save after the end queued %d more records", n-ended)
	}
	if s := p.last(tk.ID()); s.Status != agentpb.TaskStatus_CANCELLED || s.Stop.GetReason() != "bye" {
		t.Fatalf("newest record: %s, stop %v", s.Status, s.Stop)
	}
}

package fleet

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// entries are stream entries of events seqs (as the publisher writes them).
func entries(t *testing.T, seqs ...uint64) []redis.XMessage {
	t.Helper()
	out := make([]redis.XMessage, 0, len(seqs))
	for _, s := range seqs {
		b, err := proto.Marshal(&dispatchv1.TaskEvent{Seq: s})
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, redis.XMessage{ID: eventID(s), Values: map[string]any{"e": string(b)}})
	}
	return out
}

func seqsOf(evs []*dispatchv1.TaskEvent) []uint64 {
	out := make([]uint64, 0, len(evs))
	for _, ev := range evs {
		out = append(out, ev.GetSeq())
	}
	return out
}

func same(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// The hub's bookkeeping, without Redis (the bus counts as down, so no
// wake-up is written): waiters are woken by delivered entries, get serves
// only a run that continues after the caller's seq, a gap starts a new run
// (the caller reads PostgreSQL), the run is bounded, and a task nobody
// waits on is forgotten after hubLinger.
func TestTailHubDeliversContiguousRunsOnly(t *testing.T) {
	h := newTailHub(&Fleet{id: "r1"}, nil)
	evs, ch, done := h.wait("t1", 0, 64)
	if len(evs) != 0 || ch == nil {
		t.Fatalf("wait on a new task: %v events, channel %v", len(evs), ch)
	}
	h.deliver("t1", entries(t, 1, 2), time.Now())
	select {
	case <-ch:
	default:
		t.Fatal("delivered entries did not wake the waiter")
	}
	done()
	if got := seqsOf(h.get("t1", 0, 64)); !same(got, []uint64{1, 2}) {
		t.Fatalf("get after 0: %v", got)
	}
	if got := seqsOf(h.get("t1", 1, 64)); !same(got, []uint64{2}) {
		t.Fatalf("get after 1: %v", got)
	}
	if got := h.get("t1", 2, 64); len(got) != 0 {
		t.Fatalf("get after the last: %v", seqsOf(got))
	}
	// 3 and 4 never arrive: 5 starts a new run; a reader at 2 gets nothing
	// (PostgreSQL fills the gap), a reader at 4 gets 5.
	h.deliver("t1", entries(t, 5), time.Now())
	if got := h.get("t1", 2, 64); len(got) != 0 {
		t.Fatalf("get across a gap: %v", seqsOf(got))
	}
	if got := seqsOf(h.get("t1", 4, 64)); !same(got, []uint64{5}) {
		t.Fatalf("get after 4: %v", got)
	}
	// A duplicate or older entry changes nothing.
	h.deliver("t1", entries(t, 5, 3), time.Now())
	if got := seqsOf(h.get("t1", 4, 64)); !same(got, []uint64{5}) {
		t.Fatalf("after a duplicate: %v", got)
	}
	// Bounded: at most hubKeep events kept, the latest ones.
	var many []uint64
	for s := uint64(6); s < 6+3*hubKeep; s++ {
		many = append(many, s)
	}
	h.deliver("t1", entries(t, many...), time.Now())
	h.mu.Lock()
	n, last := len(h.tasks["t1"].evs), h.tasks["t1"].last
	h.mu.Unlock()
	if n > hubKeep || last != many[len(many)-1] {
		t.Fatalf("kept %d events (bound %d), last %d", n, hubKeep, last)
	}
	if got := seqsOf(h.get("t1", last-1, 64)); !same(got, []uint64{last}) {
		t.Fatalf("get of the latest: %v", got)
	}
	// A waiter past what the hub read moves its position on.
	_, _, done = h.wait("t1", last+10, 64)
	done()
	if got := h.snapshot("0-0"); got[len(got)-1] != eventID(last+10) {
		t.Fatalf("XREAD position %v, want %s", got, eventID(last+10))
	}
	// Nobody waiting for longer than hubLinger: forgotten.
	h.mu.Lock()
	h.tasks["t1"].idle = time.Now().Add(-2 * hubLinger)
	h.mu.Unlock()
	if got := h.snapshot("0-0"); len(got) != 2 {
		t.Fatalf("an idle task is still read: %v", got)
	}
}

// A task that runs on this replica now is released from the hub at once
// (its watchers here read its own log), unless a Read waits on it.
func TestTailHubReleasesATaskRunHere(t *testing.T) {
	h := newTailHub(&Fleet{id: "r1"}, nil)
	_, _, done := h.wait("t1", 0, 64)
	h.release("t1")
	if len(h.snapshot("0-0")) != 4 {
		t.Fatal("a task with a Read waiting on it was released")
	}
	done()
	h.release("t1")
	if got := h.snapshot("0-0"); len(got) != 2 {
		t.Fatalf("released task still read: streams %v", got)
	}
	h.deliver("t1", entries(t, 1), time.Now()) // an answer in flight: dropped
	if evs := h.get("t1", 0, 64); len(evs) != 0 {
		t.Fatalf("a released task got events: %v", seqsOf(evs))
	}
}

// A task whose terminal event the hub delivered is read no more (nothing
// follows it in its stream): while a Read waits it stays for get, out of
// the XREAD; once nobody waits it is forgotten at once, not after
// hubLinger. A running task nobody waits on still lingers.
func TestTailHubStopsReadingAnEndedTask(t *testing.T) {
	h := newTailHub(&Fleet{id: "r1"}, nil)
	_, _, doneLive := h.wait("live", 0, 64)
	doneLive()
	_, _, done := h.wait("t1", 0, 64)
	end, err := proto.Marshal(&dispatchv1.TaskEvent{Seq: 3, Kind: &dispatchv1.TaskEvent_State{
		State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_CANCELLED}}})
	if err != nil {
		t.Fatal(err)
	}
	h.deliver("t1", append(entries(t, 1, 2), redis.XMessage{ID: eventID(3), Values: map[string]any{"e": string(end)}}), time.Now())
	// wake stream + "live" (lingering): 2 keys and 2 ids.
	if got := h.snapshot("0-0"); len(got) != 4 || got[1] != eventsPrefix+"live" {
		t.Fatalf("with a Read waiting on the ended task: streams %v", got)
	}
	if got := seqsOf(h.get("t1", 1, 64)); !same(got, []uint64{2, 3}) {
		t.Fatalf("get of an ended task: %v", got)
	}
	done()
	h.snapshot("0-0")
	h.mu.Lock()
	_, kept := h.tasks["t1"]
	_, live := h.tasks["live"]
	h.mu.Unlock()
	if kept || !live {
		t.Fatalf("after its last Read: ended task kept %v, running task kept %v", kept, live)
	}
}

package api

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// watchResponses is every WatchTask response for task id after seq after
// with max_batch n, to the task's end.
func watchResponses(t *testing.T, h *harness, id string, after uint64, n uint32) []*dispatchv1.WatchTaskResponse {
	t.Helper()
	s, err := h.tasks.WatchTask(testutil.Context(t, testTimeout), &dispatchv1.WatchTaskRequest{TaskId: id, AfterSeq: after, MaxBatch: n})
	if err != nil {
		t.Fatal(err)
	}
	rs, err := testutil.RecvAll(s, nil)
	if err != nil {
		t.Fatalf("watch ended with %v after %d responses", err, len(rs))
	}
	return rs
}

// batched checks that every response carries 1..limit events in events
// (none in event) and returns them in order, with the largest batch.
func batched(t *testing.T, rs []*dispatchv1.WatchTaskResponse, limit int) (evs []*dispatchv1.TaskEvent, largest int) {
	t.Helper()
	for i, r := range rs {
		if r.GetEvent() != nil || len(r.GetEvents()) == 0 || len(r.GetEvents()) > limit {
			t.Fatalf("response %d: event %v, %d events (limit %d)", i, r.GetEvent() != nil, len(r.GetEvents()), limit)
		}
		evs = append(evs, r.GetEvents()...)
		largest = max(largest, len(r.GetEvents()))
	}
	return evs, largest
}

// sameEvents fails unless got is want, event by event.
func sameEvents(t *testing.T, what string, got, want []*dispatchv1.TaskEvent) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d events, want %d", what, len(got), len(want))
	}
	for i := range got {
		if !proto.Equal(got[i], want[i]) {
			t.Fatalf("%s: event %d is %v, want %v", what, i, got[i], want[i])
		}
	}
}

// WatchTaskRequest.max_batch: several events per response when the watcher
// is behind, a lone event at once, the same events in the same order as
// without it, and without it one event per response as before.
func TestWatchTaskBatches(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "count"})
	if err != nil {
		t.Fatal(err)
	}
	id := sub.GetTaskId()
	live, err := h.tasks.WatchTask(testutil.Context(t, testTimeout), &dispatchv1.WatchTaskRequest{TaskId: id, MaxBatch: 64})
	if err != nil {
		t.Fatal(err)
	}
	s, err := c.NextSession(testutil.Context(t, testutil.Wait))
	if err != nil {
		t.Fatal(err)
	}
	// A lone event is sent at once, not held back to fill a batch: the
	// session sends nothing else until the watcher has it.
	if err := s.Send(&dispatchv1.ContentChunk{Text: "lone"}); err != nil {
		t.Fatal(err)
	}
	var liveResps []*dispatchv1.WatchTaskResponse
	lone := testutil.Async(func() (bool, error) {
		for {
			r, err := live.Recv()
			if err != nil {
				return false, err
			}
			liveResps = append(liveResps, r)
			for _, ev := range r.GetEvents() {
				if ev.GetContent().GetText() == "lone" {
					return true, nil
				}
			}
		}
	})
	if r := testutil.Recv(t, lone, testutil.Wait, "the lone event"); r.Err != nil {
		t.Fatal(r.Err)
	}
	const chunks = 600
	for i := range chunks {
		if err := s.Send(&dispatchv1.ContentChunk{Text: fmt.Sprint(i)}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Send(testutil.Success("done")); err != nil {
		t.Fatal(err)
	}
	if err := s.Closed(testutil.Context(t, testutil.Wait)); err != nil {
		t.Fatal(err)
	}
	rest, err := testutil.RecvAll(live, nil)
	if err != nil {
		t.Fatal(err)
	}
	liveEvs, _ := batched(t, append(liveResps, rest...), 64)

	// Without max_batch: one event per response in event, as before.
	var all []*dispatchv1.TaskEvent
	for i, r := range watchResponses(t, h, id, 0, 0) {
		if r.GetEvent() == nil || len(r.GetEvents()) != 0 {
			t.Fatalf("max_batch 0, response %d: event %v, %d events", i, r.GetEvent(), len(r.GetEvents()))
		}
		all = append(all, r.GetEvent())
	}
	if n := len(all); n < chunks+3 || all[n-1].GetState().GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("%d events, last %v", n, all[n-1])
	}
	for i, ev := range all {
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("seq %d at %d", ev.GetSeq(), i)
		}
	}
	sameEvents(t, "live, max_batch 64", liveEvs, all)

	// A replay is all behind: full batches.
	evs, largest := batched(t, watchResponses(t, h, id, 0, 50), 50)
	sameEvents(t, "replay, max_batch 50", evs, all)
	if largest != 50 {
		t.Fatalf("replay, max_batch 50: largest batch %d", largest)
	}
	// A max_batch over the dispatcher's bound is cut to it.
	rs := watchResponses(t, h, id, 0, 1<<20)
	evs, largest = batched(t, rs, maxWatchBatch)
	sameEvents(t, "replay, max_batch 1<<20", evs, all)
	if largest != maxWatchBatch || len(rs) != (len(all)+maxWatchBatch-1)/maxWatchBatch {
		t.Fatalf("replay, max_batch 1<<20: %d responses, largest %d", len(rs), largest)
	}
	// A resume with batches: exactly the rest.
	evs, _ = batched(t, watchResponses(t, h, id, 5, 7), 7)
	sameEvents(t, "resume after 5, max_batch 7", evs, all[5:])
	if rs := watchResponses(t, h, id, uint64(len(all)), 7); len(rs) != 0 {
		t.Fatalf("resume at the end: %d responses", len(rs))
	}
}

// sendBatches cuts a run of events where a response would go over
// maxWatchBatchBytes; an event over it goes alone.
func TestSendBatchesBytes(t *testing.T) {
	t.Parallel()
	ev := func(seq uint64, n int) *dispatchv1.TaskEvent {
		return &dispatchv1.TaskEvent{Seq: seq, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("x", n)}}}
	}
	third := maxWatchBatchBytes / 3
	evs := []*dispatchv1.TaskEvent{
		ev(1, third), ev(2, third), ev(3, third), // the third would take it over
		ev(4, maxWatchBatchBytes+10), // alone
		ev(5, 10), ev(6, 10),
	}
	var got [][]uint64
	err := sendBatches(evs, func(r *dispatchv1.WatchTaskResponse) error {
		if len(r.GetEvents()) > 1 && proto.Size(r) > maxWatchBatchBytes {
			t.Errorf("a response of %d events is %d bytes", len(r.GetEvents()), proto.Size(r))
		}
		var seqs []uint64
		for _, e := range r.GetEvents() {
			seqs = append(seqs, e.GetSeq())
		}
		got = append(got, seqs)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := "[[1 2] [3] [4] [5 6]]"; fmt.Sprint(got) != want {
		t.Fatalf("batches %v, want %s", got, want)
	}
	// A send error ends it.
	calls := 0
	err = sendBatches(evs, func(*dispatchv1.WatchTaskResponse) error { calls++; return context.Canceled })
	if err != context.Canceled || calls != 1 {
		t.Fatalf("error %v after %d sends", err, calls)
	}
}

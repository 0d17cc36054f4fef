package store

import (
	"runtime"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

func contentEvent(seq uint64, text string) pendingEvent {
	return pendingEvent{taskID: "t", ev: &dispatchv1.TaskEvent{Seq: seq, Kind: &dispatchv1.TaskEvent_Content{
		Content: &dispatchv1.ContentChunk{Text: text}}}}
}

// Every event of a batch of mixed sizes is encoded intact, and no event's
// bytes can be grown into the next one's.
func TestNewJobEncodesEveryEvent(t *testing.T) {
	var events []pendingEvent
	for i, n := range []int{10, 5000, 20, 40000, 30, 30, 300, 1, 70000, 2} {
		events = append(events, contentEvent(uint64(i+1), strings.Repeat(string(rune('a'+i)), n)))
	}
	for range 3 { // and many small ones after
		for i := range 200 {
			events = append(events, contentEvent(uint64(len(events)+1), strings.Repeat("z", i)))
		}
	}
	j := newJob(events, nil, func(string, ...any) {})
	if len(j.b.Events) != len(events) || len(j.rejected) != 0 {
		t.Fatalf("%d events encoded, %d rejected, of %d", len(j.b.Events), len(j.rejected), len(events))
	}
	for i, e := range j.b.Events {
		if len(e.Data) != cap(e.Data) {
			t.Fatalf("event %d: len %d cap %d: appending would overwrite the next", i, len(e.Data), cap(e.Data))
		}
		var got dispatchv1.TaskEvent
		if err := proto.Unmarshal(e.Data, &got); err != nil || !proto.Equal(&got, events[i].ev) {
			t.Fatalf("event %d does not decode to itself (err %v)", i, err)
		}
	}
}

// A commit of a few small events (the writer's batch at moderate rates)
// does not allocate a whole arenaSize buffer: that was 70 % of the
// dispatcher's allocations in the tools scenario.
func TestNewJobSmallBatchAllocatesLittle(t *testing.T) {
	events := []pendingEvent{contentEvent(1, "call"), contentEvent(2, "result"), contentEvent(3, "chunk")}
	const runs = 200
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range runs {
		newJob(events, nil, func(string, ...any) {})
	}
	runtime.ReadMemStats(&after)
	if per := (after.TotalAlloc - before.TotalAlloc) / runs; per > 4<<10 {
		t.Fatalf("%d bytes allocated per 3-event job, want under 4 KiB (arenaSize is %d)", per, arenaSize)
	}
}

// An event the log encoded (PersistEncoded) is stored with those bytes,
// as they are, not encoded again; the others are encoded here.
func TestNewJobStoresTheLogsBytes(t *testing.T) {
	a, b := contentEvent(1, "encoded by the log"), contentEvent(2, "not")
	a.data, _ = proto.Marshal(a.ev)
	j := newJob([]pendingEvent{a, b}, nil, func(string, ...any) {})
	if len(j.b.Events) != 2 || &j.b.Events[0].Data[0] != &a.data[0] || len(j.b.Events[0].Data) != len(a.data) {
		t.Fatal("the log's bytes were not stored as they are")
	}
	if want, _ := proto.Marshal(b.ev); string(j.b.Events[1].Data) != string(want) {
		t.Fatal("an event without bytes was not encoded")
	}
}

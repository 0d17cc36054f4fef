package api

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// rawLog is an event log that keeps the bytes of the events in raw (by
// pointer) and of no others.
type rawLog struct {
	eventlog.Log
	raw map[*dispatchv1.TaskEvent][]byte
}

func (l rawLog) Encoded(evs []*dispatchv1.TaskEvent, dst [][]byte) [][]byte {
	dst = dst[:0]
	for _, ev := range evs {
		dst = append(dst, l.raw[ev])
	}
	return dst
}

// rawWatchEvents are n content events of task t, seq 1..n, of size bytes
// of text each (every third a little larger), and a rawLog that keeps the
// bytes of every other one.
func rawWatchEvents(t *testing.T, n, size int) ([]*dispatchv1.TaskEvent, rawLog) {
	t.Helper()
	l := rawLog{raw: make(map[*dispatchv1.TaskEvent][]byte)}
	var evs []*dispatchv1.TaskEvent
	for i := range n {
		ev := &dispatchv1.TaskEvent{TaskId: "t", Seq: uint64(i + 1), EmittedAtUs: int64(i),
			Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("x", size+i%3*7)}}}
		if i%2 == 0 {
			b, err := proto.Marshal(ev)
			if err != nil {
				t.Fatal(err)
			}
			l.raw[ev] = b
		}
		evs = append(evs, ev)
	}
	return evs, l
}

// The responses a watchSender sends are, byte for byte, what marshalling
// the responses with the same events in event / events gives; batches are
// cut as before (≤ maxWatchBatchBytes unless a lone event), whether an
// event's bytes came from the log or were encoded for the response.
func TestWatchSenderWireIsMarshalOfTheResponse(t *testing.T) {
	for _, c := range []struct {
		n, size int
	}{{1, 10}, {5, 64}, {300, 100}, {7, maxWatchBatchBytes / 3}, {3, maxWatchBatchBytes + 10}} {
		t.Run(fmt.Sprintf("%dx%d", c.n, c.size), func(t *testing.T) {
			evs, l := rawWatchEvents(t, c.n, c.size)
			for _, batched := range []bool{true, false} {
				var got []*dispatchv1.WatchTaskResponse
				var wire [][]byte
				w := watchSender{log: l, send: func(r *dispatchv1.WatchTaskResponse) error {
					b, err := proto.Marshal(r) // as grpc's codec does, within Send
					wire = append(wire, b)
					var back dispatchv1.WatchTaskResponse
					if err == nil {
						err = proto.Unmarshal(b, &back)
					}
					got = append(got, &back)
					return err
				}}
				send := w.oneByOne
				if batched {
					send = w.batches
				}
				if err := send(evs); err != nil {
					t.Fatal(err)
				}
				var seen []*dispatchv1.TaskEvent
				for i, r := range got {
					var want *dispatchv1.WatchTaskResponse
					if batched {
						if r.GetEvent() != nil || len(r.GetEvents()) == 0 {
							t.Fatalf("response %d: not a batch", i)
						}
						if len(r.GetEvents()) > 1 && len(wire[i]) > maxWatchBatchBytes {
							t.Fatalf("response %d: %d events in %d bytes", i, len(r.GetEvents()), len(wire[i]))
						}
						want = &dispatchv1.WatchTaskResponse{Events: evs[len(seen) : len(seen)+len(r.GetEvents())]}
						seen = append(seen, r.GetEvents()...)
					} else {
						if r.GetEvent() == nil || len(r.GetEvents()) != 0 {
							t.Fatalf("response %d: not one event", i)
						}
						want = &dispatchv1.WatchTaskResponse{Event: evs[len(seen)]}
						seen = append(seen, r.GetEvent())
					}
					wb, err := proto.Marshal(want)
					if err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(wire[i], wb) {
						t.Fatalf("response %d (batched %v): wire differs from the marshalled response", i, batched)
					}
				}
				sameEvents(t, fmt.Sprintf("batched %v", batched), seen, evs)
				if batched {
					// Cut only where the next event would not fit.
					n := 0
					for i := range len(got) - 1 {
						n += len(got[i].GetEvents())
						if next := proto.Size(&dispatchv1.WatchTaskResponse{Events: evs[n : n+1]}); len(wire[i])+next <= maxWatchBatchBytes {
							t.Fatalf("response %d cut with room for the next event", i)
						}
					}
				}
			}
		})
	}
}

// A failing send ends the batch at once, and the sender keeps no bytes
// of the log's events once it returns.
func TestWatchSenderStopsAtSendError(t *testing.T) {
	evs, l := rawWatchEvents(t, 300, 200)
	calls := 0
	w := watchSender{log: l, send: func(*dispatchv1.WatchTaskResponse) error { calls++; return context.Canceled }}
	if err := w.batches(evs); err != context.Canceled || calls != 1 {
		t.Fatalf("err %v after %d sends", err, calls)
	}
	for i, r := range w.raws {
		if r != nil {
			t.Fatalf("raw %d kept", i)
		}
	}
}

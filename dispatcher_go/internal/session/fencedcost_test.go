package session

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// TestFencedContentCost measures what a content packet arriving after the
// stop costs the receiving goroutine (slot.handle; decoding is gRPC's and
// not counted): the backlog a stopped written on the stream waits behind.
// A measurement, not a check: SESSION_BENCH_FENCED=1 runs it.
func TestFencedContentCost(t *testing.T) {
	if os.Getenv("SESSION_BENCH_FENCED") == "" {
		t.Skip("SESSION_BENCH_FENCED=1 measures the cost of a fenced content packet")
	}
	e := newEnv(t, Options{StopGrace: 30 * time.Second}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	if out, err := e.mgr.Cancel(context.Background(), tk.ID(), "stop", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if p := c.recv(); p.GetStop() == nil {
		t.Fatalf("want stop, got %v", p)
	}
	var sl *slot
	e.srv.slotsMu.Lock()
	for s := range e.srv.slots {
		sl = s
	}
	e.srv.slotsMu.Unlock()
	pkt := &dispatchv1.UpstreamPacket{SessionId: sid, Timestamp: time.Now().UnixMicro(),
		Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("x", 64)}}}
	var seq uint64
	res := testing.Benchmark(func(b *testing.B) {
		b.ReportAllocs()
		for range b.N {
			seq++
			pkt.Seq = seq
			if err := sl.handle(pkt); err != nil {
				b.Fatal(err)
			}
		}
	})
	t.Logf("a fenced content packet: %s %s", res, res.MemString())
	c.send(upSeq(sid, seq+1, &dispatchv1.Stopped{Reason: "ok"}))
	waitDone(t, tk)
}

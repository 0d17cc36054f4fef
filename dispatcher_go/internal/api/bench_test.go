package api

import (
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// watchedSession connects a commander, submits a task, which it starts,
// and watches the task: the commander, the session id and the watch.
func watchedSession(tb testing.TB, ctx context.Context, h *harness, instruction string) (*testutil.Commander, string, grpc.ServerStreamingClient[dispatchv1.WatchTaskResponse]) {
	tb.Helper()
	c := testutil.Connect(tb, ctx, h.conn, "planner:chat")
	sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: instruction})
	if err != nil {
		tb.Fatal(err)
	}
	sid, _ := c.Start()
	watch, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: sub.GetTaskId()})
	if err != nil {
		tb.Fatal(err)
	}
	return c, sid, watch
}

// BenchmarkContentRelay measures one commander streaming content through the
// dispatcher to one WatchTask client, in memory: the per-packet cost of
// receive → event log → fan-out → send. Reports packets/s and the mean
// relay latency (commander emit → watcher receive).
func BenchmarkContentRelay(b *testing.B) {
	h, _ := newHarness(b, dispatcher.Config{})
	ctx := b.Context()
	c, sid, watch := watchedSession(b, ctx, h, "bench")
	type stats struct {
		n       int
		latency time.Duration
	}
	done := make(chan stats, 1)
	go func() {
		var s stats
		for {
			r, err := watch.Recv()
			if errors.Is(err, io.EOF) || err != nil {
				done <- s
				return
			}
			if ev := r.GetEvent(); ev.GetContent() != nil {
				s.n++
				s.latency += time.Since(time.UnixMicro(ev.GetEmittedAtUs()))
			}
		}
	}()
	chunk := &dispatchv1.ContentChunk{Text: "token "}
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if err := c.Stream().Send(testutil.Up(sid, chunk)); err != nil {
			b.Fatal(err)
		}
	}
	c.Send(testutil.Up(sid, testutil.Success("")))
	s := testutil.Recv(b, done, testTimeout, "the watcher to see the task end")
	elapsed := time.Since(start)
	b.StopTimer()
	if s.n != b.N {
		b.Fatalf("watcher got %d of %d", s.n, b.N)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "packets/s")
	b.ReportMetric(float64(s.latency.Microseconds())/float64(s.n), "µs-relay")
}

package api

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// Drain: NOT_SERVING, no new work, running work gets the drain time, then a
// SHUTDOWN stop, then every stream ends.
func TestDrain(t *testing.T) {
	h, ctx := newHarness(t, dispatcher.Config{})
	finisher := testutil.Connect(t, ctx, h.conn, "planner:fast")
	stubborn := testutil.Connect(t, ctx, h.conn, "planner:slow")
	fast, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "fast"})
	slow, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "slow"})
	fsid, _ := finisher.Start()
	ssid, _ := stubborn.Start()
	watch, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: slow.GetTaskId()})
	if err != nil {
		t.Fatal(err)
	}

	drained := make(chan struct{})
	go func() {
		dctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		h.d.Drain(dctx)
		close(drained)
	}()
	testutil.WaitFor(t, testutil.Wait, func() bool {
		hr, err := h.health.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return hr.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
	}, "health NOT_SERVING while draining")
	_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "new work"})
	wantCode(t, err, codes.Unavailable)

	// One finishes within the drain time.
	finisher.Send(testutil.Up(fsid, testutil.Success("ok")))
	// The other is stopped when the time is up, and obeys.
	stop := stubborn.RecvUntil(isStop).GetStop()
	if stop.GetCode() != dispatchv1.StopCode_STOP_CODE_SHUTDOWN {
		t.Fatalf("stop %v", stop)
	}
	stubborn.Send(testutil.Up(ssid, &dispatchv1.Stopped{Reason: "shutdown"}))
	testutil.Done(t, drained, testutil.Wait, "Drain to return")
	if st := waitTerminal(t, h, fast.GetTaskId()); st.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("fast %v", st)
	}
	if st := waitTerminal(t, h, slow.GetTaskId()); st.GetStatus() != agentpb.TaskStatus_FAILURE || st.GetMessage() != "dispatcher shutting down" {
		t.Fatalf("slow %v", st)
	}
	wantCode(t, finisher.Ended(), codes.Unavailable)
	wantCode(t, stubborn.Ended(), codes.Unavailable)
	// The task ended, so the watch ends.
	if _, err := testutil.RecvAll(watch, nil); err != nil {
		t.Fatalf("watch ended with %v, want EOF", err)
	}
}

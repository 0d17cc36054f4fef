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
)

// Drain: NOT_SERVING, no new work, running work gets the drain time, then a
// SHUTDOWN stop, then every stream ends.
func TestDrain(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
	finisher := h.commander(ctx, "planner:fast")
	stubborn := h.commander(ctx, "planner:slow")
	fast, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "fast"})
	slow, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "slow"})
	fsid, _ := finisher.start()
	ssid, _ := stubborn.start()
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
	deadline := time.Now().Add(wait)
	for {
		hr, err := h.health.Check(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if hr.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("health still SERVING while draining")
		}
		time.Sleep(2 * time.Millisecond)
	}
	_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "new work"})
	wantCode(t, err, codes.Unavailable)

	// One finishes within the drain time.
	finisher.send(up(fsid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "ok"}))
	// The other is stopped when the time is up, and obeys.
	stop := stubborn.recvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil }).GetStop()
	if stop.GetCode() != dispatchv1.StopCode_STOP_CODE_SHUTDOWN {
		t.Fatalf("stop %v", stop)
	}
	stubborn.send(up(ssid, &dispatchv1.Stopped{Reason: "shutdown"}))
	select {
	case <-drained:
	case <-time.After(wait):
		t.Fatal("Drain did not return")
	}
	if st := waitTerminal(t, h, fast.GetTaskId()); st.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("fast %v", st)
	}
	if st := waitTerminal(t, h, slow.GetTaskId()); st.GetStatus() != agentpb.TaskStatus_FAILURE || st.GetMessage() != "dispatcher shutting down" {
		t.Fatalf("slow %v", st)
	}
	wantCode(t, finisher.ended(), codes.Unavailable)
	wantCode(t, stubborn.ended(), codes.Unavailable)
	for {
		if _, err := watch.Recv(); err != nil {
			break // the task ended, so the watch ended (EOF)
		}
	}
}

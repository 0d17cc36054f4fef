package api

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// A task delivered to a slot whose stream dies before the start went out
// never ran: it goes back to the queue and runs on the next commander, and
// its watchers see RUNNING → PENDING (requeued) → RUNNING on the same stream.
//
// To keep B's start in the first slot's outbox deterministically, the first
// commander stops reading its stream (on a connection without dynamic flow
// control windows) after a 1 MiB interjection was queued for it: the
// dispatcher's sender is stuck in Send, B's start waits behind it, and then
// the commander's stream is cancelled.
func TestSlotLostBeforeStartRequeuesTask(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})

	conn := h.g.Dial(grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	sctx, kill := context.WithCancel(ctx)
	defer kill()
	stream, err := dispatchv1.NewAgentInteractionClient(conn).ChatStream(sctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(testutil.Hello("slow-commander", "planner:chat")); err != nil {
		t.Fatal(err)
	}
	if p, err := stream.Recv(); err != nil || p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		t.Fatalf("hello ack %v %v", p, err)
	}

	// Task A runs on the slow commander; a big interjection is queued for
	// it, which it never reads; then A ends.
	subA, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "a"})
	if err != nil {
		t.Fatal(err)
	}
	p, err := stream.Recv()
	if err != nil || p.GetStart().GetTaskId() != subA.GetTaskId() {
		t.Fatalf("start A %v %v", p, err)
	}
	sidA := p.GetSessionId()
	if _, err := h.tasks.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: subA.GetTaskId(), Text: strings.Repeat("x", 1<<20)}); err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(testutil.Up(sidA, testutil.Success("a"))); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, h, subA.GetTaskId(), agentpb.TaskStatus_SUCCESS)

	// Task B goes to the same (now idle) slot; its start waits in the outbox.
	subB, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "b"})
	if err != nil {
		t.Fatal(err)
	}
	idB := subB.GetTaskId()
	live := watchEvents(t, h, idB, 0)
	if tk := waitStatus(t, h, idB, agentpb.TaskStatus_RUNNING); tk.GetCommanderId() != "slow-commander" {
		t.Fatalf("B runs on %q", tk.GetCommanderId())
	}

	kill() // the slow commander's stream dies with B's start still queued
	tk := waitStatus(t, h, idB, agentpb.TaskStatus_PENDING)
	if tk.GetMessage() != task.RequeueMessage {
		t.Fatalf("requeued task message %q", tk.GetMessage())
	}

	// The next commander gets B and finishes it.
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	playChat(t, c, "b done")
	tk = waitStatus(t, h, idB, agentpb.TaskStatus_SUCCESS)
	if tk.GetResult() != "b done" || tk.GetCommanderId() != "test-commander" {
		t.Fatalf("task B %v", tk)
	}

	evs := awaitEvents(t, live)
	want := "PENDING RUNNING PENDING RUNNING SUCCESS"
	if got := states(evs); got != want {
		t.Fatalf("live watcher saw states %q, want %q", got, want)
	}
	if got := states(watchAll(t, h, idB, 0)); got != want {
		t.Fatalf("replayed states %q, want %q", got, want)
	}
	for _, ev := range evs {
		if st := ev.GetState(); st.GetStatus() == agentpb.TaskStatus_PENDING && ev.GetSeq() > 1 && st.GetMessage() != task.RequeueMessage {
			t.Fatalf("requeue event %v", ev)
		}
	}
}

// states lists the statuses of the state events in evs.
func states(evs []*dispatchv1.TaskEvent) string {
	var s []string
	for _, ev := range evs {
		if st := ev.GetState(); st != nil {
			s = append(s, st.GetStatus().String())
		}
	}
	return strings.Join(s, " ")
}

// waitStatus polls GetTask until the task has status want.
func waitStatus(t *testing.T, h *harness, id string, want agentpb.TaskStatus) *dispatchv1.Task {
	t.Helper()
	return waitTask(t, h, id, "to be "+want.String(), func(tk *dispatchv1.Task) bool { return tk.GetStatus() == want })
}

package api

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// A ChatStream that sends no hello within Tasks.HelloTimeout ends
// DEADLINE_EXCEEDED with a message saying so (it was held until the client
// closed it); a commander that says hello is served as before. The
// timeout leaves the hello sent at once ample time under -race.
func TestChatStreamWithoutHelloEnds(t *testing.T) {
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{HelloTimeout: time.Second}})
	silent := testutil.OpenChat(t, ctx, h.conn)
	err := silent.Ended()
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "no hello") {
		t.Fatalf("silent stream ended with %v, want DEADLINE_EXCEEDED naming the hello", err)
	}
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "hi"}); err != nil {
		t.Fatal(err)
	}
	playChat(t, c, "hi")
}

// A tool provider's Connect stream takes the same hello timeout: one that
// sends nothing ends DEADLINE_EXCEEDED naming the hello (it was held until
// the client closed it).
func TestConnectWithoutHelloEnds(t *testing.T) {
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{HelloTimeout: time.Second}})
	silent, err := h.tools.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_, err = silent.Recv()
	if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(status.Convert(err).Message(), "no hello") {
		t.Fatalf("silent provider stream ended with %v, want DEADLINE_EXCEEDED naming the hello", err)
	}
}

package broker

import (
	"context"
	"math"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestLongChineseToolErrorStaysValidUTF8: a provider's error of 900 bytes
// of Chinese text (a file name, an API's message) is cut to the planner's
// bound on a character boundary: the result is valid UTF-8, so it can be
// sent to the commander and stored (protobuf refuses anything else).
func TestLongChineseToolErrorStaysValidUTF8(t *testing.T) {
	b := newBroker(t, 2*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "read"}))
	f.next(t)

	// 1 ASCII byte first, so that the 512-byte cut falls inside a character.
	msg := "x" + strings.Repeat("文件名", 100)
	res := make(chan Result, 1)
	go func() { res <- call(b, context.Background(), "read", `{}`) }()
	inv := f.next(t).GetInvoke()
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), Error: &dispatchv1.ToolError{Code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED, Message: msg},
	}}})
	r := testutil.Recv(t, res, testutil.Wait, "the call's result")
	got := r.Result.GetError().GetMessage()
	if !utf8.ValidString(got) {
		t.Fatalf("tool error is not valid UTF-8: %q", got)
	}
	if len(got) > maxErrorText+len("…") || !strings.HasPrefix(msg, strings.TrimSuffix(got, "…")) || !strings.HasSuffix(got, "…") {
		t.Fatalf("tool error %q (%d bytes): want a prefix of the provider's, at most %d bytes, marked as cut", got, len(got), maxErrorText)
	}
	if _, err := proto.Marshal(&dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_ToolResult{ToolResult: r.Result}}); err != nil {
		t.Fatalf("the result cannot be sent to the commander: %v", err)
	}
	close(f.In)
	ended(t, done)
}

// TestHugeToolTimeoutIsCapped: a provider declaring timeout_ms near the
// int64 limit gets the longest timeout, not an overflowed (negative) one
// that would time every call out at once.
func TestHugeToolTimeoutIsCapped(t *testing.T) {
	b := newBroker(t, 2*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "slow", TimeoutMs: math.MaxInt64}))
	f.next(t)
	res := make(chan Result, 1)
	go func() { res <- call(b, context.Background(), "slow", `{}`) }()
	inv := f.next(t).GetInvoke()
	if left := time.Until(inv.GetDeadline().AsTime()); left < maxToolTimeout-time.Minute || left > maxToolTimeout {
		t.Fatalf("invocation deadline in %s, want the cap %s", left, maxToolTimeout)
	}
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), ResultJson: `{}`,
	}}})
	if r := testutil.Recv(t, res, testutil.Wait, "the call's result"); r.Result.GetError() != nil {
		t.Fatalf("call failed: %v", r.Result.GetError())
	}
	close(f.In)
	ended(t, done)
}

package broker

import (
	"context"
	"strings"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// An oversized result fails its own call only: the provider's other call in
// flight gets its result and the stream goes on (issue 12, class 5).
func TestOversizedResultFailsOnlyItsCall(t *testing.T) {
	b, err := New(Options{DefaultTimeout: 5 * time.Second, MaxResultBytes: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "t1"}))
	w := f.next(t).GetWelcome()
	if w.GetMaxMessageBytes() != 1<<10 {
		t.Fatalf("welcome announces %d, want %d", w.GetMaxMessageBytes(), 1<<10)
	}
	start := func() (chan Result, string) {
		res := make(chan Result, 1)
		go func() { res <- call(b, context.Background(), "t1", `{}`) }()
		return res, f.next(t).GetInvoke().GetInvocationId()
	}
	bigRes, bigID := start()
	smallRes, smallID := start()
	answer := func(id, result string) {
		f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
			InvocationId: id, ResultJson: result,
		}}})
	}
	answer(bigID, `"`+strings.Repeat("x", 2<<10)+`"`)
	r := testutil.Recv(t, bigRes, testutil.Wait, "the big call's result")
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
	if msg := r.Result.GetError().GetMessage(); !strings.Contains(msg, "exceeds the limit of 1024 bytes") {
		t.Fatalf("message %q", msg)
	}
	answer(smallID, `{"ok":true}`)
	if r := testutil.Recv(t, smallRes, testutil.Wait, "the small call's result"); r.Result.GetResultJson() != `{"ok":true}` {
		t.Fatalf("small result %v", r.Result)
	}
	close(f.In)
	if err := ended(t, done); err != nil {
		t.Fatalf("ServeProvider = %v", err)
	}
}

func TestDefaultMaxResultBytesAnnounced(t *testing.T) {
	b := newBroker(t, time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "t1"}))
	if got := f.next(t).GetWelcome().GetMaxMessageBytes(); got != DefaultMaxResultBytes {
		t.Fatalf("welcome announces %d, want %d", got, DefaultMaxResultBytes)
	}
	close(f.In)
	ended(t, done)
}

// A built-in tool's result is bounded the same way (echo of large arguments).
func TestOversizedBuiltinResultIsAnError(t *testing.T) {
	b, err := New(Options{DefaultTimeout: 5 * time.Second, MaxResultBytes: 1 << 10})
	if err != nil {
		t.Fatal(err)
	}
	r := call(b, context.Background(), "echo", `{"text":"`+strings.Repeat("y", 2<<10)+`"}`)
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
	if !strings.Contains(r.Result.GetError().GetMessage(), "exceeds the limit of 1024 bytes") {
		t.Fatalf("message %q", r.Result.GetError().GetMessage())
	}
	wantJSON(t, call(b, context.Background(), "echo", `{"text":"small"}`))
}

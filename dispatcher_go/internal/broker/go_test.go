package broker

import (
	"context"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// goCall starts a call with Go; its result arrives on the channel.
func goCall(t *testing.T, b *Broker, ctx context.Context, tool, args string) (<-chan Result, bool) {
	t.Helper()
	res := make(chan Result, 2) // room for a second result, so that a double completion shows
	ok := b.Go(ctx, Call{TaskID: "t", SessionID: "s", CallID: "c1", ToolName: tool, ArgumentsJSON: args}, func(r Result) { res <- r })
	return res, ok
}

// once receives the call's only result.
func once(t *testing.T, res <-chan Result) Result {
	t.Helper()
	r := testutil.Recv(t, res, testutil.Wait, "the call's result")
	select {
	case r2 := <-res:
		t.Fatalf("a second result: %v after %v", r2.Result, r.Result)
	case <-time.After(20 * time.Millisecond): // a double completion would be immediate
	}
	return r
}

func TestGoOnlyTakesProviderTools(t *testing.T) {
	b := newBroker(t, time.Second)
	for _, tool := range []string{"echo", "calculator", "no.such.tool"} {
		if _, ok := goCall(t, b, context.Background(), tool, `{}`); ok {
			t.Errorf("Go took %s", tool)
		}
	}
}

func TestGoProviderCall(t *testing.T) {
	b := newBroker(t, 5*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "obj", ParametersJsonSchema: `{"type":"object","required":["x"]}`},
		&dispatchv1.ToolSpec{Name: "short", TimeoutMs: 30}))
	f.next(t)

	// Arguments that fail the schema: answered at once, nothing is sent.
	res, ok := goCall(t, b, context.Background(), "obj", `{"y":1}`)
	if !ok {
		t.Fatal("Go refused a provider tool")
	}
	wantError(t, once(t, res), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)

	// A result.
	res, _ = goCall(t, b, context.Background(), "obj", `{"x":1}`)
	inv := f.next(t).GetInvoke()
	if inv.GetArgumentsJson() != `{"x":1}` || inv.GetDeadline() == nil {
		t.Fatalf("invocation %v", inv)
	}
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), ResultJson: `{"ok":true}`}}})
	if r := once(t, res); r.Result.GetResultJson() != `{"ok":true}` || r.Executor != "p" || r.Result.GetCallId() != "c1" {
		t.Fatalf("result %v executor %q", r.Result, r.Executor)
	}

	// A stop: CANCELLED, and the provider is told.
	ctx, cancel := context.WithCancel(context.Background())
	res, _ = goCall(t, b, ctx, "obj", `{"x":2}`)
	inv = f.next(t).GetInvoke()
	cancel()
	wantError(t, once(t, res), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED)
	if c := f.next(t).GetCancel(); c.GetInvocationId() != inv.GetInvocationId() || c.GetReason() != "cancelled" {
		t.Fatalf("cancel %v for %v", c, inv)
	}
	// Its late result is refused.
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), ResultJson: `1`}}})
	if rej := f.next(t).GetRejected(); rej.GetInvocationId() != inv.GetInvocationId() {
		t.Fatalf("late result: %v", rej)
	}

	// A stop that came first: the call does not start.
	res, _ = goCall(t, b, ctx, "obj", `{"x":3}`)
	wantError(t, once(t, res), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED)

	// A deadline: TIMEOUT, and the provider is told.
	res, _ = goCall(t, b, context.Background(), "short", `{}`)
	inv = f.next(t).GetInvoke()
	r := once(t, res)
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT)
	if msg := r.Result.GetError().GetMessage(); msg != "no result within 30ms" {
		t.Fatalf("message %q", msg)
	}
	if c := f.next(t).GetCancel(); c.GetInvocationId() != inv.GetInvocationId() || c.GetReason() != "timeout" {
		t.Fatalf("cancel %v for %v", c, inv)
	}

	// The provider goes away mid-call: PROVIDER_UNAVAILABLE.
	res, _ = goCall(t, b, context.Background(), "obj", `{"x":4}`)
	f.next(t)
	close(f.In)
	ended(t, done)
	wantError(t, once(t, res), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE)
}

// A provider whose queue is full: the call waits for room without its
// caller, and still completes once.
func TestGoWaitsForQueueRoom(t *testing.T) {
	b, err := New(Options{DefaultTimeout: 5 * time.Second, ProviderQueue: 1})
	if err != nil {
		t.Fatal(err)
	}
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "x"}))
	f.next(t)
	// Nobody reads f.Out (capacity 16) for a while: 16 invocations fill it,
	// one waits in the sender, one in the queue, the rest wait for room.
	const n = 24
	results := make([]<-chan Result, n)
	for i := range n {
		res, ok := goCall(t, b, context.Background(), "x", `{}`)
		if !ok {
			t.Fatal("Go refused")
		}
		results[i] = res
	}
	for range n {
		inv := f.next(t).GetInvoke()
		f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
			InvocationId: inv.GetInvocationId(), ResultJson: `7`}}})
	}
	for i, res := range results {
		if r := once(t, res); r.Result.GetResultJson() != "7" {
			t.Fatalf("call %d: %v", i, r.Result)
		}
	}
	close(f.In)
	ended(t, done)
}

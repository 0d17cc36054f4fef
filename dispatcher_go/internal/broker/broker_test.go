package broker

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newBroker(t *testing.T, timeout time.Duration) *Broker {
	t.Helper()
	b, err := New(Options{DefaultTimeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func call(b *Broker, ctx context.Context, tool, args string) Result {
	return b.Call(ctx, Call{TaskID: "t", SessionID: "s", CallID: "c1", ToolName: tool, ArgumentsJSON: args})
}

func wantError(t *testing.T, r Result, code dispatchv1.ToolErrorCode) {
	t.Helper()
	if r.Result.GetError().GetCode() != code {
		t.Fatalf("error = %v, want %v (result %q)", r.Result.GetError(), code, r.Result.GetResultJson())
	}
	if r.Result.GetCallId() != "c1" {
		t.Fatal("result lost its call_id")
	}
}

func wantJSON(t *testing.T, r Result) map[string]any {
	t.Helper()
	if r.Result.GetError() != nil {
		t.Fatalf("unexpected error %v", r.Result.GetError())
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(r.Result.GetResultJson()), &m); err != nil {
		t.Fatalf("result not JSON: %q", r.Result.GetResultJson())
	}
	return m
}

func TestBuiltinsListed(t *testing.T) {
	b := newBroker(t, time.Second)
	specs, execs := b.Tools()
	var names []string
	for i, s := range specs {
		names = append(names, s.GetName())
		if execs[i] != ExecutorBuiltin {
			t.Fatalf("executor %q", execs[i])
		}
	}
	if strings.Join(names, ",") != "calculator,echo,sleep,time_now" {
		t.Fatalf("tools %v", names)
	}
}

func TestCalculator(t *testing.T) {
	b := newBroker(t, time.Second)
	ctx := context.Background()
	for expr, want := range map[string]float64{
		"1 + 1":           2,
		"7 / 2":           3.5,
		"(1 + 2) * 3.5":   10.5,
		"-4 * .5":         -2,
		"17 % 5":          2,
		"2e3 + 1":         2001,
		"((((((1))))))":   1,
		"1.5e-1 * 10":     1.5,
		"100 - 99.75":     0.25,
		"3 * (4 + 5) - 6": 21,
	} {
		r := call(b, ctx, "calculator", `{"expression":"`+expr+`"}`)
		m := wantJSON(t, r)
		if got, _ := m["result"].(float64); got != want {
			t.Errorf("%s = %v, want %v", expr, m["result"], want)
		}
		if r.Executor != ExecutorBuiltin {
			t.Errorf("executor %q", r.Executor)
		}
	}
	for _, expr := range []string{"1 +", "os.exit()", "'a' + 'b'", "size([1,2])", "1 ; 2", "1.5 % 2", "[1][0]"} {
		r := call(b, ctx, "calculator", `{"expression":"`+expr+`"}`)
		wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	}
	wantError(t, call(b, ctx, "calculator", `{"expression":"1/0"}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
	wantError(t, call(b, ctx, "calculator", `{"expression":"5 % 0"}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
}

func TestTimeNowEchoSleep(t *testing.T) {
	b := newBroker(t, 5*time.Second)
	ctx := context.Background()
	m := wantJSON(t, call(b, ctx, "time_now", `{"timezone":"Asia/Shanghai"}`))
	if !strings.HasSuffix(m["time"].(string), "+08:00") {
		t.Fatalf("time %v", m["time"])
	}
	m = wantJSON(t, call(b, ctx, "time_now", ``))
	if m["timezone"] != "UTC" {
		t.Fatalf("default zone %v", m["timezone"])
	}
	wantError(t, call(b, ctx, "time_now", `{"timezone":"Mars/Olympus"}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	wantError(t, call(b, ctx, "time_now", `{"timezone":"Local"}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)

	r := call(b, ctx, "echo", `{"a":[1,2],"b":"x"}`)
	if r.Result.GetResultJson() != `{"a":[1,2],"b":"x"}` {
		t.Fatalf("echo %q", r.Result.GetResultJson())
	}
	m = wantJSON(t, call(b, ctx, "sleep", `{"ms":5}`))
	if m["slept_ms"].(float64) != 5 {
		t.Fatalf("sleep %v", m)
	}
	wantError(t, call(b, ctx, "sleep", `{"ms":600000}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
}

func TestBadCalls(t *testing.T) {
	b := newBroker(t, time.Second)
	ctx := context.Background()
	wantError(t, call(b, ctx, "no_such_tool", `{}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL)
	wantError(t, call(b, ctx, "echo", `{not json`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	wantError(t, call(b, ctx, "echo", `[1,2]`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	wantError(t, call(b, ctx, "echo", `{} {}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	r := call(b, ctx, "calculator", `{"expression":42}`)
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
	if !strings.Contains(r.Result.GetError().GetMessage(), "schema") {
		t.Fatalf("message %q", r.Result.GetError().GetMessage())
	}
	wantError(t, call(b, ctx, "calculator", `{"expression":"1","extra":1}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)
}

func TestTimeoutAndCancel(t *testing.T) {
	b := newBroker(t, 30*time.Millisecond)
	// The sleep tool, told when it runs.
	running := make(chan struct{})
	sleepTool := b.tools["sleep"]
	probe := *sleepTool
	probe.builtin = func(ctx context.Context, args map[string]any, raw string) (string, error) {
		close(running)
		return sleepTool.builtin(ctx, args, raw)
	}
	b.mu.Lock()
	b.tools["sleep"] = &probe
	b.mu.Unlock()

	// A stop cancels the session's context: a running sleep ends at once
	// with CANCELLED (sleep declares its own, longer timeout).
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan Result, 1)
	start := time.Now()
	go func() { res <- call(b, ctx, "sleep", `{"ms":5000}`) }()
	testutil.Done(t, running, testutil.Wait, "the sleep tool to run")
	cancel()
	r := testutil.Recv(t, res, testutil.Wait, "the cancelled sleep's result")
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED)
	if time.Since(start) > time.Second {
		t.Fatal("cancel did not interrupt sleep")
	}
	// Already cancelled: the call must not start.
	wantError(t, call(b, ctx, "echo", `{}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED)
}

func TestSchemaCompilation(t *testing.T) {
	for name, src := range map[string]string{
		"not json":      `{`,
		"bad type":      `{"type":"objekt"}`,
		"external ref":  `{"$ref":"file:///etc/passwd"}`,
		"remote ref":    `{"$ref":"https://example.com/s.json"}`,
		"not an object": `[1]`,
	} {
		if _, _, err := compileSchema(src); err == nil {
			t.Errorf("%s: compiled", name)
		}
	}
	for name, src := range map[string]string{
		"empty":    ``,
		"object":   `{"type":"object","properties":{"x":{"type":"integer"}},"required":["x"]}`,
		"internal": `{"$defs":{"n":{"type":"number"}},"type":"object","properties":{"x":{"$ref":"#/$defs/n"}}}`,
		"true":     `true`,
	} {
		if _, _, err := compileSchema(src); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A deeply nested or huge schema is refused before the compiler sees it:
// its time grows with the cube of the nesting, and a provider's hello of
// one 2 000 levels deep kept a core busy for minutes (black-box attack
// run). Brackets inside strings do not count.
func TestSchemaDepthAndSizeAreBounded(t *testing.T) {
	nest := func(n int) string {
		return `{"type":"object","properties":{"a":` + strings.Repeat(`{"type":"object","properties":{"a":`, n-1) + `{}` + strings.Repeat(`}}`, n)
	}
	start := time.Now()
	for name, src := range map[string]string{
		"2000 levels": nest(2000),
		"33 levels":   nest(33), // 67 objects deep
		"arrays":      `{"allOf":` + strings.Repeat(`[`, 70) + strings.Repeat(`]`, 70) + `}`,
		"over 64 KiB": `{"description":"` + strings.Repeat("d", maxSchemaBytes) + `"}`,
	} {
		if _, _, err := compileSchema(src); err == nil || !strings.Contains(err.Error(), "allowed") {
			t.Errorf("%s: %v", name, err)
		}
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("refusing took %v", d)
	}
	for name, src := range map[string]string{
		"31 levels":          nest(31), // 63 objects deep
		"brackets in string": `{"type":"object","description":"` + strings.Repeat(`{[\"`, 100) + `"}`,
	} {
		if _, _, err := compileSchema(src); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// A schema that accepts any object lets calls skip decoding their
// arguments; anything that constrains them does not.
func TestSchemaAnyObject(t *testing.T) {
	for src, want := range map[string]bool{
		``:                  true,
		`{"type":"object"}`: true,
		`{"type":"object","description":"d","title":"t","$comment":"c"}`: true,
		`true`:                false,
		`{}`:                  true, // anything; arguments are objects anyway
		`{"description":"d"}`: true,
		`{"type":"array"}`:    false,
		`{"type":["object"]}`: false,
		`{"type":"object","properties":{"x":{"type":"integer"}}}`: false,
		`{"type":"object","additionalProperties":false}`:          false,
		`{"type":"object","maxProperties":1}`:                     false,
	} {
		_, got, err := compileSchema(src)
		if err != nil || got != want {
			t.Errorf("%q: anyObject %v (err %v), want %v", src, got, err, want)
		}
	}
}

// checkObject gives the verdict and message of parseArguments on every
// input, without decoding.
func TestCheckObjectAgreesWithParse(t *testing.T) {
	for _, raw := range []string{
		``, `  `, "\u00a0", `{}`, ` {"a":1} `, "\n\t{\"a\":[1,2,{\"b\":null}]}\r\n", `{"a":1,"a":2}`,
		`[]`, `1`, `"s"`, `null`, `true`, `{`, `{} {}`, `{}x`, `{"a":}`, `{'a':1}`, `{"a":1e999}`,
	} {
		_, perr := parseArguments(raw)
		cerr := checkObject(raw)
		if (perr == nil) != (cerr == nil) || perr != nil && perr.Error() != cerr.Error() {
			t.Errorf("%q: parseArguments %v, checkObject %v", raw, perr, cerr)
		}
	}
}

// fakeProvider is the provider's end of a Connect stream.
type fakeProvider struct {
	*testutil.ServerStream[*dispatchv1.ConnectRequest, *dispatchv1.ConnectResponse]
	cancel context.CancelFunc
}

func newFakeProvider() *fakeProvider {
	ctx, cancel := context.WithCancel(context.Background())
	return &fakeProvider{testutil.NewServerStream[*dispatchv1.ConnectRequest, *dispatchv1.ConnectResponse](ctx, 16), cancel}
}

func (f *fakeProvider) next(t *testing.T) *dispatchv1.ConnectResponse {
	t.Helper()
	return testutil.Recv(t, f.Out, testutil.Wait, "a message from the broker")
}

// send hands m to the broker's Recv.
func (f *fakeProvider) send(t *testing.T, m *dispatchv1.ConnectRequest) {
	t.Helper()
	testutil.Send(t, f.In, m, testutil.Wait, "the broker to read the provider's message")
}

// ended waits for ServeProvider's error.
func ended(t *testing.T, done <-chan error) error {
	t.Helper()
	return testutil.Recv(t, done, testutil.Wait, "ServeProvider to return")
}

func hello(id string, tools ...*dispatchv1.ToolSpec) *dispatchv1.ConnectRequest {
	return &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{ProviderId: id, Tools: tools}}}
}

// serve runs ServeProvider; the returned channel yields its error.
func serve(b *Broker, f *fakeProvider) chan error {
	done := make(chan error, 1)
	go func() {
		err := b.ServeProvider(f.Ctx, f)
		f.cancel() // the RPC is over: what grpc does after the handler returns
		done <- err
	}()
	return done
}

func TestProviderRoundTripAndUnregister(t *testing.T) {
	b := newBroker(t, 2*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("sandbox-1", &dispatchv1.ToolSpec{
		Name: "computer.click", ParametersJsonSchema: `{"type":"object","properties":{"x":{"type":"integer"},"y":{"type":"integer"}},"required":["x","y"]}`,
	}))
	w := f.next(t).GetWelcome()
	if w == nil || len(w.GetRegisteredTools()) != 1 {
		t.Fatalf("welcome %v", w)
	}

	res := make(chan Result, 1)
	go func() {
		res <- b.Call(context.Background(), Call{
			TaskID: "t", SessionID: "s", CallID: "c1", ToolName: "computer.click",
			ArgumentsJSON: `{"x":1,"y":2}`, SandboxIDs: []string{"SBX-1"},
		})
	}()
	inv := f.next(t).GetInvoke()
	if inv.GetToolName() != "computer.click" || inv.GetCallId() != "c1" || inv.GetTaskId() != "t" || inv.GetDeadline() == nil {
		t.Fatalf("invoke %v", inv)
	}
	// The provider learns which sandboxes the task was given (it checks them).
	if !slices.Equal(inv.GetSandboxIds(), []string{"SBX-1"}) {
		t.Fatalf("invoke sandbox_ids %v", inv.GetSandboxIds())
	}
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvocationId(), ResultJson: `{"ok":true}`,
	}}})
	r := testutil.Recv(t, res, testutil.Wait, "the call's result")
	if r.Result.GetResultJson() != `{"ok":true}` || r.Executor != "sandbox-1" {
		t.Fatalf("result %v executor %q", r.Result, r.Executor)
	}
	// Schema is enforced before the provider sees anything.
	wantError(t, call(b, context.Background(), "computer.click", `{"x":"1"}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS)

	// A result nobody waits for is rejected; the stream goes on.
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{InvocationId: "bogus"}}})
	if rej := f.next(t).GetRejected(); rej.GetInvocationId() != "bogus" {
		t.Fatalf("rejected %v", rej)
	}

	close(f.In)
	if err := ended(t, done); err != nil {
		t.Fatalf("ServeProvider = %v", err)
	}
	wantError(t, call(b, context.Background(), "computer.click", `{"x":1,"y":2}`), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL)
}

func TestProviderGoneMidCall(t *testing.T) {
	b := newBroker(t, 5*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "slow"}))
	f.next(t)
	res := make(chan Result, 1)
	go func() { res <- call(b, context.Background(), "slow", `{}`) }()
	f.next(t) // the invoke
	close(f.In)
	ended(t, done)
	wantError(t, testutil.Recv(t, res, testutil.Wait, "the call's result"), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE)
}

func TestProviderTimeoutSendsCancel(t *testing.T) {
	b := newBroker(t, 50*time.Millisecond)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "slow"}))
	f.next(t)
	r := call(b, context.Background(), "slow", `{}`)
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT)
	inv := f.next(t).GetInvoke()
	c := f.next(t).GetCancel()
	if c.GetInvocationId() != inv.GetInvocationId() || c.GetReason() != "timeout" {
		t.Fatalf("cancel %v for %v", c, inv)
	}
	close(f.In)
	ended(t, done)
}

// Deadlines are kept per provider, not per call: a call with a shorter
// timeout than one already waiting still times out at its own deadline,
// the other keeps waiting, and a result after the deadline is rejected.
func TestProviderDeadlinesOfDifferentTimeouts(t *testing.T) {
	b := newBroker(t, 10*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "long"}, &dispatchv1.ToolSpec{Name: "short", TimeoutMs: 50}))
	f.next(t)
	long := make(chan Result, 1)
	go func() { long <- call(b, context.Background(), "long", `{}`) }()
	longInv := f.next(t).GetInvoke()
	began := time.Now()
	r := call(b, context.Background(), "short", `{}`)
	wantError(t, r, dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT)
	if took := time.Since(began); took > 5*time.Second {
		t.Fatalf("the 50 ms call timed out after %v: it waited for the 10 s call's deadline", took)
	}
	if msg := r.Result.GetError().GetMessage(); msg != "no result within 50ms" {
		t.Fatalf("message %q", msg)
	}
	shortInv := f.next(t).GetInvoke()
	if c := f.next(t).GetCancel(); c.GetInvocationId() != shortInv.GetInvocationId() || c.GetReason() != "timeout" {
		t.Fatalf("cancel %v for %v", c, shortInv)
	}
	// Its late result is refused; the long call is still waiting and gets its own.
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: shortInv.GetInvocationId(), ResultJson: `1`}}})
	if rej := f.next(t).GetRejected(); rej.GetInvocationId() != shortInv.GetInvocationId() {
		t.Fatalf("late result: got %v, want it rejected", rej)
	}
	select {
	case r := <-long:
		t.Fatalf("the long call ended early: %v", r.Result)
	default:
	}
	f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: longInv.GetInvocationId(), ResultJson: `2`}}})
	if r := testutil.Recv(t, long, testutil.Wait, "the long call's result"); r.Result.GetResultJson() != "2" || r.Result.GetError() != nil {
		t.Fatalf("long call: %v", r.Result)
	}
	close(f.In)
	ended(t, done)
}

func TestProviderErrorsAndBadResults(t *testing.T) {
	b := newBroker(t, 2*time.Second)
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("p", &dispatchv1.ToolSpec{Name: "t1"}))
	f.next(t)
	answer := func(r *dispatchv1.InvocationResult) Result {
		res := make(chan Result, 1)
		go func() { res <- call(b, context.Background(), "t1", `{}`) }()
		r.InvocationId = f.next(t).GetInvoke().GetInvocationId()
		f.send(t, &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: r}})
		return testutil.Recv(t, res, testutil.Wait, "the call's result")
	}
	wantError(t, answer(&dispatchv1.InvocationResult{ResultJson: "not json"}), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
	wantError(t, answer(&dispatchv1.InvocationResult{Error: &dispatchv1.ToolError{Message: "boom"}}), dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED)
	close(f.In)
	ended(t, done)
}

func TestProviderRegistrationRefusals(t *testing.T) {
	b := newBroker(t, time.Second)
	cases := map[string]struct {
		first *dispatchv1.ConnectRequest
		want  error
	}{
		"builtin clash":    {hello("p1", &dispatchv1.ToolSpec{Name: "calculator"}), ErrToolExists},
		"bad schema":       {hello("p2", &dispatchv1.ToolSpec{Name: "x", ParametersJsonSchema: `{"type":1}`}), ErrInvalidTool},
		"bad name":         {hello("p3", &dispatchv1.ToolSpec{Name: "a b"}), ErrInvalidTool},
		"duplicate":        {hello("p4", &dispatchv1.ToolSpec{Name: "d"}, &dispatchv1.ToolSpec{Name: "d"}), ErrInvalidTool},
		"no provider id":   {hello("", &dispatchv1.ToolSpec{Name: "e"}), ErrProtocol},
		"result first":     {&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{}}}, ErrProtocol},
		"negative timeout": {hello("p5", &dispatchv1.ToolSpec{Name: "f", TimeoutMs: -1}), ErrInvalidTool},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			f := newFakeProvider()
			done := serve(b, f)
			f.send(t, c.first)
			if err := ended(t, done); !errors.Is(err, c.want) {
				t.Errorf("%v, want %v", err, c.want)
			}
		})
	}
	// A clash with another provider.
	f := newFakeProvider()
	done := serve(b, f)
	f.send(t, hello("first", &dispatchv1.ToolSpec{Name: "shared"}))
	f.next(t)
	g := newFakeProvider()
	gdone := serve(b, g)
	g.send(t, hello("second", &dispatchv1.ToolSpec{Name: "shared"}))
	if err := ended(t, gdone); !errors.Is(err, ErrToolExists) {
		t.Fatalf("clash: %v", err)
	}
	close(f.In)
	ended(t, done)
}

// A provider stream that sends no hello within Options.HelloTimeout ends
// with ErrHelloTimeout (it was held, with its goroutines, until the
// provider closed it); a provider that says hello at once is served. The
// timeout leaves the hello sent at once ample time under -race.
func TestProviderWithoutHelloEnds(t *testing.T) {
	b, err := New(Options{HelloTimeout: 250 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	silent := newFakeProvider()
	if err := ended(t, serve(b, silent)); !errors.Is(err, ErrHelloTimeout) {
		t.Fatalf("ServeProvider = %v, want %v", err, ErrHelloTimeout)
	}

	// A longer timeout here: the hello below must win against it even on
	// a slow runner under -race.
	b2, err := New(Options{HelloTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	f := newFakeProvider()
	done := serve(b2, f)
	f.send(t, hello("prompt", &dispatchv1.ToolSpec{Name: "prompt.tool"}))
	if w := f.next(t).GetWelcome(); w == nil {
		t.Fatal("no welcome")
	}
	select {
	case err := <-done:
		t.Fatalf("a provider that said hello ended: %v", err)
	case <-time.After(1500 * time.Millisecond): // past the hello timeout: still served
	}
	f.cancel()
	if err := ended(t, done); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("ServeProvider = %v", err)
	}
}

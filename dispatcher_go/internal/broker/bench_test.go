package broker

import (
	"context"
	"strings"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// benchArgs are the arguments loadgen's tools scenario sends.
var benchArgs = `{"text":"` + strings.Repeat("x", 32) + `"}`

// BenchmarkCallEcho is one call of the built-in echo, as a session makes it.
func BenchmarkCallEcho(b *testing.B) {
	br, err := New(Options{DefaultTimeout: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	c := Call{TaskID: "t", SessionID: "s", CallID: "c1", ToolName: "echo", ArgumentsJSON: benchArgs}
	b.ReportAllocs()
	for b.Loop() {
		if r := br.Call(ctx, c); r.Result.GetError() != nil {
			b.Fatal(r.Result.GetError())
		}
	}
}

// BenchmarkCallProvider is one call of a provider's tool that answers at
// once (loadgen's bench_echo), through the broker's queue, its sender, the
// stream and its receiver.
func BenchmarkCallProvider(b *testing.B) {
	br, stop := benchProvider(b)
	defer stop()
	ctx := context.Background()
	c := Call{TaskID: "t", SessionID: "s", CallID: "c1", ToolName: "bench_echo", ArgumentsJSON: benchArgs}
	b.ReportAllocs()
	for b.Loop() {
		if r := br.Call(ctx, c); r.Result.GetError() != nil {
			b.Fatal(r.Result.GetError())
		}
	}
	b.StopTimer()
}

// BenchmarkGoProvider is BenchmarkCallProvider started with Go, as a
// session starts a provider call: no goroutine waits for it.
func BenchmarkGoProvider(b *testing.B) {
	br, stop := benchProvider(b)
	defer stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel() // a cancellable context, as a session's
	c := Call{TaskID: "t", SessionID: "s", CallID: "c1", ToolName: "bench_echo", ArgumentsJSON: benchArgs}
	res := make(chan Result, 1)
	done := func(r Result) { res <- r }
	b.ReportAllocs()
	for b.Loop() {
		if !br.Go(ctx, c, done) {
			b.Fatal("Go refused")
		}
		if r := <-res; r.Result.GetError() != nil {
			b.Fatal(r.Result.GetError())
		}
	}
	b.StopTimer()
}

// benchProvider serves bench_echo from a provider that answers at once.
func benchProvider(b *testing.B) (*Broker, func()) {
	br, err := New(Options{DefaultTimeout: time.Minute})
	if err != nil {
		b.Fatal(err)
	}
	f := newFakeProvider()
	done := serve(br, f)
	f.In <- hello("bench", &dispatchv1.ToolSpec{Name: "bench_echo", ParametersJsonSchema: `{"type":"object"}`})
	<-f.Out // welcome
	go func() {
		for {
			select {
			case m := <-f.Out:
				inv := m.GetInvoke()
				if inv == nil {
					continue
				}
				select {
				case f.In <- &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
					InvocationId: inv.GetInvocationId(), ResultJson: inv.GetArgumentsJson(),
				}}}:
				case <-f.Ctx.Done():
					return
				}
			case <-f.Ctx.Done():
				return
			}
		}
	}()
	return br, func() {
		f.cancel()
		<-done
	}
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// remoteTool is the tool the load generator serves as a tool provider.
const remoteTool = "bench_echo"

// provider serves remoteTool over ToolProviderService.Connect: it answers
// every invocation at once with its arguments, so the round trip measures
// the dispatcher's brokering, not the tool.
type provider struct {
	stream grpc.BidiStreamingClient[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse]
	done   chan error
}

// startProvider registers remoteTool and serves it until ctx ends.
func startProvider(ctx context.Context, conn *grpc.ClientConn) (*provider, error) {
	stream, err := dispatchv1.NewToolProviderServiceClient(conn).Connect(ctx)
	if err != nil {
		return nil, fmt.Errorf("tool provider: Connect: %w", err)
	}
	err = stream.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: fmt.Sprintf("loadgen-%d", os.Getpid()),
		Tools: []*dispatchv1.ToolSpec{{
			Name: remoteTool, Description: "loadgen: returns its arguments at once",
			ParametersJsonSchema: `{"type":"object"}`,
		}},
	}}})
	if err != nil {
		return nil, fmt.Errorf("tool provider: hello: %w", err)
	}
	msg, err := stream.Recv()
	if err != nil {
		return nil, fmt.Errorf("tool provider: waiting for welcome: %w", err)
	}
	if msg.GetWelcome() == nil {
		return nil, fmt.Errorf("tool provider: expected welcome, got %v", msg)
	}
	p := &provider{stream: stream, done: make(chan error, 1)}
	go func() { p.done <- p.serve() }()
	return p, nil
}

// serve answers invocations; this goroutine is the stream's only sender.
func (p *provider) serve() error {
	for {
		msg, err := p.stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		inv := msg.GetInvoke()
		if inv == nil {
			continue // cancel, rejected: nothing to do for an instant tool
		}
		err = p.stream.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
			InvocationId: inv.GetInvocationId(), ResultJson: inv.GetArgumentsJson(),
		}}})
		if err != nil {
			return err
		}
	}
}

func runTools(ctx context.Context, o *options, e *env) (*result, error) {
	params := streamParams(o)
	params["tools"] = "echo (builtin), " + remoteTool + " (provider)"
	params["task_packets"] = o.taskPackets
	res := newResult("tools", params)

	provConns, err := dialN(o, e, 1, o.token, true)
	if err != nil {
		return nil, err
	}
	defer closeAll(provConns)
	provCtx, stopProvider := context.WithCancel(ctx)
	defer stopProvider()
	prov, err := startProvider(provCtx, provConns[0])
	if err != nil {
		return nil, err
	}

	r, cleanup, err := startStreamRun(ctx, o, e, "tools", o.taskPackets, []string{"echo", remoteTool})
	defer cleanup()
	if err != nil {
		return nil, err
	}
	r.f.toolFrom.Store(r.measureFrom.UnixMicro())
	r.f.toolTo.Store(r.measureTo.UnixMicro())
	if err := sleepUntil(ctx, r.measureTo); err != nil {
		return nil, err
	}
	window := r.measureTo.Sub(r.measureFrom).Seconds()
	r.finish(ctx, res)
	calls := r.f.toolCalls.Load()
	res.latency("tool round trip: echo (builtin)", r.f.toolRTT["echo"].Summary())
	res.latency("tool round trip: "+remoteTool+" (provider)", r.f.toolRTT[remoteTool].Summary())
	res.value("tool calls", float64(calls)/window, "/s")
	errs := r.f.toolErrors.Load()
	first, _ := r.f.toolErrFirst.Load().(string)
	res.check("no tool errors", errs == 0, "%d errors %s", errs, first)
	res.check("tool calls measured", calls > 0, "%d", calls)
	stopProvider()
	select {
	case err := <-prov.done:
		if err != nil && ctx.Err() == nil && !isCanceled(err) {
			res.note("tool provider ended: %v", err)
		}
	case <-time.After(5 * time.Second):
		res.note("tool provider did not end within 5s")
	}
	return res, nil
}

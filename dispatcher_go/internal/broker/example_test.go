package broker_test

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// New registers the built-in tools; a planner's tool call is checked
// against the tool's schema and run. Failures come back in the result,
// never as a Go error.
func ExampleBroker_Call() {
	b, err := broker.New(broker.Options{DefaultTimeout: 5 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	specs, executors := b.Tools()
	for i, spec := range specs {
		fmt.Println(spec.GetName(), executors[i])
	}
	ctx := context.Background()
	r := b.Call(ctx, broker.Call{TaskID: "task-1", SessionID: "s1", CallID: "k1", ToolName: "calculator", ArgumentsJSON: `{"expression":"123 * 456"}`})
	fmt.Println(r.Executor, r.Result.GetResultJson())
	r = b.Call(ctx, broker.Call{TaskID: "task-1", SessionID: "s1", CallID: "k2", ToolName: "calculator", ArgumentsJSON: `{"expression":42}`})
	fmt.Println(r.Result.GetError().GetCode())
	// Output:
	// calculator builtin
	// echo builtin
	// sleep builtin
	// time_now builtin
	// builtin {"expression":"123 * 456","result":56088}
	// TOOL_ERROR_CODE_INVALID_ARGUMENTS
}

// pipe is a ToolProviderService.Connect stream held in memory: what the
// provider sends goes in on fromProvider, what the broker sends comes out
// on toProvider.
type pipe struct {
	fromProvider chan *dispatchv1.ConnectRequest
	toProvider   chan *dispatchv1.ConnectResponse
}

func (p pipe) Recv() (*dispatchv1.ConnectRequest, error) {
	m, ok := <-p.fromProvider
	if !ok {
		return nil, io.EOF
	}
	return m, nil
}

func (p pipe) Send(m *dispatchv1.ConnectResponse) error {
	p.toProvider <- m
	return nil
}

// A provider process registers its tools with a hello on its Connect
// stream; the broker routes their calls to it for as long as the stream
// lasts.
func ExampleBroker_ServeProvider() {
	b, err := broker.New(broker.Options{DefaultTimeout: 5 * time.Second})
	if err != nil {
		fmt.Println(err)
		return
	}
	p := pipe{fromProvider: make(chan *dispatchv1.ConnectRequest), toProvider: make(chan *dispatchv1.ConnectResponse, 8)}
	served := make(chan error, 1)
	go func() { served <- b.ServeProvider(context.Background(), p) }()

	p.fromProvider <- &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "sandbox-1",
		Tools:      []*dispatchv1.ToolSpec{{Name: "screen.size", ParametersJsonSchema: `{"type":"object"}`}},
	}}}
	fmt.Println("registered", (<-p.toProvider).GetWelcome().GetRegisteredTools())

	// The provider answers the invocation the call below makes.
	go func() {
		inv := (<-p.toProvider).GetInvoke()
		p.fromProvider <- &dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
			InvocationId: inv.GetInvocationId(), ResultJson: `{"width":1280,"height":720}`,
		}}}
	}()
	r := b.Call(context.Background(), broker.Call{TaskID: "task-1", SessionID: "s1", CallID: "k1", ToolName: "screen.size", ArgumentsJSON: `{}`})
	fmt.Println(r.Executor, r.Result.GetResultJson())

	// The provider goes away; so do its tools.
	close(p.fromProvider)
	fmt.Println("served:", <-served)
	r = b.Call(context.Background(), broker.Call{CallID: "k2", ToolName: "screen.size", ArgumentsJSON: `{}`})
	fmt.Println(r.Result.GetError().GetCode())
	// Output:
	// registered [screen.size]
	// sandbox-1 {"width":1280,"height":720}
	// served: <nil>
	// TOOL_ERROR_CODE_UNKNOWN_TOOL
}

package api

import (
	"strconv"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// BenchmarkToolRoundTrip measures one commander's tool calls, one at a
// time, through gRPC: tool_call sent → tool_result received, per call
// (ns/op), for the built-in echo (run on the receiving goroutine, its
// result sent from there when the outbox is idle) and a provider's tool
// answered at once by a provider in this process.
func BenchmarkToolRoundTrip(b *testing.B) {
	for _, tool := range []string{"echo", "bench.echo"} {
		b.Run(tool, func(b *testing.B) {
			h, ctx := newHarness(b, dispatcher.Config{})
			prov, err := h.tools.Connect(ctx)
			if err != nil {
				b.Fatal(err)
			}
			if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
				ProviderId: "bench", Tools: []*dispatchv1.ToolSpec{{Name: "bench.echo"}},
			}}}); err != nil {
				b.Fatal(err)
			}
			if w, err := prov.Recv(); err != nil || w.GetWelcome() == nil {
				b.Fatalf("welcome %v %v", w, err)
			}
			go func() { // answers every invocation with its arguments
				for {
					m, err := prov.Recv()
					if err != nil {
						return
					}
					if inv := m.GetInvoke(); inv != nil {
						if prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
							InvocationId: inv.GetInvocationId(), ResultJson: inv.GetArgumentsJson(),
						}}}) != nil {
							return
						}
					}
				}
			}()
			c := testutil.Connect(b, ctx, h.conn, "planner:chat")
			if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "bench"}); err != nil {
				b.Fatal(err)
			}
			sid, _ := c.Start()
			b.ResetTimer()
			for i := range b.N {
				id := strconv.Itoa(i)
				c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: id, ToolName: tool, ArgumentsJson: `{"text":"hello"}`}))
				for {
					p := c.Recv()
					if r := p.GetToolResult(); r != nil {
						if r.GetCallId() != id || r.GetError() != nil {
							b.Fatalf("result %v, want %s", r, id)
						}
						break
					}
				}
			}
			b.StopTimer()
			c.Send(testutil.Up(sid, testutil.Success("")))
		})
	}
}

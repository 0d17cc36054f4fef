package api

import (
	"context"
	"testing"

	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestTraceJoinsAcrossHops: one trace from the client's span through the
// SubmitTask call, the task, the session (whose context the start packet
// carries to the commander), the commander's tool_call span (carried back
// in the ToolCallRequest) and the dispatcher's execute_tool span, whose
// context the provider's invocation carries on.
func TestTraceJoinsAcrossHops(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	t.Cleanup(func() {
		otel.SetTracerProvider(prev)
		_ = tp.Shutdown(context.Background())
	})
	h, ctx := newHarnessWith(t, dispatcher.Config{}, telemetry.ForProvider(tp).ServerOptions()...)

	prov, err := h.tools.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "p", Tools: []*dispatchv1.ToolSpec{{Name: "remote.echo"}},
	}}})
	if _, err := prov.Recv(); err != nil {
		t.Fatal(err)
	}
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")

	// The client: a span of its own, sent as a traceparent header.
	cctx, clientSpan := tp.Tracer("client").Start(ctx, "client")
	md := metadata.MD{}
	for k, v := range telemetry.Inject(cctx) {
		md.Set(k, v)
	}
	sub, err := h.tasks.SubmitTask(metadata.NewOutgoingContext(cctx, md), &dispatchv1.SubmitTaskRequest{Instruction: "trace me"})
	if err != nil {
		t.Fatal(err)
	}
	clientSpan.End()
	traceID := clientSpan.SpanContext().TraceID()

	// The commander: its session span continues the start packet's context.
	sid, st := c.Start()
	sessCtx := telemetry.Extract(context.Background(), st.GetTraceContext())
	if got := trace.SpanContextFromContext(sessCtx); got.TraceID() != traceID {
		t.Fatalf("start trace_context %v: trace %s, want %s", st.GetTraceContext(), got.TraceID(), traceID)
	}
	callCtx, callSpan := tp.Tracer("commander").Start(sessCtx, "tool_call remote.echo")
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "remote.echo", ArgumentsJson: `{}`,
		TraceContext: telemetry.Inject(callCtx)}))
	inv, err := prov.Recv()
	if err != nil {
		t.Fatal(err)
	}
	invCtx := trace.SpanContextFromContext(telemetry.Extract(context.Background(), inv.GetInvoke().GetTraceContext()))
	_ = prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
		InvocationId: inv.GetInvoke().GetInvocationId(), ResultJson: `{}`,
	}}})
	if r := c.Recv().GetToolResult(); r.GetCallId() != "k1" || r.GetError() != nil {
		t.Fatalf("tool result %v", r)
	}
	callSpan.End()
	c.Send(testutil.Up(sid, testutil.Success("")))
	if a := c.Recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
		t.Fatalf("close ack %v", a)
	}

	byName := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range rec.Ended() {
		byName[s.Name()] = s
	}
	parentOf := func(name string) trace.SpanID {
		t.Helper()
		s, ok := byName[name]
		if !ok {
			t.Fatalf("no %q span among %v", name, keys(byName))
		}
		if s.SpanContext().TraceID() != traceID {
			t.Fatalf("%q is in trace %s, want %s", name, s.SpanContext().TraceID(), traceID)
		}
		return s.Parent().SpanID()
	}
	rpc := "dispatch.v1.TaskService/SubmitTask"
	if p := parentOf(rpc); p != clientSpan.SpanContext().SpanID() {
		t.Errorf("%s: parent %s, want the client's span", rpc, p)
	}
	if p := parentOf("task"); p != byName[rpc].SpanContext().SpanID() {
		t.Errorf("task: parent %s, want the SubmitTask span", p)
	}
	if p := parentOf("session"); p != byName["task"].SpanContext().SpanID() {
		t.Errorf("session: parent %s, want the task span", p)
	}
	if got := trace.SpanContextFromContext(sessCtx).SpanID(); got != byName["session"].SpanContext().SpanID() {
		t.Errorf("start packet carries span %s, want the session span", got)
	}
	exec := "execute_tool remote.echo"
	if p := parentOf(exec); p != callSpan.SpanContext().SpanID() {
		t.Errorf("%s: parent %s, want the commander's tool_call span", exec, p)
	}
	if invCtx.SpanID() != byName[exec].SpanContext().SpanID() {
		t.Errorf("invocation carries span %s, want %s's", invCtx.SpanID(), exec)
	}
	if sub.GetTaskId() == "" {
		t.Fatal("no task id")
	}
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

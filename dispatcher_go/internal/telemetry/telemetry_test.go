package telemetry

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestSetupIsOffByDefault(t *testing.T) {
	for _, e := range []map[string]string{
		nil,
		{"OTEL_TRACES_EXPORTER": "none"},
		{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
	} {
		tr, err := Setup(context.Background(), "x", "v", env(e))
		if err != nil || tr.Enabled() || tr.ServerOptions() != nil || tr.DialOptions() != nil {
			t.Fatalf("%v: enabled=%v err=%v", e, tr.Enabled(), err)
		}
	}
}

func TestSetupRejectsWhatItCannotDo(t *testing.T) {
	for _, e := range []map[string]string{
		{"OTEL_TRACES_EXPORTER": "zipkin"},
		{"OTEL_TRACES_EXPORTER": "otlp,console"},
		{"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
	} {
		if _, err := Setup(context.Background(), "x", "v", env(e)); err == nil || !strings.Contains(err.Error(), "OTEL_") {
			t.Errorf("%v: want an error naming the variable, got %v", e, err)
		}
	}
}

func TestSetupOTLP(t *testing.T) {
	// The exporter connects lazily: no collector is needed to set up.
	tr, err := Setup(context.Background(), "x", "v", env(map[string]string{
		"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}))
	if err != nil || !tr.Enabled() || len(tr.ServerOptions()) != 2 {
		t.Fatalf("enabled=%v err=%v", tr.Enabled(), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := tr.Shutdown(ctx); err != nil { // nothing to export
		t.Fatal(err)
	}
}

func TestInjectExtractRoundTrip(t *testing.T) {
	if Inject(context.Background()) != nil {
		t.Fatal("no span: nothing to inject")
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{1, 2, 3}, SpanID: trace.SpanID{4, 5}, TraceFlags: trace.FlagsSampled})
	carrier := Inject(trace.ContextWithSpanContext(context.Background(), sc))
	if !strings.HasPrefix(carrier["traceparent"], "00-01020300") {
		t.Fatalf("carrier %v", carrier)
	}
	got := trace.SpanContextFromContext(Extract(context.Background(), carrier))
	if got.TraceID() != sc.TraceID() || got.SpanID() != sc.SpanID() || !got.IsRemote() {
		t.Fatalf("extracted %v", got)
	}
	// A broken carrier leaves the context (and its span) as it was.
	parent := trace.ContextWithSpanContext(context.Background(), sc)
	if got := trace.SpanContextFromContext(Extract(parent, map[string]string{"traceparent": "garbage"})); got.SpanID() != sc.SpanID() {
		t.Fatalf("garbage replaced the parent: %v", got)
	}
}

type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }

func TestInterceptorsSpanClientCallsOnly(t *testing.T) {
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	unary, stream := ForProvider(tp).interceptors()

	parent := "00-0102030405060708090a0b0c0d0e0f10-0102030405060708-01"
	in := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", parent))
	for _, m := range []string{"/dispatch.v1.AgentInteraction/ChatStream", "/dispatch.v1.ToolProviderService/Connect"} {
		_ = stream(nil, fakeStream{ctx: in}, &grpc.StreamServerInfo{FullMethod: m}, func(_ any, ss grpc.ServerStream) error {
			if trace.SpanFromContext(ss.Context()).IsRecording() {
				t.Errorf("%s got a span", m)
			}
			return nil
		})
	}
	_ = stream(nil, fakeStream{ctx: in}, &grpc.StreamServerInfo{FullMethod: "/dispatch.v1.TaskService/WatchTask"}, func(_ any, ss grpc.ServerStream) error {
		return status.Error(grpccodes.NotFound, "no such task")
	})
	_, _ = unary(in, nil, &grpc.UnaryServerInfo{FullMethod: "/dispatch.v1.TaskService/SubmitTask"}, func(context.Context, any) (any, error) {
		return nil, status.Error(grpccodes.Internal, "boom")
	})
	spans := rec.Ended()
	if len(spans) != 2 {
		t.Fatalf("%d spans, want WatchTask and SubmitTask", len(spans))
	}
	for i, want := range []struct {
		name string
		code codes.Code
	}{{"dispatch.v1.TaskService/WatchTask", codes.Unset}, {"dispatch.v1.TaskService/SubmitTask", codes.Error}} {
		s := spans[i]
		if s.Name() != want.name || s.Parent().TraceID().String() != "0102030405060708090a0b0c0d0e0f10" || s.Status().Code != want.code {
			t.Errorf("span %d: %s parent %s status %v", i, s.Name(), s.Parent().TraceID(), s.Status())
		}
	}
}

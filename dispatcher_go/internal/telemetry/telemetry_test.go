package telemetry

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.opentelemetry.io/otel/trace"
	"go.uber.org/goleak"
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
	if err != nil || !tr.Enabled() || len(tr.ServerOptions()) != 1 {
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

// Package telemetry sets up OpenTelemetry tracing from the standard OTEL_*
// environment and carries trace context across the dispatcher's hops: gRPC
// and HTTP calls (otelgrpc, otelhttp), and the packets of the long-lived
// ChatStream and tool-provider streams, whose messages carry a W3C Trace
// Context map (StartSession, ToolCallRequest and Invocation trace_context).
//
// Exporting is off by default. OTEL_TRACES_EXPORTER=otlp turns it on; the
// exporter then reads OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL
// (grpc, the default, or http/protobuf), OTEL_EXPORTER_OTLP_HEADERS and the
// rest of the OTLP variables; the SDK reads OTEL_SERVICE_NAME,
// OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER and OTEL_BSP_*. When off,
// nothing is installed on the RPC path and the spans made by the dispatcher's
// own code are no-ops.
//
// It must not sit on the per-message path of a long-lived stream (an
// otelgrpc stats handler would: the server spans come from interceptors that
// see only the call). Spans carry ids, names and statuses, never a
// planner's output (thought, content, tool arguments), an instruction or a
// credential.
package telemetry

import (
	"context"
	"fmt"
	"net/http"
	"strings"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.40.0"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	grpccodes "google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ScopeName is the instrumentation scope of the dispatcher's own spans.
const ScopeName = "github.com/agentdispatch/dispatcher"

// propagator is W3C Trace Context plus Baggage: what the commander (Python
// SDK defaults) and most clients speak.
var propagator = propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})

func init() {
	// Set even when tracing is off: the otel API's global propagator is a
	// no-op until set, and the helpers below use it.
	otel.SetTextMapPropagator(propagator)
}

// Tracer is the tracer of the dispatcher's own spans (tasks, sessions, tool
// calls). It follows the global provider: a no-op until Setup enables
// tracing.
func Tracer() trace.Tracer { return otel.Tracer(ScopeName) }

// Tracing is the process's tracing setup; the zero value (and nil) is "off".
type Tracing struct {
	tp *sdktrace.TracerProvider
}

// Setup enables tracing when getenv says so (see the package doc) and makes
// it the global provider. serviceName is the default service.name.
func Setup(ctx context.Context, serviceName, version string, getenv func(string) string) (*Tracing, error) {
	if strings.EqualFold(getenv("OTEL_SDK_DISABLED"), "true") {
		return &Tracing{}, nil
	}
	var exporters []string
	for _, e := range strings.Split(getenv("OTEL_TRACES_EXPORTER"), ",") {
		if e = strings.TrimSpace(strings.ToLower(e)); e != "" && e != "none" {
			exporters = append(exporters, e)
		}
	}
	if len(exporters) == 0 {
		return &Tracing{}, nil // the default: off
	}
	if len(exporters) > 1 || exporters[0] != "otlp" {
		return nil, fmt.Errorf("OTEL_TRACES_EXPORTER=%q: only otlp (or none) is supported", getenv("OTEL_TRACES_EXPORTER"))
	}
	exp, err := newOTLPExporter(ctx, getenv)
	if err != nil {
		return nil, err
	}
	res, err := resource.Merge(
		resource.NewSchemaless(semconv.ServiceName(serviceName), semconv.ServiceVersion(version)),
		// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win.
		resource.Environment(),
	)
	if err != nil {
		return nil, fmt.Errorf("trace resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	otel.SetTracerProvider(tp)
	return &Tracing{tp: tp}, nil
}

func newOTLPExporter(ctx context.Context, getenv func(string) string) (*otlptrace.Exporter, error) {
	proto := getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if proto == "" {
		proto = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	switch proto {
	case "", "grpc":
		// The client reads the OTEL_EXPORTER_OTLP_* variables itself.
		return otlptracegrpc.New(ctx)
	case "http/protobuf":
		return otlptracehttp.New(ctx)
	}
	return nil, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL=%q: grpc or http/protobuf", proto)
}

// ForProvider returns a Tracing that records into tp (tests; programs
// that set up the SDK themselves). It does not make tp the global provider.
func ForProvider(tp *sdktrace.TracerProvider) *Tracing { return &Tracing{tp: tp} }

// Enabled reports whether spans are recorded and exported.
func (t *Tracing) Enabled() bool { return t != nil && t.tp != nil }

// Shutdown exports what is buffered and stops the exporter.
func (t *Tracing) Shutdown(ctx context.Context) error {
	if !t.Enabled() {
		return nil
	}
	return t.tp.Shutdown(ctx)
}

// ServerOptions instrument a gRPC server: a span per client call,
// continuing the caller's trace (W3C traceparent in the metadata). The
// long-lived streams of commanders and tool providers get no span of their
// own (one would last as long as the connection); their packets carry the
// context of each session and call. Health checks are skipped too.
// Nothing is installed when tracing is off.
//
// Interceptors, not otelgrpc's stats handler: with any stats handler
// installed grpc-go builds per-message stats for every stream, ChatStream
// included (ingest events per CPU-second 4-9 % lower with tracing on, three
// runs of scripts/bench_tracing.sh; 1-5 % with these, within the noise). An
// interceptor runs once per call.
func (t *Tracing) ServerOptions() []grpc.ServerOption {
	if !t.Enabled() {
		return nil
	}
	unary, stream := t.interceptors()
	return []grpc.ServerOption{grpc.ChainUnaryInterceptor(unary), grpc.ChainStreamInterceptor(stream)}
}

func (t *Tracing) interceptors() (grpc.UnaryServerInterceptor, grpc.StreamServerInterceptor) {
	tr := t.tp.Tracer(ScopeName + "/grpc")
	unary := func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if untraced(info.FullMethod) {
			return handler(ctx, req)
		}
		ctx, span := startRPCSpan(ctx, tr, info.FullMethod)
		resp, err := handler(ctx, req)
		endRPCSpan(span, err)
		return resp, err
	}
	stream := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if untraced(info.FullMethod) {
			return handler(srv, ss)
		}
		ctx, span := startRPCSpan(ss.Context(), tr, info.FullMethod)
		err := handler(srv, tracedStream{ServerStream: ss, ctx: ctx})
		endRPCSpan(span, err)
		return err
	}
	return unary, stream
}

// untraced are the methods that get no span: the long-lived streams and
// health checks.
func untraced(method string) bool {
	switch method {
	case "/dispatch.v1.AgentInteraction/ChatStream", "/dispatch.v1.ToolProviderService/Connect",
		"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch":
		return true
	}
	return false
}

// startRPCSpan starts the server span of a call (RPC semantic conventions),
// the child of the caller's span when its metadata carries one.
func startRPCSpan(ctx context.Context, tr trace.Tracer, fullMethod string) (context.Context, trace.Span) {
	md, _ := metadata.FromIncomingContext(ctx)
	ctx = propagator.Extract(ctx, mdCarrier(md))
	name := strings.TrimPrefix(fullMethod, "/")
	service, method, _ := strings.Cut(name, "/")
	return tr.Start(ctx, name, trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(
		attribute.String("rpc.system", "grpc"),
		attribute.String("rpc.service", service),
		attribute.String("rpc.method", method)))
}

func endRPCSpan(span trace.Span, err error) {
	st := status.Convert(err)
	span.SetAttributes(attribute.Int64("rpc.grpc.status_code", int64(st.Code())))
	switch st.Code() {
	// Server errors, as the RPC conventions count them.
	case grpccodes.Unknown, grpccodes.DeadlineExceeded, grpccodes.Unimplemented, grpccodes.Internal,
		grpccodes.Unavailable, grpccodes.DataLoss:
		span.SetStatus(codes.Error, st.Message())
	}
	span.End()
}

// tracedStream gives the handler the context with the call's span.
type tracedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s tracedStream) Context() context.Context { return s.ctx }

// mdCarrier reads W3C headers from incoming gRPC metadata.
type mdCarrier metadata.MD

func (c mdCarrier) Get(key string) string {
	if v := metadata.MD(c).Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (c mdCarrier) Set(key, value string) { metadata.MD(c).Set(key, value) }

func (c mdCarrier) Keys() []string {
	keys := make([]string, 0, len(c))
	for k := range c {
		keys = append(keys, k)
	}
	return keys
}

// DialOptions instrument a gRPC client (dispatchctl): its calls carry the
// current trace context. None when tracing is off.
func (t *Tracing) DialOptions() []grpc.DialOption {
	if !t.Enabled() {
		return nil
	}
	return []grpc.DialOption{grpc.WithStatsHandler(otelgrpc.NewClientHandler(
		otelgrpc.WithTracerProvider(t.tp), otelgrpc.WithPropagators(propagator)))}
}

// HTTPHandler wraps the HTTP API: a span per request, continuing a
// traceparent header. h itself when tracing is off.
func (t *Tracing) HTTPHandler(h http.Handler) http.Handler {
	if !t.Enabled() {
		return h
	}
	return otelhttp.NewHandler(h, "http",
		otelhttp.WithTracerProvider(t.tp),
		otelhttp.WithPropagators(propagator),
		otelhttp.WithSpanNameFormatter(func(_ string, r *http.Request) string {
			if r.Pattern != "" {
				return r.Pattern
			}
			return r.Method
		}),
	)
}

// Inject returns the W3C Trace Context of ctx's span as a packet's
// trace_context map, or nil when ctx carries no valid span context.
func Inject(ctx context.Context) map[string]string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return nil
	}
	carrier := propagation.MapCarrier{}
	propagator.Inject(ctx, carrier)
	return carrier
}

// Extract returns ctx with the span context of a packet's trace_context
// map as the (remote) parent. ctx is returned as it is when the map holds no
// valid context, so a span already in ctx stays the parent.
func Extract(ctx context.Context, carrier map[string]string) context.Context {
	if len(carrier) == 0 {
		return ctx
	}
	out := propagator.Extract(ctx, propagation.MapCarrier(carrier))
	if !trace.SpanContextFromContext(out).IsValid() {
		return ctx
	}
	return out
}

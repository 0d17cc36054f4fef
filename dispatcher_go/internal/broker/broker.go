// Package broker routes planners' tool calls to their executors: tools built
// into the dispatcher, tools declared by provider processes over
// ToolProviderService.Connect, or tools of local providers in the
// dispatcher's process (SetLocalTools: the MCP servers of internal/mcp).
//
// Every call is checked before it runs: the tool must exist (else
// UNKNOWN_TOOL), the arguments must be a JSON object that passes the tool's
// JSON Schema (else INVALID_ARGUMENTS; schemas are compiled once, at
// registration). Each call runs under a timeout (TIMEOUT) and under the
// caller's context, which a stop cancels (CANCELLED). A provider that goes
// away fails its calls in flight with PROVIDER_UNAVAILABLE. Failures are
// returned as a ToolCallResult carrying the error, never as a Go error: the
// session always goes on.
package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/santhosh-tekuri/jsonschema/v6"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// ExecutorBuiltin is the executor name of tools served by the dispatcher.
const ExecutorBuiltin = "builtin"

// Errors of provider registration; the API layer maps them to gRPC codes.
var (
	// ErrToolExists means a declared tool name is already served.
	ErrToolExists = errors.New("tool already registered")
	// ErrInvalidTool means a declared tool is malformed (name, schema, ...).
	ErrInvalidTool = errors.New("invalid tool spec")
	// ErrProtocol means a provider broke the Connect protocol.
	ErrProtocol = errors.New("tool provider protocol violation")
	// ErrHelloTimeout means a provider sent no hello within
	// Options.HelloTimeout of opening its stream.
	ErrHelloTimeout = errors.New("no hello received within the hello timeout")
)

// Limits on declared tools.
const (
	maxToolName      = 128
	maxToolsPerHello = 1024
	maxToolTimeout   = 10 * time.Minute
	maxErrorText     = 512
)

// Options configure a Broker.
type Options struct {
	// DefaultTimeout applies to tools that declare none (--tool-timeout).
	DefaultTimeout time.Duration
	// ProviderQueue bounds the messages waiting to be sent to one provider;
	// callers wait (under their timeout) when it is full.
	ProviderQueue int
	// MaxResultBytes is the largest result message (ConnectRequest) a
	// provider may send, announced in its Welcome; a larger one becomes an
	// EXECUTION_FAILED error for that call alone (default
	// DefaultMaxResultBytes). It stays under the commander's 4 MiB receive
	// limit with room for the ToolCallResult envelope.
	MaxResultBytes int
	// HelloTimeout ends a Connect stream that sent no hello this long
	// after it opened, with ErrHelloTimeout (0: never), as a commander's
	// ChatStream is ended: until its hello a stream holds goroutines and
	// is no provider anyone can see.
	HelloTimeout time.Duration
	// Logger receives broker logs; nil discards.
	Logger *slog.Logger
}

// DefaultMaxResultBytes is MaxResultBytes's default: 4 MiB less 4 KiB of
// room for the packet that carries a result on to the commander.
const DefaultMaxResultBytes = 4<<20 - ResultEnvelopeBytes

// ResultEnvelopeBytes is the room kept between a message limit and the
// largest result: a result travels on inside a ToolCallResult packet with
// ids and, as an event, inside a TaskEvent.
const ResultEnvelopeBytes = 4 << 10

// Call is one tool call of a planner.
type Call struct {
	TaskID        string
	SessionID     string
	CallID        string
	ToolName      string
	ArgumentsJSON string
	// TraceContext is the caller's W3C Trace Context (the commander's span
	// for the call); the call's span is its child. Empty: ctx's span.
	TraceContext map[string]string
	// SandboxIDs are the sandboxes the task was given (Invocation.sandbox_ids):
	// a sandbox provider lets the call act on these and on its own.
	SandboxIDs []string
	// Tenant owns the task (Invocation.tenant; "" the default tenant): a
	// provider that keeps anything across tasks keeps tenants apart by it.
	Tenant string
	// Recorded, when set, is the log that recorded the call as its event
	// Seq: a call of a tool not declared idempotent (ToolSpec.idempotent)
	// is invoked only once that event is durable, so that a dispatcher
	// that dies first never leaves a call that ran unrecorded (its
	// commander would resend it and the next dispatcher run it again;
	// docs/protocol.md, "Tool calls in flight"). A stop, or the call's
	// deadline (counted from its arrival), that comes first ends the call
	// without invoking it. Idempotent tools (every built-in) never wait.
	Recorded Recorder
	Seq      uint64
}

// Recorder tells when a recorded event is durable (eventlog.Log).
type Recorder interface {
	// WhenDurable calls f, once, when event seq is durable: at once if it
	// is, else on the goroutine that commits it (f must not block).
	WhenDurable(seq uint64, f func())
}

// holdsBack reports whether c, a call of t, waits for its record.
func (c *Call) holdsBack(t *tool) bool {
	return c.Recorded != nil && !t.spec.GetIdempotent()
}

// Result is a call's outcome as the session reports it.
type Result struct {
	// Result answers the call (error set on failure).
	Result *dispatchv1.ToolCallResult
	// Executor is "builtin" or the provider id ("" if the call never ran).
	Executor string
	// Duration is the time from Call to Result.
	Duration time.Duration
}

// builtinFunc runs a built-in tool. args passed the tool's schema; it is
// nil for a tool whose schema accepts any object (tool.anyObject: the
// arguments are checked, not decoded), which then reads raw if anything.
type builtinFunc func(ctx context.Context, args map[string]any, raw string) (string, error)

type tool struct {
	spec    *dispatchv1.ToolSpec
	schema  *jsonschema.Schema // nil: any object
	timeout time.Duration
	// anyObject: the schema accepts every JSON object (none, or
	// {"type":"object"} with annotations only), so a call's arguments are
	// only checked to be one (json.Valid), never decoded.
	anyObject bool
	builtin   builtinFunc
	// instant: a built-in that does a small, bounded amount of work and
	// never waits (echo), so that a caller may run it on its own
	// goroutine (Instant).
	instant  bool
	provider *provider
	local    *localProvider // local.go
}

// Broker is the tool registry and router. Safe for concurrent use.
type Broker struct {
	opts Options
	log  *slog.Logger
	calc *calculator

	mu        sync.RWMutex
	tools     map[string]*tool
	providers map[string]*provider
	specs     []*dispatchv1.ToolSpec // sorted by name; replaced, never modified
	executors []string               // parallel to specs

	nextInvocation atomic.Uint64
}

// New returns a broker serving the built-in tools.
func New(opts Options) (*Broker, error) {
	if opts.DefaultTimeout <= 0 {
		opts.DefaultTimeout = 30 * time.Second
	}
	if opts.ProviderQueue <= 0 {
		opts.ProviderQueue = 256
	}
	if opts.MaxResultBytes <= 0 {
		opts.MaxResultBytes = DefaultMaxResultBytes
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	calc, err := newCalculator()
	if err != nil {
		return nil, err
	}
	b := &Broker{
		opts:      opts,
		log:       opts.Logger,
		calc:      calc,
		tools:     make(map[string]*tool),
		providers: make(map[string]*provider),
	}
	for _, bt := range b.builtins() {
		t, err := b.compileTool(bt.spec)
		if err != nil {
			return nil, fmt.Errorf("built-in tool %s: %w", bt.spec.GetName(), err)
		}
		t.builtin, t.instant = bt.run, bt.instant
		b.tools[t.spec.GetName()] = t
	}
	b.rebuildLocked()
	return b, nil
}

// Tools lists the tools a planner can call now, sorted by name, with their
// executors ("builtin" or the provider id). The slices must not be modified.
func (b *Broker) Tools() (specs []*dispatchv1.ToolSpec, executors []string) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.specs, b.executors
}

// rebuildLocked republishes the sorted tool list after a change.
func (b *Broker) rebuildLocked() {
	names := make([]string, 0, len(b.tools))
	for n := range b.tools {
		names = append(names, n)
	}
	slices.Sort(names)
	specs := make([]*dispatchv1.ToolSpec, len(names))
	execs := make([]string, len(names))
	for i, n := range names {
		t := b.tools[n]
		specs[i] = t.spec
		execs[i] = t.executor()
	}
	b.specs, b.executors = specs, execs
}

// compileTool validates a declared spec and compiles its schema.
func (b *Broker) compileTool(spec *dispatchv1.ToolSpec) (*tool, error) {
	name := spec.GetName()
	if err := validToolName(name); err != nil {
		return nil, err
	}
	sch, anyObject, err := compileSchema(spec.GetParametersJsonSchema())
	if err != nil {
		return nil, fmt.Errorf("%w: tool %q: schema: %s", ErrInvalidTool, name, truncate(err.Error()))
	}
	timeout := b.opts.DefaultTimeout
	if ms := spec.GetTimeoutMs(); ms > 0 {
		// Compared in milliseconds: a huge timeout_ms would overflow a
		// Duration (and time every call out at once).
		timeout = time.Duration(min(ms, maxToolTimeout.Milliseconds())) * time.Millisecond
	} else if ms < 0 {
		return nil, fmt.Errorf("%w: tool %q: negative timeout_ms", ErrInvalidTool, name)
	}
	return &tool{spec: spec, schema: sch, anyObject: anyObject, timeout: timeout}, nil
}

func validToolName(name string) error {
	if name == "" || len(name) > maxToolName {
		return fmt.Errorf("%w: tool name must be 1..%d characters", ErrInvalidTool, maxToolName)
	}
	for _, c := range name {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("_.:-", c)
		if !ok {
			return fmt.Errorf("%w: tool name %q: only letters, digits and _ . : - are allowed", ErrInvalidTool, name)
		}
	}
	return nil
}

// Call runs c and always returns a result; failures are in Result.Error.
func (b *Broker) Call(ctx context.Context, c Call) Result {
	b.mu.RLock()
	t := b.tools[c.ToolName]
	b.mu.RUnlock()
	var s running // on the stack
	if early, ok := b.begin(ctx, &s, c, t); !ok {
		return early
	}
	ctx = s.ctx
	timeout := t.timeout
	if c.holdsBack(t) {
		if early, ok := s.awaitRecord(ctx, c); !ok {
			return early
		}
		timeout -= time.Since(s.start) // the deadline counts from the call's arrival
	}
	cctx := ctx
	if !t.instant && t.provider == nil {
		// An instant built-in never waits, so a timeout could not fire;
		// a provider keeps its calls' deadlines itself (expireLoop).
		var cancel context.CancelFunc
		cctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var out string
	var err error
	switch {
	case t.builtin != nil:
		out, err = t.builtin(cctx, s.args, c.ArgumentsJSON)
	case t.local != nil:
		out, err = t.local.run(cctx, c)
	default:
		out, err = t.provider.invoke(cctx, b.newInvocationID(), c, timeout)
	}
	return s.finish(ctx, cctx, out, err)
}

// awaitRecord waits until c's event is durable (Call.Recorded); ok false
// means the call ended first, with early: CANCELLED on ctx's end, TIMEOUT
// at its deadline.
func (s *running) awaitRecord(ctx context.Context, c Call) (early Result, ok bool) {
	ready := make(chan struct{})
	var once sync.Once
	c.Recorded.WhenDurable(c.Seq, func() { once.Do(func() { close(ready) }) })
	select {
	case <-ready:
		return Result{}, true
	default:
	}
	t := time.NewTimer(s.t.timeout - time.Since(s.start))
	defer t.Stop()
	select {
	case <-ready:
		return Result{}, true
	case <-ctx.Done():
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED, "session stopped", s.t.executor()), false
	case <-t.C:
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT, fmt.Sprintf("no result within %s", s.t.timeout), s.t.executor()), false
	}
}

// maxGoArguments bounds the arguments of a call Go starts: Go checks them
// on its caller's goroutine (a session's receive loop).
const maxGoArguments = 64 << 10

// Go starts c, a call of a provider's tool, without a goroutine waiting
// for it, and calls done once with its result: on the goroutine that
// completes it (the provider stream's receiver, its deadline keeper, the
// one that ends ctx, or Go's caller when the call fails its checks or
// the provider is gone). done must not block. Go reports false, and does
// nothing, for any other call (a built-in, a local tool, a tool that does
// not exist, or arguments over maxGoArguments): the caller runs Call.
// A call that waits for its record (Call.Recorded) is started at once, its
// deadline running, but its invocation is queued only once the record is
// durable, on the goroutine that reports it.
//
// A call that only waits for a provider needs no goroutine: Go saves the
// tool goroutine's start and its wake-up when the result comes, two of
// the hand-offs on a provider call's round trip.
func (b *Broker) Go(ctx context.Context, c Call, done func(Result)) bool {
	b.mu.RLock()
	t := b.tools[c.ToolName]
	b.mu.RUnlock()
	if t == nil || t.provider == nil || len(c.ArgumentsJSON) > maxGoArguments {
		return false
	}
	s := new(running)
	if early, ok := b.begin(ctx, s, c, t); !ok {
		done(early)
		return true
	}
	var hold func(release func())
	if c.holdsBack(t) {
		rec, seq := c.Recorded, c.Seq
		hold = func(release func()) { rec.WhenDurable(seq, release) }
	}
	t.provider.start(s.ctx, b.newInvocationID(), c, t.timeout, hold, func(out string, err error) {
		done(s.finish(s.ctx, s.ctx, out, err))
	})
	return true
}

// running is a call that passed its checks, until finish.
type running struct {
	b     *Broker
	t     *tool
	ctx   context.Context // the caller's, with the call's span
	args  map[string]any  // decoded arguments; nil for any-object schemas
	start time.Time
	span  trace.Span
	res   *dispatchv1.ToolCallResult
}

// begin starts c's span and checks c against t, its tool (nil: none);
// ok false means c is answered already (unknown tool, invalid arguments,
// ctx done) with early.
func (b *Broker) begin(ctx context.Context, s *running, c Call, t *tool) (early Result, ok bool) {
	s.b, s.start = b, time.Now()
	ctx, s.span = telemetry.Tracer().Start(telemetry.Extract(ctx, c.TraceContext), "execute_tool",
		trace.WithSpanKind(trace.SpanKindServer), trace.WithAttributes(
			attribute.String("gen_ai.operation.name", "execute_tool"),
			attribute.String("gen_ai.tool.name", c.ToolName),
			attribute.String("gen_ai.tool.call.id", c.CallID),
			attribute.String("task.id", c.TaskID),
			attribute.String("session.id", c.SessionID)))
	s.ctx = ctx
	s.res = &dispatchv1.ToolCallResult{ToolName: c.ToolName, CallId: c.CallID}
	if t == nil {
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL, "unknown tool", ""), false
	}
	var err error
	if t.anyObject {
		// Nothing to validate but that the arguments are an object:
		// checked without decoding them (a provider gets the text anyway).
		err = checkObject(c.ArgumentsJSON)
	} else {
		s.args, err = parseArguments(c.ArgumentsJSON)
	}
	if err != nil {
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS, err.Error(), ""), false
	}
	if t.schema != nil && !t.anyObject {
		if err := t.schema.Validate(s.args); err != nil {
			return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS, "arguments do not match the tool's schema: "+schemaError(err), ""), false
		}
	}
	s.span.SetName("execute_tool " + c.ToolName) // a known name: bounded
	s.t = t
	// A stop that came first wins: the call must not start.
	if ctx.Err() != nil {
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED, "session stopped", t.executor()), false
	}
	return Result{}, true
}

// done ends the call's span and returns its result.
func (s *running) done(executor string) Result {
	s.span.SetAttributes(attribute.String("tool.executor", executor))
	if e := s.res.GetError(); e != nil {
		s.span.SetAttributes(attribute.String("error.type", e.GetCode().String()))
		s.span.SetStatus(codes.Error, e.GetMessage())
	}
	s.span.End()
	return Result{Result: s.res, Executor: executor, Duration: time.Since(s.start)}
}

func (s *running) fail(code dispatchv1.ToolErrorCode, msg, executor string) Result {
	s.res.ResultJson = ""
	s.res.Error = &dispatchv1.ToolError{Code: code, Message: truncate(msg)}
	return s.done(executor)
}

// finish turns an executor's outcome into the call's result. ctx is the
// caller's context, cctx the one the executor ran under (with its timeout).
func (s *running) finish(ctx, cctx context.Context, out string, err error) Result {
	t := s.t
	executor := t.executor()
	if err == nil && len(out) > s.b.opts.MaxResultBytes {
		// A built-in's result (echo of large arguments) is bounded like a
		// provider's, so the packet and event it becomes fit the limit.
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED,
			fmt.Sprintf("result of %d bytes exceeds the limit of %d bytes", len(out), s.b.opts.MaxResultBytes), executor)
	}
	if err == nil {
		s.res.ResultJson = out
		return s.done(executor)
	}
	var te *toolError
	switch {
	case errors.As(err, &te):
		return s.fail(te.code, te.msg, executor)
	case ctx.Err() != nil:
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED, "session stopped", executor)
	case errors.Is(err, context.DeadlineExceeded) || cctx.Err() != nil:
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT, fmt.Sprintf("no result within %s", t.timeout), executor)
	case errors.Is(err, errProviderGone):
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE, "tool provider disconnected", executor)
	default:
		return s.fail(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED, err.Error(), executor)
	}
}

// Instant reports whether name is a built-in tool that does a small,
// bounded amount of work and never waits (echo): a session may
// run its calls on the goroutine that received them, without a goroutine
// of their own. Built-ins are never replaced (a provider cannot declare
// their names), so the answer holds for the call that follows.
func (b *Broker) Instant(name string) bool {
	b.mu.RLock()
	t := b.tools[name]
	b.mu.RUnlock()
	return t != nil && t.instant
}

func (b *Broker) newInvocationID() string {
	return "inv-" + strconv.FormatUint(b.nextInvocation.Add(1), 10)
}

// toolError is a failure with a specific code, returned by executors.
type toolError struct {
	code dispatchv1.ToolErrorCode
	msg  string
}

// Error returns the message meant for the planner.
func (e *toolError) Error() string { return e.msg }

func invalidArgs(format string, a ...any) error {
	return &toolError{code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS, msg: fmt.Sprintf(format, a...)}
}

func execFailed(format string, a ...any) error {
	return &toolError{code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED, msg: fmt.Sprintf(format, a...)}
}

// truncate bounds texts that go back to planners and clients, on a
// character boundary: the text is sent to the commander and stored, and
// protobuf refuses a string that is not UTF-8 (a cut through a Chinese file
// name tore the commander's stream down).
func truncate(s string) string {
	return textcut.Shorten(s, maxErrorText)
}

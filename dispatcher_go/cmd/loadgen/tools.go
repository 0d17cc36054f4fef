package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
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
func startProvider(ctx context.Context, conn *grpc.ClientConn, idempotent bool) (*provider, error) {
	stream, err := dispatchv1.NewToolProviderServiceClient(conn).Connect(ctx)
	if err != nil {
		return nil, fmt.Errorf("tool provider: Connect: %w", err)
	}
	err = stream.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: fmt.Sprintf("loadgen-%d", os.Getpid()),
		Tools: []*dispatchv1.ToolSpec{{
			Name: remoteTool, Description: "loadgen: returns its arguments at once",
			ParametersJsonSchema: `{"type":"object"}`,
			Idempotent:           idempotent,
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
	params["provider_idempotent"] = o.providerIdempotent
	if o.rate > 0 {
		params["arrivals"] = o.arrivals
	}
	res := newResult("tools", params)

	provConns, err := dialN(o, e, 1, o.token, true)
	if err != nil {
		return nil, err
	}
	defer closeAll(provConns)
	provCtx, stopProvider := context.WithCancel(ctx)
	defer stopProvider()
	prov, err := startProvider(provCtx, provConns[0], o.providerIdempotent)
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
	// The dispatcher's CPU time over the window, per call.
	cpuAt := func() time.Duration {
		if o.dispatcherPID == 0 {
			return 0
		}
		d, _ := benchkit.CPUTime(o.dispatcherPID)
		return d
	}
	if err := sleepUntil(ctx, r.measureFrom); err != nil {
		return nil, err
	}
	cpuFrom := cpuAt()
	if err := sleepUntil(ctx, r.measureTo); err != nil {
		return nil, err
	}
	cpuUsed := cpuAt() - cpuFrom
	window := r.measureTo.Sub(r.measureFrom).Seconds()
	r.finish(ctx, res)
	calls := r.f.toolCalls.Load()
	res.latency("tool round trip: echo (builtin)", r.f.toolRTT["echo"].Summary())
	res.latency("tool round trip: "+remoteTool+" (provider)", r.f.toolRTT[remoteTool].Summary())
	res.value("tool calls", float64(calls)/window, "/s")
	if o.dispatcherPID > 0 && calls > 0 {
		res.value("dispatcher CPU per call", float64(cpuUsed.Microseconds())/float64(calls), "µs")
	}
	if p50, p99 := sameMillisecond(r.f.toolStarts, int(window*1000)); calls > 0 {
		res.value("calls sent in the same ms as a call, p50", p50, "")
		res.value("calls sent in the same ms as a call, p99", p99, "")
	}
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

// sameMillisecond says how bursty the calls were: for a call sent in the
// window, how many calls (itself included) were sent in the same
// millisecond; p50 and p99 over the calls. starts counts the calls sent in
// each millisecond; only the first ms of them are the window's.
func sameMillisecond(starts []atomic.Int32, ms int) (p50, p99 float64) {
	var byCount []int64 // byCount[c]: calls sent in a millisecond with c calls
	var total int64
	for i := range min(ms, len(starts)) {
		c := int(starts[i].Load())
		if c == 0 {
			continue
		}
		for len(byCount) <= c {
			byCount = append(byCount, 0)
		}
		byCount[c] += int64(c)
		total += int64(c)
	}
	quantile := func(q float64) float64 {
		need := int64(math.Ceil(q * float64(total)))
		var seen int64
		for c, n := range byCount {
			seen += n
			if n > 0 && seen >= need {
				return float64(c)
			}
		}
		return 0
	}
	return quantile(0.5), quantile(0.99)
}

// connTrace (LOADGEN_CONN_TRACE=FILE, benchmarks only) follows each tool
// call's marker through loadgen's sockets (benchkit.ConnTrace); with it, a
// call's arguments carry the marker its toolTrace line names.
var connTrace = benchkit.OpenConnTrace("LOADGEN_CONN_TRACE")

// callMarks numbers the markers of traced calls.
var callMarks atomic.Int64

// The commander's side of the tool trace (the dispatcher's is
// DISPATCHER_TOOL_TRACE, internal/session/tooltrace.go), for benchmarks
// only: with LOADGEN_TOOL_TRACE=FILE every measured call appends
//
//	session call tool sent received got
//
// in Unix nanoseconds: the call handed to Send, its result returned by Recv
// (the receiving goroutine), and taken by the session's goroutine.
var toolTrace = func() *toolTracer {
	if f := benchkit.OpenTrace("LOADGEN_TOOL_TRACE"); f != nil {
		return &toolTracer{f: f}
	}
	return nil
}()

type toolTracer struct {
	f    *benchkit.TraceFile
	recv sync.Map // *DownstreamPacket → Unix ns of its Recv
}

// received notes when the receiving goroutine got p.
func (t *toolTracer) received(p *dispatchv1.DownstreamPacket, at time.Time) {
	if t != nil && p.GetToolResult() != nil {
		t.recv.Store(p, at.UnixNano())
	}
}

// call writes one call's line.
// mark is " ~T<n>~" when the call carried a marker (connTrace), else "".
func (t *toolTracer) call(p *dispatchv1.DownstreamPacket, sid, tool string, sent time.Time, mark string) {
	if t == nil {
		return
	}
	got := time.Now().UnixNano()
	var recv int64
	if v, ok := t.recv.LoadAndDelete(p); ok {
		recv = v.(int64)
	}
	t.f.Printf("%s %s %s %d %d %d%s\n", sid, p.GetToolResult().GetCallId(), tool, sent.UnixNano(), recv, got, mark)
}

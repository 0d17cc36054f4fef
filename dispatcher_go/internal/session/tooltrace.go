package session

import (
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// The tool round trip's legs, for benchmarks only: with
// DISPATCHER_TOOL_TRACE=FILE in the environment every tool result pushed
// by the tool path is followed to its Send, and one line per call is
// appended to FILE (flushed every second):
//
//	session call emitted_us received dispatched resulted pushed taken sent
//
// emitted_us is the commander's timestamp of the call packet (µs); the rest
// are Unix nanoseconds on the dispatcher: received (toolCall entered),
// dispatched (the call ran, for an instant built-in, or was queued to its
// provider), resulted (the result was in), pushed (into the outbox), taken
// (by the sender), sent (Send returned). cmd/loadgen's LOADGEN_TOOL_TRACE writes
// the commander's side of the same calls; scripts/tool_legs.py joins the
// two and prints the legs. The first line is "# start NS",
// the process's start. Off, it costs a nil test per call, per take and per
// Send.
var toolTrace = func() *toolTracer {
	f := benchkit.OpenTrace("DISPATCHER_TOOL_TRACE")
	if f == nil {
		return nil
	}
	// The process's start, near enough (package init), to place
	// GODEBUG=gctrace=1's "@seconds" lines on the same clock.
	f.Printf("# start %d\n", time.Now().UnixNano())
	return &toolTracer{f: f, recs: make(map[*dispatchv1.DownstreamPacket]*toolRec)}
}()

type toolTracer struct {
	f    *benchkit.TraceFile
	mu   sync.Mutex // recs
	recs map[*dispatchv1.DownstreamPacket]*toolRec
}

type toolRec struct {
	session, call                                 string
	emitted                                       int64
	received, dispatched, resulted, pushed, taken int64
}

// toolStamp is a trace timestamp (0 when tracing is off).
func toolStamp() int64 {
	if toolTrace == nil {
		return 0
	}
	return time.Now().UnixNano()
}

// pushing registers p, a tool result about to be pushed.
func (t *toolTracer) pushing(p *dispatchv1.DownstreamPacket, emitted, received, dispatched, resulted int64) {
	if t == nil {
		return
	}
	rec := &toolRec{
		session: p.GetSessionId(), call: p.GetToolResult().GetCallId(), emitted: emitted,
		received: received, dispatched: dispatched, resulted: resulted, pushed: time.Now().UnixNano(),
	}
	t.mu.Lock()
	t.recs[p] = rec
	t.mu.Unlock()
}

// took notes that the sender took p.
func (t *toolTracer) took(p *dispatchv1.DownstreamPacket) {
	if t == nil || p.GetToolResult() == nil {
		return
	}
	now := time.Now().UnixNano()
	t.mu.Lock()
	if rec := t.recs[p]; rec != nil {
		rec.taken = now
	}
	t.mu.Unlock()
}

// sent writes p's line once its Send returned.
func (t *toolTracer) sent(p *dispatchv1.DownstreamPacket) {
	if t == nil || p.GetToolResult() == nil {
		return
	}
	now := time.Now().UnixNano()
	t.mu.Lock()
	rec := t.recs[p]
	delete(t.recs, p)
	t.mu.Unlock()
	if rec != nil {
		t.f.Printf("%s %s %d %d %d %d %d %d %d\n", rec.session, rec.call, rec.emitted,
			rec.received, rec.dispatched, rec.resulted, rec.pushed, rec.taken, now)
	}
}

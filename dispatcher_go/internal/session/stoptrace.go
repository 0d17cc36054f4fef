package session

import (
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
)

// The stop's legs on the dispatcher, for benchmarks only: with
// DISPATCHER_STOP_TRACE=FILE in the environment every stop decided and
// acknowledged appends one line to FILE (flushed every second):
//
//	session decided fenced queued taken sent received recorded
//
// all Unix nanoseconds on the dispatcher: decided (stopWith entered, the
// stop event is stamped within µs), fenced (the fence event appended; the
// task's record with the stop is queued later, after setStop), queued
// (the session's context cancelled, just before setStop puts the stop in
// the outbox's stop lane: queued → taken includes setStop), taken (by the
// sender), sent (its Send returned: in grpc's control buffer, not yet on
// the wire), received (the commander's stopped handled, the time the
// event is recorded with), recorded (appended to the task's log).
// cmd/loadgen's LOADGEN_STOP_TRACE writes the commander's side of the same
// stops; scripts/stop_legs.py joins the two. A stop that gets no stopped
// (withdrawn before it went out, grace expired, stream lost) writes no
// line: its entry is dropped when the session ends (forget).
// Every second a "# sched" line gives the Go scheduler's latencies
// (benchkit.TraceFile.SchedEvery). Off, it costs a nil test at each point.
var stopTrace = func() *stopTracer {
	f := benchkit.OpenTrace("DISPATCHER_STOP_TRACE")
	if f == nil {
		return nil
	}
	f.SchedEvery(time.Second)
	return &stopTracer{f: f, recs: make(map[string]*stopRec)}
}()

type stopTracer struct {
	f    *benchkit.TraceFile
	mu   sync.Mutex // recs
	recs map[string]*stopRec
}

type stopRec struct {
	decided, fenced, queued, taken, sent int64
}

// stopStamp is a trace timestamp (0 when tracing is off).
func stopStamp() int64 {
	if stopTrace == nil {
		return 0
	}
	return time.Now().UnixNano()
}

// decided registers session sid's stop, decided at decided and fenced at
// fenced; now is its queued stamp (setStop comes next).
func (t *stopTracer) decided(sid string, decided, fenced int64) {
	if t == nil {
		return
	}
	now := time.Now().UnixNano()
	t.mu.Lock()
	t.recs[sid] = &stopRec{decided: decided, fenced: fenced, queued: now}
	t.mu.Unlock()
}

// took notes that the sender took sid's stop (sent: false) or that its
// Send returned (sent: true).
func (t *stopTracer) took(sid string, sent bool) {
	if t == nil {
		return
	}
	now := time.Now().UnixNano()
	t.mu.Lock()
	if rec := t.recs[sid]; rec != nil {
		if sent {
			rec.sent = now
		} else {
			rec.taken = now
		}
	}
	t.mu.Unlock()
}

// stopped writes sid's line: its stopped was received at received and
// recorded now.
func (t *stopTracer) stopped(sid string, received time.Time) {
	if t == nil {
		return
	}
	now := time.Now().UnixNano()
	t.mu.Lock()
	rec := t.recs[sid]
	delete(t.recs, sid)
	t.mu.Unlock()
	if rec != nil {
		t.f.Printf("%s %d %d %d %d %d %d %d\n", sid, rec.decided, rec.fenced, rec.queued, rec.taken, rec.sent,
			received.UnixNano(), now)
	}
}

// forget drops sid's entry, if any: called when the session ends, so that a
// stop that never got its stopped does not stay in the map.
func (t *stopTracer) forget(sid string) {
	if t == nil {
		return
	}
	t.mu.Lock()
	delete(t.recs, sid)
	t.mu.Unlock()
}

// pending is the number of stops waiting for their stopped (tests).
func (t *stopTracer) pending() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.recs)
}

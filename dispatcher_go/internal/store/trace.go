package store

import (
	"fmt"
	"os"
	"runtime/metrics"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
)

// The writer's latency trace, for benchmarks only: with
// DISPATCHER_STORE_TRACE=1 in the environment the Writer times the legs of
// each event's way to durability (queued → taken into a write → written →
// its log told) and, through eventlog.TraceWakes, commit → the reader's
// wake-up, and prints their percentiles to stderr every 5 s with the Go
// scheduler's latency and GC pauses of the same window. Off, it costs one
// bool test per Persist and per write.
var traceOn = os.Getenv("DISPATCHER_STORE_TRACE") == "1"

// traceMax bounds the samples kept per leg between two reports.
const traceMax = 1 << 20

type tracer struct {
	mu     sync.Mutex
	queued []time.Duration // Persist → taken into a write
	write  []time.Duration // taken → Apply returned (per event)
	tell   []time.Duration // Apply returned → its log's Commit returned (per event)
	apply  []time.Duration // per write: Apply
	sizes  []int           // per write: events
	slept  []time.Duration // per write: the Interval wait
	// per pacing timer that fired: the wait asked for, and how late it
	// fired (a Go timer under 1 ms fires ~1 ms late while the process is
	// idle: the runtime's epoll_wait timeout is whole milliseconds,
	// rounded up)
	paceWant, paceLate []time.Duration
	wakeup             []time.Duration // the first record's wake-up sent → the Writer running
	// per write, of Apply's wall time: on the CPU, waiting for one
	// (run queue), and the rest (blocked: I/O, locks)
	applyCPU, applyRunq, applyBlocked []time.Duration
	writes                            int
	unpaced                           int // writes that did not wait their turn in the pacer (PaceFrom)
	started                           time.Time
	last                              *metrics.Float64Histogram // sched latencies at the last report
	lastGC                            *metrics.Float64Histogram
}

var trace = func() *tracer {
	if !traceOn {
		return nil
	}
	eventlog.TraceWakes(true)
	t := &tracer{started: time.Now()}
	go t.loop()
	return t
}()

func (t *tracer) add(dst *[]time.Duration, d time.Duration) {
	if len(*dst) < traceMax {
		*dst = append(*dst, d)
	}
}

func (t *tracer) loop() {
	for range time.Tick(5 * time.Second) {
		t.report()
	}
}

func pcts(d []time.Duration) string {
	if len(d) == 0 {
		return "n=0"
	}
	slices.Sort(d)
	p := func(q float64) string {
		return fmt.Sprintf("%.3f", float64(d[min(len(d)-1, int(float64(len(d))*q))].Microseconds())/1e3)
	}
	return fmt.Sprintf("n=%d p50=%s p90=%s p99=%s p999=%s max=%s ms", len(d), p(.5), p(.9), p(.99), p(.999), p(1))
}

// histDelta prints the percentiles of the difference of two runtime
// histograms (the window's samples).
func histDelta(now, before *metrics.Float64Histogram) string {
	counts := slices.Clone(now.Counts)
	if before != nil && len(before.Counts) == len(counts) {
		for i := range counts {
			counts[i] -= before.Counts[i]
		}
	}
	var n uint64
	for _, c := range counts {
		n += c
	}
	if n == 0 {
		return "n=0"
	}
	q := func(f float64) string {
		want := uint64(float64(n) * f)
		var acc uint64
		for i, c := range counts {
			acc += c
			if acc > want {
				return fmt.Sprintf("%.3f", now.Buckets[i+1]*1e3)
			}
		}
		return "inf"
	}
	return fmt.Sprintf("n=%d p50<%s p99<%s p999<%s max<%s ms", n, q(.5), q(.99), q(.999), q(.99999))
}

func (t *tracer) report() {
	t.mu.Lock()
	queued, write, tell, apply, sizes, slept, writes, unpaced := t.queued, t.write, t.tell, t.apply, t.sizes, t.slept, t.writes, t.unpaced
	t.queued, t.write, t.tell, t.apply, t.sizes, t.slept, t.writes, t.unpaced = nil, nil, nil, nil, nil, nil, 0, 0
	acpu, arunq, ablk := t.applyCPU, t.applyRunq, t.applyBlocked
	t.applyCPU, t.applyRunq, t.applyBlocked = nil, nil, nil
	pwant, plate, wakeup := t.paceWant, t.paceLate, t.wakeup
	t.paceWant, t.paceLate, t.wakeup = nil, nil, nil
	t.mu.Unlock()
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}, {Name: "/gc/pauses:seconds"}}
	metrics.Read(s)
	sched, gc := s[0].Value.Float64Histogram(), s[1].Value.Float64Histogram()
	var b strings.Builder
	fmt.Fprintf(&b, "store trace: %d writes (%d of them not paced)\n", writes, unpaced)
	fmt.Fprintf(&b, "  queued (persist→taken) %s\n", pcts(queued))
	fmt.Fprintf(&b, "  write  (taken→applied) %s\n", pcts(write))
	fmt.Fprintf(&b, "  tell   (applied→commit) %s\n", pcts(tell))
	fmt.Fprintf(&b, "  wake   (commit→read)   %s\n", pcts(eventlog.TraceWakeSamples()))
	fmt.Fprintf(&b, "  apply per write        %s\n", pcts(apply))
	fmt.Fprintf(&b, "    of which on CPU      %s\n", pcts(acpu))
	fmt.Fprintf(&b, "    of which run queue   %s\n", pcts(arunq))
	fmt.Fprintf(&b, "    of which blocked     %s\n", pcts(ablk))
	fmt.Fprintf(&b, "  slept per write        %s\n", pcts(slept))
	fmt.Fprintf(&b, "  pace timer asked       %s\n", pcts(pwant))
	fmt.Fprintf(&b, "  pace timer late by     %s\n", pcts(plate))
	fmt.Fprintf(&b, "  writer wake-up         %s\n", pcts(wakeup))
	sz := make([]time.Duration, len(sizes)) // reuse pcts: sizes as "µs"
	for i, n := range sizes {
		sz[i] = time.Duration(n) * time.Microsecond
	}
	fmt.Fprintf(&b, "  batch size (events, as µs) %s\n", pcts(sz))
	fmt.Fprintf(&b, "  sched latency %s\n", histDelta(sched, t.last))
	fmt.Fprintf(&b, "  gc pauses     %s\n", histDelta(gc, t.lastGC))
	t.last, t.lastGC = sched, gc
	fmt.Fprint(os.Stderr, b.String())
}

// traceBase is the origin of pendingEvent.at.
var traceBase = time.Now()

// threadStat is the calling thread's CPU time and run-queue wait
// (/proc/thread-self/schedstat); the Writer's goroutine is locked to its
// thread while tracing.
func threadStat() (cpu, runq time.Duration) {
	b, err := os.ReadFile("/proc/thread-self/schedstat")
	if err != nil {
		return 0, 0
	}
	var c, r int64
	fmt.Sscan(string(b), &c, &r)
	return time.Duration(c), time.Duration(r)
}

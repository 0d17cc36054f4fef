package eventlog

import (
	"sync"
	"sync/atomic"
	"time"
)

// The wake-up trace, for benchmarks only (store's DISPATCHER_STORE_TRACE
// turns it on): how long a reader waiting in Read took to run again after
// Commit woke it.
var (
	traceWakes atomic.Bool
	traceBase  = time.Now()
	wakeMu     sync.Mutex
	wakes      []time.Duration
)

// TraceWakes turns the wake-up trace on or off.
func TraceWakes(on bool) { traceWakes.Store(on) }

// TraceWakeSamples returns the samples since the last call and forgets them.
func TraceWakeSamples() []time.Duration {
	wakeMu.Lock()
	defer wakeMu.Unlock()
	w := wakes
	wakes = nil
	return w
}

func traceWake(committedAt time.Duration) {
	d := time.Since(traceBase) - committedAt
	wakeMu.Lock()
	if len(wakes) < 1<<20 {
		wakes = append(wakes, d)
	}
	wakeMu.Unlock()
}

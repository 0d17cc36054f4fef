package benchkit

import (
	"bufio"
	"fmt"
	"math"
	"os"
	"runtime/metrics"
	"slices"
	"sync"
	"time"
)

// TraceFile is a benchmark trace: lines appended to the file named by an
// environment variable and flushed every second. OpenTrace returns nil
// when the variable is unset (or the file cannot be opened, which it
// reports on stderr); a nil *TraceFile's Printf does nothing, so tracing
// off costs a nil test.
type TraceFile struct {
	mu sync.Mutex
	w  *bufio.Writer
}

// OpenTrace opens the trace named by the environment variable env.
func OpenTrace(env string) *TraceFile {
	path := os.Getenv(env)
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", env, err)
		return nil
	}
	t := &TraceFile{w: bufio.NewWriter(f)}
	go func() { // for the process's life: a trace is for benchmark runs only
		for range time.Tick(time.Second) {
			t.mu.Lock()
			_ = t.w.Flush()
			t.mu.Unlock()
		}
	}()
	return t
}

// Printf appends a line (format should end with a newline).
func (t *TraceFile) Printf(format string, args ...any) {
	if t == nil {
		return
	}
	t.mu.Lock()
	fmt.Fprintf(t.w, format, args...)
	t.mu.Unlock()
}

// SchedEvery appends, every interval for the process's life, a line
//
//	# sched N P50 P99 P999 MAX
//
// with the Go scheduler's latencies (runtime/metrics
// /sched/latencies:seconds: a goroutine runnable → running) of that
// interval: N samples, the rest bucket upper bounds in ns. The runtime
// samples a fraction of the transitions; the quantiles are its histogram's.
func (t *TraceFile) SchedEvery(interval time.Duration) {
	if t == nil {
		return
	}
	go func() {
		s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
		var last []uint64
		for range time.Tick(interval) {
			metrics.Read(s)
			h := s[0].Value.Float64Histogram()
			counts := slices.Clone(h.Counts)
			if len(last) == len(counts) {
				for i := range counts {
					counts[i] -= last[i]
				}
			}
			last = slices.Clone(h.Counts)
			var n uint64
			for _, c := range counts {
				n += c
			}
			if n == 0 {
				continue
			}
			q := func(f float64) int64 {
				want, acc := uint64(float64(n)*f), uint64(0)
				for i, c := range counts {
					acc += c
					if acc > want || (f == 1 && acc == n) {
						if b := h.Buckets[i+1]; !math.IsInf(b, 1) {
							return int64(b * 1e9)
						}
						return int64(h.Buckets[i] * 1e9)
					}
				}
				return -1
			}
			t.Printf("# sched %d %d %d %d %d\n", n, q(.5), q(.99), q(.999), q(1))
		}
	}()
}

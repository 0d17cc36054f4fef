package benchkit

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// DefaultMaxSamples bounds the memory of a Recorder: past it, samples are
// kept by reservoir sampling, so percentiles stay unbiased while memory stays
// fixed however long a benchmark runs.
const DefaultMaxSamples = 1 << 20

// Recorder collects durations from any number of goroutines.
type Recorder struct {
	mu      sync.Mutex
	max     int
	samples []time.Duration
	seen    int64
	rng     *rand.Rand
	total   time.Duration
	min     time.Duration
	maxSeen time.Duration
}

// NewRecorder returns a Recorder that keeps at most maxSamples samples
// (DefaultMaxSamples when maxSamples <= 0). Count, mean, min and max are exact
// regardless; percentiles come from the kept samples.
func NewRecorder(maxSamples int) *Recorder {
	if maxSamples <= 0 {
		maxSamples = DefaultMaxSamples
	}
	return &Recorder{max: maxSamples, rng: rand.New(rand.NewPCG(1, 2))}
}

// Add records one sample.
func (r *Recorder) Add(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen++
	r.total += d
	if r.seen == 1 || d < r.min {
		r.min = d
	}
	if d > r.maxSeen {
		r.maxSeen = d
	}
	if len(r.samples) < r.max {
		r.samples = append(r.samples, d)
		return
	}
	// Algorithm R: the i-th sample replaces a kept one with probability max/i.
	if j := r.rng.Int64N(r.seen); j < int64(r.max) {
		r.samples[j] = d
	}
}

// Summary computes the percentiles of what was recorded so far.
func (r *Recorder) Summary() Summary {
	r.mu.Lock()
	kept := slices.Clone(r.samples)
	s := Summary{N: r.seen}
	if r.seen > 0 {
		s.Min, s.Max = r.min, r.maxSeen
		s.Mean = time.Duration(int64(r.total) / r.seen)
	}
	r.mu.Unlock()
	slices.Sort(kept)
	s.P50 = Percentile(kept, 50)
	s.P90 = Percentile(kept, 90)
	s.P99 = Percentile(kept, 99)
	return s
}

// Percentile returns the p-th percentile (0..100) of sorted by the
// nearest-rank method: the smallest sample such that at least p% of the
// samples are at or below it. It returns 0 for no samples.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	n := len(sorted)
	if n == 0 {
		return 0
	}
	rank := int(math.Ceil(p / 100 * float64(n)))
	return sorted[min(max(rank, 1), n)-1]
}

// Summary is the shape every latency is reported in.
type Summary struct {
	N    int64
	Min  time.Duration
	Mean time.Duration
	P50  time.Duration
	P90  time.Duration
	P99  time.Duration
	Max  time.Duration
}

// String renders the summary on one line, in milliseconds.
func (s Summary) String() string {
	if s.N == 0 {
		return "n=0"
	}
	return fmt.Sprintf("n=%d p50=%s p90=%s p99=%s max=%s mean=%s",
		s.N, Millis(s.P50), Millis(s.P90), Millis(s.P99), Millis(s.Max), Millis(s.Mean))
}

// JSON is the summary as a map of milliseconds, for machine-readable output.
func (s Summary) JSON() map[string]any {
	ms := func(d time.Duration) float64 { return math.Round(float64(d)/1e3) / 1e3 }
	return map[string]any{
		"n": s.N, "min_ms": ms(s.Min), "mean_ms": ms(s.Mean),
		"p50_ms": ms(s.P50), "p90_ms": ms(s.P90), "p99_ms": ms(s.P99), "max_ms": ms(s.Max),
	}
}

// Millis formats d in milliseconds with a precision that suits its size.
func Millis(d time.Duration) string {
	ms := float64(d) / float64(time.Millisecond)
	switch {
	case ms < 1:
		return fmt.Sprintf("%.3fms", ms)
	case ms < 100:
		return fmt.Sprintf("%.2fms", ms)
	default:
		return fmt.Sprintf("%.0fms", ms)
	}
}

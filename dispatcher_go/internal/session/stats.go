package session

import (
	"sync/atomic"
	"time"
)

// latencyBounds are the upper bounds of the stop-latency histogram buckets,
// chosen around the expected range (a local commander acks in milliseconds;
// the grace is 2 s). The last bucket is unbounded. internal/metrics exports
// the histogram with these buckets.
var latencyBounds = []time.Duration{
	time.Millisecond, 2 * time.Millisecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second,
}

// Histogram is a fixed-bucket, lock-free latency histogram.
type Histogram struct {
	counts [13]atomic.Int64 // len(latencyBounds)+1
	sum    atomic.Int64     // nanoseconds
	n      atomic.Int64
}

// Observe records one duration.
func (h *Histogram) Observe(d time.Duration) {
	i := 0
	for i < len(latencyBounds) && d > latencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
	h.n.Add(1)
}

// HistogramSnapshot is a point-in-time copy of a Histogram.
type HistogramSnapshot struct {
	// Bounds are the buckets' upper bounds; Counts has one more entry, for
	// durations above the last bound.
	Bounds []time.Duration
	Counts []int64
	Count  int64
	Sum    time.Duration
}

// Snapshot copies the histogram.
func (h *Histogram) Snapshot() HistogramSnapshot {
	s := HistogramSnapshot{Bounds: latencyBounds, Counts: make([]int64, len(h.counts))}
	for i := range h.counts {
		s.Counts[i] = h.counts[i].Load()
	}
	s.Count = h.n.Load()
	s.Sum = time.Duration(h.sum.Load())
	return s
}

// Quantile estimates the q-quantile (0..1) as the upper bound of the bucket
// it falls in; the open last bucket reports the last bound.
func (s HistogramSnapshot) Quantile(q float64) time.Duration {
	if s.Count == 0 {
		return 0
	}
	rank := int64(q*float64(s.Count) + 0.5)
	rank = max(rank, 1)
	var seen int64
	for i, c := range s.Counts {
		seen += c
		if seen >= rank {
			if i < len(s.Bounds) {
				return s.Bounds[i]
			}
			break
		}
	}
	return s.Bounds[len(s.Bounds)-1]
}

// Stats counts what the sessions did; safe for concurrent use. internal/metrics
// exports it to Prometheus at scrape time.
type Stats struct {
	// StopsDecided counts stop decisions (cancel, deadline, budget, shutdown).
	StopsDecided atomic.Int64
	// StopsAcked counts sessions that ended by a commander packet after a stop.
	StopsAcked atomic.Int64
	// StopsAborted counts streams ended because no stopped came within the grace.
	StopsAborted atomic.Int64
	// DroppedAfterStop counts planner output (thought, content, stage,
	// artifact, error) received after a stop decision and not forwarded.
	DroppedAfterStop atomic.Int64
	// DeniedAfterStop counts tool calls refused because their session was stopped.
	DeniedAfterStop atomic.Int64
	// StopLatency is the time from the stop decision to the stopped ack.
	StopLatency Histogram
	// Slots is the number of connected slots.
	Slots atomic.Int64
	// Resent counts upstream packets dropped because their seq was
	// recorded already (resent after a hand-over).
	Resent atomic.Int64
	// AcksSent counts cumulative acks (ACK_KIND_RECORDED) queued.
	AcksSent atomic.Int64
	// Detached counts sessions detached by a drain for a hand-over.
	Detached atomic.Int64
	// UpstreamBatches counts UpstreamBatch messages handled (their packets
	// are handled as packets).
	UpstreamBatches atomic.Int64
}

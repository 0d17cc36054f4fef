package fleet

import (
	"context"
	"log/slog"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// legStatsEnv turns on the fleet's leg timings: with
// DISPATCHER_FLEET_LEG_STATS=1 a replica logs, every 10 s, p50/p90/p99/max
// of where the time of its share of the relay and the stop goes (see the
// leg names below). Off, recording a sample is one atomic-free nil check.
const legStatsEnv = "DISPATCHER_FLEET_LEG_STATS"

// The legs timed.
const (
	legQueued      = "recorded_to_write"           // a write's first event: its time (stamped when recorded) → the fenced write begins (the session's and the store writer's queues)
	legQueuedEv    = "recorded_to_write_per_event" // as recorded_to_write, for every event of the write
	legBatchEvents = "events_per_write"            // not a time: the events of one fenced write, logged as ms (1 ms = 1 event)
	legApply       = "pg_apply"                    // the fenced write: one batch to PostgreSQL and its commit
	legPublish     = "publish"                     // a stored batch handed to the publisher → its XADDs answered
	legHub         = "recorded_to_hub"             // an event's time (stamped by the replica that recorded it) → decoded by this replica's tail hub
	legXread       = "xadd_to_hub_read"            // the publisher sent the XADDs (its clock, in the entry's "t" field while leg stats are on) → this replica's hub XREAD returned them
	legReader      = "hub_to_reader"               // the hub delivered an event → a watcher's Read returns it
	legToXadd      = "recorded_to_xadd"            // an event's time → the publisher (on the replica that recorded it) sent its XADD (timed by the hub that reads it, from the entry's "t")
	legCancel      = "cancel_to_sent"              // Fleet.Cancel called (on a replica not running the task) → command row written and published
	legCommand     = "cmd_recv_to_ok"              // a command received on the channel → carried out (a cancel: the stop sent to the session)
)

// legSamples bounds each leg's samples between two reports.
const legSamples = 8192

// legStats keeps recent samples per leg; nil when off.
type legStats struct {
	mu   sync.Mutex
	legs map[string][]time.Duration
}

func newLegStats() *legStats {
	if os.Getenv(legStatsEnv) != "1" {
		return nil
	}
	return &legStats{legs: map[string][]time.Duration{}}
}

// add records one sample of leg (no-op when off or full).
func (s *legStats) add(leg string, d time.Duration) {
	if s == nil {
		return
	}
	s.mu.Lock()
	if xs := s.legs[leg]; len(xs) < legSamples {
		s.legs[leg] = append(xs, d)
	}
	s.mu.Unlock()
}

// run logs and resets the samples every 10 s, and how the PostgreSQL
// pools' connections were waited for (pools: name → pool).
func (s *legStats) run(ctx context.Context, log *slog.Logger, pools map[string]*pgxpool.Pool) {
	if s == nil {
		return
	}
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	type poolStat struct {
		acquires, empty int64
		wait            time.Duration
	}
	last := map[string]poolStat{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for name, p := range pools {
			st := p.Stat()
			now := poolStat{st.AcquireCount(), st.EmptyAcquireCount(), st.AcquireDuration()}
			was := last[name]
			last[name] = now
			n := now.acquires - was.acquires
			if n == 0 {
				continue
			}
			log.Info("fleet pool", "pool", name, "max_conns", st.MaxConns(), "acquires", n,
				"waited", now.empty-was.empty, "mean_acquire_ms", float64((now.wait-was.wait).Microseconds())/1000/float64(n))
		}
		s.mu.Lock()
		legs := s.legs
		s.legs = map[string][]time.Duration{}
		s.mu.Unlock()
		for leg, xs := range legs {
			slices.Sort(xs)
			q := func(p float64) float64 { return float64(xs[int(p*float64(len(xs)-1))].Microseconds()) / 1000 }
			log.Info("fleet leg", "leg", leg, "n", len(xs), "p50_ms", q(0.5), "p90_ms", q(0.9), "p99_ms", q(0.99), "max_ms", q(1))
		}
	}
}

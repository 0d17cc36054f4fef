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
	legLookup      = "lookup"                      // Fleet.Lookup: a task another replica runs read from PostgreSQL (the API's tenant check before a cancel, a watch)
	legAnnounce    = "cancel_to_announced"         // Fleet.Cancel called (on a replica not running the task) → its announcement's PUBLISH answered
	legCmdWire     = "announce_to_recv"            // a command's PUBLISH sent (the sender's clock, in the message while leg stats are on) → received by the owner's listener
	legStopAck     = "stop_to_stopped"             // the owner handed an announced cancel's stop to the session → the commander's stopped recorded (its event time)
	legStoppedDone = "stopped_to_stored"           // a stopped event's time (recorded) → its fenced write committed (then it is published to the other replicas' watchers)
)

// legMarks bounds the stops legStats remembers (stop_to_stopped).
const legMarks = 4096

// legSamples bounds each leg's samples between two reports.
const legSamples = 8192

// legStats keeps recent samples per leg; nil when off.
type legStats struct {
	mu   sync.Mutex
	legs map[string][]time.Duration
	// stops: task id → when its stop was handed to the session.
	stops map[string]time.Time
}

func newLegStats() *legStats {
	if os.Getenv(legStatsEnv) != "1" {
		return nil
	}
	return &legStats{legs: map[string][]time.Duration{}, stops: map[string]time.Time{}}
}

// stopHanded notes when task id's stop was handed to its session (the
// first time only).
func (s *legStats) stopHanded(id string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	if _, ok := s.stops[id]; !ok && len(s.stops) < legMarks {
		s.stops[id] = time.Now()
	}
	s.mu.Unlock()
}

// stopped records stop_to_stopped for task id's stopped event recorded at
// at, if its stop was noted.
func (s *legStats) stopped(id string, at time.Time) {
	if s == nil {
		return
	}
	s.mu.Lock()
	t, ok := s.stops[id]
	delete(s.stops, id)
	if xs := s.legs[legStopAck]; ok && len(xs) < legSamples {
		s.legs[legStopAck] = append(xs, at.Sub(t))
	}
	s.mu.Unlock()
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
		for id, t := range s.stops {
			if time.Since(t) > time.Minute {
				delete(s.stops, id) // a stop whose stopped never came
			}
		}
		s.mu.Unlock()
		for leg, xs := range legs {
			slices.Sort(xs)
			q := func(p float64) float64 { return float64(xs[int(p*float64(len(xs)-1))].Microseconds()) / 1000 }
			log.Info("fleet leg", "leg", leg, "n", len(xs), "p50_ms", q(0.5), "p90_ms", q(0.9), "p99_ms", q(0.99), "max_ms", q(1))
		}
	}
}

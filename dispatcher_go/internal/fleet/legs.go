package fleet

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"
)

// legStatsEnv turns on the fleet's leg timings: with
// DISPATCHER_FLEET_LEG_STATS=1 a replica logs, every 10 s, p50/p90/p99/max
// of where the time of its share of the relay and the stop goes (see the
// leg names below). Off, recording a sample is one atomic-free nil check.
const legStatsEnv = "DISPATCHER_FLEET_LEG_STATS"

// legDumpEnv, with leg stats on, names a directory: every sample, with
// its task id where it has one and when it ended, is also kept (up to
// legDumpMax) and written there as legs-<replica>.jsonl when the replica
// stops ([leg, task id, end µs since the epoch, duration µs] per line), to
// join one cancel's or one event's legs with a benchmark's own samples.
const legDumpEnv = "DISPATCHER_FLEET_LEG_DUMP"

// legDumpMax bounds the samples legDumpEnv keeps.
const legDumpMax = 1 << 20

// legSample is one sample kept for legDumpEnv.
type legSample struct {
	leg, id  string
	end, dur int64 // µs
}

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
	legStoppedDone = "stopped_to_stored"
	legRedisDial   = "redis_dial"         // a new Redis connection dialled (id: which client)
	legPgConn      = "pg_new_conns"       // not a time: new PostgreSQL connections in a report's window (1 ms = 1)
	legStored      = "recorded_to_stored" // an event's time → its fenced write committed (every event)           // a stopped event's time (recorded) → its fenced write committed (then it is published to the other replicas' watchers)
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
	// dumpDir, raw: legDumpEnv's directory and samples.
	dumpDir string
	raw     []legSample
}

func newLegStats() *legStats {
	if os.Getenv(legStatsEnv) != "1" {
		return nil
	}
	return &legStats{legs: map[string][]time.Duration{}, stops: map[string]time.Time{}, dumpDir: os.Getenv(legDumpEnv)}
}

// keepLocked keeps a sample for legDumpEnv.
func (s *legStats) keepLocked(leg, id string, d time.Duration) {
	if s.dumpDir != "" && len(s.raw) < legDumpMax {
		s.raw = append(s.raw, legSample{leg, id, time.Now().UnixMicro(), d.Microseconds()})
	}
}

// dump writes the samples kept for legDumpEnv.
func (s *legStats) dump(log *slog.Logger, replica string) {
	s.mu.Lock()
	raw := s.raw
	s.raw = nil
	s.mu.Unlock()
	if s.dumpDir == "" {
		return
	}
	var b []byte
	for _, x := range raw {
		line, _ := json.Marshal([]any{x.leg, x.id, x.end, x.dur})
		b = append(append(b, line...), '\n')
	}
	path := filepath.Join(s.dumpDir, "legs-"+replica+".jsonl")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		log.Warn("fleet legs not dumped", "path", path, "error", err)
	}
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
	if ok {
		s.keepLocked(legStopAck, id, at.Sub(t))
	}
	s.mu.Unlock()
}

// add records one sample of leg (no-op when off or full).
func (s *legStats) add(leg string, d time.Duration) { s.addID(leg, "", d) }

// addID is add for a sample of task id.
func (s *legStats) addID(leg, id string, d time.Duration) {
	if s == nil {
		return
	}
	s.mu.Lock()
	if xs := s.legs[leg]; len(xs) < legSamples {
		s.legs[leg] = append(xs, d)
	}
	s.keepLocked(leg, id, d)
	s.mu.Unlock()
}

// run logs and resets the samples every 10 s, and how the PostgreSQL
// pools' connections were waited for (pools: name → pool).
func (s *legStats) run(ctx context.Context, log *slog.Logger, replica string, pools map[string]*pgxpool.Pool) {
	if s == nil {
		return
	}
	defer s.dump(log, replica)
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	type poolStat struct {
		acquires, empty, conns int64
		wait                   time.Duration
	}
	last := map[string]poolStat{}
	// With legDumpEnv, the pools' acquires each second too (their waits
	// line up with the slow samples).
	var sec <-chan time.Time
	lastSec := map[string]poolStat{}
	if s.dumpDir != "" {
		ts := time.NewTicker(time.Second)
		defer ts.Stop()
		sec = ts.C
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-sec:
			for name, p := range pools {
				st := p.Stat()
				now := poolStat{st.AcquireCount(), st.EmptyAcquireCount(), st.NewConnsCount(), st.AcquireDuration()}
				was := lastSec[name]
				lastSec[name] = now
				s.mu.Lock()
				s.keepLocked("pool_acquires", name, time.Duration(now.acquires-was.acquires)*time.Microsecond)
				s.keepLocked("pool_waited", name, time.Duration(now.empty-was.empty)*time.Microsecond)
				s.keepLocked("pool_new_conns", name, time.Duration(now.conns-was.conns)*time.Microsecond)
				s.keepLocked("pool_wait_total", name, now.wait-was.wait)
				s.mu.Unlock()
			}
			continue
		case <-t.C:
		}
		for name, p := range pools {
			st := p.Stat()
			now := poolStat{st.AcquireCount(), st.EmptyAcquireCount(), st.NewConnsCount(), st.AcquireDuration()}
			was := last[name]
			last[name] = now
			n := now.acquires - was.acquires
			if n == 0 {
				continue
			}
			s.add(legPgConn, time.Duration(now.conns-was.conns)*time.Millisecond)
			log.Info("fleet pool", "pool", name, "max_conns", st.MaxConns(), "acquires", n, "new_conns", now.conns-was.conns,
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

// dialTimer is a go-redis hook that records each new connection's dial
// (leg redis_dial, its id the client's name) while leg stats are on: a
// burst that finds the pool without an idle connection pays for dials.
type dialTimer struct {
	s    *legStats
	name string
}

func (d dialTimer) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		began := time.Now()
		c, err := next(ctx, network, addr)
		d.s.addID(legRedisDial, d.name, time.Since(began))
		return c, err
	}
}

func (dialTimer) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (dialTimer) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

package store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

// streamOnce streams tasks×perTask content events through logs, one
// producer and one watcher per task (the watcher reads by cursor until the
// terminal event, as WatchTask does), and returns delivered events/s: the
// time until every watcher has read every event.
func streamOnce(tb testing.TB, logs eventlog.Store, tasks, perTask int) float64 {
	tb.Helper()
	run := fmt.Sprint(time.Now().UnixNano())
	var wg sync.WaitGroup
	start := time.Now()
	for i := range tasks {
		l, err := logs.Create(fmt.Sprintf("bench-%s-%d", run, i))
		if err != nil {
			tb.Fatal(err)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := range perTask {
				ev := &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "token " + fmt.Sprint(j) + " of a streamed answer"}}}
				if _, err := l.Append(ev, eventlog.Capped); err != nil {
					tb.Error(err)
					return
				}
			}
			_, _ = l.Seal(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{}}})
		}()
		go func() {
			defer wg.Done()
			buf := make([]*dispatchv1.TaskEvent, 0, 256)
			var after uint64
			for {
				evs, err := l.Read(context.Background(), after, buf)
				if len(evs) > 0 {
					after = evs[len(evs)-1].GetSeq()
				}
				if errors.Is(err, io.EOF) {
					if after != uint64(perTask+1) {
						tb.Errorf("watcher read %d events", after)
					}
					return
				}
				if err != nil {
					tb.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return float64(tasks*(perTask+1)) / time.Since(start).Seconds()
}

func pgBenchDSN(tb testing.TB) string {
	dsn := os.Getenv("POSTGRES_TEST_DSN")
	if dsn == "" {
		return ""
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close(ctx)
	schema := fmt.Sprintf("bench_%d", os.Getpid())
	if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE; CREATE SCHEMA `+schema); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		if c, err := pgx.Connect(ctx, dsn); err == nil {
			_, _ = c.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
			c.Close(ctx)
		}
	})
	if strings.Contains(dsn, "?") {
		return dsn + "&search_path=" + schema
	}
	return dsn + "?search_path=" + schema
}

// BenchmarkStreamingThroughput compares, in one run, how many events per
// second reach watchers with the in-memory log and with durable logs on
// SQLite and PostgreSQL (POSTGRES_TEST_DSN; skipped without it). It reports
// each rate and the ratio to memory (1.0 = persistence costs nothing).
//
//	go test -run '^$' -bench StreamingThroughput -benchtime 1x ./internal/store/
func BenchmarkStreamingThroughput(b *testing.B) {
	const tasks, perTask = 32, 5000
	ctx := context.Background()
	limits := eventlog.Limits{}
	for range b.N {
		cpu0 := cpuTime()
		mem := streamOnce(b, eventlog.NewMemory(limits), tasks, perTask)
		b.ReportMetric(mem, "memory_events/s")
		b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/1e3/float64(tasks*(perTask+1)), "memory_cpu_us/event")

		sq, err := sqlite.Open(ctx, b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		w := store.NewWriter(sq, store.WriterOptions{Interval: benchInterval})
		cpu0 = cpuTime()
		lite := streamOnce(b, eventlog.NewDurable(limits, w), tasks, perTask)
		w.Close()
		sq.Close()
		b.ReportMetric(lite, "sqlite_events/s")
		b.ReportMetric(lite/mem, "sqlite/memory")
		b.ReportMetric(float64((cpuTime()-cpu0).Nanoseconds())/1e3/float64(tasks*(perTask+1)), "sqlite_cpu_us/event")

		if dsn := pgBenchDSN(b); dsn != "" {
			pg, err := postgres.Open(ctx, dsn)
			if err != nil {
				b.Fatal(err)
			}
			w := store.NewWriter(pg, store.WriterOptions{Interval: benchInterval})
			p := streamOnce(b, eventlog.NewDurable(limits, w), tasks, perTask)
			w.Close()
			pg.Close()
			b.ReportMetric(p, "postgres_events/s")
			b.ReportMetric(p/mem, "postgres/memory")
		}
	}
}

// cpuTime is the CPU time (user + system) this process has used: the
// cost per event, which the machine's other load hardly changes (unlike
// the rates).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

var benchInterval = func() time.Duration {
	d, _ := time.ParseDuration(os.Getenv("BENCH_FLUSH_INTERVAL"))
	return d
}()

// BenchmarkRelayLatency measures what the durable store adds to a watcher's
// latency at relay rates, without the network: tasks each appending
// content at a steady rate to a durable log on SQLite, one watcher each;
// it reports append → watcher read p50/p99 (ms) beside the same with the
// in-memory log, and the CPU per event. BENCH_FLUSH_INTERVAL sets the
// Writer's Interval (the dispatcher's default is 500µs).
//
//	go test -run '^$' -bench RelayLatency -benchtime 1x ./internal/store/
func BenchmarkRelayLatency(b *testing.B) {
	for _, c := range []struct{ tasks, rate int }{{64, 50}, {200, 20}} {
		b.Run(fmt.Sprintf("tasks=%d", c.tasks), func(b *testing.B) {
			for range b.N {
				mem := relayOnce(b, eventlog.NewMemory(eventlog.Limits{}), c.tasks, c.rate)
				sq, err := sqlite.Open(context.Background(), b.TempDir())
				if err != nil {
					b.Fatal(err)
				}
				w := store.NewWriter(sq, store.WriterOptions{Interval: benchInterval})
				cpu0 := cpuTime()
				lite := relayOnce(b, eventlog.NewDurable(eventlog.Limits{}, w), c.tasks, c.rate)
				cpu := cpuTime() - cpu0
				w.Close()
				sq.Close()
				b.ReportMetric(pct(mem, 50), "memory_p50_ms")
				b.ReportMetric(pct(mem, 99), "memory_p99_ms")
				b.ReportMetric(pct(lite, 50), "sqlite_p50_ms")
				b.ReportMetric(pct(lite, 99), "sqlite_p99_ms")
				b.ReportMetric(float64(cpu.Microseconds())/float64(len(lite)), "sqlite_cpu_us/event")
			}
		})
	}
}

// poissonArrivals (BENCH_ARRIVALS=poisson): relayOnce's tasks append as
// Poisson processes of their own (as loadgen's relay sessions do by
// default) instead of all in step on one ticker grid.
var poissonArrivals = os.Getenv("BENCH_ARRIVALS") == "poisson"

// relayOnce streams for 5 s and returns every append → read latency.
func relayOnce(tb testing.TB, logs eventlog.Store, tasks, rate int) []time.Duration {
	const dur = 5 * time.Second
	n := int(dur.Seconds()) * rate
	run := fmt.Sprint(time.Now().UnixNano())
	lats := make([][]time.Duration, tasks)
	var wg sync.WaitGroup
	for i := range tasks {
		l, err := logs.Create(fmt.Sprintf("relay-%s-%d", run, i))
		if err != nil {
			tb.Fatal(err)
		}
		sent := make([]time.Time, n+2)
		wg.Add(2)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(time.Second / time.Duration(rate))
			defer tick.Stop()
			next := time.Now()
			for j := range n {
				if poissonArrivals {
					// Each task's appends a Poisson process of its own.
					next = next.Add(time.Duration(rand.ExpFloat64() * float64(time.Second) / float64(rate)))
					time.Sleep(time.Until(next))
				} else {
					<-tick.C
				}
				sent[j+1] = time.Now()
				if _, err := l.Append(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "a token"}}}, eventlog.Capped); err != nil {
					tb.Error(err)
					return
				}
			}
			sent[n+1] = time.Now()
			_, _ = l.Seal(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{}}})
		}()
		go func() {
			defer wg.Done()
			var after uint64
			for {
				evs, err := l.Read(context.Background(), after, nil)
				now := time.Now()
				for _, ev := range evs {
					lats[i] = append(lats[i], now.Sub(sent[ev.GetSeq()]))
					after = ev.GetSeq()
				}
				if err != nil {
					if !errors.Is(err, io.EOF) {
						tb.Error(err)
					}
					return
				}
			}
		}()
	}
	wg.Wait()
	var all []time.Duration
	for _, l := range lats {
		all = append(all, l...)
	}
	return all
}

// pct is the p-th percentile of d in ms.
func pct(d []time.Duration, p int) float64 {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return float64(s[min(len(s)-1, len(s)*p/100)].Microseconds()) / 1e3
}

// BenchmarkRelayPacing compares the Writer's pacing in one process, the
// variants alternating for BENCH_ROUNDS rounds (default 3) so that the
// machine's load falls on both alike: 64 tasks × 50 events/s (in step, as
// loadgen's sessions are; BENCH_TASKS n: n tasks sharing 4 000 events/s)
// on SQLite. The variants: BENCH_PACING, a comma-separated list of
// interval/burst (e.g. "1ms/4,2ms/16"); by default Interval
// BENCH_FLUSH_INTERVAL (default 2ms) with Burst 1 (a fixed least gap
// between two writes' starts) against the default Burst. It reports each
// variant's median over the rounds of the append → read p50/p99, the CPU
// per event and the writes per second.
//
//	go test -run '^$' -bench RelayPacing -benchtime 1x ./internal/store/
func BenchmarkRelayPacing(b *testing.B) {
	rounds := 3
	if n, err := strconv.Atoi(os.Getenv("BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	interval := benchInterval
	if interval == 0 {
		interval = 2 * time.Millisecond
	}
	tasks, rate := 64, 50
	if n, err := strconv.Atoi(os.Getenv("BENCH_TASKS")); err == nil && n > 0 {
		tasks, rate = n, 4000/n
	}
	type variant struct {
		name     string
		interval time.Duration
		burst    int
	}
	variants := []variant{{"burst1", interval, 1}, {"burstdefault", interval, 0}}
	if spec := os.Getenv("BENCH_PACING"); spec != "" {
		variants = nil
		for _, v := range strings.Split(spec, ",") {
			iv, bs, _ := strings.Cut(v, "/")
			d, err := time.ParseDuration(iv)
			if err != nil {
				b.Fatalf("BENCH_PACING %q: %v", v, err)
			}
			n, err := strconv.Atoi(bs)
			if err != nil {
				b.Fatalf("BENCH_PACING %q: %v", v, err)
			}
			variants = append(variants, variant{strings.ReplaceAll(v, "/", "_b"), d, n})
		}
	}
	for range b.N {
		res := make([][4][]float64, len(variants)) // p50, p99, cpu, writes/s per round
		for r := range rounds {
			for vi, v := range variants {
				sq, err := sqlite.Open(context.Background(), b.TempDir())
				if err != nil {
					b.Fatal(err)
				}
				cs := &countingStore{Store: sq}
				w := store.NewWriter(cs, store.WriterOptions{Interval: v.interval, Burst: v.burst})
				cpu0, t0 := cpuTime(), time.Now()
				lats := relayOnce(b, eventlog.NewDurable(eventlog.Limits{}, w), tasks, rate)
				cpu, wall := cpuTime()-cpu0, time.Since(t0)
				w.Close()
				sq.Close()
				res[vi][0] = append(res[vi][0], pct(lats, 50))
				res[vi][1] = append(res[vi][1], pct(lats, 99))
				res[vi][2] = append(res[vi][2], float64(cpu.Microseconds())/float64(len(lats)))
				res[vi][3] = append(res[vi][3], float64(cs.applies.Load())/wall.Seconds())
				b.Logf("round %d %s: p50 %.3f p99 %.3f ms, %.1f µs CPU/event, %.0f writes/s", r, v.name, pct(lats, 50), pct(lats, 99), res[vi][2][r], res[vi][3][r])
			}
		}
		for vi, v := range variants {
			b.ReportMetric(median(res[vi][0]), v.name+"_p50_ms")
			b.ReportMetric(median(res[vi][1]), v.name+"_p99_ms")
			b.ReportMetric(median(res[vi][2]), v.name+"_cpu_us/event")
			b.ReportMetric(median(res[vi][3]), v.name+"_writes/s")
		}
	}
}

// countingStore counts the writes (Apply calls) of a Store.
type countingStore struct {
	store.Store
	applies atomic.Int64
}

func (s *countingStore) Apply(ctx context.Context, b store.Batch) error {
	s.applies.Add(1)
	return s.Store.Apply(ctx, b)
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

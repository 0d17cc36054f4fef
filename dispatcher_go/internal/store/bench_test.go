package store_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
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

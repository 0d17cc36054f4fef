package sqlite

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// benchEnv is the integer in the environment variable name, or def.
func benchEnv(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// BenchmarkFoldRelay is the store's side of a relay: BENCH_TASKS tasks
// (default 200) whose events (60 bytes each) arrive in writes of
// BENCH_PER_WRITE events of different tasks (default 4: ~4 000 events/s
// at ~1 000 writes/s), folded the way the checkpointer does (a chunk of
// foldChunkEvents events), into a store that already holds
// BENCH_HISTORY_S seconds of such a relay (default 60, at 20 events per
// task per second). It reports the CPU per write, and the wall time
// (p50, p99, max) and CPU of one fold chunk: the time every write behind
// it waits. Run it with -benchtime 1x: b.N is not used.
func BenchmarkFoldRelay(b *testing.B) {
	ctx := context.Background()
	tasks := benchEnv("BENCH_TASKS", 200)
	per := benchEnv("BENCH_PER_WRITE", 4)
	history := benchEnv("BENCH_HISTORY_S", 60)
	s, err := Open(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	seq := make([]uint64, tasks)
	data := make([]byte, 60)
	k := 0
	mk := func() store.Batch {
		evs := make([]store.Event, per)
		for i := range evs {
			t := k % tasks
			k++
			seq[t]++
			evs[i] = store.Event{TaskID: fmt.Sprintf("task-%03d-0123456789abcdef-0123456789", t), Seq: seq[t], Data: data}
		}
		return store.Batch{Events: evs}
	}
	// History: a second of events per task, folded at once.
	for range history {
		for range 20 * tasks / per {
			if err := s.Apply(ctx, mk()); err != nil {
				b.Fatal(err)
			}
		}
		if err := s.fold(ctx); err != nil {
			b.Fatal(err)
		}
	}
	var folds []time.Duration
	var foldCPU, writeCPU time.Duration
	writes := 0
	journaled := 0
	for range 5 {
		for range 20 * tasks / per {
			c0 := threadCPU()
			if err := s.Apply(ctx, mk()); err != nil {
				b.Fatal(err)
			}
			writeCPU += threadCPU() - c0
			writes++
			journaled += per
			if journaled >= foldChunkEvents {
				journaled = 0
				c0 := threadCPU()
				t0 := time.Now()
				if _, err := s.foldOnce(ctx, foldChunkEvents); err != nil {
					b.Fatal(err)
				}
				folds = append(folds, time.Since(t0))
				foldCPU += threadCPU() - c0
			}
		}
	}
	slices.Sort(folds)
	q := func(f float64) float64 {
		return float64(folds[min(len(folds)-1, int(f*float64(len(folds))))].Microseconds())
	}
	b.ReportMetric(float64(writeCPU.Microseconds())/float64(writes), "write_cpu_us")
	b.ReportMetric(q(.5), "fold_p50_us")
	b.ReportMetric(q(.99), "fold_p99_us")
	b.ReportMetric(q(1), "fold_max_us")
	b.ReportMetric(float64(foldCPU.Microseconds())/float64(len(folds)), "fold_cpu_us")
}

// BenchmarkApplyFlood is a flood's write: BENCH_TASKS tasks (default 8)
// with BENCH_PER_TASK consecutive events each (default 25, 110 bytes)
// per write, written straight into event_runs, into a store that already
// holds BENCH_HISTORY writes (default 2 000). It reports the CPU per event.
func BenchmarkApplyFlood(b *testing.B) {
	ctx := context.Background()
	tasks := benchEnv("BENCH_TASKS", 8)
	per := benchEnv("BENCH_PER_TASK", 25)
	history := benchEnv("BENCH_HISTORY", 2000)
	s, err := Open(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	seq := make([]uint64, tasks)
	data := make([]byte, 110)
	mk := func() store.Batch {
		evs := make([]store.Event, 0, tasks*per)
		for t := range tasks {
			for range per {
				seq[t]++
				evs = append(evs, store.Event{TaskID: fmt.Sprintf("task-%03d-0123456789abcdef-0123456789", t), Seq: seq[t], Data: data})
			}
		}
		return store.Batch{Events: evs}
	}
	for range history {
		if err := s.Apply(ctx, mk()); err != nil {
			b.Fatal(err)
		}
	}
	batches := make([]store.Batch, b.N)
	for i := range batches {
		batches[i] = mk()
	}
	b.ResetTimer()
	c0 := threadCPU()
	for i := range b.N {
		if err := s.Apply(ctx, batches[i]); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64((threadCPU()-c0).Nanoseconds())/float64(b.N*tasks*per), "cpu_ns/event")
}

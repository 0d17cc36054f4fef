package sqlite

import (
	"context"
	"fmt"
	"os"
	"runtime"
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
// BENCH_CHUNK events, default foldChunkEvents), into a store that
// already holds BENCH_HISTORY_S seconds of such a relay (default 60, at
// 20 events per task per second): a write every millisecond for 5 s
// beside a goroutine folding a chunk whenever one is journaled. It
// reports the process CPU per event and the wall time of the writes
// (what a fold holding the write lock adds to them) and of a fold.
// Run it with -benchtime 1x: b.N is not used.
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
	// 5 s of writes, one every millisecond, beside a folder that folds a
	// chunk whenever one is journaled.
	chunk := benchEnv("BENCH_CHUNK", foldChunkEvents)
	s.lastFold = time.Now().AddDate(100, 0, 0) // no background fold: this one folds
	waits0, waited0 := s.lockWaits.Load(), s.lockWaited.Load()
	var folds, applies []time.Duration
	stop := make(chan struct{})
	folded := make(chan struct{})
	var foldCPU time.Duration
	foldedEvents := 0
	go func() {
		defer close(folded)
		runtime.LockOSThread() // foldCPU: this thread's CPU time
		defer runtime.UnlockOSThread()
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if s.journaled.Load() < int64(chunk) {
				continue
			}
			t0, c0, j0 := time.Now(), threadSchedCPU(), s.journaled.Load()
			if _, err := s.foldOnce(ctx, chunk); err != nil {
				b.Error(err)
				return
			}
			folds = append(folds, time.Since(t0))
			foldCPU += threadSchedCPU() - c0
			foldedEvents += int(j0 - s.journaled.Load())
		}
	}()
	c0 := threadCPU()
	tick := time.NewTicker(time.Millisecond)
	events := 0
	for range 5000 {
		<-tick.C
		bt := mk()
		t0 := time.Now()
		if err := s.Apply(ctx, bt); err != nil {
			b.Fatal(err)
		}
		applies = append(applies, time.Since(t0))
		events += per
	}
	tick.Stop()
	close(stop)
	<-folded
	cpu := threadCPU() - c0
	q := func(d []time.Duration, f float64) float64 {
		if len(d) == 0 {
			return 0
		}
		d = slices.Clone(d)
		slices.Sort(d)
		return float64(d[min(len(d)-1, int(f*float64(len(d))))].Microseconds())
	}
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(events), "cpu_ns/event")
	b.ReportMetric(q(applies, .5), "apply_p50_us")
	b.ReportMetric(q(applies, .99), "apply_p99_us")
	b.ReportMetric(q(applies, .999), "apply_p999_us")
	b.ReportMetric(q(folds, .5), "fold_p50_us")
	waits, waited := s.lockWaits.Load()-waits0, s.lockWaited.Load()-waited0
	b.ReportMetric(100*float64(waits)/float64(len(applies)), "waited_%")
	b.ReportMetric(float64(waited)/1e3/float64(len(applies)), "wait_us/write")
	b.ReportMetric(float64(len(folds)), "folds")
	b.ReportMetric(float64(foldCPU.Nanoseconds())/float64(max(1, foldedEvents)), "fold_cpu_ns/event")
}

// threadSchedCPU is the calling thread's CPU time.
func threadSchedCPU() time.Duration {
	b, err := os.ReadFile("/proc/thread-self/schedstat")
	if err != nil {
		return 0
	}
	var c int64
	fmt.Sscan(string(b), &c)
	return time.Duration(c)
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

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

// BenchmarkFoldBursts: what the background fold and checkpoint do to
// writes that come in bursts, as the Writer makes them when sessions emit
// in step (loadgen's relay-200: 200 tasks' events every 50 ms, written in
// writes of 25 events about 0.5 ms apart; BENCH_TASKS=64: 64 tasks every
// 20 ms, writes of 16). For 5 s per round, alternating: the fold and
// checkpoint waiting for a quiet spell (quiet) or starting at the kick of
// a commit (noquiet, before). Reported: the writes that found the write
// lock taken (%), and the wall time of a write p50/p99/max (ms).
//
//	go test -run '^$' -bench FoldBursts -benchtime 1x ./internal/store/sqlite/
func BenchmarkFoldBursts(b *testing.B) {
	tasks, period, per := 200, 50*time.Millisecond, 25
	if n, _ := strconv.Atoi(os.Getenv("BENCH_TASKS")); n == 64 {
		tasks, period, per = 64, 20*time.Millisecond, 16
	}
	rounds := 2
	if n, _ := strconv.Atoi(os.Getenv("BENCH_ROUNDS")); n > 0 {
		rounds = n
	}
	for range b.N {
		for r := range rounds {
			for _, quiet := range []bool{true, false} {
				waits, walls := foldBurstsOnce(b, quiet, tasks, period, per)
				name := "quiet"
				if !quiet {
					name = "noquiet"
				}
				slices.Sort(walls)
				q := func(p int) float64 { return float64(walls[min(len(walls)-1, len(walls)*p/100)].Microseconds()) / 1e3 }
				b.Logf("round %d %s: %d writes, %.2f%% waited for the lock, write wall p50 %.3f p99 %.3f max %.3f ms",
					r, name, len(walls), 100*float64(waits)/float64(len(walls)), q(50), q(99), float64(walls[len(walls)-1].Microseconds())/1e3)
			}
		}
	}
}

func foldBurstsOnce(b *testing.B, quiet bool, tasks int, period time.Duration, per int) (int64, []time.Duration) {
	ctx := context.Background()
	s, err := Open(ctx, b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	s.noQuiet = !quiet // before the first Apply kicks the checkpointer
	seq := make([]uint64, tasks)
	data := make([]byte, 40)
	var walls []time.Duration
	end := time.Now().Add(5 * time.Second)
	for next := time.Now(); next.Before(end); next = next.Add(period) {
		time.Sleep(time.Until(next))
		for k := 0; k < tasks; k += per {
			evs := make([]store.Event, 0, per)
			for t := k; t < min(k+per, tasks); t++ {
				seq[t]++
				evs = append(evs, store.Event{TaskID: fmt.Sprintf("task-%03d-0123456789abcdef", t), Seq: seq[t], Data: data})
			}
			t0 := time.Now()
			if err := s.Apply(ctx, store.Batch{Events: evs}); err != nil {
				b.Fatal(err)
			}
			walls = append(walls, time.Since(t0))
			time.Sleep(500 * time.Microsecond)
		}
	}
	return s.writeWaits.Load(), walls
}

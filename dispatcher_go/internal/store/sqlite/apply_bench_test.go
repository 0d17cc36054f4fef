package sqlite

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

func threadCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkApplySmall is the cost of one write of a relay-sized batch:
// n events of n different tasks (64 tasks in turn), 40 bytes each, into a
// store that already holds some history. It reports the process CPU per
// write.
func BenchmarkApplySmall(b *testing.B) {
	for _, n := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprint("events=", n), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			const tasks = 64
			seq := make([]uint64, tasks)
			data := make([]byte, 40)
			k := 0
			mk := func() store.Batch {
				evs := make([]store.Event, n)
				for i := range evs {
					t := k % tasks
					k++
					seq[t]++
					evs[i] = store.Event{TaskID: fmt.Sprintf("task-%02d-0123456789abcdef", t), Seq: seq[t], Data: data}
				}
				return store.Batch{Events: evs}
			}
			for range 2000 {
				if err := s.Apply(ctx, mk()); err != nil {
					b.Fatal(err)
				}
			}
			batches := make([]store.Batch, b.N)
			for i := range batches {
				batches[i] = mk()
			}
			b.ResetTimer()
			cpu0 := threadCPU()
			for i := range b.N {
				if err := s.Apply(ctx, batches[i]); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64((threadCPU()-cpu0).Microseconds())/float64(b.N), "cpu_us/write")
		})
	}
}

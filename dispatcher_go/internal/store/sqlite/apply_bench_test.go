package sqlite

import (
	"context"
	"fmt"
	"runtime/metrics"
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
	for _, n := range []int{1, 4, 16, 64, 200} {
		b.Run(fmt.Sprint("events=", n), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			tasks := max(64, n)
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

// BenchmarkJournalSmall is BenchmarkApplySmall's batches written the way a
// write-ordered journal would (a prototype, not the store's layout): one
// row per write, rowid in write order, all the write's events framed in
// one blob. It measures what a commit would cost if the per-task layout
// were built later, off the watchers' path.
func BenchmarkJournalSmall(b *testing.B) {
	for _, n := range []int{1, 4, 16, 64, 200} {
		b.Run(fmt.Sprint("events=", n), func(b *testing.B) {
			ctx := context.Background()
			s, err := Open(ctx, b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			if _, err := s.db.ExecContext(ctx, `CREATE TABLE event_journal (id INTEGER PRIMARY KEY, data BLOB NOT NULL)`); err != nil {
				b.Fatal(err)
			}
			ins, err := s.db.PrepareContext(ctx, `INSERT INTO event_journal (data) VALUES (?)`)
			if err != nil {
				b.Fatal(err)
			}
			defer ins.Close()
			tasks := max(64, n)
			seq := make([]uint64, tasks)
			data := make([]byte, 40)
			k := 0
			mk := func() []byte {
				var blob []byte
				for range n {
					t := k % tasks
					k++
					seq[t]++
					id := fmt.Sprintf("task-%02d-0123456789abcdef", t)
					blob = append(blob, byte(len(id)))
					blob = append(blob, id...)
					blob = append(blob, byte(seq[t]), byte(seq[t]>>8), byte(len(data)))
					blob = append(blob, data...)
				}
				return blob
			}
			write := func(blob []byte) {
				tx, err := s.db.BeginTx(ctx, nil)
				if err != nil {
					b.Fatal(err)
				}
				if _, err := tx.StmtContext(ctx, ins).ExecContext(ctx, blob); err != nil {
					b.Fatal(err)
				}
				if err := tx.Commit(); err != nil {
					b.Fatal(err)
				}
				s.kickCheckpoint()
			}
			for range 2000 {
				write(mk())
			}
			blobs := make([][]byte, b.N)
			for i := range blobs {
				blobs[i] = mk()
			}
			b.ResetTimer()
			cpu0 := threadCPU()
			for i := range b.N {
				write(blobs[i])
			}
			b.ReportMetric(float64((threadCPU()-cpu0).Microseconds())/float64(b.N), "cpu_us/write")
		})
	}
}

// BenchmarkApplyWriterContext is BenchmarkApplySmall's write of n events
// under the context the store Writer passes (one with a timeout, so it can
// end), beside context.Background(): what the context costs a write (the
// driver starts a goroutine per statement run under one that can end). It
// reports the process CPU and the goroutines started per write.
func BenchmarkApplyWriterContext(b *testing.B) {
	for _, n := range []int{16, 64} {
		for _, withTimeout := range []bool{false, true} {
			b.Run(fmt.Sprintf("events=%d/timeout=%v", n, withTimeout), func(b *testing.B) {
				s, err := Open(context.Background(), b.TempDir())
				if err != nil {
					b.Fatal(err)
				}
				defer s.Close()
				data := make([]byte, 40)
				seq := uint64(0)
				mk := func() store.Batch {
					evs := make([]store.Event, n)
					for i := range evs {
						seq++
						evs[i] = store.Event{TaskID: "task-0123456789abcdef", Seq: seq, Data: data}
					}
					return store.Batch{Events: evs}
				}
				apply := func(bt store.Batch) error {
					ctx := context.Background()
					if withTimeout {
						var cancel context.CancelFunc
						ctx, cancel = context.WithTimeout(ctx, 30*time.Second)
						defer cancel()
					}
					return s.Apply(ctx, bt)
				}
				for range 500 {
					if err := apply(mk()); err != nil {
						b.Fatal(err)
					}
				}
				batches := make([]store.Batch, b.N)
				for i := range batches {
					batches[i] = mk()
				}
				b.ResetTimer()
				g0, cpu0 := goroutinesCreated(), threadCPU()
				for i := range b.N {
					if err := apply(batches[i]); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64((threadCPU()-cpu0).Microseconds())/float64(b.N), "cpu_us/write")
				b.ReportMetric(float64(goroutinesCreated()-g0)/float64(b.N), "goroutines/write")
			})
		}
	}
}

// goroutinesCreated is the runtime's count of goroutines started so far.
func goroutinesCreated() uint64 {
	s := []metrics.Sample{{Name: "/sched/goroutines-created:goroutines"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

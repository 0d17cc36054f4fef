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

package store_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
)

// acceptingStore takes every write and keeps nothing.
type acceptingStore struct{ store.Store }

func (acceptingStore) Apply(context.Context, store.Batch) error { return nil }

// orderCommitter records the Commit calls of all its logs in one list.
type orderCommitter struct {
	name string
	mu   *sync.Mutex
	got  *[]string
}

func (c orderCommitter) Commit(seq uint64) {
	c.mu.Lock()
	*c.got = append(*c.got, fmt.Sprintf("%s@%d", c.name, seq))
	c.mu.Unlock()
}

func (orderCommitter) Replace(uint64, *dispatchv1.TaskEvent) {}

// TestWriterTellsInPersistOrder: after a write of many logs' events, each
// log is told once, with its highest seq, in the order of its first event
// in the batch, so that the reader of the event that waited longest is
// woken first (the order was a map's, random).
func TestWriterTellsInPersistOrder(t *testing.T) {
	w := store.NewWriter(acceptingStore{}, store.WriterOptions{Interval: time.Hour}) // held until Flush
	defer w.Close()
	var mu sync.Mutex
	var got []string
	const logs = 64
	cs := make([]orderCommitter, logs)
	for i := range cs {
		cs[i] = orderCommitter{name: fmt.Sprint("t", i), mu: &mu, got: &got}
	}
	order := rand.Perm(logs)
	seqs := make([]uint64, logs)
	var want []string
	// Each log's first event in a shuffled order, then more events of
	// every other log, in another order.
	for _, i := range order {
		seqs[i]++
		w.Persist(cs[i], cs[i].name, &dispatchv1.TaskEvent{Seq: seqs[i]})
	}
	for _, i := range rand.Perm(logs) {
		if i%2 == 0 {
			seqs[i]++
			w.Persist(cs[i], cs[i].name, &dispatchv1.TaskEvent{Seq: seqs[i]})
		}
	}
	for _, i := range order {
		want = append(want, fmt.Sprintf("%s@%d", cs[i].name, seqs[i]))
	}
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("told\n%v\nwant\n%v", got, want)
	}
}

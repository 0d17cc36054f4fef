package storetest

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// ErrInjected is the error a Faulty store fails with.
var ErrInjected = errors.New("storetest: injected store failure")

// Faulty wraps a Store so that a test can make it misbehave for a while:
// after Block every call (but Close) hangs, after Fail every call fails
// with ErrInjected, until Heal or until the given duration has passed. A
// hanging call honours its context, and goes through once healed.
type Faulty struct {
	store.Store

	mu     sync.Mutex
	fail   bool
	healed chan struct{} // nil while healthy
	timer  *time.Timer

	met atomic.Int64
}

// NewFaulty wraps st; it behaves until told otherwise.
func NewFaulty(st store.Store) *Faulty { return &Faulty{Store: st} }

// Block makes every call hang for d (or until Heal).
func (f *Faulty) Block(d time.Duration) { f.breakFor(false, d) }

// Fail makes every call fail for d (or until Heal).
func (f *Faulty) Fail(d time.Duration) { f.breakFor(true, d) }

func (f *Faulty) breakFor(fail bool, d time.Duration) {
	f.Heal()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail, f.healed = fail, make(chan struct{})
	f.timer = time.AfterFunc(d, f.Heal)
}

// Heal ends the misbehaviour: hanging calls go through.
func (f *Faulty) Heal() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.healed == nil {
		return
	}
	f.timer.Stop()
	close(f.healed)
	f.healed, f.timer = nil, nil
}

// Met is how many calls met the fault (hung or failed) so far.
func (f *Faulty) Met() int64 { return f.met.Load() }

func (f *Faulty) fault(ctx context.Context) error {
	f.mu.Lock()
	fail, healed := f.fail, f.healed
	f.mu.Unlock()
	if healed == nil {
		return nil
	}
	f.met.Add(1)
	if fail {
		return ErrInjected
	}
	select {
	case <-healed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Apply implements store.Store.
func (f *Faulty) Apply(ctx context.Context, b store.Batch) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.Store.Apply(ctx, b)
}

// GetTask implements store.Store.
func (f *Faulty) GetTask(ctx context.Context, id string) (store.TaskRecord, error) {
	if err := f.fault(ctx); err != nil {
		return store.TaskRecord{}, err
	}
	return f.Store.GetTask(ctx, id)
}

// ListTasks implements store.Store.
func (f *Faulty) ListTasks(ctx context.Context, statuses []int32, limit int) ([]store.TaskRecord, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.ListTasks(ctx, statuses, limit)
}

// ListTasksBefore implements store.Store.
func (f *Faulty) ListTasksBefore(ctx context.Context, statuses []int32, before *store.TaskKey, limit int) ([]store.TaskRecord, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.ListTasksBefore(ctx, statuses, before, limit)
}

// ReadEvents implements store.Store.
func (f *Faulty) ReadEvents(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]store.Event, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.ReadEvents(ctx, taskID, afterSeq, limit)
}

// LastSeq implements store.Store.
func (f *Faulty) LastSeq(ctx context.Context, taskID string) (uint64, error) {
	if err := f.fault(ctx); err != nil {
		return 0, err
	}
	return f.Store.LastSeq(ctx, taskID)
}

// PutConfig implements store.Store.
func (f *Faulty) PutConfig(ctx context.Context, id string, data []byte) error {
	if err := f.fault(ctx); err != nil {
		return err
	}
	return f.Store.PutConfig(ctx, id, data)
}

// GetConfig implements store.Store.
func (f *Faulty) GetConfig(ctx context.Context, id string) ([]byte, error) {
	if err := f.fault(ctx); err != nil {
		return nil, err
	}
	return f.Store.GetConfig(ctx, id)
}

// DeleteEndedBefore implements store.Store.
func (f *Faulty) DeleteEndedBefore(ctx context.Context, cutoff time.Time) (int64, error) {
	if err := f.fault(ctx); err != nil {
		return 0, err
	}
	return f.Store.DeleteEndedBefore(ctx, cutoff)
}

var _ store.Store = (*Faulty)(nil)

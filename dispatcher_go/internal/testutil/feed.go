package testutil

import (
	"context"
	"sync"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// Feed is the event log of one fake task, for the fake TaskServices of
// client tests (the dispatcher's own log, internal/eventlog, is not
// testutil's to import): Append numbers events from 1, Follow sends them
// to a watcher the way WatchTask does. The zero Feed is empty and ready.
type Feed struct {
	mu      sync.Mutex
	events  []*dispatchv1.TaskEvent
	ended   bool          // a terminal state is among events
	changed chan struct{} // closed and replaced when events grow
}

// Append gives each event the next seq and appends it; followers wake.
func (f *Feed) Append(evs ...*dispatchv1.TaskEvent) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ev := range evs {
		ev.Seq = uint64(len(f.events) + 1)
		f.events = append(f.events, ev)
		f.ended = f.ended || terminal(ev)
	}
	if f.changed != nil {
		close(f.changed)
	}
	f.changed = make(chan struct{})
}

// Len is the number of events appended: the seq of the last one.
func (f *Feed) Len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.events)
}

// Follow calls send with each event after seq after, in order, waiting for
// more, until it has sent a terminal state (SUCCESS, FAILURE, CANCELLED),
// send fails, or ctx ends; a follow from after the terminal event ends at
// once, as the dispatcher's WatchTask does. It returns send's error or
// ctx's, else nil.
func (f *Feed) Follow(ctx context.Context, after uint64, send func(*dispatchv1.TaskEvent) error) error {
	next := after
	for {
		f.mu.Lock()
		if f.changed == nil {
			f.changed = make(chan struct{})
		}
		evs, changed := f.events[min(next, uint64(len(f.events))):], f.changed
		ended := f.ended
		f.mu.Unlock()
		if len(evs) == 0 && ended {
			return nil
		}
		for _, ev := range evs {
			if err := send(ev); err != nil {
				return err
			}
			next = ev.GetSeq()
			if terminal(ev) {
				return nil
			}
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// terminal says whether ev is the state event that ends a task.
func terminal(ev *dispatchv1.TaskEvent) bool {
	switch ev.GetState().GetStatus() {
	case agentpb.TaskStatus_SUCCESS, agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_CANCELLED:
		return true
	}
	return false
}

package dispatcher

import (
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// observe wraps logs so that fn sees every event appended to the logs it
// hands out (metrics): those of new tasks and, if logs can reopen stored
// logs (task.Reopener), those of tasks queued again after a restart.
func observe(logs eventlog.Store, fn func(*dispatchv1.TaskEvent)) eventlog.Store {
	o := observedStore{Store: logs, fn: fn}
	if r, ok := logs.(task.Reopener); ok {
		return observedReopener{observedStore: o, r: r}
	}
	return o
}

// observedStore calls fn with every event appended to the logs it creates.
type observedStore struct {
	eventlog.Store
	fn func(*dispatchv1.TaskEvent)
}

func (s observedStore) Create(taskID string) (eventlog.Log, error) {
	l, err := s.Store.Create(taskID)
	if err != nil {
		return nil, err
	}
	return observedLog{Log: l, fn: s.fn}, nil
}

// observedReopener is an observedStore over a store that reopens stored
// logs (task.Reopener).
type observedReopener struct {
	observedStore
	r task.Reopener
}

func (s observedReopener) Restore(taskID string, lastSeq uint64, sealed bool) (eventlog.Log, error) {
	l, err := s.r.Restore(taskID, lastSeq, sealed)
	if err != nil {
		return nil, err
	}
	return observedLog{Log: l, fn: s.fn}, nil
}

// Stored logs are sealed: nothing is appended to them, nothing to observe.
func (s observedReopener) Stored(taskID string, lastSeq uint64) eventlog.Log {
	return s.r.Stored(taskID, lastSeq)
}

// observedLog reports each event once the log accepted it (its seq set).
type observedLog struct {
	eventlog.Log
	fn func(*dispatchv1.TaskEvent)
}

// Unwrap is the log observed (eventlog.SetToken reaches it through this).
func (l observedLog) Unwrap() eventlog.Log { return l.Log }

func (l observedLog) Append(ev *dispatchv1.TaskEvent, class eventlog.Class) (uint64, error) {
	seq, err := l.Log.Append(ev, class)
	if err == nil {
		l.fn(ev)
	}
	return seq, err
}

func (l observedLog) Fence(ev *dispatchv1.TaskEvent) (uint64, error) {
	seq, err := l.Log.Fence(ev)
	if err == nil {
		l.fn(ev)
	}
	return seq, err
}

func (l observedLog) Seal(ev *dispatchv1.TaskEvent) (uint64, error) {
	seq, err := l.Log.Seal(ev)
	if err == nil {
		l.fn(ev)
	}
	return seq, err
}

// Encoded implements eventlog.Encoder: the wrapped log's encodings.
func (l observedLog) Encoded(evs []*dispatchv1.TaskEvent, dst [][]byte) [][]byte {
	return eventlog.EncodedOf(l.Log, evs, dst)
}

package dispatcher

import (
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// observedStore calls fn with every event appended to the logs it creates
// (metrics). Logs restored from a store at start are not observed.
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

// observedLog reports each event once the log accepted it (its seq set).
type observedLog struct {
	eventlog.Log
	fn func(*dispatchv1.TaskEvent)
}

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

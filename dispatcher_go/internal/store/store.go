// Package store is the dispatcher's durable state: tasks, their numbered
// events, and configs. Store is the interface; sqlite/ (embedded, the
// default) and postgres/ implement it and both pass storetest's conformance
// suite.
//
// The store is deliberately schema-light: a task is a row with the columns
// queries need (id, status, creation and end time) and an opaque body the
// task package encodes (secrets already removed or encrypted), an event is
// (task id, seq, serialized TaskEvent). Implementations do not interpret
// bodies, so the two backends cannot drift apart in what they keep. What
// does not depend on the database (turning rows into records, collecting a
// result set, reporting a missing row, the migration loop; rows.go) is
// here once; each backend keeps only its SQL and its driver's calls.
//
// Writes from the hot path go through Writer, which batches them into one
// transaction per flush so that persistence does not throttle streaming,
// and reports whether the store keeps up (Writer.Health) so that callers
// can refuse work at once instead of waiting for a store that is stuck.
// The package must not interpret task bodies or know about tasks' states.
package store

import (
	"context"
	"errors"
	"time"
)

// ErrNotFound means no row has the given id.
var ErrNotFound = errors.New("store: not found")

// ErrRejected marks an Apply error caused by a record, not by the store:
// the database refused the data of a row (a constraint such as NOT NULL, a
// value it cannot hold). Writing the same batch again would fail again,
// while other records would be written; Writer sets the record aside (see
// WriterOptions.OnRejected). Any other Apply error counts as the store's
// (disk, connection, lock) and is retried.
var ErrRejected = errors.New("store: record refused")

// Rejected marks err as caused by a record (errors.Is(err, ErrRejected)),
// keeping err in the chain.
func Rejected(err error) error { return rejectedError{err} }

type rejectedError struct{ err error }

func (e rejectedError) Error() string   { return e.err.Error() }
func (e rejectedError) Unwrap() []error { return []error{ErrRejected, e.err} }

// TaskRecord is a task as stored.
type TaskRecord struct {
	// ID is the task id (primary key).
	ID string
	// Status is the agentpb.TaskStatus number.
	Status int32
	// CreatedAt orders tasks; EndedAt is zero until the task ends and is
	// what retention looks at.
	CreatedAt time.Time
	EndedAt   time.Time
	// Body is the rest of the task, encoded by the task package. nil
	// means it could not be encoded: Writer sets such a record aside.
	Body []byte
	// Token is the fencing token the record was written under (0: none):
	// a fleet replica's store writes it only while it is the token of the
	// task's lease there (the attempt the writing copy was given). The
	// other stores ignore it; it is not stored.
	Token int64
}

// TaskKey is a task's place in the order of ListTasks: newest first by
// CreatedAt (to the microsecond, as stored), then by ID descending, ids
// compared byte by byte.
type TaskKey struct {
	CreatedAt time.Time
	ID        string
}

// KeyOf is r's TaskKey.
func KeyOf(r TaskRecord) TaskKey { return TaskKey{CreatedAt: r.CreatedAt, ID: r.ID} }

// Before reports whether k comes after o in the newest-first order (k is
// older, or as old with a smaller id).
func (k TaskKey) Before(o TaskKey) bool {
	a, b := Micros(k.CreatedAt), Micros(o.CreatedAt)
	return a < b || (a == b && k.ID < o.ID)
}

// Event is one task event as stored: Data is the serialized TaskEvent.
type Event struct {
	TaskID string
	Seq    uint64
	Data   []byte
	// Token is as TaskRecord's: the fencing token of the log that
	// appended the event when it did (eventlog.SetToken).
	Token int64
}

// Batch is what one flush writes, in one transaction: events first, then
// task records (a record written in the same flush as its task's events is
// never ahead of them).
type Batch struct {
	Events []Event
	Tasks  []TaskRecord
}

// Store is the durable state. Implementations are safe for concurrent use.
type Store interface {
	// Apply writes b atomically. Events are idempotent by (task id, seq):
	// writing an event again is a no-op. Tasks are upserted by id. An error
	// caused by the data of a record rather than by the store wraps
	// ErrRejected (see Rejected).
	Apply(ctx context.Context, b Batch) error
	// GetTask returns the task with id, or ErrNotFound.
	GetTask(ctx context.Context, id string) (TaskRecord, error)
	// ListTasks returns tasks whose status is in statuses (empty: any),
	// newest first, at most limit of them (<= 0: all).
	ListTasks(ctx context.Context, statuses []int32, limit int) ([]TaskRecord, error)
	// ListTasksBefore is ListTasks continuing after before (nil: from the
	// newest): only the tasks that come after it in the newest-first order
	// (see TaskKey), so that a listing can be paged.
	ListTasksBefore(ctx context.Context, statuses []int32, before *TaskKey, limit int) ([]TaskRecord, error)
	// ReadEvents returns up to limit events of taskID with seq > afterSeq,
	// in seq order.
	ReadEvents(ctx context.Context, taskID string, afterSeq uint64, limit int) ([]Event, error)
	// LastSeq is the highest stored seq of taskID (0: none).
	LastSeq(ctx context.Context, taskID string) (uint64, error)
	// PutConfig stores a config document under id (upsert).
	PutConfig(ctx context.Context, id string, data []byte) error
	// GetConfig returns the config document with id, or ErrNotFound.
	GetConfig(ctx context.Context, id string) ([]byte, error)
	// DeleteEndedBefore removes the tasks that ended before cutoff and all
	// their events, and reports how many tasks it removed.
	DeleteEndedBefore(ctx context.Context, cutoff time.Time) (int64, error)
	// Close releases the store.
	Close() error
}

// Micros is t in Unix microseconds, 0 for the zero time: the column
// encoding both backends share.
func Micros(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMicro()
}

// FromMicros is the inverse of Micros.
func FromMicros(us int64) time.Time {
	if us == 0 {
		return time.Time{}
	}
	return time.UnixMicro(us)
}

// Package eventlog keeps each task's numbered events (seq 1, 2, 3, ...) and
// lets any number of readers follow them, each at its own pace, by cursor.
//
// Fan-out reads from the log rather than pushing into per-reader queues: a
// slow reader only falls behind in the log, it never slows the writer and
// never makes memory grow. The log of one task is bounded (Limits) so that a
// runaway task cannot eat the dispatcher's memory; appends past the bound are
// refused with ErrFull, never silently dropped.
//
// Store creates the logs: Memory keeps them in memory only, Durable also
// writes every event to a Sink (the store's batching writer) and lets
// readers see an event once it is durable.
//
// Each event is encoded (protobuf) once, when it is appended: a log keeps
// the bytes of its newest events for the Sink to store and for readers
// that send events on as protobuf (Encoder, encode.go).
//
// It must not block a task's lifecycle on the store: only content waits for
// the sink's room (back-pressure on the commander that produces it), never a
// Control event, the fence or the seal (see Control). It knows nothing of
// sessions, scheduling or the wire.
package eventlog

import (
	"context"
	"errors"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Errors returned by Log implementations. Callers test them with errors.Is.
var (
	// ErrFull means a Capped append would exceed the task's limits.
	ErrFull = errors.New("event log limit reached")
	// ErrFenced means a Fenceable append came after Fence: the task is being
	// stopped and accepts no further planner output.
	ErrFenced = errors.New("event log fenced")
	// ErrSealed means the log holds its terminal event; nothing more is accepted.
	ErrSealed = errors.New("event log sealed")
	// ErrExists means Create was called twice for one task.
	ErrExists = errors.New("event log already exists")
)

// Class says how an append is policed. Classes combine with |.
type Class uint8

const (
	// Control events (state changes, stop, terminal packets, tool results of
	// accepted calls, policy decisions) are always accepted until the log is
	// sealed, and never wait for room in a durable log's sink: a task's start,
	// stop and end must not queue behind content when the store falls behind
	// (they are appended under the task's lock). Their number per task is
	// bounded by the protocol, so they need no cap and their overshoot of
	// the sink's buffer is bounded too: per task one submission, at most
	// task.MaxRequeues+1 starts and requeues, one fence, one result or
	// stopped, one seal, and per recorded tool call (itself Capped, so it
	// waited for room) one result and at most three policy decisions.
	Control Class = 0
	// Capped events count toward Limits and are refused with ErrFull past them.
	Capped Class = 1 << iota
	// Fenceable events are refused with ErrFenced once Fence was called.
	Fenceable
)

// Limits bound one task's log. Zero fields mean "no limit".
type Limits struct {
	// MaxEvents is the most Capped events a task may log.
	MaxEvents int
	// MaxBytes is the most wire bytes (proto.Size) of Capped events.
	MaxBytes int64
}

// DefaultLimits are the dispatcher's defaults: 100 000 events or 64 MiB per
// task, whichever comes first. A chatty planner streaming token by token
// produces a few thousand events per answer, so the bound only bites on a
// runaway; 64 MiB keeps room for a few screenshots sent inline.
var DefaultLimits = Limits{MaxEvents: 100_000, MaxBytes: 64 << 20}

// Log is one task's event log. All methods are safe for concurrent use.
//
// Events handed to Append, Fence and Seal belong to the log afterwards: the
// log sets their Seq and readers share the same pointer, so nobody may
// modify them again.
type Log interface {
	// Append adds ev with the next seq and returns it.
	Append(ev *dispatchv1.TaskEvent, class Class) (uint64, error)
	// Fence appends ev (a Control event) and, atomically with it, refuses
	// every later Fenceable append. It reports ErrFenced if already fenced.
	Fence(ev *dispatchv1.TaskEvent) (uint64, error)
	// Seal appends the terminal event ev and closes the log to appends.
	// Readers get io.EOF once they have read it.
	Seal(ev *dispatchv1.TaskEvent) (uint64, error)
	// LastSeq is the seq of the newest event (0 when empty).
	LastSeq() uint64
	// Read waits until the log holds an event with seq > afterSeq, then
	// returns such events in order, at most cap(dst) of them (64 if dst has
	// no capacity), appended to dst[:0]. It returns io.EOF when the log is
	// sealed and holds nothing after afterSeq, and ctx.Err() when ctx ends.
	Read(ctx context.Context, afterSeq uint64, dst []*dispatchv1.TaskEvent) ([]*dispatchv1.TaskEvent, error)
	// WhenDurable calls f once event seq is durable: at once, on the
	// caller's goroutine, if it is already (always in a Memory log), else
	// on the goroutine that reports the commit (the store's writer), after
	// the commit, so f must not block. f is called at most once, and never
	// if the event never becomes durable — nor if the store did not keep
	// it (a placeholder replaced it, Committer.Replace).
	WhenDurable(seq uint64, f func())
}

// Store creates and removes task logs.
type Store interface {
	// Create opens a new, empty log for taskID.
	Create(taskID string) (Log, error)
	// Remove forgets taskID's log (on eviction of a finished task). Readers
	// that hold the Log may finish reading it.
	Remove(taskID string)
}

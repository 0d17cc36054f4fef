package store

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Codes of the error events (TaskEvent.error.code) that stand, at their
// seq, for an event the store could not keep or give back: a reader, also
// one resuming by seq, sees the gap explained instead of a number missing,
// and the events around it stay readable.
const (
	// EventNotStored: the event could not be encoded, or the store refused
	// it; this placeholder was stored (and is read live) in its place, and
	// the task was failed (WriterOptions.OnRejected).
	EventNotStored = "event_not_stored"
	// EventUndecodable: the stored bytes of the event cannot be decoded
	// (they were corrupted in the database).
	EventUndecodable = "event_undecodable"
	// EventMissing: the store holds no event at this seq although it holds
	// later ones.
	EventMissing = "event_missing"
)

// placeholder is the error event with code that stands for event seq of
// taskID; at is its time, if known.
func placeholder(taskID string, seq uint64, at *timestamppb.Timestamp, code, msg string) *dispatchv1.TaskEvent {
	ev := &dispatchv1.TaskEvent{TaskId: taskID, Seq: seq,
		Kind: &dispatchv1.TaskEvent_Error{Error: &dispatchv1.ErrorSignal{Code: code, Message: msg}}}
	if at != nil {
		ev.Time = &timestamppb.Timestamp{Seconds: at.GetSeconds(), Nanos: at.GetNanos()}
	}
	return ev
}

// kindName is the name of ev's kind ("content", "tool_result", ...).
func kindName(ev *dispatchv1.TaskEvent) string {
	m := ev.ProtoReflect()
	if fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("kind")); fd != nil {
		return string(fd.Name())
	}
	return "event"
}

// decodeStored is stored event r of taskID, or the placeholder that says it
// cannot be decoded (or is not the event it should be).
func decodeStored(taskID string, r Event) *dispatchv1.TaskEvent {
	ev := &dispatchv1.TaskEvent{}
	err := proto.Unmarshal(r.Data, ev)
	if err == nil && ev.GetSeq() != r.Seq {
		err = fmt.Errorf("it holds seq %d", ev.GetSeq())
	}
	if err != nil {
		return placeholder(taskID, r.Seq, nil, EventUndecodable,
			fmt.Sprintf("stored event %d cannot be decoded (%v); it is skipped", r.Seq, err))
	}
	return ev
}

// missing is the placeholder of an event the store does not hold.
func missing(taskID string, seq uint64) *dispatchv1.TaskEvent {
	return placeholder(taskID, seq, nil, EventMissing, fmt.Sprintf("event %d is missing from the store; it is skipped", seq))
}

// rejection is a record set aside: its task and why, in words for people
// (no store error text: clients read it).
type rejection struct {
	taskID string
	reason string
}

// job is one write: a batch whose Events[i] is events[i], and what was set
// aside of it.
type job struct {
	events []pendingEvent
	b      Batch
	// repl holds the placeholders stored in place of events (by index):
	// the logs are told to serve them instead (Committer.Replace).
	repl     map[int]*dispatchv1.TaskEvent
	rejected []rejection
}

// newJob encodes events. One that cannot be encoded is replaced by its
// placeholder, a task record without a body is left out: both are
// rejections of their task.
func newJob(events []pendingEvent, tasks []TaskRecord, log func(msg string, args ...any)) *job {
	j := &job{events: events, b: Batch{Events: make([]Event, 0, len(events)), Tasks: make([]TaskRecord, 0, len(tasks))}}
	var arena []byte
	perEvent := arenaPerEvent
	// Each event carries its log's fencing token as it is when the batch
	// is built, not when the event was queued: a fleet copy given a new
	// attempt (Task.SetFenceToken, a session re-attaching to it) writes
	// what it recorded just before under that attempt, which its new lease
	// holds. What remains: a batch built before SetFenceToken whose write
	// reads the task's lease after the claim that gave it committed; its
	// events are refused (fleet's fencedStore) while the copy keeps them
	// in memory, reported durable: a gap in the store, as before the fence
	// was per copy.
	for i, p := range events {
		if p.data != nil {
			// Encoded once by the log, shared with its readers.
			j.b.Events = append(j.b.Events, Event{TaskID: p.taskID, Seq: p.ev.GetSeq(), Data: p.data, Token: eventlog.TokenOf(p.c)})
			continue
		}
		if cap(arena)-len(arena) < perEvent {
			// Sized to what is left of the batch: a commit of a few events
			// (the writer's usual batch at moderate rates) does not take a
			// whole arenaSize buffer.
			arena = make([]byte, 0, min(arenaSize, (len(events)-i)*perEvent))
		}
		data, err := marshalInto(&arena, p.ev)
		if len(data) > perEvent {
			perEvent = min(2*len(data), arenaSize) // larger events: larger arenas
		}
		if err != nil {
			seq := p.ev.GetSeq()
			log("event not encodable; a placeholder is stored instead", "task_id", p.taskID, "seq", seq, "error", err)
			why := fmt.Sprintf("event %d (%s) could not be encoded for the store: %v", seq, kindName(p.ev), err)
			ph := placeholder(p.taskID, seq, p.ev.GetTime(), EventNotStored, why)
			data, _ = proto.Marshal(ph) // our own strings: cannot fail
			j.replace(i, ph)
			j.reject(p.taskID, why)
		}
		j.b.Events = append(j.b.Events, Event{TaskID: p.taskID, Seq: p.ev.GetSeq(), Data: data, Token: eventlog.TokenOf(p.c)})
	}
	for _, t := range tasks {
		if t.Body == nil {
			log("task record not encodable; not stored", "task_id", t.ID)
			j.reject(t.ID, "the task's record could not be encoded for the store")
			continue
		}
		j.b.Tasks = append(j.b.Tasks, t)
	}
	return j
}

// arenaSize is the largest buffer newJob encodes events into: one
// allocation for a few hundred events instead of one each (garbage
// collection was a tenth of the dispatcher's CPU under a flood).
// arenaPerEvent is the room an arena starts with per event still to
// encode: at moderate rates the writer commits every few milliseconds a
// batch of a few events, and a full arenaSize buffer per commit was 70 % of
// the dispatcher's allocations in the tools scenario (~10 MB/s, a garbage
// collection every second).
const (
	arenaSize     = 32 << 10
	arenaPerEvent = 256
)

// marshalInto encodes ev at the end of *arena (its free capacity), or in
// a buffer of its own when it does not fit (then *arena is left as it
// was, for the next event). The bytes returned are never written again.
func marshalInto(arena *[]byte, ev *dispatchv1.TaskEvent) ([]byte, error) {
	a := *arena
	data, err := proto.MarshalOptions{}.MarshalAppend(a[len(a):len(a):cap(a)], ev)
	if err != nil {
		return nil, err
	}
	if len(data) > 0 && len(a) < cap(a) && &data[0] == &a[:len(a)+1][len(a)] {
		*arena = a[:len(a)+len(data)] // encoded in place
	}
	return data[:len(data):len(data)], nil
}

func (j *job) replace(i int, ph *dispatchv1.TaskEvent) {
	if j.repl == nil {
		j.repl = make(map[int]*dispatchv1.TaskEvent)
	}
	j.repl[i] = ph
}

func (j *job) reject(taskID, reason string) {
	j.rejected = append(j.rejected, rejection{taskID: taskID, reason: reason})
}

// size is the number of items: events, then task records.
func (j *job) size() int { return len(j.b.Events) + len(j.b.Tasks) }

// sub is the batch of items [lo, hi), in order: events first, so a task
// record never goes ahead of its events.
func (j *job) sub(lo, hi int) Batch {
	ne := len(j.b.Events)
	return Batch{
		Events: j.b.Events[min(lo, ne):min(hi, ne)],
		Tasks:  j.b.Tasks[max(lo-ne, 0):max(hi-ne, 0)],
	}
}

// applyIsolating writes items [lo, hi) of j. When the store refuses a
// record (ErrRejected), the items are split in halves and each is written
// (so ⌈log2 n⌉ more transactions per refused record find it) until the
// refused one is alone; it is set aside, everything else is written.
// It returns only the store's own failure once the Writer is closed.
func (w *Writer) applyIsolating(j *job, lo, hi int) error {
	if lo >= hi {
		return nil
	}
	err := w.apply(j.sub(lo, hi))
	if err == nil || !errors.Is(err, ErrRejected) {
		return err
	}
	if hi-lo > 1 {
		mid := lo + (hi-lo)/2
		if err := w.applyIsolating(j, lo, mid); err != nil {
			return err
		}
		return w.applyIsolating(j, mid, hi)
	}
	return w.setAside(j, lo, err)
}

// setAside handles item i, which the store refused with err: a task record
// is left out; an event is written as its placeholder instead (left out too
// if the store refuses that: readers then see it missing).
func (w *Writer) setAside(j *job, i int, err error) error {
	if ne := len(j.b.Events); i >= ne {
		t := j.b.Tasks[i-ne]
		w.opts.Logger.Error("store refused a task record; not stored", "task_id", t.ID, "error", err)
		j.reject(t.ID, "the store refused the task's record")
		return nil
	}
	e := &j.b.Events[i]
	w.opts.Logger.Error("store refused an event; a placeholder is stored instead", "task_id", e.TaskID, "seq", e.Seq, "error", err)
	if _, done := j.repl[i]; done {
		return nil // the placeholder itself was refused
	}
	p := j.events[i]
	why := fmt.Sprintf("the store refused event %d (%s)", e.Seq, kindName(p.ev))
	ph := placeholder(e.TaskID, e.Seq, p.ev.GetTime(), EventNotStored, why)
	j.replace(i, ph)
	j.reject(e.TaskID, why)
	e.Data, _ = proto.Marshal(ph)
	if err := w.apply(Batch{Events: []Event{*e}}); err != nil && !errors.Is(err, ErrRejected) {
		return err
	} else if err != nil {
		w.opts.Logger.Error("store refused an event's placeholder; the event is missing", "task_id", e.TaskID, "seq", e.Seq, "error", err)
	}
	return nil
}

// replaceAll tells the logs to serve the placeholders instead of the
// events they stand for (before those are committed: no reader saw them).
func (j *job) replaceAll() {
	for i, ph := range j.repl {
		j.events[i].c.Replace(ph.GetSeq(), ph)
	}
}

// notify tells the owner which tasks lost a record (once per task and
// write).
func (w *Writer) notify(j *job) {
	if w.opts.OnRejected == nil {
		return
	}
	told := make(map[string]bool, len(j.rejected))
	for _, r := range j.rejected {
		if !told[r.taskID] {
			told[r.taskID] = true
			w.opts.OnRejected(r.taskID, r.reason)
		}
	}
}

package sqlite

import (
	"encoding/binary"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// Events are stored as runs: one row of event_runs holds consecutive
// events of one task from one write, (task_id, first_seq, last_seq, data).
// A row per event made SQLite's per-row work (the B-tree seek and insert,
// binding three values) the largest part of the dispatcher's CPU under a
// flood (perf, docs/benchmarks.md); a run of up to maxRunEvents events
// costs one row. A run of one event holds the serialized event as it is
// (what migration 2 copied from the old events table); a longer one holds
// each event as its length (uvarint) followed by its bytes.
//
// event_runs is a rowid table whose key (task_id, first_seq, last_seq) is
// a unique index (event_runs_key, migration 4), not a WITHOUT ROWID table
// as before: there the whole row was the key, data included, so a run of
// more than ~1 KB (most runs: a flood's ~25 events per write, a second of
// a relay task folded) spilled onto overflow pages, a 4 KiB page held 3
// or 4 runs, and each key compare of an insert or a seek read a run's
// whole data back from its overflow pages (accessPayload: 6–9 % of the
// dispatcher's CPU under a flood). Now the index holds ~50-byte keys and
// a run's data is appended at the end of the table, where nothing
// compares it: BenchmarkApplyFlood's CPU per event −35..−40 %,
// BenchmarkFoldRelay's fold chunk at 200 tasks −55 %.
//
// A seq may be in more than one run (a batch written again with other
// boundaries: Store.Apply's "writing an event again is a no-op"); readers
// take each seq from the first run that holds it, in (first_seq,
// last_seq) order.

// maxRunEvents bounds the events of one run, so that the run holding a
// given seq starts at most maxRunEvents-1 before it (reads seek there).
const maxRunEvents = 256

// maxRunBytes ends a run once its data reaches this size, so that a read
// of a few events never decodes megabytes of others.
const maxRunBytes = 64 << 10

// run is one row of event_runs.
type run struct {
	taskID      string
	first, last uint64
	data        []byte
	n           int // events
	size        int // bytes of data once framed (n > 1)
}

// groupRuns turns events (each task's in seq order, tasks interleaved)
// into runs, in the order of their first events. The data of all runs of
// more than one event shares one allocation; a run of one event holds
// that event's bytes. An event without data gets a run of its own whose
// data is nil: the database refuses it (NOT NULL), as it refused such an
// event before.
func groupRuns(events []store.Event) []run {
	runs := make([]run, 0, 8)
	of := make([]int32, len(events)) // event → its run
	cur := make(map[string]int32, 8) // task → its open run
	for k, e := range events {
		framed := uvarintLen(len(e.Data)) + len(e.Data)
		if i, ok := cur[e.TaskID]; ok && e.Data != nil {
			if r := &runs[i]; e.Seq == r.last+1 && r.n < maxRunEvents && r.size < maxRunBytes {
				r.last, r.n, r.size = e.Seq, r.n+1, r.size+framed
				of[k] = i
				continue
			}
		}
		of[k] = int32(len(runs))
		runs = append(runs, run{taskID: e.TaskID, first: e.Seq, last: e.Seq, n: 1, size: framed})
		if e.Data != nil {
			cur[e.TaskID] = of[k]
		} else {
			delete(cur, e.TaskID)
		}
	}
	total := 0
	for _, r := range runs {
		if r.n > 1 {
			total += r.size
		}
	}
	buf := make([]byte, 0, total)
	for k, e := range events {
		r := &runs[of[k]]
		if r.n == 1 {
			r.data = e.Data
			continue
		}
		if r.data == nil {
			r.data, buf = buf[len(buf):len(buf):len(buf)+r.size], buf[:len(buf)+r.size]
		}
		r.data = binary.AppendUvarint(r.data, uint64(len(e.Data)))
		r.data = append(r.data, e.Data...)
	}
	return runs
}

// uvarintLen is the length of n as a uvarint.
func uvarintLen(n int) int {
	l := 1
	for ; n >= 0x80; n >>= 7 {
		l++
	}
	return l
}

// unpack appends the events of the run (first, last, data) of taskID to
// out: those with seq > after, at most limit events in out. A run whose
// data does not split into last-first+1 events (corrupted in the
// database) gives events without data for the seqs it cannot split, which
// the Writer reads as undecodable.
func unpack(out []store.Event, taskID string, first, last uint64, data []byte, after uint64, limit int) []store.Event {
	if first == last {
		if first > after && len(out) < limit {
			out = append(out, store.Event{TaskID: taskID, Seq: first, Data: data})
		}
		return out
	}
	for seq := first; seq <= last && len(out) < limit; seq++ {
		var ev []byte
		if n, k := binary.Uvarint(data); k > 0 && n <= uint64(len(data)-k) {
			ev, data = data[k:k+int(n)], data[k+int(n):]
		} else {
			data = nil // corrupt from here on
		}
		if seq > after {
			out = append(out, store.Event{TaskID: taskID, Seq: seq, Data: ev})
		}
	}
	return out
}

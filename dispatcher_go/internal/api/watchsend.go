package api

import (
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// watchSender sends a WatchTask's events from their encodings: the bytes
// the event log keeps of each event it holds (eventlog.Encoder: the event
// was encoded once, when it was appended, and the store wrote the same
// bytes). A response is those bytes framed as its event or events field,
// set as the response's unknown fields: the codec copies them as they are
// (no walk of the events to size or marshal them), and the wire is exactly
// what marshalling WatchTaskResponse{Event: ev} or {Events: evs} gives. An
// event without kept bytes (read back from the store, a placeholder, a
// fleet view's) is encoded here, once per response.
//
// One per WatchTask call, used by its goroutine only.
type watchSender struct {
	log  eventlog.Log
	send func(*dispatchv1.WatchTaskResponse) error

	raws  [][]byte // the events' bytes (nil: encode it), per call
	sizes []int    // the events' wire sizes, per call
	buf   []byte   // the response's bytes, reused (see flush)
}

// Fields of WatchTaskResponse.
const (
	watchEventField  protowire.Number = 1
	watchEventsField protowire.Number = 2
)

// maxReusedBuf bounds the response buffer a watchSender keeps between
// responses: one of a batch (≤ maxWatchBatchBytes); a larger one, of an
// event over it alone, is left to the garbage collector.
const maxReusedBuf = 2 * maxWatchBatchBytes

// batches sends evs as WatchTaskResponse.events, split where a response
// would exceed maxWatchBatchBytes (an event over it goes alone).
func (w *watchSender) batches(evs []*dispatchv1.TaskEvent) error {
	w.prepare(evs)
	defer w.done()
	start, bytes := 0, 0
	for i := range evs {
		n := framedLen(w.sizes[i])
		if i > start && bytes+n > maxWatchBatchBytes {
			if err := w.flush(evs, start, i, bytes, watchEventsField); err != nil {
				return err
			}
			start, bytes = i, 0
		}
		bytes += n
	}
	return w.flush(evs, start, len(evs), bytes, watchEventsField)
}

// oneByOne sends each of evs as WatchTaskResponse.event, one per response.
func (w *watchSender) oneByOne(evs []*dispatchv1.TaskEvent) error {
	w.prepare(evs)
	defer w.done()
	for i := range evs {
		if err := w.flush(evs, i, i+1, framedLen(w.sizes[i]), watchEventField); err != nil {
			return err
		}
	}
	return nil
}

// prepare looks up the bytes of evs and sizes the events without bytes.
func (w *watchSender) prepare(evs []*dispatchv1.TaskEvent) {
	w.raws = eventlog.EncodedOf(w.log, evs, w.raws)
	w.sizes = w.sizes[:0]
	for i, ev := range evs {
		n := len(w.raws[i])
		if w.raws[i] == nil {
			n = proto.Size(ev) // flush marshals it with this cached size
		}
		w.sizes = append(w.sizes, n)
	}
}

// done lets the events' bytes go (the log may drop them).
func (w *watchSender) done() { clear(w.raws) }

// framedLen is the size of an event of n bytes as a field of the response.
func framedLen(n int) int { return 1 + protowire.SizeVarint(uint64(n)) + n }

// reuseCached marshals an event just sized by proto.Size (prepare).
var reuseCached = proto.MarshalOptions{UseCachedSize: true}

// flush sends evs[lo:hi], total bytes framed, as one response of field.
// The buffer is reused for the next response: grpc's codec copies the
// message into its own buffer within Send, and this server registers no
// stats handler that could look at the message later.
func (w *watchSender) flush(evs []*dispatchv1.TaskEvent, lo, hi, total int, field protowire.Number) error {
	if cap(w.buf) < total {
		w.buf = make([]byte, 0, total)
	}
	buf := w.buf[:0]
	for i := lo; i < hi; i++ {
		buf = protowire.AppendTag(buf, field, protowire.BytesType)
		buf = protowire.AppendVarint(buf, uint64(w.sizes[i]))
		if raw := w.raws[i]; raw != nil {
			buf = append(buf, raw...)
			continue
		}
		at := len(buf)
		var err error
		if buf, err = reuseCached.MarshalAppend(buf, evs[i]); err != nil {
			return err
		}
		if len(buf)-at != w.sizes[i] {
			return fmt.Errorf("watch: event %d changed while being sent", evs[i].GetSeq())
		}
	}
	resp := &dispatchv1.WatchTaskResponse{}
	resp.ProtoReflect().SetUnknown(buf)
	err := w.send(resp)
	if cap(buf) <= maxReusedBuf {
		w.buf = buf[:0]
	} else {
		w.buf = nil
	}
	return err
}

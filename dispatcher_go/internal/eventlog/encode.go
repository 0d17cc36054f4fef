package eventlog

import (
	"encoding/binary"
	"sync"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Each event is encoded once, when it is appended: the log keeps its
// bytes beside it while it holds the event, the sink gets them to store
// (EncodedSink), and readers that send events on as protobuf copy them
// (Encoder) instead of walking the event again. Under a flood, walking
// each event 3–4 times to size it and twice to marshal it (the store, then
// each watcher's response) was about a quarter of the dispatcher's CPU.
//
// The bytes are exactly proto.Marshal of the numbered event (fields in
// field-number order, as protobuf-go writes them): the event is encoded
// before it has a seq, outside the log's lock, with room in front, and
// numbering it writes the seq field (2) in place behind the task id (1).

// seqRoom is the room encodeUnnumbered leaves in front of the event: the
// seq field's tag and its uvarint.
const seqRoom = 1 + binary.MaxVarintLen64

// seqTag is the tag of TaskEvent.seq (field 2, varint); idTag that of
// TaskEvent.task_id (field 1, bytes).
var (
	seqTag = byte(protowire.EncodeTag(2, protowire.VarintType))
	idTag  = byte(protowire.EncodeTag(1, protowire.BytesType))
)

// cached marshals a message just sized by proto.Size.
var cached = proto.MarshalOptions{UseCachedSize: true}

// unnumbered is an event encoded without its seq (encodeUnnumbered).
type unnumbered struct {
	// buf is seqRoom free bytes, then the encoded event; nil when the
	// event was not encoded (it could not be, or it has a seq already).
	buf []byte
	// at is where the seq field goes in buf (after the task id's field).
	at int
}

// encodeUnnumbered encodes ev, which has no seq yet, leaving room for it,
// into space taken from a (nil: a buffer of its own). It returns the zero
// unnumbered (nothing encoded) for an event that has a seq, or that
// protobuf refuses (the store then reports it, as before).
func encodeUnnumbered(ev *dispatchv1.TaskEvent, a *arena) unnumbered {
	if ev.GetSeq() != 0 {
		return unnumbered{}
	}
	var buf []byte
	if s, ok := asStreamed(ev); ok {
		// Content and thought: by hand (fastenc.go).
		buf = s.appendTo(a.take(seqRoom + s.size)[:seqRoom])
		if len(buf) != seqRoom+s.size {
			buf = nil // cannot happen (fuzzed against proto.Size): protobuf's encoding below, never a panic in Append
		}
	}
	if buf == nil {
		n := proto.Size(ev)
		var err error
		buf, err = cached.MarshalAppend(a.take(seqRoom + n)[:seqRoom], ev)
		if err != nil || len(buf) != seqRoom+n {
			return unnumbered{}
		}
	}
	n := len(buf) - seqRoom
	at := seqRoom
	if id := ev.GetTaskId(); id != "" {
		// The task id's field comes first: its tag, length and bytes.
		k := 1 + protowire.SizeVarint(uint64(len(id))) + len(id)
		if buf[seqRoom] != idTag || k > n {
			return unnumbered{} // not laid out as expected: no bytes kept
		}
		at += k
	}
	return unnumbered{buf: buf, at: at}
}

// size is the event's wire size without its seq (0 if not encoded).
func (u unnumbered) size() int {
	if u.buf == nil {
		return 0
	}
	return len(u.buf) - seqRoom
}

// number writes seq into u (once: u's buffer is the event's from then on)
// and returns the numbered event's bytes: proto.Marshal of the event with
// Seq = seq. nil if u holds nothing.
func (u unnumbered) number(seq uint64) []byte {
	if u.buf == nil {
		return nil
	}
	if seq == 0 {
		return u.buf[seqRoom:len(u.buf):len(u.buf)]
	}
	k := 1 + protowire.SizeVarint(seq)
	start := seqRoom - k
	// Move the task id's field k bytes to the front, then write the seq
	// field behind it.
	copy(u.buf[start:], u.buf[seqRoom:u.at])
	p := u.buf[:u.at-k]
	p = append(p, seqTag)
	p = protowire.AppendVarint(p, seq)
	if len(p) != u.at {
		panic("eventlog: seq field of unexpected size")
	}
	return u.buf[start:len(u.buf):len(u.buf)]
}

// arena hands out space for a log's encodings from shared chunks: one
// allocation for many small events instead of one each. A chunk lives as
// long as any event's bytes in it (the log lets them go when the task
// ends). Chunks start small, so that a task of a few events holds little,
// and double up to arenaChunk.
type arena struct {
	mu   sync.Mutex
	free []byte // the current chunk's unused space (len 0)
	next int    // the size of the next chunk
}

// Chunk sizes of an arena; a request over arenaAlone gets a buffer of its
// own.
const (
	arenaFirst = 1 << 10
	arenaChunk = 16 << 10
	arenaAlone = arenaChunk / 4
)

// take returns n bytes (len n) no one else is handed. a may be nil.
func (a *arena) take(n int) []byte {
	if a == nil || n > arenaAlone {
		return make([]byte, n)
	}
	a.mu.Lock()
	if cap(a.free) < n {
		size := max(a.next, arenaFirst, n) // n may exceed a young arena's chunk
		a.next = min(2*size, arenaChunk)
		a.free = make([]byte, 0, size)
	}
	b := a.free[:n:n]
	a.free = a.free[n:n]
	a.mu.Unlock()
	return b
}

// A log keeps the encodings of its newest events only, at most rawWindow
// of them: readers that keep up (the live watchers the bytes are for) find
// them, one further behind encodes what it sends itself. So the bytes a
// log holds beside its events are bounded (about rawWindow events' wire
// size), and the garbage collector scans a ring, not a slice as long as
// the task's log. The ring starts at rawFirst entries and doubles as the
// log grows.
const (
	rawFirst  = 64
	rawWindow = 4096
)

// rawRing holds the encodings of the newest events of a log, by seq.
type rawRing struct {
	b     [][]byte // b[(seq-1) & (len(b)-1)]; len(b) is a power of two
	n     int      // how many of the newest seqs up to last b holds
	last  uint64   // the newest seq put
	bytes int64    // the bytes held
}

// put holds data (nil: none) for seq, which is last+1 (or the first).
func (r *rawRing) put(seq uint64, data []byte) {
	if r.n == len(r.b) && len(r.b) < rawWindow {
		r.grow()
	}
	i := (seq - 1) & uint64(len(r.b)-1)
	if r.n == len(r.b) {
		r.bytes -= int64(len(r.b[i])) // the oldest goes
	} else {
		r.n++
	}
	r.b[i] = data
	r.bytes += int64(len(data))
	r.last = seq
}

// grow doubles the ring, keeping what it holds.
func (r *rawRing) grow() {
	b := make([][]byte, max(2*len(r.b), rawFirst))
	for k := range r.n {
		s := r.last - uint64(k)
		b[(s-1)&uint64(len(b)-1)] = r.b[(s-1)&uint64(len(r.b)-1)]
	}
	r.b = b
}

// get is the encoding held for seq, or nil.
func (r *rawRing) get(seq uint64) []byte {
	if seq == 0 || seq > r.last || r.last-seq >= uint64(r.n) {
		return nil
	}
	return r.b[(seq-1)&uint64(len(r.b)-1)]
}

// clear lets the encoding of seq go, if held.
func (r *rawRing) clear(seq uint64) {
	if d := r.get(seq); d != nil {
		r.bytes -= int64(len(d))
		r.b[(seq-1)&uint64(len(r.b)-1)] = nil
	}
}

// Encoder is a Log that keeps its events' encodings (as memory and durable
// logs do while they hold the events).
type Encoder interface {
	// Encoded appends to dst[:0], for each of evs (events this log's Read
	// returned), proto.Marshal of it, or nil when the log does not hold
	// its bytes (then the caller encodes it). The bytes are shared: the
	// caller must not change them.
	Encoded(evs []*dispatchv1.TaskEvent, dst [][]byte) [][]byte
}

// EncodedOf is l's Encoded when l is an Encoder; otherwise dst[:0] with a
// nil for each of evs.
func EncodedOf(l Log, evs []*dispatchv1.TaskEvent, dst [][]byte) [][]byte {
	if e, ok := l.(Encoder); ok {
		return e.Encoded(evs, dst)
	}
	dst = dst[:0]
	for range evs {
		dst = append(dst, nil)
	}
	return dst
}

// EncodedSink is a Sink that stores the bytes the log encoded instead of
// encoding the event again (store.Writer is one).
type EncodedSink interface {
	Sink
	// PersistEncoded is Persist with ev's bytes (proto.Marshal of ev, nil
	// when the log has none: the sink encodes it itself). The sink must
	// not change them.
	PersistEncoded(c Committer, taskID string, ev *dispatchv1.TaskEvent, data []byte)
}

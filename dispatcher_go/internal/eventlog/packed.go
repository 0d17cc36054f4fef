package eventlog

import (
	"fmt"
	"slices"
	"unsafe"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// A memory log (Memory) has no store behind it, yet it keeps every event of
// its task for as long as the task is kept. As messages (an event, its
// oneof, its payload and its text: ~350 bytes in four objects for a
// 64-byte content chunk) the events of the kept finished tasks grew the
// heap by ~60 MB/s under the throughput flood; the fresh spans, their page
// faults and the marking of those objects cost the memory backend more CPU
// per event than the SQLite one, whose finished logs let their events go.
//
// So a memory log also keeps each event's encoding (encode.go: the bytes
// it made at the append anyway), copied back to back into chunks: about
// the event's wire size, in objects the garbage collector does not scan.
// A finished log lets its messages go like a durable one (retainer, see
// Durable) and its readers then decode the events they read from these
// bytes, as a durable log's read the store. The encodings serve Encoder
// too, for every event, so a memory log keeps no rawRing.

// Chunk sizes of a packed log: chunks start small, so that a task of a few
// events holds little, and double up to packChunk; an encoding over
// packAlone is kept as it is, as a chunk of its own.
const (
	packFirst = 1 << 10
	packChunk = 64 << 10
	packAlone = packChunk / 4
)

// packed holds the encoding of each event of a log, by seq from 1. It is
// guarded by its log's lock (put and trim under the write lock).
type packed struct {
	chunks [][]byte
	refs   []packedRef // refs[seq-1]
	next   int         // the size of the next chunk
	// odd are the events that have no encoding (encodeUnnumbered gave
	// none: protobuf refused them); kept as they are. n is 0 in their ref.
	odd map[uint64]*dispatchv1.TaskEvent
}

// packedRef is where an event's bytes are: chunks[chunk][off:off+n].
type packedRef struct{ chunk, off, n uint32 }

// put keeps data, the encoding of ev (nil: none), as seq, which is the
// next seq (len(refs)+1). data may be an encoding's own buffer (over
// packAlone), which it keeps then: nobody else writes it.
func (p *packed) put(seq uint64, data []byte, ev *dispatchv1.TaskEvent) {
	n := len(data)
	switch {
	case n == 0:
		if p.odd == nil {
			p.odd = make(map[uint64]*dispatchv1.TaskEvent)
		}
		p.odd[seq] = ev
		p.refs = append(p.refs, packedRef{})
		return
	case n > packAlone:
		p.chunks = append(p.chunks, data[:n:n])
		p.refs = append(p.refs, packedRef{chunk: uint32(len(p.chunks) - 1), n: uint32(n)})
		return
	}
	last := len(p.chunks) - 1
	if last < 0 || cap(p.chunks[last])-len(p.chunks[last]) < n {
		size := max(p.next, packFirst, n) // n may exceed a young log's chunk
		p.next = min(2*size, packChunk)
		p.chunks = append(p.chunks, make([]byte, 0, size))
		last++
	}
	c := p.chunks[last]
	p.refs = append(p.refs, packedRef{chunk: uint32(last), off: uint32(len(c)), n: uint32(n)})
	p.chunks[last] = append(c, data...)
}

// get is seq's encoding (shared, never written again), nil if it has none.
func (p *packed) get(seq uint64) []byte {
	if seq == 0 || seq > uint64(len(p.refs)) {
		return nil
	}
	r := p.refs[seq-1]
	if r.n == 0 {
		return nil
	}
	return p.chunks[r.chunk][r.off : r.off+r.n : r.off+r.n]
}

// event is event seq, decoded from its encoding (a new message each call).
// A seq with neither bytes nor a kept message is an error: decoding no
// bytes would give an empty event (seq 0), from which a reader would read
// the log again from its start.
func (p *packed) event(seq uint64) (*dispatchv1.TaskEvent, error) {
	if ev, ok := p.odd[seq]; ok {
		return ev, nil
	}
	data := p.get(seq)
	if data == nil {
		return nil, fmt.Errorf("eventlog: no encoding kept for event %d (%d kept)", seq, len(p.refs))
	}
	ev := &dispatchv1.TaskEvent{}
	if err := proto.Unmarshal(data, ev); err != nil {
		return nil, fmt.Errorf("eventlog: decoding event %d: %w", seq, err)
	}
	return ev, nil
}

// packedRefBytes is the size of a packedRef.
const packedRefBytes = int64(unsafe.Sizeof(packedRef{}))

// bytes is the memory p holds: its chunks and refs (and 64 bytes for an
// odd event, beside its message's wire size, which the log counts).
func (p *packed) bytes() int64 {
	n := packedRefBytes*int64(cap(p.refs)) + 64*int64(len(p.odd))
	for _, c := range p.chunks {
		n += int64(cap(c))
	}
	return n
}

// trim gives back the room no event will use (the log is finished): the
// rest of the last chunk and of refs, when it is more than an eighth.
func (p *packed) trim() {
	if last := len(p.chunks) - 1; last >= 0 {
		if c := p.chunks[last]; cap(c)-len(c) > len(c)/8 {
			p.chunks[last] = exactCopy(c)
		}
	}
	if cap(p.refs)-len(p.refs) > len(p.refs)/8 {
		p.refs = exactCopy(p.refs)
	}
	p.chunks = slices.Clip(p.chunks)
}

// exactCopy copies s into a slice of capacity len(s) (slices.Clone rounds
// it up to the allocator's size class).
func exactCopy[S ~[]E, E any](s S) S {
	c := make(S, len(s))
	copy(c, s)
	return c
}

package eventlog

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// encodeSamples are events of several kinds and shapes, without a seq.
func encodeSamples() []*dispatchv1.TaskEvent {
	at := &timestamppb.Timestamp{Seconds: 1_800_000_000, Nanos: 123}
	return []*dispatchv1.TaskEvent{
		{},
		{TaskId: "t"},
		{TaskId: "task-0123456789abcdef", Time: at, EmittedAtUs: 17, UpstreamSeq: 1 << 40,
			Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "héllo"}}},
		{Time: at, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "no task id"}}},
		{TaskId: strings.Repeat("i", 200), Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_SUCCESS, Message: "done"}}},
		{TaskId: "t", Kind: &dispatchv1.TaskEvent_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{CallId: "c1", ToolName: "calc", ArgumentsJson: `{"e":"1+1"}`}}},
		{TaskId: "t", Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{Reason: "by client"}}},
		{TaskId: "t", Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("x", 70_000)}}},
	}
}

// The bytes a log keeps of an event are proto.Marshal of the numbered
// event, whatever its seq (uvarints of 1 to 10 bytes), task id (none,
// short, with a 2-byte length) and kind.
func TestEncodedIsMarshalOfTheNumberedEvent(t *testing.T) {
	for _, seq := range []uint64{1, 127, 128, 16383, 16384, 1 << 35, 1<<64 - 1} {
		for i, ev := range encodeSamples() {
			u := encodeUnnumbered(ev, nil)
			if u.buf == nil {
				t.Fatalf("sample %d not encoded", i)
			}
			if got, want := u.size(), proto.Size(ev); got != want {
				t.Fatalf("sample %d: size %d, want %d", i, got, want)
			}
			got := u.number(seq)
			ev.Seq = seq
			want, err := proto.MarshalOptions{Deterministic: true}.Marshal(ev)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("seq %d, sample %d:\n got %x\nwant %x", seq, i, got, want)
			}
		}
	}
}

// An event that has a seq already, or that protobuf refuses, keeps no
// bytes: the store and the readers encode it themselves (and report it).
func TestEncodeUnnumberedRefuses(t *testing.T) {
	if u := encodeUnnumbered(&dispatchv1.TaskEvent{TaskId: "t", Seq: 3}, nil); u.buf != nil || u.number(4) != nil {
		t.Fatal("an event with a seq was encoded")
	}
	bad := &dispatchv1.TaskEvent{TaskId: "t", Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "\xff"}}}
	if u := encodeUnnumbered(bad, nil); u.buf != nil {
		t.Fatal("an event with invalid UTF-8 was encoded")
	}
}

// encSink is a fakeSink that records the bytes handed to PersistEncoded.
type encSink struct {
	fakeSink
	mu   sync.Mutex
	data map[uint64][]byte
}

func (s *encSink) PersistEncoded(c Committer, taskID string, ev *dispatchv1.TaskEvent, data []byte) {
	s.mu.Lock()
	if s.data == nil {
		s.data = make(map[uint64][]byte)
	}
	s.data[ev.GetSeq()] = data
	s.mu.Unlock()
	s.Persist(c, taskID, ev)
}

// Readers of a durable log get, for the events Read gave them, the bytes
// the sink stored (the same slice) until the finished log is retained;
// after that, and for events they did not get from this log, nil.
func TestDurableEncodedSharedWithSinkUntilRetained(t *testing.T) {
	sink := &encSink{}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	for _, text := range []string{"a", "b", "c"} {
		ev := content(text)
		ev.TaskId = "t"
		if _, err := l.Append(ev, Capped); err != nil {
			t.Fatal(err)
		}
	}
	sink.commitAll()
	evs, err := l.Read(context.Background(), 0, nil)
	if err != nil || len(evs) != 3 {
		t.Fatalf("read %d: %v", len(evs), err)
	}
	raws := EncodedOf(l, append(evs, content("stranger")), nil)
	if len(raws) != 4 || raws[3] != nil {
		t.Fatalf("raws %d, stranger %x", len(raws), raws[len(raws)-1])
	}
	for i, ev := range evs {
		want, _ := proto.Marshal(ev)
		if !bytes.Equal(raws[i], want) {
			t.Fatalf("event %d: %x, want %x", i+1, raws[i], want)
		}
		if &raws[i][0] != &sink.data[ev.GetSeq()][0] {
			t.Fatalf("event %d: the reader's bytes are not the sink's", i+1)
		}
	}
	// A copy of an event (same seq, another pointer) gets no bytes.
	if r := EncodedOf(l, []*dispatchv1.TaskEvent{proto.Clone(evs[0]).(*dispatchv1.TaskEvent)}, nil); r[0] != nil {
		t.Fatal("bytes for an event the log did not give out")
	}
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	sink.commitAll() // finished and durable: retained, bytes let go
	if r := EncodedOf(l, evs, nil); r[0] != nil || r[1] != nil || r[2] != nil {
		t.Fatal("a retained log still hands out bytes")
	}
	if ml := l.(*memLog); ml.raw.b != nil || ml.raw.bytes != 0 {
		t.Fatalf("retained log holds %d encodings, %d bytes", ml.raw.n, ml.raw.bytes)
	}
}

// A placeholder the store keeps instead of an event (Replace) has no
// bytes: the reader encodes it.
func TestReplacedEventHasNoBytes(t *testing.T) {
	sink := &encSink{}
	l, _ := NewDurable(Limits{}, sink).Create("t")
	if _, err := l.Append(content("a"), Capped); err != nil {
		t.Fatal(err)
	}
	ph := content("placeholder")
	l.(Committer).Replace(1, ph)
	sink.commitAll()
	evs, _ := l.Read(context.Background(), 0, nil)
	if len(evs) != 1 || evs[0] != ph {
		t.Fatalf("read %v", evs)
	}
	if r := EncodedOf(l, evs, nil); r[0] != nil {
		t.Fatalf("placeholder has bytes %x", r[0])
	}
}

// A memory log hands out the bytes of every event it gave out, also once
// its task has ended (they are what it keeps, packed.go), and none for an
// event it did not give out.
func TestMemoryEncodedAlsoWhenSealed(t *testing.T) {
	l := newLog(t, Limits{})
	if _, err := l.Append(content("a"), Capped); err != nil {
		t.Fatal(err)
	}
	evs, _ := l.Read(context.Background(), 0, nil)
	want, _ := proto.Marshal(evs[0])
	if r := EncodedOf(l, evs, nil); !bytes.Equal(r[0], want) {
		t.Fatalf("bytes %x, want %x", r[0], want)
	}
	if _, err := l.Seal(content("end")); err != nil {
		t.Fatal(err)
	}
	if r := EncodedOf(l, evs, nil); !bytes.Equal(r[0], want) {
		t.Fatalf("sealed: bytes %x, want %x", r[0], want)
	}
	if r := EncodedOf(l, []*dispatchv1.TaskEvent{proto.Clone(evs[0]).(*dispatchv1.TaskEvent)}, nil); r[0] != nil {
		t.Fatal("bytes for an event the log did not give out")
	}
}

// The byte limit counts the wire size of each event as before (without
// its seq).
func TestByteLimitCountsWireSize(t *testing.T) {
	ev := content(strings.Repeat("x", 100))
	n := int64(proto.Size(ev))
	l := newLog(t, Limits{MaxBytes: 3 * n})
	for i := range 3 {
		if _, err := l.Append(content(strings.Repeat("x", 100)), Capped); err != nil {
			t.Fatalf("append %d: %v", i+1, err)
		}
	}
	if _, err := l.Append(content("x"), Capped); err == nil {
		t.Fatal("append over the byte limit accepted")
	}
}

// Events encoded into a log's shared arena keep their own bytes: after
// thousands of appends of mixed sizes (some over arenaAlone, some from
// another goroutine at the same time) every event's bytes are still
// proto.Marshal of it.
func TestArenaEncodingsStayIntact(t *testing.T) {
	l := newLog(t, Limits{})
	var wg sync.WaitGroup
	for g := range 2 {
		wg.Go(func() {
			for i := range 1500 {
				n := (i * 37 % 300) + g
				if i%200 == 7 {
					n = arenaAlone + 100
				}
				if _, err := l.Append(content(strings.Repeat("y", n)), Capped); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	var after uint64
	for after < 3000 {
		evs, err := l.Read(context.Background(), after, make([]*dispatchv1.TaskEvent, 0, 256))
		if err != nil {
			t.Fatal(err)
		}
		raws := EncodedOf(l, evs, nil)
		for i, ev := range evs {
			want, _ := proto.Marshal(ev)
			if !bytes.Equal(raws[i], want) || cap(raws[i]) != len(raws[i]) {
				t.Fatalf("event %d: bytes %x (cap %d), want %x", ev.GetSeq(), raws[i], cap(raws[i]), want)
			}
		}
		after = evs[len(evs)-1].GetSeq()
	}
}

// The ring holds the encodings of the newest rawWindow seqs, through its
// growth, starting at any seq (a restored log), with its byte count.
func TestRawRingKeepsTheNewest(t *testing.T) {
	for _, first := range []uint64{1, 1000} {
		var r rawRing
		last := first + 3*rawWindow
		for s := first; s <= last; s++ {
			r.put(s, []byte(fmt.Sprint(s)))
			if s%997 == 0 || s == last {
				var want int64
				for q := first; q <= s; q++ {
					got := r.get(q)
					if s-q < rawWindow {
						if string(got) != fmt.Sprint(q) {
							t.Fatalf("first %d, after %d: seq %d holds %q", first, s, q, got)
						}
						want += int64(len(got))
					} else if got != nil {
						t.Fatalf("first %d, after %d: seq %d (out of the window) holds %q", first, s, q, got)
					}
				}
				if r.get(s+1) != nil || r.bytes != want {
					t.Fatalf("after %d: bytes %d, want %d", s, r.bytes, want)
				}
			}
		}
		r.clear(last)
		if r.get(last) != nil || r.get(last-1) == nil {
			t.Fatal("clear")
		}
	}
}

// A reader far behind a durable log gets no bytes for the events out of
// the window (it encodes them itself), and the log keeps at most the
// window's.
func TestEncodedOnlyForTheNewestEvents(t *testing.T) {
	sink := &fakeSink{}
	l, err := NewDurable(Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	const n = rawWindow + 1000
	for range n {
		if _, err := l.Append(content("z"), Capped); err != nil {
			t.Fatal(err)
		}
	}
	sink.commitAll()
	evs, _ := l.Read(context.Background(), 0, make([]*dispatchv1.TaskEvent, 0, n))
	raws := EncodedOf(l, evs, nil)
	for i, r := range raws {
		if (r != nil) != (i >= n-rawWindow) {
			t.Fatalf("event %d: bytes %v", i+1, r != nil)
		}
	}
	if ml := l.(*memLog); len(ml.raw.b) != rawWindow {
		t.Fatalf("ring of %d", len(ml.raw.b))
	}
}

// An arena hands out any size up to arenaAlone from its first chunks too,
// which are smaller than that: a young log's first event of a few KiB (a
// folded content chunk) crashed the dispatcher with "slice bounds out of
// range" before.
func TestArenaTakesAnySizeFromYoungChunks(t *testing.T) {
	for _, first := range []int{1, arenaFirst - 1, arenaFirst, arenaFirst + 1, 2*arenaFirst + 80, arenaAlone} {
		for _, second := range []int{1, arenaFirst + 1, 3*arenaFirst + 1, arenaAlone} {
			a := &arena{}
			x, y := a.take(first), a.take(second)
			if len(x) != first || cap(x) != first || len(y) != second || cap(y) != second {
				t.Fatalf("take(%d), take(%d): len/cap %d/%d, %d/%d", first, second, len(x), cap(x), len(y), cap(y))
			}
		}
	}
	l := newLog(t, Limits{})
	for _, n := range []int{2100, 3000, arenaAlone - 64, 10, 4000} {
		if _, err := l.Append(content(strings.Repeat("z", n)), Capped); err != nil {
			t.Fatal(err)
		}
	}
	evs, err := l.Read(context.Background(), 0, nil)
	if err != nil || len(evs) != 5 {
		t.Fatalf("read %d events, %v", len(evs), err)
	}
	for i, raw := range EncodedOf(l, evs, nil) {
		if want, _ := proto.Marshal(evs[i]); !bytes.Equal(raw, want) {
			t.Fatalf("event %d: bytes differ from proto.Marshal", evs[i].GetSeq())
		}
	}
}

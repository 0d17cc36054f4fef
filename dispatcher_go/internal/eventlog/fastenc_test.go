package eventlog

import (
	"bytes"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// randomStreamed is a content or thought event with each field absent,
// zero, small, large or extreme at random, as a log gets it (no seq).
func randomStreamed(r *rand.Rand) *dispatchv1.TaskEvent {
	str := func() string {
		switch r.IntN(5) {
		case 0:
			return ""
		case 1:
			return "é✓" + strings.Repeat("a", r.IntN(4))
		case 2:
			return strings.Repeat("x", 120+r.IntN(20)) // a 2-byte length
		case 3:
			if r.IntN(16) == 0 {
				return strings.Repeat("y", 1<<14) // a 3-byte length, rarely (slow under -race)
			}
			return strings.Repeat("y", 300)
		}
		return "tok"
	}
	i64 := func() int64 {
		switch r.IntN(5) {
		case 0:
			return 0
		case 1:
			return -1 - r.Int64N(1000)
		case 2:
			return math.MaxInt64
		case 3:
			return math.MinInt64
		}
		return r.Int64N(1 << 50)
	}
	ev := &dispatchv1.TaskEvent{TaskId: str(), EmittedAtUs: i64()}
	if r.IntN(2) == 0 {
		ev.UpstreamSeq = uint64(r.Int64N(1<<40)) * uint64(r.IntN(2))
	} else if r.IntN(2) == 0 {
		ev.UpstreamSeq = math.MaxUint64
	}
	if r.IntN(4) != 0 {
		ev.Time = &timestamppb.Timestamp{Seconds: i64(), Nanos: int32(i64() % 1_000_000_000)}
	}
	if r.IntN(2) == 0 {
		ev.Kind = &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: str(), IsFinish: r.IntN(2) == 0}}
	} else {
		ev.Kind = &dispatchv1.TaskEvent_Thought{Thought: &dispatchv1.ThoughtChain{StepName: str(), Delta: str()}}
	}
	return ev
}

// The hand encoder writes exactly proto.Marshal's bytes, for every shape
// of content and thought event, numbered with seqs of every length.
func TestHandEncodingIsProtoMarshal(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	seqs := []uint64{1, 127, 128, 1 << 35, math.MaxUint64}
	for i := range 1000 {
		ev := randomStreamed(r)
		s, ok := asStreamed(ev)
		if !ok {
			t.Fatalf("event %d not taken by the hand encoder: %v", i, ev)
		}
		if want := proto.Size(ev); s.size != want {
			t.Fatalf("event %d: size %d, want %d (%v)", i, s.size, want, ev)
		}
		got := s.appendTo(nil)
		want, err := proto.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("event %d (%v):\n got %x\nwant %x", i, ev, got, want)
		}
		// And through the log's encoding, numbered.
		seq := seqs[i%len(seqs)]
		u := encodeUnnumbered(ev, nil)
		numbered := u.number(seq)
		ev.Seq = seq
		if want, _ := proto.Marshal(ev); !bytes.Equal(numbered, want) {
			t.Fatalf("event %d numbered %d:\n got %x\nwant %x", i, seq, numbered, want)
		}
	}
}

// Events the hand encoder must leave to protobuf: other kinds, unknown
// fields anywhere (protobuf writes them), a nil payload, strings that are
// not UTF-8 (protobuf refuses them), and a seq already set.
func TestHandEncoderLeavesOtherShapesToProtobuf(t *testing.T) {
	unknown := protowire.AppendString(protowire.AppendTag(nil, 99, protowire.BytesType), "later")
	withUnknown := func(m proto.Message) proto.Message {
		m.ProtoReflect().SetUnknown(unknown)
		return m
	}
	content := func(c *dispatchv1.ContentChunk) *dispatchv1.TaskEvent {
		return &dispatchv1.TaskEvent{TaskId: "t", Kind: &dispatchv1.TaskEvent_Content{Content: c}}
	}
	cases := map[string]*dispatchv1.TaskEvent{
		"state":                  {TaskId: "t", Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{}}},
		"no kind":                {TaskId: "t"},
		"nil content":            content(nil),
		"nil thought":            {Kind: &dispatchv1.TaskEvent_Thought{}},
		"unknown in the chunk":   content(withUnknown(&dispatchv1.ContentChunk{Text: "a"}).(*dispatchv1.ContentChunk)),
		"unknown in the thought": {Kind: &dispatchv1.TaskEvent_Thought{Thought: withUnknown(&dispatchv1.ThoughtChain{Delta: "a"}).(*dispatchv1.ThoughtChain)}},
		"unknown in the event":   withUnknown(content(&dispatchv1.ContentChunk{Text: "a"})).(*dispatchv1.TaskEvent),
		"unknown in the time": {Time: withUnknown(timestamppb.New(timestamppb.Now().AsTime())).(*timestamppb.Timestamp),
			Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{}}},
		"text not UTF-8":    content(&dispatchv1.ContentChunk{Text: "a\xffb"}),
		"delta not UTF-8":   {Kind: &dispatchv1.TaskEvent_Thought{Thought: &dispatchv1.ThoughtChain{Delta: "\xc3"}}},
		"step not UTF-8":    {Kind: &dispatchv1.TaskEvent_Thought{Thought: &dispatchv1.ThoughtChain{StepName: "\xc3"}}},
		"task id not UTF-8": {TaskId: "\xff", Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{}}},
		"seq set":           {Seq: 3, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{}}},
	}
	for name, ev := range cases {
		if _, ok := asStreamed(ev); ok {
			t.Errorf("%s: taken by the hand encoder", name)
		}
		// The log's encoding is still proto.Marshal's (or none, where
		// protobuf refuses the event).
		u := encodeUnnumbered(ev, nil)
		want, err := proto.Marshal(ev)
		switch {
		case ev.GetSeq() != 0:
			if u.buf != nil {
				t.Errorf("%s: encoded", name)
			}
		case err != nil:
			if u.buf != nil {
				t.Errorf("%s: encoded although protobuf refuses it (%v)", name, err)
			}
		case !bytes.Equal(u.number(0), want):
			t.Errorf("%s:\n got %x\nwant %x", name, u.number(0), want)
		}
	}
}

// BenchmarkEncodeContent is the log's encoding of one flood event.
func BenchmarkEncodeContent(b *testing.B) {
	ev := &dispatchv1.TaskEvent{TaskId: "0198c0de-7a1b-7c3d-9e8f-0123456789ab", Time: timestamppb.Now(), EmittedAtUs: 1_765_000_000_000_000,
		UpstreamSeq: 12345, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("t", 64)}}}
	var a arena
	b.ReportAllocs()
	for b.Loop() {
		encodeUnnumbered(ev, &a)
	}
}

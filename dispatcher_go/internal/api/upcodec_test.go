package api

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/session"
)

// randomUpstream is a packet of a shape decodeUpstream takes: content or
// thought (or, when batch, a batch of such packets), every field absent,
// zero, small, large or extreme at random.
func randomUpstream(r *rand.Rand, batch bool) *dispatchv1.UpstreamPacket {
	str := func() string {
		switch r.IntN(7) {
		case 0:
			return ""
		case 5:
			// Around the sizes of the content boxes' rooms.
			return strings.Repeat("r", []int{1, 39, 40, 41, 71, 72, 73, 135, 136, 137, 279, 280, 281}[r.IntN(13)])
		case 1:
			return "é✓\U0001F600" + strings.Repeat("a", r.IntN(4))
		case 2:
			return strings.Repeat("x", 120+r.IntN(20))
		case 3:
			if r.IntN(16) == 0 {
				return strings.Repeat("y", 1<<14) // a 3-byte length, rarely (slow under -race)
			}
			return strings.Repeat("y", 300)
		case 4:
			return "s1"
		}
		return "tok"
	}
	p := &dispatchv1.UpstreamPacket{SessionId: str()}
	switch r.IntN(4) {
	case 0:
		p.Timestamp = -1 - r.Int64N(1000)
	case 1:
		p.Timestamp = math.MinInt64
	case 2:
		p.Timestamp = r.Int64N(1 << 52)
	}
	switch r.IntN(3) {
	case 0:
		p.Seq = math.MaxUint64
	case 1:
		p.Seq = uint64(r.Int64N(1 << 30))
	}
	switch k := r.IntN(5); {
	case k == 0 && batch:
		b := &dispatchv1.UpstreamBatch{}
		for range r.IntN(8) {
			b.Packets = append(b.Packets, randomUpstream(r, false))
		}
		p.Payload = &dispatchv1.UpstreamPacket_Batch{Batch: b}
	case k <= 2:
		p.Payload = &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: str(), IsFinish: r.IntN(3) == 0}}
	case k == 3:
		p.Payload = &dispatchv1.UpstreamPacket_Thought{Thought: &dispatchv1.ThoughtChain{StepName: str(), Delta: str()}}
	}
	return p
}

// checkDecode decodes b into pkt by hand and, where that takes it,
// requires exactly proto.Unmarshal's message; it reports whether the hand
// decoder took it.
func checkDecode(t *testing.T, b []byte, pkt *dispatchv1.UpstreamPacket) bool {
	t.Helper()
	want := &dispatchv1.UpstreamPacket{}
	err := proto.Unmarshal(b, want)
	if !decodeUpstream(b, pkt) {
		return false
	}
	if err != nil {
		t.Fatalf("decoded by hand what protobuf refuses (%v): %x", err, b)
	}
	if !proto.Equal(pkt, want) {
		t.Fatalf("decoded %x\n got %v\nwant %v", b, pkt, want)
	}
	return true
}

// The hand decoder gives proto.Unmarshal's message for every packet of
// the shapes it takes, into a packet reused from the one before.
func TestHandDecodingIsProtoUnmarshal(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	pkt := &dispatchv1.UpstreamPacket{}
	for i := range 1000 {
		p := randomUpstream(r, true)
		b, err := proto.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if !checkDecode(t, b, pkt) {
			t.Fatalf("packet %d not taken by the hand decoder: %v", i, p)
		}
	}
}

// Bytes the hand decoder takes are exactly those protobuf takes the same
// way: packets made odd (a field repeated, two payloads, unknown fields,
// wrong wire types, strings that are not UTF-8, cut or flipped bytes) are
// either left to protobuf or decoded to protobuf's message.
func TestHandDecoderLeavesTheRestToProtobuf(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	tag := func(b []byte, num protowire.Number, typ protowire.Type) []byte {
		return protowire.AppendTag(b, num, typ)
	}
	odd := [][]byte{
		// session_id twice (the last wins).
		protowire.AppendString(tag(protowire.AppendString(tag(nil, 1, protowire.BytesType), "a"), 1, protowire.BytesType), "b"),
		// content twice (merged), content then thought (the last wins).
		protowire.AppendBytes(tag(protowire.AppendBytes(tag(nil, 4, protowire.BytesType), []byte{0x0a, 1, 'x'}), 4, protowire.BytesType), []byte{0x10, 1}),
		protowire.AppendBytes(tag(protowire.AppendBytes(tag(nil, 4, protowire.BytesType), []byte{0x0a, 1, 'x'}), 3, protowire.BytesType), []byte{0x12, 1, 'y'}),
		// text twice inside content; an unknown field inside content.
		protowire.AppendBytes(tag(nil, 4, protowire.BytesType), []byte{0x0a, 1, 'x', 0x0a, 1, 'y'}),
		protowire.AppendBytes(tag(nil, 4, protowire.BytesType), []byte{0x18, 1}),
		// an unknown field; a known one of the wrong wire type.
		protowire.AppendVarint(tag(nil, 40, protowire.VarintType), 1),
		protowire.AppendVarint(tag(nil, 1, protowire.VarintType), 1),
		protowire.AppendFixed64(tag(nil, 2, protowire.Fixed64Type), 1),
		// strings that are not UTF-8.
		protowire.AppendString(tag(nil, 1, protowire.BytesType), "a\xff"),
		protowire.AppendBytes(tag(nil, 4, protowire.BytesType), []byte{0x0a, 1, 0xc3}),
		protowire.AppendBytes(tag(nil, 3, protowire.BytesType), []byte{0x12, 1, 0xc3}),
		// another payload (usage), a hello; a batch in a batch.
		protowire.AppendBytes(tag(nil, 8, protowire.BytesType), nil),
		protowire.AppendBytes(tag(nil, 7, protowire.BytesType), nil),
		protowire.AppendBytes(tag(nil, 15, protowire.BytesType), protowire.AppendBytes(tag(nil, 1, protowire.BytesType), protowire.AppendBytes(tag(nil, 15, protowire.BytesType), nil))),
		// cut inside a length, a varint too long.
		{0x0a, 5, 'a'},
		{0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01},
	}
	pkt := &dispatchv1.UpstreamPacket{}
	for i, b := range odd {
		if checkDecode(t, b, pkt) {
			t.Errorf("odd packet %d (%x) taken by the hand decoder", i, b)
		}
	}
	// Random damage to good packets: whatever the hand decoder takes must
	// be protobuf's message (checkDecode); some of it is still good.
	took, left := 0, 0
	for range 4000 {
		b, _ := proto.Marshal(randomUpstream(r, true))
		switch r.IntN(4) {
		case 0:
			if len(b) > 0 {
				b = b[:r.IntN(len(b))]
			}
		case 1:
			if len(b) > 0 {
				b[r.IntN(len(b))] ^= byte(1 << r.IntN(8))
			}
		case 2:
			more, _ := proto.Marshal(randomUpstream(r, true))
			b = append(b, more...)
		case 3:
			if len(b) > 0 {
				b[r.IntN(len(b))] = byte(r.IntN(256))
			}
		}
		if checkDecode(t, b, pkt) {
			took++
		} else {
			left++
		}
	}
	if took == 0 || left == 0 {
		t.Fatalf("took %d, left %d: the damage test checks nothing", took, left)
	}
}

// Decoding the next packet into the same message leaves the payload of
// the last one as it was (the event recorded from it keeps it), even when
// the bytes it came from are reused (grpc's buffers are pooled), and a
// content packet of the same session costs one allocation: the payload
// (its wrapper, message and text in one).
func TestHandDecoderKeepsTheLastPayloadAndTheSessionID(t *testing.T) {
	first, _ := proto.Marshal(&dispatchv1.UpstreamPacket{SessionId: "sess-1", Seq: 1,
		Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: "one"}}})
	second, _ := proto.Marshal(&dispatchv1.UpstreamPacket{SessionId: "sess-1", Seq: 2,
		Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: "two", IsFinish: true}}})
	pkt := &dispatchv1.UpstreamPacket{}
	if !decodeUpstream(first, pkt) {
		t.Fatal("not decoded")
	}
	kept, id := pkt.GetContent(), pkt.GetSessionId()
	for i := range first {
		first[i] = 'X' // the buffer reused
	}
	if !decodeUpstream(second, pkt) {
		t.Fatal("not decoded")
	}
	if kept.GetText() != "one" || kept.GetIsFinish() || pkt.GetContent() == kept || pkt.GetContent().GetText() != "two" {
		t.Fatalf("the first payload became %v, the second is %v", kept, pkt.GetContent())
	}
	if unsafe.StringData(pkt.GetSessionId()) != unsafe.StringData(id) {
		t.Fatal("the session id was made again")
	}
	if n := testing.AllocsPerRun(100, func() { decodeUpstream(second, pkt) }); n != 1 {
		t.Fatalf("%v allocations per content packet, want 1", n)
	}
}

// The codec hands UpstreamPackets to the hand decoder and everything else
// (and what the decoder leaves) to grpc's proto codec.
func TestServerCodec(t *testing.T) {
	c := serverCodec{}
	if c.Name() != "proto" {
		t.Fatalf("name %q", c.Name())
	}
	in := &dispatchv1.UpstreamPacket{SessionId: "s", Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: "t"}}}
	data, err := c.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := proto.Marshal(in)
	if !bytes.Equal(data.Materialize(), want) {
		t.Fatal("marshal differs from proto.Marshal")
	}
	out := &dispatchv1.UpstreamPacket{}
	if err := c.Unmarshal(data, out); err != nil || !proto.Equal(in, out) {
		t.Fatalf("unmarshal: %v, %v", err, out)
	}
	// A hello: protobuf's path.
	hello := &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{CommanderId: "c"}}}
	hb, _ := proto.Marshal(hello)
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(hb)}, out); err != nil || !proto.Equal(hello, out) {
		t.Fatalf("hello: %v, %v", err, out)
	}
	// Bytes protobuf refuses: its error, noted for the interceptors
	// (decodeerr.go) as INVALID_ARGUMENT, not returned.
	if err := c.unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 5, 'a'})}, out); err == nil {
		t.Fatal("a cut packet decoded")
	}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer([]byte{0x0a, 5, 'a'})}, out); err != nil {
		t.Fatalf("Unmarshal returned %v", err)
	}
	if err := decodeFailure(out); status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "grpc: failed to unmarshal the received message: ") {
		t.Fatalf("decode failure %v", err)
	}
	if err := decodeFailure(out); err != nil {
		t.Fatalf("the failure was not forgotten: %v", err)
	}
	// Another message type.
	ack := &dispatchv1.WatchTaskRequest{TaskId: "x"}
	ab, _ := proto.Marshal(ack)
	got := &dispatchv1.WatchTaskRequest{}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(ab)}, got); err != nil || !proto.Equal(ack, got) {
		t.Fatalf("other message: %v, %v", err, got)
	}
}

// FuzzDecodeUpstream: whatever the hand decoder takes is protobuf's
// message.
func FuzzDecodeUpstream(f *testing.F) {
	r := rand.New(rand.NewPCG(7, 8))
	for range 20 {
		b, _ := proto.Marshal(randomUpstream(r, true))
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkDecode(t, b, &dispatchv1.UpstreamPacket{SessionId: "s1"})
	})
}

// BenchmarkDecodeContent is the receive of one flood packet.
func BenchmarkDecodeContent(b *testing.B) {
	data, _ := proto.Marshal(&dispatchv1.UpstreamPacket{SessionId: "0198c0de-7a1b-7c3d-9e8f-0123456789ab", Timestamp: 1_765_000_000_000_000, Seq: 12345,
		Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: strings.Repeat("t", 64)}}})
	b.Run("hand", func(b *testing.B) {
		pkt := &dispatchv1.UpstreamPacket{}
		b.ReportAllocs()
		for b.Loop() {
			decodeUpstream(data, pkt)
		}
	})
	b.Run("protobuf", func(b *testing.B) {
		pkt := &dispatchv1.UpstreamPacket{}
		b.ReportAllocs()
		for b.Loop() {
			_ = proto.Unmarshal(data, pkt)
		}
	})
}

// emptyPackets is the bytes of n empty packets inside an UpstreamBatch (a
// packet field 1 of length 0 each).
func emptyPackets(n int) []byte { return bytes.Repeat([]byte{0x0a, 0}, n) }

// batchField is the bytes of an UpstreamPacket's batch field holding body.
func batchField(body []byte) []byte {
	b := protowire.AppendTag(nil, upBatch, protowire.BytesType)
	return protowire.AppendBytes(b, body)
}

// TestCodecRefusesTooLongBatches: a batch of more than MaxUpstreamBatch
// packets, nested ones counted, decodes to session.TooLongBatch() on both
// the hand and the protobuf path, without a packet made for each: 4 Mi
// empty packets (an 8 MiB message) made ~384 MB of packets before.
func TestCodecRefusesTooLongBatches(t *testing.T) {
	toolCall, _ := proto.Marshal(&dispatchv1.UpstreamPacket{SessionId: "s", Payload: &dispatchv1.UpstreamPacket_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{CallId: "c"}}})
	withToolCall := func(n int) []byte { // protobuf's path: a tool call in the batch
		b := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), toolCall)
		return append(b, emptyPackets(n-1)...)
	}
	nested := func(n int) []byte { // one packet holding a batch of n-1
		b := protowire.AppendTag(nil, 1, protowire.BytesType)
		return protowire.AppendBytes(b, batchField(emptyPackets(n-1)))
	}
	max := session.MaxUpstreamBatch
	for _, c := range []struct {
		name string
		b    []byte
		long bool
	}{
		{"hand, 4 Mi empty", batchField(emptyPackets(4 << 20)), true},
		{"hand, max+1", batchField(emptyPackets(max + 1)), true},
		{"hand, max", batchField(emptyPackets(max)), false},
		{"protobuf, tool call and max", batchField(withToolCall(max)), false},
		{"protobuf, tool call and more", batchField(withToolCall(max + 1)), true},
		{"protobuf, 1 Mi with a tool call", batchField(withToolCall(1 << 20)), true},
		{"protobuf, two batch fields", append(batchField(emptyPackets(max/2+1)), batchField(emptyPackets(max/2))...), true},
		{"protobuf, two batch fields of max in all", append(batchField(emptyPackets(max/2)), batchField(emptyPackets(max/2))...), false},
		{"protobuf, nested", batchField(nested(max + 1)), true},
		{"protobuf, nested within max", batchField(nested(max)), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			pkt := &dispatchv1.UpstreamPacket{}
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := serverCodec{}.Unmarshal(mem.BufferSlice{mem.SliceBuffer(c.b)}, pkt)
			runtime.ReadMemStats(&after)
			if err != nil {
				t.Fatal(err)
			}
			pkts := pkt.GetBatch().GetPackets()
			tooLong := len(pkts) > 0 && &pkts[0] == &session.TooLongBatch().Batch.Packets[0]
			if tooLong != c.long {
				t.Fatalf("decoded as too long: %v, want %v (%d packets)", tooLong, c.long, len(pkts))
			}
			if !c.long {
				want := &dispatchv1.UpstreamPacket{}
				if err := proto.Unmarshal(c.b, want); err != nil || !proto.Equal(want, pkt) {
					t.Fatalf("not protobuf's message (%v)", err)
				}
				return
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 64<<10 {
				t.Fatalf("refusing it allocated %d bytes", n)
			}
		})
	}
}

// TestCodecBoundsEmbeddedMessages: a message holding more than
// MaxMessagesPerRequest embedded messages is refused before protobuf makes
// them (an 8 MiB provider hello of 4 Mi empty tool specs decoded to ~570
// MB), as INVALID_ARGUMENT; one within the budget decodes as before.
func TestCodecBoundsEmbeddedMessages(t *testing.T) {
	specs := func(n int) []byte {
		hello := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), []byte("p"))
		hello = append(hello, bytes.Repeat([]byte{0x12, 0}, n)...) // tools (2): empty specs
		return protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), hello)
	}
	labels := func(n int) []byte { // SubmitTaskRequest.labels (8): distinct map entries
		var b []byte
		for i := range n {
			entry := protowire.AppendBytes(protowire.AppendTag(nil, 1, protowire.BytesType), fmt.Appendf(nil, "%d", i))
			b = protowire.AppendBytes(protowire.AppendTag(b, 8, protowire.BytesType), entry)
		}
		return b
	}
	for _, c := range []struct {
		name string
		msg  proto.Message
		b    []byte
		over bool
	}{
		{"4 Mi tool specs", &dispatchv1.ConnectRequest{}, specs(4 << 20), true},
		{"budget+1 tool specs", &dispatchv1.ConnectRequest{}, specs(MaxMessagesPerRequest), true}, // the hello counts too
		{"1024 tool specs", &dispatchv1.ConnectRequest{}, specs(1024), false},
		{"budget+1 labels", &dispatchv1.SubmitTaskRequest{}, labels(MaxMessagesPerRequest + 1), true},
		{"64 labels", &dispatchv1.SubmitTaskRequest{}, labels(64), false},
		// SubmitTaskRequest.required_capabilities (7): empty strings, 2
		// bytes each on the wire, 16 bytes each decoded.
		{"4 Mi empty capabilities", &dispatchv1.SubmitTaskRequest{}, bytes.Repeat([]byte{0x3a, 0}, 4<<20), true},
		{"budget+1 capabilities", &dispatchv1.SubmitTaskRequest{}, bytes.Repeat([]byte{0x3a, 0}, MaxMessagesPerRequest+1), true},
		{"budget capabilities", &dispatchv1.SubmitTaskRequest{}, bytes.Repeat([]byte{0x3a, 0}, MaxMessagesPerRequest), false},
		{"a packet with budget+1 labels in its hello", &dispatchv1.UpstreamPacket{},
			protowire.AppendBytes(protowire.AppendTag(nil, 7, protowire.BytesType), bytes.ReplaceAll(labels(MaxMessagesPerRequest+1), []byte{0x42}, []byte{0x22})), true},
	} {
		t.Run(c.name, func(t *testing.T) {
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			err := serverCodec{}.unmarshal(mem.BufferSlice{mem.SliceBuffer(c.b)}, c.msg)
			runtime.ReadMemStats(&after)
			if (err != nil) != c.over {
				t.Fatalf("err %v, want refused: %v", err, c.over)
			}
			if !c.over {
				want := c.msg.ProtoReflect().New().Interface()
				if perr := proto.Unmarshal(c.b, want); perr != nil || !proto.Equal(want, c.msg) {
					t.Fatalf("not protobuf's message (%v)", perr)
				}
				return
			}
			if !strings.Contains(err.Error(), "embedded messages") {
				t.Fatalf("err %v", err)
			}
			if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
				t.Fatalf("refusing it allocated %d bytes", n)
			}
		})
	}
}

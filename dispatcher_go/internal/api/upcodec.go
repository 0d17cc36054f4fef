package api

import (
	"fmt"
	"unicode/utf8"
	"unsafe"

	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/session"
)

// serverCodec is grpc's proto codec, except that it decodes the streamed
// shapes of a commander's UpstreamPacket (content and thought, alone or in
// a batch) by hand: protobuf's reflective unmarshal of a packet (its oneof
// wrapper and payload made through reflect, two strings) was ~20 % of the
// dispatcher's CPU under a flood, the largest single cost of an event.
// The result is the message proto.Unmarshal would give; anything else
// (another payload, an unknown or repeated field, a wrong wire type, a
// string that is not UTF-8, bytes that do not parse) goes to
// proto.Unmarshal as before, errors included. A packet whose batches hold
// more than session.MaxUpstreamBatch packets in all is not decoded by
// either: it becomes session.TooLongBatch(), which ends its stream with
// FAILED_PRECONDITION (an 8 MiB message of empty packets would otherwise
// be ~4 million packets, ~400 MB, before the session could count them).
type serverCodec struct{}

// protoCodec is grpc's own proto codec, which serverCodec defers to.
var protoCodec = encoding.GetCodecV2(grpcproto.Name)

func (serverCodec) Name() string { return grpcproto.Name }

func (serverCodec) Marshal(v any) (mem.BufferSlice, error) { return protoCodec.Marshal(v) }

// Unmarshal decodes data into v. A failure is marked on v for the
// interceptors (decodeerr.go), which answer INVALID_ARGUMENT, and not
// returned: grpc-go would make it INTERNAL.
func (c serverCodec) Unmarshal(data mem.BufferSlice, v any) error {
	if err := c.unmarshal(data, v); err != nil && !noteDecodeFailure(v, err) {
		return err
	}
	return nil
}

func (serverCodec) unmarshal(data mem.BufferSlice, v any) error {
	pkt, ok := v.(*dispatchv1.UpstreamPacket)
	if !ok {
		if m, ok := v.(proto.Message); ok {
			buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
			defer buf.Free()
			b := buf.ReadOnlyData()
			if err := messageBudget(b, m); err != nil {
				return err
			}
			return proto.Unmarshal(b, m)
		}
		return protoCodec.Unmarshal(data, v)
	}
	buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
	defer buf.Free()
	b := buf.ReadOnlyData()
	if decodeUpstream(b, pkt) {
		return nil
	}
	if batchedOver(b, session.MaxUpstreamBatch) {
		pkt.Reset()
		pkt.Payload = session.TooLongBatch()
		return nil
	}
	if err := messageBudget(b, pkt); err != nil {
		return err
	}
	return proto.Unmarshal(b, pkt)
}

// MaxMessagesPerRequest is the most embedded messages (repeated ones and
// map entries counted each) and elements of repeated string and bytes
// fields a received message may hold. Every one is an
// allocation of ~50-150 bytes made from as few as 2 bytes on the wire: an
// 8 MiB provider hello of 4 million empty tool specs decoded to ~570 MB.
// The largest legitimate request holds a few thousand (a provider hello
// of 1024 tools, a batch of 256 packets).
const MaxMessagesPerRequest = 1 << 14

// messageBudget is an error if b, an encoding of m's type, holds more
// than MaxMessagesPerRequest embedded messages; it reads only tags and
// lengths (bytes that do not parse are left to proto.Unmarshal).
func messageBudget(b []byte, m proto.Message) error {
	if len(b) < 2*(MaxMessagesPerRequest+1) {
		return nil // each counted element takes at least 2 bytes: within budget
	}
	left := MaxMessagesPerRequest
	if !withinBudget(b, m.ProtoReflect().Descriptor(), &left) {
		return fmt.Errorf("more than %d embedded messages and repeated strings (a request holds at most %d)", MaxMessagesPerRequest, MaxMessagesPerRequest)
	}
	return nil
}

// withinBudget counts the embedded messages of b (a message of type md)
// against *left, and reports false once it went below zero. Its recursion
// is at most MaxMessagesPerRequest deep: each level is a message.
func withinBudget(b []byte, md protoreflect.MessageDescriptor, left *int) bool {
	for len(b) > 0 {
		num, typ, tl := protowire.ConsumeTag(b)
		if tl < 0 {
			return true
		}
		vl := protowire.ConsumeFieldValue(num, typ, b[tl:])
		if vl < 0 {
			return true
		}
		if fd := md.Fields().ByNumber(num); fd != nil && typ == protowire.BytesType {
			switch k := fd.Kind(); {
			case k == protoreflect.MessageKind || k == protoreflect.GroupKind:
				if *left--; *left < 0 {
					return false
				}
				inner, _ := protowire.ConsumeBytes(b[tl:])
				if !withinBudget(inner, fd.Message(), left) {
					return false
				}
			case fd.IsList() && (k == protoreflect.StringKind || k == protoreflect.BytesKind):
				// An empty string is 2 bytes on the wire and a 16-byte
				// header (plus the slice's growth) once decoded.
				if *left--; *left < 0 {
					return false
				}
			}
		}
		b = b[tl+vl:]
	}
	return true
}

// batchedOver reports whether the UpstreamPacket b encodes holds more than
// limit packets in its batches, nested ones counted (protobuf merges a
// repeated batch field into one batch). It reads only tags and lengths;
// bytes that do not parse count as far as they parse (proto.Unmarshal then
// refuses them). Its recursion is at most limit+1 deep: each level holds a
// packet.
func batchedOver(b []byte, limit int) bool {
	if len(b) <= 2*limit+2 {
		return false // each packet takes at least 2 bytes: within limit
	}
	n := 0
	return countBatched(b, limit, &n)
}

// countBatched adds to *n the packets in the batches of the packet b
// encodes (and of theirs), and reports whether *n went over limit.
func countBatched(b []byte, limit int, n *int) bool {
	for len(b) > 0 {
		num, typ, tl := protowire.ConsumeTag(b)
		if tl < 0 {
			return false
		}
		vl := protowire.ConsumeFieldValue(num, typ, b[tl:])
		if vl < 0 {
			return false
		}
		if num == upBatch && typ == protowire.BytesType {
			batch, _ := protowire.ConsumeBytes(b[tl:])
			for len(batch) > 0 {
				pnum, ptyp, ptl := protowire.ConsumeTag(batch)
				if ptl < 0 {
					return false
				}
				pvl := protowire.ConsumeFieldValue(pnum, ptyp, batch[ptl:])
				if pvl < 0 {
					return false
				}
				if pnum == 1 && ptyp == protowire.BytesType {
					if *n++; *n > limit {
						return true
					}
					inner, _ := protowire.ConsumeBytes(batch[ptl:])
					if countBatched(inner, limit, n) {
						return true
					}
				}
				batch = batch[ptl+pvl:]
			}
		}
		b = b[tl+vl:]
	}
	return false
}

// Field numbers of UpstreamPacket that decodeUpstream takes.
const (
	upSessionID = 1
	upTimestamp = 2
	upThought   = 3
	upContent   = 4
	upSeq       = 14
	upBatch     = 15
)

// decodeUpstream sets pkt to the packet b encodes, as proto.Unmarshal
// would, and reports true, if b is of a shape it decodes: the fields
// session_id, timestamp and seq, and a content, thought or (at the top)
// batch payload of such packets, each field at most once, nothing else.
// Otherwise it reports false, with pkt reset and partly set (the caller
// unmarshals it, which resets it again). The previous packet's payload is
// not touched (an event may hold it); its session id string is reused
// when the new one is the same (no allocation per packet).
func decodeUpstream(b []byte, pkt *dispatchv1.UpstreamPacket) bool {
	prevID := pkt.GetSessionId()
	pkt.Reset()
	return parseUpstream(b, pkt, prevID, true)
}

// parseUpstream parses a packet into p, which is reset (see
// decodeUpstream); prevID is a session id to reuse when it is the
// packet's, batch whether a batch may be its payload.
func parseUpstream(b []byte, p *dispatchv1.UpstreamPacket, prevID string, batch bool) bool {
	var seen uint32 // a bit per field number taken
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 || num >= 32 || seen&(1<<num) != 0 {
			return false
		}
		seen |= 1 << num
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			switch num {
			case upTimestamp:
				p.Timestamp = int64(v)
			case upSeq:
				p.Seq = v
			default:
				return false
			}
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return false
			}
			b = b[n:]
			var ok bool
			switch {
			case num == upSessionID:
				p.SessionId, ok = internString(v, prevID)
			case p.Payload != nil:
				ok = false // a second payload: the last would win
			case num == upContent:
				ok = parseContent(v, p)
			case num == upThought:
				ok = parseThought(v, p)
			case num == upBatch && batch:
				ok = parseBatch(v, p, prevID)
			}
			if !ok {
				return false
			}
		default:
			return false
		}
	}
	return true
}

// internString is v as a string, prev itself when they are equal; false
// if v is not UTF-8 (protobuf refuses such a string field).
func internString(v []byte, prev string) (string, bool) {
	if string(v) == prev {
		return prev, true
	}
	if !utf8.Valid(v) {
		return "", false
	}
	return string(v), true
}

// contentBox is a content payload's oneof wrapper, message and text in one
// allocation: they are made together, and the event keeps the message,
// which keeps the text. A is the text's room, a byte array sized so that
// the box fills a size class of Go's allocator; a text longer than the
// largest room gets a string of its own. One object per content packet
// instead of three (wrapper, message, string) also means one object, not
// two, per content event for the garbage collector to mark while the log
// holds it.
type contentBox[A any] struct {
	w    dispatchv1.UpstreamPacket_Content
	c    dispatchv1.ContentChunk
	room A
}

// newContent is the payload of a content packet with text and finish;
// text is copied.
func newContent[A any](text []byte, finish bool) *dispatchv1.UpstreamPacket_Content {
	box := new(contentBox[A])
	box.w.Content = &box.c
	box.c.IsFinish = finish
	room := unsafe.Slice((*byte)(unsafe.Pointer(&box.room)), unsafe.Sizeof(box.room))
	if len(text) <= len(room) {
		// The string is the room's bytes, never written again.
		box.c.Text = unsafe.String(unsafe.SliceData(room), copy(room, text))
	} else {
		box.c.Text = string(text)
	}
	return &box.w
}

// parseContent parses a ContentChunk: text (1), is_finish (2). The rooms
// make boxes of 112, 144, 208 and 352 bytes (one without room is 80).
func parseContent(b []byte, p *dispatchv1.UpstreamPacket) bool {
	text, _, finish, ok := parsePair(b, false)
	if !ok {
		return false
	}
	f := protowire.DecodeBool(finish)
	switch n := len(text); {
	case n == 0:
		p.Payload = newContent[struct{}](nil, f)
	case n <= 40:
		p.Payload = newContent[[40]byte](text, f)
	case n <= 72:
		p.Payload = newContent[[72]byte](text, f)
	case n <= 136:
		p.Payload = newContent[[136]byte](text, f)
	case n <= 280:
		p.Payload = newContent[[280]byte](text, f)
	default:
		// Its own string: a room it does not fit would be carried empty.
		p.Payload = newContent[struct{}](text, f)
	}
	return true
}

// thoughtBox is a thought payload's oneof wrapper and message in one
// allocation.
type thoughtBox struct {
	w dispatchv1.UpstreamPacket_Thought
	c dispatchv1.ThoughtChain
}

// parseThought parses a ThoughtChain: step_name (1), delta (2).
func parseThought(b []byte, p *dispatchv1.UpstreamPacket) bool {
	step, delta, _, ok := parsePair(b, true)
	if !ok {
		return false
	}
	box := &thoughtBox{}
	box.c.StepName, box.c.Delta = string(step), string(delta)
	box.w.Thought = &box.c
	p.Payload = &box.w
	return true
}

// parsePair parses a message of a string field 1 and a field 2 that is a
// string (str2) or a varint: each at most once, nothing else. The strings
// are returned as the bytes of b they are in, checked to be UTF-8.
func parsePair(b []byte, str2 bool) (s1, s2 []byte, v2 uint64, ok bool) {
	var saw1, saw2 bool
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, 0, false
		}
		b = b[n:]
		switch {
		case num == 1 && typ == protowire.BytesType && !saw1:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || !utf8.Valid(v) {
				return nil, nil, 0, false
			}
			b, saw1, s1 = b[n:], true, v
		case num == 2 && typ == protowire.BytesType && str2 && !saw2:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 || !utf8.Valid(v) {
				return nil, nil, 0, false
			}
			b, saw2, s2 = b[n:], true, v
		case num == 2 && typ == protowire.VarintType && !str2 && !saw2:
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return nil, nil, 0, false
			}
			b, saw2, v2 = b[n:], true, v
		default:
			return nil, nil, 0, false
		}
	}
	return s1, s2, v2, true
}

// batchBox is a batch payload's wrapper and message in one allocation.
type batchBox struct {
	w dispatchv1.UpstreamPacket_Batch
	b dispatchv1.UpstreamBatch
}

// parseBatch parses an UpstreamBatch: packets (1), each of the shape
// parseUpstream takes (but no batch). The packets are made in one array.
func parseBatch(b []byte, p *dispatchv1.UpstreamPacket, prevID string) bool {
	count := 0
	for rest := b; len(rest) > 0; count++ {
		if count == session.MaxUpstreamBatch {
			return false // too long: Unmarshal's batchedOver refuses it
		}
		num, typ, n := protowire.ConsumeTag(rest)
		if n < 0 || num != 1 || typ != protowire.BytesType {
			return false
		}
		n2 := protowire.ConsumeFieldValue(num, typ, rest[n:])
		if n2 < 0 {
			return false
		}
		rest = rest[n+n2:]
	}
	box := &batchBox{}
	box.w.Batch = &box.b
	if count > 0 {
		arr := make([]dispatchv1.UpstreamPacket, count)
		box.b.Packets = make([]*dispatchv1.UpstreamPacket, count)
		for i := range count {
			_, _, n := protowire.ConsumeTag(b)
			v, n2 := protowire.ConsumeBytes(b[n:])
			b = b[n+n2:]
			q := &arr[i]
			if !parseUpstream(v, q, prevID, false) {
				return false
			}
			prevID = q.SessionId
			box.b.Packets[i] = q
		}
	}
	p.Payload = &box.w
	return true
}

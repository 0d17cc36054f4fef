package eventlog

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// The streamed kinds (content and thought: most of a task's events) are
// encoded by hand: protobuf's reflective size walk and marshal of such an
// event were ~15 % of the dispatcher's CPU under a flood. The bytes are
// exactly proto.Marshal's (the fields in field-number order, then the oneof; encode_test.go
// and fastenc_test.go compare them); any event outside the shape below
// (another kind, unknown fields anywhere, a nil payload, a string that is
// not UTF-8, which protobuf refuses) is left to protobuf.

// Tags of the TaskEvent fields the hand encoder writes.
var (
	timeTag    = byte(protowire.EncodeTag(3, protowire.BytesType))
	emitTag    = byte(protowire.EncodeTag(4, protowire.VarintType))
	thoughtTag = byte(protowire.EncodeTag(11, protowire.BytesType))
	contentTag = byte(protowire.EncodeTag(12, protowire.BytesType))
	// upstream_seq is field 30: a two-byte tag.
	upSeqTag = protowire.AppendVarint(nil, protowire.EncodeTag(30, protowire.VarintType))
	// Fields 1 and 2 of the payloads and of Timestamp.
	f1Bytes  = byte(protowire.EncodeTag(1, protowire.BytesType))
	f2Bytes  = byte(protowire.EncodeTag(2, protowire.BytesType))
	f1Varint = byte(protowire.EncodeTag(1, protowire.VarintType))
	f2Varint = byte(protowire.EncodeTag(2, protowire.VarintType))
)

// streamed is a content or thought event taken apart for the hand
// encoder: both payloads are a string (field 1) and a string or a bool
// (field 2).
type streamed struct {
	taskID  string
	hasTime bool
	sec     int64
	nanos   int32
	timeLen int
	emitted int64
	tag     byte   // thoughtTag or contentTag
	s1      string // text / step_name
	s2      string // delta (thought)
	b2      bool   // is_finish (content)
	bodyLen int
	upSeq   uint64
	size    int // the whole event's
}

// asStreamed takes ev apart; false if it is not of the shape the hand
// encoder writes exactly as protobuf would.
func asStreamed(ev *dispatchv1.TaskEvent) (s streamed, ok bool) {
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_Content:
		c := k.Content
		if c == nil || len(c.ProtoReflect().GetUnknown()) != 0 {
			return s, false
		}
		s.tag, s.s1, s.b2 = contentTag, c.GetText(), c.GetIsFinish()
	case *dispatchv1.TaskEvent_Thought:
		c := k.Thought
		if c == nil || len(c.ProtoReflect().GetUnknown()) != 0 {
			return s, false
		}
		s.tag, s.s1, s.s2 = thoughtTag, c.GetStepName(), c.GetDelta()
	default:
		return s, false
	}
	if ev.GetSeq() != 0 || len(ev.ProtoReflect().GetUnknown()) != 0 ||
		!utf8.ValidString(s.s1) || !utf8.ValidString(s.s2) || !utf8.ValidString(ev.GetTaskId()) {
		return s, false
	}
	s.taskID, s.emitted, s.upSeq = ev.GetTaskId(), ev.GetEmittedAtUs(), ev.GetUpstreamSeq()
	n := 0
	if s.taskID != "" {
		n += 1 + protowire.SizeBytes(len(s.taskID))
	}
	if t := ev.GetTime(); t != nil {
		if len(t.ProtoReflect().GetUnknown()) != 0 {
			return s, false
		}
		s.hasTime, s.sec, s.nanos = true, t.GetSeconds(), t.GetNanos()
		if s.sec != 0 {
			s.timeLen += 1 + protowire.SizeVarint(uint64(s.sec))
		}
		if s.nanos != 0 {
			s.timeLen += 1 + protowire.SizeVarint(uint64(int64(s.nanos)))
		}
		n += 1 + protowire.SizeBytes(s.timeLen)
	}
	if s.emitted != 0 {
		n += 1 + protowire.SizeVarint(uint64(s.emitted))
	}
	if s.s1 != "" {
		s.bodyLen += 1 + protowire.SizeBytes(len(s.s1))
	}
	if s.s2 != "" {
		s.bodyLen += 1 + protowire.SizeBytes(len(s.s2))
	}
	if s.b2 {
		s.bodyLen += 2
	}
	n += 1 + protowire.SizeBytes(s.bodyLen)
	if s.upSeq != 0 {
		n += len(upSeqTag) + protowire.SizeVarint(s.upSeq)
	}
	s.size = n
	return s, true
}

// appendTo appends the event's encoding (s.size bytes) to b.
func (s *streamed) appendTo(b []byte) []byte {
	if s.taskID != "" {
		b = append(b, idTag)
		b = protowire.AppendString(b, s.taskID)
	}
	if s.hasTime {
		b = append(b, timeTag)
		b = protowire.AppendVarint(b, uint64(s.timeLen))
		if s.sec != 0 {
			b = append(b, f1Varint)
			b = protowire.AppendVarint(b, uint64(s.sec))
		}
		if s.nanos != 0 {
			b = append(b, f2Varint)
			b = protowire.AppendVarint(b, uint64(int64(s.nanos)))
		}
	}
	if s.emitted != 0 {
		b = append(b, emitTag)
		b = protowire.AppendVarint(b, uint64(s.emitted))
	}
	if s.upSeq != 0 {
		b = append(b, upSeqTag...)
		b = protowire.AppendVarint(b, s.upSeq)
	}
	// The oneof comes last: protobuf-go writes a message's oneof fields
	// after its other fields.
	b = append(b, s.tag)
	b = protowire.AppendVarint(b, uint64(s.bodyLen))
	if s.s1 != "" {
		b = append(b, f1Bytes)
		b = protowire.AppendString(b, s.s1)
	}
	if s.s2 != "" {
		b = append(b, f2Bytes)
		b = protowire.AppendString(b, s.s2)
	}
	if s.b2 {
		b = append(b, f2Varint, 1)
	}
	return b
}

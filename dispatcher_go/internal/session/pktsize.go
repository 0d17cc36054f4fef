package session

import (
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// packetSize is proto.Size(pkt), the size the per-packet limit is checked
// against. A content or thought packet without unknown fields (what a
// flood is made of) is sized by hand from its few fields: protobuf's
// reflective walk of every packet was ~4 % of the dispatcher's CPU under a
// flood. Every other packet is walked by protobuf.
func packetSize(pkt *dispatchv1.UpstreamPacket) int {
	var body int
	var m proto.Message
	switch p := pkt.GetPayload().(type) {
	case *dispatchv1.UpstreamPacket_Content:
		c := p.Content
		if c == nil {
			return proto.Size(pkt)
		}
		body = stringSize(c.GetText())
		if c.GetIsFinish() {
			body += 2
		}
		m = c
	case *dispatchv1.UpstreamPacket_Thought:
		c := p.Thought
		if c == nil {
			return proto.Size(pkt)
		}
		body = stringSize(c.GetStepName()) + stringSize(c.GetDelta())
		m = c
	default:
		return proto.Size(pkt)
	}
	if len(pkt.ProtoReflect().GetUnknown()) != 0 || len(m.ProtoReflect().GetUnknown()) != 0 {
		return proto.Size(pkt)
	}
	n := 1 + protowire.SizeBytes(body) + stringSize(pkt.GetSessionId())
	if ts := pkt.GetTimestamp(); ts != 0 {
		n += 1 + protowire.SizeVarint(uint64(ts))
	}
	if seq := pkt.GetSeq(); seq != 0 {
		n += 1 + protowire.SizeVarint(seq)
	}
	return n
}

// stringSize is the wire size of a string field numbered below 16 (its
// one-byte tag, length and bytes), 0 when it is empty (not written).
func stringSize(s string) int {
	if s == "" {
		return 0
	}
	return 1 + protowire.SizeBytes(len(s))
}

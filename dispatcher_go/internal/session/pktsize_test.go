package session

import (
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// packetSize is proto.Size for every packet: content and thought of
// every shape (sized by hand), with unknown fields, and other payloads.
func TestPacketSizeIsProtoSize(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	str := func() string {
		return []string{"", "é✓", "tok", strings.Repeat("x", 127), strings.Repeat("y", 128), strings.Repeat("z", 1<<14)}[r.IntN(6)]
	}
	unknown := protowire.AppendVarint(protowire.AppendTag(nil, 99, protowire.VarintType), 5)
	for i := range 2000 {
		pkt := &dispatchv1.UpstreamPacket{SessionId: str()}
		switch r.IntN(4) {
		case 0:
			pkt.Timestamp = math.MinInt64
		case 1:
			pkt.Timestamp = r.Int64N(1 << 52)
		case 2:
			pkt.Timestamp = -r.Int64N(100)
		}
		if r.IntN(2) == 0 {
			pkt.Seq = []uint64{1, 127, 128, math.MaxUint64}[r.IntN(4)]
		}
		var payload proto.Message
		switch r.IntN(5) {
		case 0, 1:
			c := &dispatchv1.ContentChunk{Text: str(), IsFinish: r.IntN(2) == 0}
			pkt.Payload, payload = &dispatchv1.UpstreamPacket_Content{Content: c}, c
		case 2:
			c := &dispatchv1.ThoughtChain{StepName: str(), Delta: str()}
			pkt.Payload, payload = &dispatchv1.UpstreamPacket_Thought{Thought: c}, c
		case 3:
			pkt.Payload = &dispatchv1.UpstreamPacket_Usage{Usage: &dispatchv1.Usage{InputTokens: 3}}
		default:
			pkt.Payload = &dispatchv1.UpstreamPacket_Content{} // nil chunk
		}
		if r.IntN(8) == 0 {
			pkt.ProtoReflect().SetUnknown(unknown)
		}
		if payload != nil && r.IntN(8) == 0 {
			payload.ProtoReflect().SetUnknown(unknown)
		}
		if got, want := packetSize(pkt), proto.Size(pkt); got != want {
			t.Fatalf("packet %d (%v): size %d, want %d", i, pkt, got, want)
		}
	}
}

package api

import (
	"runtime"
	"strings"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// An idle ChatStream is served by its RPC's goroutine alone: the tap
// context and the transport stream's WriteStatus are there to abort it
// (chatstream.go). Should a grpc upgrade take either away, the session
// falls back to a receiving goroutine of its own and this fails.
func TestIdleChatStreamIsItsRPCGoroutine(t *testing.T) {
	h, ctx := newHarness(t, dispatcher.Config{})
	testutil.Connect(t, ctx, h.conn, "planner:chat")
	testutil.WaitFor(t, testutil.Wait, func() bool {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		recv, inRPC, senders := 0, 0, 0
		for g := range strings.SplitSeq(string(buf), "\n\n") {
			if strings.Contains(g, "(*slot).sendLoop") {
				senders++
			}
			if strings.Contains(g, "(*slot).recvLoop") {
				recv++
				if strings.Contains(g, "grpc.(*Server).processRPC") {
					inRPC++
				}
			}
		}
		return recv == 1 && inRPC == 1 && senders == 0
	}, "the idle slot to be its RPC's goroutine alone, receiving")
}

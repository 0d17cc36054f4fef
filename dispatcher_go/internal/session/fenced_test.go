package session

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// TestFencedContentIsDroppedUnread: after the stop, content is dropped
// before the policy and the size check (an oversized packet no longer
// matters) and counted as dropped.
func TestFencedContentIsDroppedUnread(t *testing.T) {
	e := newEnv(t, Options{StopGrace: 2 * time.Second, MaxMessageBytes: 64}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	if out, err := e.mgr.Cancel(context.Background(), tk.ID(), "stop", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if p := c.recv(); p.GetStop() == nil {
		t.Fatalf("want stop, got %v", p)
	}
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: strings.Repeat("x", 200)}))
	c.send(upSeq(sid, 2, &dispatchv1.ThoughtChain{Delta: "x"}))
	c.send(upSeq(sid, 3, &dispatchv1.Stopped{Reason: "ok"}))
	if p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
		t.Fatalf("want SESSION_CLOSED, got %v", p)
	}
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED || !strings.Contains(info.Message, "stop") {
		t.Fatalf("info %+v", info)
	}
	if n := e.srv.Stats().DroppedAfterStop.Load(); n != 2 {
		t.Fatalf("dropped after stop %d", n)
	}
}

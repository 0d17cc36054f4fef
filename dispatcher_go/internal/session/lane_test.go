package session

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func lane(pkts ...*dispatchv1.UpstreamPacket) *dispatchv1.StoppedRequest {
	return &dispatchv1.StoppedRequest{Packets: pkts}
}

// TestStopLaneOvertakesTheStream: a stopped on the lane ends the session
// while content written before it still waits on the stream; the usage it
// carries is counted once (the copy already handled on the stream is not
// counted again, the one not yet handled is), and what arrives later on
// the stream up to the stopped's seq is dropped without a REJECTED ack.
func TestStopLaneOvertakesTheStream(t *testing.T) {
	e := newEnv(t, Options{StopGrace: 2 * time.Second}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "before"}))
	c.send(upSeq(sid, 2, &dispatchv1.Usage{OutputTokens: 5}))
	if out, err := e.mgr.Cancel(context.Background(), tk.ID(), "user pressed stop", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if p := c.recv(); p.GetStop() == nil {
		t.Fatalf("want stop, got %v", p)
	}
	// Seq 3 and 5 (content) and the stream's copies of 4 and 6 are still
	// "queued on the stream": the lane goes first.
	usage4 := upSeq(sid, 4, &dispatchv1.Usage{OutputTokens: 7})
	stopped6 := upSeq(sid, 6, &dispatchv1.Stopped{Reason: "ok", FinalUsage: &dispatchv1.Usage{OutputTokens: 1}})
	err := e.srv.Stopped(context.Background(), tenant.Commander{}, lane(
		upSeq(sid, 2, &dispatchv1.Usage{OutputTokens: 5}), usage4, stopped6))
	if err != nil {
		t.Fatalf("Stopped: %v", err)
	}
	if p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED || p.GetSessionId() != sid {
		t.Fatalf("want SESSION_CLOSED, got %v", p)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_CANCELLED || info.Stats.OutputTokens != 5+7+1 {
		t.Fatalf("info %+v", info)
	}
	// The stream catches up: all dropped unread. Seq 7 is past the
	// stopped: refused as before (and, the stream being in order, the
	// first answer proves the ones before it got none).
	c.send(upSeq(sid, 3, &dispatchv1.ContentChunk{Text: "LEAK"}))
	c.send(usage4)
	c.send(upSeq(sid, 5, &dispatchv1.ContentChunk{Text: "LEAK"}))
	c.send(stopped6)
	c.send(upSeq(sid, 7, &dispatchv1.ContentChunk{Text: "LATE"}))
	if p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED {
		t.Fatalf("want REJECTED for seq 7 only, got %v", p)
	}
	st := e.srv.Stats()
	if st.LaneStops.Load() != 1 || st.DroppedAfterLane.Load() != 4 || st.StopsAcked.Load() != 1 {
		t.Fatalf("lane stops %d, dropped after lane %d, stops acked %d", st.LaneStops.Load(), st.DroppedAfterLane.Load(), st.StopsAcked.Load())
	}
	var stoppeds, usages int
	for _, ev := range allEvents(t, tk) {
		if strings.Contains(ev.GetContent().GetText(), "LEAK") {
			t.Fatal("content after the stop reached the log")
		}
		if ev.GetStopped() != nil {
			stoppeds++
		}
		if ev.GetUsage() != nil {
			usages++
		}
	}
	if stoppeds != 1 || usages != 2 {
		t.Fatalf("%d stopped, %d usage events", stoppeds, usages)
	}
}

// TestStopLaneRefusals: malformed requests, a session that is not here
// (or another tenant's), and a session with no stop decided are refused,
// and the session goes on on its stream.
func TestStopLaneRefusals(t *testing.T) {
	e := newEnv(t, Options{StopGrace: 2 * time.Second}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{Caller: tenant.Caller{Tenant: "acme"}})
	sid, _ := c.start()
	stopped := func(seq uint64) *dispatchv1.UpstreamPacket { return upSeq(sid, seq, &dispatchv1.Stopped{Reason: "x"}) }
	ctx := context.Background()
	for name, req := range map[string]*dispatchv1.StoppedRequest{
		"empty":            lane(),
		"unnumbered":       lane(testutil.Up(sid, &dispatchv1.Stopped{})),
		"content":          lane(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "x"}), stopped(2)),
		"not last":         lane(stopped(1), upSeq(sid, 2, &dispatchv1.Usage{})),
		"no stopped":       lane(upSeq(sid, 1, &dispatchv1.Usage{})),
		"out of order":     lane(upSeq(sid, 2, &dispatchv1.Usage{}), stopped(2)),
		"several sessions": lane(upSeq("ses-other", 1, &dispatchv1.Usage{}), stopped(2)),
	} {
		if err := e.srv.Stopped(ctx, tenant.Commander{}, req); !errors.Is(err, task.ErrInvalidArgument) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if err := e.srv.Stopped(ctx, tenant.Commander{}, lane(upSeq("ses-nobody", 1, &dispatchv1.Stopped{}))); !errors.Is(err, task.ErrNotFound) {
		t.Errorf("unknown session: %v", err)
	}
	if err := e.srv.Stopped(ctx, tenant.Commander{}, lane(stopped(1))); !errors.Is(err, task.ErrNotRunning) {
		t.Errorf("no stop decided: %v", err)
	}
	if out, err := e.mgr.Cancel(ctx, tk.ID(), "stop", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if p := c.recv(); p.GetStop() == nil {
		t.Fatalf("want stop, got %v", p)
	}
	other := tenant.Commander{Tenant: "globex", Restricted: true}
	if err := e.srv.Stopped(ctx, other, lane(stopped(1))); !errors.Is(err, task.ErrNotFound) {
		t.Errorf("another tenant's commander: %v", err)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("a refused lane call ended the task: %v", tk.Status())
	}
	// The stream still works: the stopped there ends the session.
	c.send(stopped(1))
	if p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
		t.Fatalf("want SESSION_CLOSED, got %v", p)
	}
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("info %+v", info)
	}
	// Ended: the lane no longer finds it.
	if err := e.srv.Stopped(ctx, tenant.Commander{Tenant: "acme", Restricted: true}, lane(stopped(2))); !errors.Is(err, task.ErrNotFound) {
		t.Errorf("ended session: %v", err)
	}
}

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

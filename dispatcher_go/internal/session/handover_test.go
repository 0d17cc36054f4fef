package session

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// upSeq is testutil.Up with the packet's upstream seq.
func upSeq(sid string, seq uint64, payload any) *dispatchv1.UpstreamPacket {
	p := testutil.Up(sid, payload)
	p.Seq = seq
	return p
}

// recvAck reads downstream packets until an ack RECORDED of sid up to at
// least seq; it returns how many RECORDED acks it read.
func (c *commander) recvRecorded(sid string, seq uint64) int {
	c.t.Helper()
	n := 0
	var last uint64
	for last < seq {
		p := c.recv()
		a := p.GetAck()
		if a.GetKind() != dispatchv1.AckKind_ACK_KIND_RECORDED {
			c.t.Fatalf("want ack RECORDED, got %v", p)
		}
		if p.GetSessionId() != sid || a.GetUpstreamSeq() < last {
			c.t.Fatalf("ack %v after %d", p, last)
		}
		last = a.GetUpstreamSeq()
		n++
	}
	return n
}

func handOverEnv(t *testing.T) *env {
	t.Helper()
	e := newEnv(t, Options{HandOver: true, AckInterval: 50 * time.Millisecond}, eventlog.Limits{})
	e.srv.opts.Reattacher = e.mgr
	return e
}

// TestAcksAreCumulativeAndBatched: many packets, few acks, the last one
// covering them all; a packet resent with a seq already handled is
// dropped, not recorded twice.
func TestAcksAreCumulativeAndBatched(t *testing.T) {
	e := handOverEnv(t)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, st := c.start()
	if st.GetAttempt() != 1 {
		t.Fatalf("start attempt %d", st.GetAttempt())
	}
	const n = 100
	for i := uint64(1); i <= n; i++ {
		c.send(upSeq(sid, i, &dispatchv1.ContentChunk{Text: "x"}))
	}
	if acks := c.recvRecorded(sid, n); acks >= n/2 {
		t.Fatalf("%d acks for %d packets: not batched", acks, n)
	}
	// Resent (a commander that did not see the ack): dropped.
	c.send(upSeq(sid, n-1, &dispatchv1.ContentChunk{Text: "dup"}))
	c.send(upSeq(sid, n, &dispatchv1.ContentChunk{Text: "dup"}))
	c.send(upSeq(sid, n+1, testutil.Success("ok")))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("status %v", info.Status)
	}
	var contents int
	for _, ev := range allEvents(t, tk) {
		if ct := ev.GetContent(); ct != nil {
			contents++
			if ct.GetText() == "dup" || ev.GetUpstreamSeq() != uint64(contents) {
				t.Fatalf("content event %d: %v", contents, ev)
			}
		}
	}
	if contents != n || e.srv.Stats().Resent.Load() != 2 {
		t.Fatalf("%d contents, %d resent dropped", contents, e.srv.Stats().Resent.Load())
	}
}

// TestDrainMovesAndAnotherServerReattaches: the drain sends move; the
// commander half-closes; the session is detached (its task stays RUNNING,
// not failed); a hello with reattach on another server takes the task over
// with the next attempt, answers with the seq recorded, drops what is resent
// up to it, and the session ends there normally.
func TestDrainMovesAndAnotherServerReattaches(t *testing.T) {
	e := handOverEnv(t)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	for i := uint64(1); i <= 3; i++ {
		c.send(upSeq(sid, i, &dispatchv1.ContentChunk{Text: "a"}))
	}
	c.recvRecorded(sid, 3)
	c.send(upSeq(sid, 4, &dispatchv1.ContentChunk{Text: "b"})) // not yet acked

	drained := testutil.Async(func() (struct{}, error) {
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
		defer cancel()
		e.srv.Drain(ctx, "test drain")
		return struct{}{}, nil
	})
	for p := c.recv(); p.GetMove() == nil; p = c.recv() {
		if p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_RECORDED {
			t.Fatalf("want move, got %v", p)
		}
	}
	close(c.In) // the commander half-closes
	testutil.Recv(t, drained, testutil.Wait, "the drain to end once the session left")
	if err := c.ended(); err != nil {
		t.Fatalf("Serve after a half-close: %v", err)
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
		t.Fatalf("after the move: %v handing over %v", tk.Status(), tk.HandingOver())
	}
	// A draining server takes no new stream.
	if err := e.open(t, 8).ended(); err != ErrShutdown {
		t.Fatalf("new stream while draining: %v", err)
	}

	// The next dispatcher: another server on the same tasks.
	b, err := broker.New(broker.Options{DefaultTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	next := NewServer(scheduler.New(4), b, Options{HandOver: true, Reattacher: e.mgr, AckInterval: 50 * time.Millisecond, StopGrace: time.Second})
	t.Cleanup(next.Shutdown)
	e2 := &env{srv: next, mgr: e.mgr}
	c2 := e2.open(t, 64)
	hello := testutil.Hello("cmd-1", "planner:chat")
	hello.GetHello().Reattach = &dispatchv1.Reattach{TaskId: tk.ID(), SessionId: sid, Attempt: 1, AckedSeq: 3}
	c2.send(hello)
	p := c2.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != sid || a.GetUpstreamSeq() != 4 || a.GetAttempt() != 2 {
		t.Fatalf("re-attach answer %v", p)
	}
	// The commander resends what it has no ack for; 4 is recorded already.
	c2.send(upSeq(sid, 4, &dispatchv1.ContentChunk{Text: "b"}))
	c2.send(upSeq(sid, 5, &dispatchv1.ContentChunk{Text: "c"}))
	c2.send(upSeq(sid, 6, testutil.Success("abc")))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_SUCCESS || tk.Attempt() != 2 {
		t.Fatalf("after the re-attach: %v attempt %d", info.Status, tk.Attempt())
	}
	var text strings.Builder
	var reattached bool
	for _, ev := range allEvents(t, tk) {
		text.WriteString(ev.GetContent().GetText())
		reattached = reattached || strings.Contains(ev.GetState().GetMessage(), "re-attached (attempt 2)")
	}
	if text.String() != "aaabc" || !reattached {
		t.Fatalf("content %q, re-attach event %v: %s", text.String(), reattached, kinds(allEvents(t, tk)))
	}
}

// TestReattachRefused: an unknown task, or one that is not waiting for
// that session, is refused in the hello's ack (no session id, the reason in
// detail); the stream goes on as an idle slot.
func TestReattachRefused(t *testing.T) {
	e := handOverEnv(t)
	c := e.open(t, 64)
	hello := testutil.Hello("cmd-1", "planner:chat")
	hello.GetHello().Reattach = &dispatchv1.Reattach{TaskId: "no-such-task", SessionId: "ses-x"}
	c.send(hello)
	p := c.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != "" || !strings.Contains(a.GetDetail(), "re-attach refused") {
		t.Fatalf("refusal %v", p)
	}
	// Idle: it takes the next task.
	tk := e.submit(t, task.Spec{})
	if _, st := c.start(); st.GetTaskId() != tk.ID() {
		t.Fatalf("start %v", st)
	}
}

// TestReattachedSessionIsStoppedAgain: a stop decided before the hand-over
// (kept with the task) goes to the re-attached session right after the
// hello's ack; its stopped ends the task as the stop decided.
func TestReattachedSessionIsStoppedAgain(t *testing.T) {
	e := handOverEnv(t)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "a"}))
	c.recvRecorded(sid, 1)
	drained := testutil.Async(func() (struct{}, error) {
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
		defer cancel()
		e.srv.Drain(ctx, "test drain")
		return struct{}{}, nil
	})
	for c.recv().GetMove() == nil { // acks until the move
	}
	close(c.In)
	testutil.Recv(t, drained, testutil.Wait, "the drain")
	// As a crash right after a cancel's decision would leave it.
	stop := &dispatchv1.StopSignal{Reason: "cancelled by client", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}
	if _, err := tk.Fence(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: stop}}); err != nil {
		t.Fatal(err)
	}

	b, err := broker.New(broker.Options{DefaultTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	next := NewServer(scheduler.New(4), b, Options{HandOver: true, Reattacher: e.mgr, StopGrace: time.Second})
	t.Cleanup(next.Shutdown)
	c2 := (&env{srv: next, mgr: e.mgr}).open(t, 64)
	hello := testutil.Hello("cmd-1", "planner:chat")
	hello.GetHello().Reattach = &dispatchv1.Reattach{TaskId: tk.ID(), SessionId: sid, AckedSeq: 1}
	c2.send(hello)
	if p := c2.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != sid {
		t.Fatalf("first packet %v", p)
	}
	if p := c2.recv(); p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || p.GetSessionId() != sid {
		t.Fatalf("want the stop again, got %v", p)
	}
	c2.send(upSeq(sid, 2, &dispatchv1.Stopped{Reason: "ok"}))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("status %v %q", info.Status, info.Message)
	}
}

package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// linkLossEnv is handOverEnv with a link-loss window.
func linkLossEnv(t *testing.T, window time.Duration) *env {
	t.Helper()
	e := newEnv(t, Options{HandOver: true, LinkLossWindow: window, AckInterval: 20 * time.Millisecond, StopGrace: time.Second}, eventlog.Limits{})
	e.srv.opts.Reattacher = e.mgr
	return e
}

// reattachHello is the hello of commander cmd-1 re-attaching session sid.
func reattachHello(tk *task.Task, sid string, acked uint64) *dispatchv1.UpstreamPacket {
	h := testutil.Hello("cmd-1", "planner:chat")
	h.GetHello().Reattach = &dispatchv1.Reattach{TaskId: tk.ID(), SessionId: sid, Attempt: 1, AckedSeq: acked}
	return h
}

// contentOf is the text of tk's content events, in order.
func contentOf(t *testing.T, tk *task.Task) string {
	t.Helper()
	var text strings.Builder
	for _, ev := range allEvents(t, tk) {
		text.WriteString(ev.GetContent().GetText())
	}
	return text.String()
}

// TestLinkLostSessionReattaches: the stream of a running session breaks
// (a transport error, not a move): the task is not failed but waits; the
// commander's next stream re-attaches the session on the same server, which
// says what it recorded; what is resent up to it is dropped, and the task
// ends SUCCESS with every packet recorded once.
func TestLinkLostSessionReattaches(t *testing.T) {
	e := linkLossEnv(t, time.Minute)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	for i := uint64(1); i <= 3; i++ {
		c.send(upSeq(sid, i, &dispatchv1.ContentChunk{Text: "a"}))
	}
	c.recvRecorded(sid, 3)
	c.send(upSeq(sid, 4, &dispatchv1.ContentChunk{Text: "b"})) // perhaps not acked
	c.cancel()                                                 // the link breaks
	if err := c.ended(); err == nil {
		t.Fatal("Serve of a broken stream returned nil")
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
		t.Fatalf("after the link loss: %v %q, handing over %v", tk.Status(), tk.Info().Message, tk.HandingOver())
	}

	c2 := e.open(t, 64)
	c2.send(reattachHello(tk, sid, 3))
	p := c2.recv()
	a := p.GetAck()
	if a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != sid || a.GetAttempt() != 2 || a.GetUpstreamSeq() < 3 {
		t.Fatalf("re-attach answer %v", p)
	}
	// The commander resends from its last ack (3): 4 again, then new ones.
	c2.send(upSeq(sid, 4, &dispatchv1.ContentChunk{Text: "b"}))
	c2.send(upSeq(sid, 5, &dispatchv1.ContentChunk{Text: "c"}))
	c2.send(upSeq(sid, 6, testutil.Success("abc")))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_SUCCESS || tk.Attempt() != 2 {
		t.Fatalf("after the re-attach: %v %q attempt %d", info.Status, info.Message, tk.Attempt())
	}
	if got := contentOf(t, tk); got != "aaabc" {
		t.Fatalf("content %q: %s", got, kinds(allEvents(t, tk)))
	}
}

// TestLinkLostWindowExpires: nobody re-attaches (the commander died): the
// task ends FAILURE once the window has passed, saying why.
func TestLinkLostWindowExpires(t *testing.T) {
	e := linkLossEnv(t, 100*time.Millisecond)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "a"}))
	c.recvRecorded(sid, 1)
	lost := time.Now()
	c.cancel()
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || info.Message != "commander link lost; session did not re-attach within 100ms" {
		t.Fatalf("after the window: %v %q", info.Status, info.Message)
	}
	if waited := time.Since(lost); waited < 100*time.Millisecond {
		t.Fatalf("ended %s after the link loss, inside the window", waited)
	}
}

// TestLinkLostAfterAStopEndsAtOnce: a session whose stop was decided is
// not kept for a re-attach: losing its stream ends it as the stop decided.
// A protocol violation still ends the session with its stream too.
func TestLinkLostAfterAStopEndsAtOnce(t *testing.T) {
	e := linkLossEnv(t, time.Hour)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "a"}))
	if _, err := e.mgr.Cancel(context.Background(), tk.ID(), "", false); err != nil {
		t.Fatal(err)
	}
	c.cancel()
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("stopped then lost: %v %q", info.Status, info.Message)
	}

	c2 := e.connect(t, "planner:chat")
	tk2 := e.submit(t, task.Spec{})
	c2.start()
	c2.send(testutil.Hello("again"))
	if err := c2.ended(); !errors.Is(err, ErrProtocol) {
		t.Fatalf("Serve = %v", err)
	}
	if info := waitDone(t, tk2); info.Status != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(info.Message, "commander connection lost: ") {
		t.Fatalf("protocol violation: %v %q", info.Status, info.Message)
	}
}

// TestReattachSupersedesAStaleStream: the commander re-attaches its session
// while this server still holds the old stream (a black-holed link that
// keepalive has not caught yet): the old stream is ended, the session
// continues on the new one, and the task ends SUCCESS.
func TestReattachSupersedesAStaleStream(t *testing.T) {
	e := linkLossEnv(t, time.Minute)
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "a"}))
	c.recvRecorded(sid, 1)

	c2 := e.open(t, 64)
	c2.send(reattachHello(tk, sid, 1))
	p := c2.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != sid || a.GetUpstreamSeq() != 1 || a.GetAttempt() != 2 {
		t.Fatalf("re-attach answer %v", p)
	}
	if err := c.ended(); !errors.Is(err, errSuperseded) {
		t.Fatalf("old stream ended with %v", err)
	}
	c2.send(upSeq(sid, 2, &dispatchv1.ContentChunk{Text: "b"}))
	c2.send(upSeq(sid, 3, testutil.Success("ab")))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("after the re-attach: %v %q", info.Status, info.Message)
	}
	if got := contentOf(t, tk); got != "ab" {
		t.Fatalf("content %q", got)
	}
}

// TestLinkLostTellsTheLinkFromTheDispatchersOwnEnds: only an end the
// dispatcher did not decide keeps the session for a re-attach.
func TestLinkLostTellsTheLinkFromTheDispatchersOwnEnds(t *testing.T) {
	for _, c := range []struct {
		err  error
		lost bool
	}{
		{io.EOF, true},
		{context.Canceled, true},
		{status.Error(codes.Unavailable, "transport is closing"), true},
		{fmt.Errorf("send: %w", status.Error(codes.Unavailable, "broken pipe")), true},
		{fmt.Errorf("%w: second hello on a stream", ErrProtocol), false},
		{ErrShutdown, false},
		{ErrStopNotAcknowledged, false},
		{errSuperseded, false},
		{status.Error(codes.Internal, "grpc: failed to unmarshal the received message: string field contains invalid UTF-8"), false},
	} {
		if got := linkLost(c.err); got != c.lost {
			t.Errorf("linkLost(%v) = %v, want %v", c.err, got, c.lost)
		}
	}
}

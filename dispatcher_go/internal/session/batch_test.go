package session

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// batch wraps pkts in one UpstreamBatch message.
func batch(pkts ...*dispatchv1.UpstreamPacket) *dispatchv1.UpstreamPacket {
	return testutil.Up("", &dispatchv1.UpstreamBatch{Packets: pkts})
}

// numbered is p with upstream seq n.
func numbered(p *dispatchv1.UpstreamPacket, n uint64) *dispatchv1.UpstreamPacket {
	p.Seq = n
	return p
}

// TestUpstreamBatchIsItsPackets: the hello's ack announces batches; a
// batch's packets are handled in order as if each had come alone — the
// same events, numbered, a packet resent with a seq already recorded
// dropped, the result ending the session.
func TestUpstreamBatchIsItsPackets(t *testing.T) {
	e := newEnv(t, Options{}, eventlog.Limits{})
	c := e.open(t, 64)
	c.send(testutil.Hello("cmd-1", "planner:chat"))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || a.GetMaxUpstreamBatch() != MaxUpstreamBatch {
		t.Fatalf("hello ack %v: want max_upstream_batch %d", a, MaxUpstreamBatch)
	}
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(numbered(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "alone "}), 1))
	c.send(batch(
		numbered(testutil.Up(sid, &dispatchv1.ThoughtChain{Delta: "hmm"}), 2),
		numbered(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "one "}), 3),
		numbered(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "again "}), 1), // resent: dropped
		numbered(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "two"}), 4),
	))
	c.send(batch(
		numbered(testutil.Up(sid, &dispatchv1.Usage{OutputTokens: 7}), 5),
		numbered(testutil.Up(sid, testutil.Success("done")), 6),
	))
	if a := c.recv(); a.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED || a.GetSessionId() != sid {
		t.Fatalf("close ack %v", a)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_SUCCESS || info.Result != "done" || info.Stats.OutputTokens != 7 {
		t.Fatalf("info %+v", info)
	}
	evs := allEvents(t, tk)
	if got := kinds(evs); got != "state:PENDING state:RUNNING content thought content content usage result state:SUCCESS" {
		t.Fatalf("events: %s", got)
	}
	var text strings.Builder
	for i, ev := range evs {
		text.WriteString(ev.GetContent().GetText())
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("seq gap at %d", i)
		}
	}
	if text.String() != "alone one two" {
		t.Fatalf("content %q", text.String())
	}
	// Counted once a batch's packets are handled: the last one's close ack
	// may come first.
	testutil.WaitFor(t, 5*time.Second, func() bool { return e.srv.Stats().UpstreamBatches.Load() == 2 }, "2 batches counted")
	if n := e.srv.Stats().Resent.Load(); n != 1 {
		t.Fatalf("%d resent packets dropped, want 1", n)
	}
}

// TestStopInsideABatch: a policy stop decided on a packet in the middle of a
// batch fences the log there: that packet and the rest of the batch's
// output never reach the log, the stop goes out, and the session ends with
// the commander's stopped (in a batch too).
func TestStopInsideABatch(t *testing.T) {
	eng := policy.NewEngine(nil)
	if _, err := eng.Load([]byte("version: 1\nrules:\n  - {id: phrase, phrases: [\"launch codes\"], action: stop, reason: forbidden}\n")); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Options{Policy: eng}, eventlog.Limits{})
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(batch(
		testutil.Up(sid, &dispatchv1.ContentChunk{Text: "the launch"}),
		testutil.Up(sid, &dispatchv1.ContentChunk{Text: " codes are"}),
		testutil.Up(sid, &dispatchv1.ContentChunk{Text: " LEAK"}),
		testutil.Up(sid, &dispatchv1.ThoughtChain{Delta: "LEAK"}),
	))
	if p := c.recv(); p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_POLICY || p.GetSessionId() != sid {
		t.Fatalf("want the policy's stop, got %v", p)
	}
	c.send(batch(
		testutil.Up(sid, &dispatchv1.ContentChunk{Text: "LEAK"}),
		testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}),
	))
	for c.recv().GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
	}
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "phrase") {
		t.Fatalf("info %+v", info)
	}
	evs := allEvents(t, tk)
	for _, ev := range evs {
		if strings.Contains(ev.GetContent().GetText()+ev.GetThought().GetDelta(), "LEAK") || strings.Contains(ev.GetContent().GetText(), "codes") {
			t.Fatalf("output at or after the stop reached the log: %s", kinds(evs))
		}
	}
	if got := kinds(evs); !strings.Contains(got, "content policy stop stopped") {
		t.Fatalf("events: %s", got)
	}
}

// TestBatchProtocolErrors: a batch holding a hello or a batch, or more than
// MaxUpstreamBatch packets, ends the stream (ErrProtocol); packets of the
// batch before the offending one were handled.
func TestBatchProtocolErrors(t *testing.T) {
	long := make([]*dispatchv1.UpstreamPacket, MaxUpstreamBatch+1)
	for i := range long {
		long[i] = testutil.Up("ses-x", &dispatchv1.ContentChunk{Text: "x"})
	}
	for name, bad := range map[string]func(sid string) *dispatchv1.UpstreamPacket{
		"hello": func(sid string) *dispatchv1.UpstreamPacket {
			return batch(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "before"}), testutil.Hello("again"))
		},
		"nested": func(sid string) *dispatchv1.UpstreamPacket {
			return batch(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "before"}), batch(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "x"})))
		},
		"too long": func(string) *dispatchv1.UpstreamPacket { return batch(long...) },
		"too long, refused by the receiver": func(string) *dispatchv1.UpstreamPacket {
			return &dispatchv1.UpstreamPacket{Payload: TooLongBatch()}
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, Options{}, eventlog.Limits{})
			c := e.connect(t, "planner:chat")
			tk := e.submit(t, task.Spec{})
			sid, _ := c.start()
			c.send(bad(sid))
			if err := c.ended(); !errors.Is(err, ErrProtocol) {
				t.Fatalf("Serve = %v, want ErrProtocol", err)
			}
			waitDone(t, tk)
			got := kinds(allEvents(t, tk))
			if want := !strings.HasPrefix(name, "too long"); strings.Contains(got, "content") != want {
				t.Fatalf("events %s: the packet before the offending one handled: want %v", got, want)
			}
		})
	}
}

package session

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// gateSink is a store whose writes the test commits: it keeps the events
// persisted, and an event is durable only once commitUp says so.
type gateSink struct {
	mu  sync.Mutex
	c   eventlog.Committer
	evs map[uint64]uint64 // upstream seq → log seq
}

func (s *gateSink) WaitRoom(<-chan struct{}) {}
func (s *gateSink) Persist(c eventlog.Committer, _ string, ev *dispatchv1.TaskEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.c = c // one task in these tests
	if up := ev.GetUpstreamSeq(); up > 0 {
		s.evs[up] = ev.GetSeq()
	}
}
func (s *gateSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}

// persisted is the log seq of upstream packet up's event (0: not yet).
func (s *gateSink) persisted(up uint64) uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.evs[up]
}

// commitUp makes the events up to upstream packet up's durable.
func (s *gateSink) commitUp(t *testing.T, up uint64) {
	t.Helper()
	testutil.WaitFor(t, testutil.Wait, func() bool { return s.persisted(up) > 0 }, "the packet's event to be persisted")
	s.mu.Lock()
	c, seq := s.c, s.evs[up]
	s.mu.Unlock()
	c.Commit(seq)
}

// gatedSession starts a hand-over server acking every interval (flush as
// its store flush) over a gateSink, and a commander running one task: the
// sink, the commander and its session.
func gatedSession(t *testing.T, interval time.Duration, flush func(context.Context) error) (*gateSink, *commander, string) {
	t.Helper()
	b, err := broker.New(broker.Options{DefaultTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sched := scheduler.New(16)
	sink := &gateSink{evs: make(map[uint64]uint64)}
	mgr := task.NewManager(eventlog.NewDurable(eventlog.Limits{}, sink), task.NewConfigStore(nil),
		task.ManagerOptions{DefaultPlanner: "chat", StopGrace: testutil.Wait})
	mgr.SetQueue(sched)
	srv := NewServer(sched, b, Options{StopGrace: testutil.Wait, HandOver: true, AckInterval: interval, Flush: flush})
	t.Cleanup(srv.Shutdown)
	e := &env{srv: srv, sched: sched, mgr: mgr}
	c := e.connect(t, "planner:chat")
	e.submit(t, task.Spec{})
	sid, _ := c.start()
	return sink, c, sid
}

// TestEarlyAckRidesTheStoresCommit: with acks every hour, a session that
// has EarlyAckBytes of content text recorded since its last ack gets one as
// soon as the store has committed them — never before, never past what is
// committed, and without a flush of its own — so that a commander's credit
// window of characters is not paced by the ack interval. Many small
// packets alone ask for nothing (a window of packets stays on the tick).
func TestEarlyAckRidesTheStoresCommit(t *testing.T) {
	flushed := make(chan struct{}, 1)
	sink, c, sid := gatedSession(t, time.Hour, func(context.Context) error { flushed <- struct{}{}; return nil })

	// 128 small packets, one byte short of EarlyAckBytes in all, all
	// durable: no ack.
	const n = 128
	chunk := strings.Repeat("x", (EarlyAckBytes-1)/n)
	rest := EarlyAckBytes - 1 - (n-1)*len(chunk)
	for i := uint64(1); i <= n; i++ {
		text := chunk
		if i == n {
			text = strings.Repeat("x", rest)
		}
		c.send(upSeq(sid, i, &dispatchv1.ContentChunk{Text: text}))
	}
	sink.commitUp(t, n)
	c.noPacket(50 * time.Millisecond)
	// The byte that reaches EarlyAckBytes is recorded, but not durable: no
	// ack yet, and none for the packets before it, durable as they are.
	c.send(upSeq(sid, n+1, &dispatchv1.ContentChunk{Text: "x"}))
	testutil.WaitFor(t, testutil.Wait, func() bool { return sink.persisted(n+1) > 0 }, "the packet's event")
	c.noPacket(50 * time.Millisecond)
	// Durable: acked, up to it (all that was sent).
	sink.commitUp(t, n+1)
	if got := c.recvRecorded(sid, n+1); got != 1 {
		t.Fatalf("%d acks", got)
	}

	// Counted from that ack: one packet of EarlyAckBytes, then one more
	// that stays uncommitted: the ack covers the first only.
	big := uint64(n + 2)
	c.send(upSeq(sid, big, &dispatchv1.ContentChunk{Text: strings.Repeat("y", EarlyAckBytes)}))
	testutil.WaitFor(t, testutil.Wait, func() bool { return sink.persisted(big) > 0 }, "the big packet's event")
	c.send(upSeq(sid, big+1, &dispatchv1.ContentChunk{Text: "z"}))
	testutil.WaitFor(t, testutil.Wait, func() bool { return sink.persisted(big+1) > 0 }, "the next packet's event")
	c.noPacket(50 * time.Millisecond)
	sink.commitUp(t, big)
	p := c.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_RECORDED || p.GetSessionId() != sid || a.GetUpstreamSeq() != big {
		t.Fatalf("want ack RECORDED up to %d, got %v", big, p)
	}
	c.noPacket(50 * time.Millisecond)
	select {
	case <-flushed:
		t.Fatal("the acker flushed: the early acks must ride the store's commits")
	default:
	}
}

// TestAPartialTickAckKeepsTheEarlyCount: the tick's ack is snapshotted
// before its flush; packets recorded during the flush are counted towards
// the next early ack and an ack that covers only part of the count must not
// reset it (it did: a flooding session whose window filled during the
// flush waited for the next tick again).
func TestAPartialTickAckKeepsTheEarlyCount(t *testing.T) {
	flushing := make(chan struct{}, 16)
	release := make(chan struct{})
	sink, c, sid := gatedSession(t, 10*time.Millisecond, func(ctx context.Context) error {
		flushing <- struct{}{}
		select {
		case <-release:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	})

	// Packet 1 (half the early-ack bytes) is handled; the tick snapshots
	// it and flushes.
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: strings.Repeat("a", EarlyAckBytes/2)}))
	select {
	case <-flushing:
	case <-time.After(testutil.Wait):
		t.Fatal("the tick did not flush")
	}
	// Packet 2 (a third) is recorded while it flushes; both are durable.
	c.send(upSeq(sid, 2, &dispatchv1.ContentChunk{Text: strings.Repeat("b", EarlyAckBytes/3)}))
	sink.commitUp(t, 2)
	c.noPacket(30 * time.Millisecond)
	// The tick's ack covers packet 1 only. Later ticks' flushes hang (until
	// the test ends): no more tick acks.
	release <- struct{}{}
	if p := c.recv(); p.GetAck().GetUpstreamSeq() != 1 {
		t.Fatalf("want the tick's ack up to 1, got %v", p)
	}
	// Packet 3 (a quarter) brings what was recorded since the ack before
	// the tick's to more than the early-ack bytes: acked once durable.
	c.send(upSeq(sid, 3, &dispatchv1.ContentChunk{Text: strings.Repeat("c", EarlyAckBytes/4)}))
	sink.commitUp(t, 3)
	p := c.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_RECORDED || a.GetUpstreamSeq() != 3 {
		t.Fatalf("want the early ack up to 3, got %v", p)
	}
}

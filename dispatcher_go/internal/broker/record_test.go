package broker

import (
	"context"
	"sync"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// heldRecord is a Recorder whose event becomes durable when the test says.
type heldRecord struct {
	mu      sync.Mutex
	durable bool
	waiting []func()
	asked   chan struct{} // gets one at the first WhenDurable
}

func newHeldRecord() *heldRecord { return &heldRecord{asked: make(chan struct{}, 1)} }

func (h *heldRecord) WhenDurable(_ uint64, f func()) {
	h.mu.Lock()
	if h.durable {
		h.mu.Unlock()
		f()
		return
	}
	h.waiting = append(h.waiting, f)
	if len(h.waiting) == 1 {
		h.asked <- struct{}{}
	}
	h.mu.Unlock()
}

func (h *heldRecord) commit() {
	h.mu.Lock()
	h.durable = true
	w := h.waiting
	h.waiting = nil
	h.mu.Unlock()
	for _, f := range w {
		f()
	}
}

// A local tool not declared idempotent (Broker.Call's path) runs once its
// record is durable; a stop or its deadline that comes first ends it
// without running it; an idempotent one runs at once.
func TestCallWaitsForItsRecord(t *testing.T) {
	b := newBroker(t, time.Second)
	ran := make(chan string, 4)
	run := func(_ context.Context, c Call) (string, error) {
		ran <- c.CallID
		return `{}`, nil
	}
	specs := []*dispatchv1.ToolSpec{
		{Name: "loc.act", TimeoutMs: 10_000},
		{Name: "loc.slow", TimeoutMs: 50},
		{Name: "loc.read", Idempotent: true},
	}
	if _, err := b.SetLocalTools("loc", specs, run); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	rec := newHeldRecord()
	done := testutil.Async(func() (Result, error) {
		return b.Call(ctx, Call{CallID: "a1", ToolName: "loc.act", ArgumentsJSON: `{}`, Recorded: rec, Seq: 1}), nil
	})
	testutil.Recv(t, rec.asked, testutil.Wait, "the call to wait for its record")
	select {
	case id := <-ran:
		t.Fatalf("%s ran before its record was durable", id)
	default:
	}
	// An idempotent call meanwhile runs at once.
	if r := b.Call(ctx, Call{CallID: "r1", ToolName: "loc.read", ArgumentsJSON: `{}`, Recorded: newHeldRecord(), Seq: 2}); r.Result.GetError() != nil {
		t.Fatalf("idempotent call: %v", r.Result)
	}
	if id := <-ran; id != "r1" {
		t.Fatalf("ran %s, want r1", id)
	}
	rec.commit()
	if r := testutil.Recv(t, done, testutil.Wait, "the call's result"); r.V.Result.GetError() != nil {
		t.Fatalf("held call: %v", r.V.Result)
	}
	if id := <-ran; id != "a1" {
		t.Fatalf("ran %s, want a1", id)
	}

	// A stop first: CANCELLED, never run, not even after the commit.
	rec = newHeldRecord()
	sctx, stop := context.WithCancel(ctx)
	done = testutil.Async(func() (Result, error) {
		return b.Call(sctx, Call{CallID: "a2", ToolName: "loc.act", ArgumentsJSON: `{}`, Recorded: rec, Seq: 3}), nil
	})
	testutil.Recv(t, rec.asked, testutil.Wait, "the call to wait for its record")
	stop()
	if r := testutil.Recv(t, done, testutil.Wait, "the call's result"); r.V.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_CANCELLED {
		t.Fatalf("stopped call: %v", r.V.Result)
	}
	rec.commit()

	// The deadline first: TIMEOUT, never run.
	rec = newHeldRecord()
	if r := b.Call(ctx, Call{CallID: "a3", ToolName: "loc.slow", ArgumentsJSON: `{}`, Recorded: rec, Seq: 4}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT {
		t.Fatalf("late call: %v", r.Result)
	}
	rec.commit()
	select {
	case id := <-ran:
		t.Fatalf("%s ran", id)
	default:
	}
}

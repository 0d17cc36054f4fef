package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// benchCapability is what the simulated commanders offer and the simulated
// clients' tasks ask for (planner "bench").
const (
	benchPlanner    = "bench"
	benchCapability = "planner:" + benchPlanner
)

// sessionPlan says what a simulated planner does once a task starts.
type sessionPlan struct {
	// rate is content packets per second per session; 0 floods.
	rate float64
	// packetBytes is the size of each content packet's text.
	packetBytes int
	// endAt ends every session with a result at that moment (relay,
	// throughput); zero means run until stopped (stop).
	endAt time.Time
	// maxPackets ends a session with a result after this many content
	// packets (0 = no limit): tasks stay below the dispatcher's per-task
	// event log bound, and a long run is many tasks, as in production.
	maxPackets int64
	// maxSession ends a session with a result after this long whatever
	// happens, so no run can hang on a stop that never comes.
	maxSession time.Duration
	// leakAfterStop is how many content packets the planner still sends
	// after it received a stop and before it sends stopped, as a careless
	// planner would: the dispatcher must drop them.
	leakAfterStop int
	// credit (stop scenario, --credit) is the commander's credit window:
	// the session's packets are numbered (seq 1, 2...) and at most this
	// many may wait unacknowledged (ack RECORDED) before the next content
	// packet is written; control (stopped, result, usage) never waits for
	// credit. So a stopped queues behind at most this many packets of
	// content on the stream. A writer goroutine sends, so that the session
	// sees the stop while a write waits on flow control, as a commander
	// whose planner the stop cancels. 0: no window, no numbering, one
	// goroutine (as before).
	credit int
	// upBatch (--up-batch) > 1: a writer goroutine sends the session's
	// packets, and those it finds waiting (handed over while it was
	// sending) go as one UpstreamBatch of at most upBatch and what the
	// dispatcher's hello ack announces; a lone packet alone, never held
	// back. The packets are numbered as with credit. 0 or 1: as before.
	upBatch int
	// tools, when set, makes each step a brokered tool call instead of a
	// content packet: the planner sends tool_call and waits for its
	// tool_result, cycling through these tool names.
	tools []string
	// arrivals is how paced sessions' steps are placed in time (see
	// pacing.go); "" is arrivalsBurst. seed seeds arrivalsPoisson.
	arrivals string
	seed     uint64
	// phrase (policy scenario) is the forbidden phrase a task labelled
	// poisonLabel=K emits split across two content packets: the first half
	// at the end of packet K-1, the second half (which completes it) at the
	// start of packet K. Such a session streams on until it is stopped.
	phrase string
}

// poisonLabel is the task label that tells a simulated planner at which
// content packet (0-based) to complete the forbidden phrase.
const poisonLabel = "bench_poison_at"

// splitPhrase cuts the phrase in two halves (at a space if any), never
// inside a character: each half is sent as a content packet, which must be
// UTF-8. Both are non-empty unless the phrase is one character.
func splitPhrase(phrase string) (string, string) {
	cut := len(textcut.Prefix(phrase, len(phrase)/2))
	if i := strings.LastIndex(phrase[:cut], " "); i > 0 {
		cut = i
	}
	if cut == 0 {
		_, cut = utf8.DecodeRuneInString(phrase)
	}
	return phrase[:cut], phrase[cut:]
}

// The commander's side of the stop trace (the dispatcher's is
// DISPATCHER_STOP_TRACE, internal/session/stoptrace.go), for benchmarks
// only: with LOADGEN_STOP_TRACE=FILE every stop acknowledged appends
//
//	session received seen sending sent
//
// in Unix nanoseconds: the stop returned by Recv (the receiving
// goroutine), taken by the session's goroutine, the stopped about to be
// handed to Send (after the plan's leaked packets), and its Send returned;
// and per stopped task a line "# events SESSION STOP STOPPED": the stop
// and stopped events' times as the watcher got them.
// Every second a "# sched" line gives loadgen's own Go scheduler latencies.
var stopTraceFile = func() *benchkit.TraceFile {
	f := benchkit.OpenTrace("LOADGEN_STOP_TRACE")
	f.SchedEvery(time.Second)
	return f
}()

// sessionTrace is what the commander side saw of one task.
type sessionTrace struct {
	mu          sync.Mutex
	taskID      string
	sessionID   string
	started     time.Time // start received
	stopRecv    time.Time // stop received (zero if none)
	stoppedSent time.Time // stopped handed to gRPC
	closedAck   time.Time // ack SESSION_CLOSED received
	sent        int64     // content packets sent
	leaked      int64     // content packets sent after the stop was received
	poisonAt    int64     // content packet completing the phrase (0: none)
	offendSent  time.Time // that packet handed to gRPC
}

func (t *sessionTrace) snapshot() sessionTrace {
	t.mu.Lock()
	defer t.mu.Unlock()
	return sessionTrace{taskID: t.taskID, sessionID: t.sessionID, started: t.started, stopRecv: t.stopRecv,
		stoppedSent: t.stoppedSent, closedAck: t.closedAck, sent: t.sent, leaked: t.leaked,
		poisonAt: t.poisonAt, offendSent: t.offendSent}
}

// fleet is a set of simulated commander slots sharing one plan.
type fleet struct {
	plan    sessionPlan
	payload string
	id      string

	traces   sync.Map // task id → *sessionTrace
	sent     atomic.Int64
	rejected atomic.Int64
	sessions atomic.Int64
	lost     atomic.Int64 // slots whose stream ended before the fleet was closed
	lostErr  atomic.Value // string: the first reason a slot was lost
	closing  atomic.Bool
	wg       sync.WaitGroup
	// epoch and slots place the slots' grids (arrivalsSpread); set by open.
	epoch time.Time
	slots int

	// Tool calls (plan.tools): round trip per tool, counted from
	// measureFrom on; errors by code.
	toolRTT      map[string]*benchkit.Recorder
	toolFrom     atomic.Int64 // unix µs; calls sent outside [toolFrom, toolTo) are not recorded
	toolTo       atomic.Int64
	toolCalls    atomic.Int64
	toolErrors   atomic.Int64
	toolErrFirst atomic.Value // string
	// toolStarts counts the calls sent in each millisecond of
	// [toolFrom, toolTo): how bursty the arrivals were.
	toolStarts []atomic.Int32
}

func newFleet(plan sessionPlan) *fleet {
	f := &fleet{
		plan:    plan,
		payload: strings.Repeat("x", max(plan.packetBytes, 1)),
		id:      fmt.Sprintf("loadgen-%d", os.Getpid()),
		toolRTT: map[string]*benchkit.Recorder{},
	}
	for _, t := range plan.tools {
		f.toolRTT[t] = benchkit.NewRecorder(0)
	}
	if len(plan.tools) > 0 {
		f.toolStarts = make([]atomic.Int32, min(plan.maxSession/time.Millisecond, 1<<22))
	}
	return f
}

// describeLost says how many slots were lost and why the first one was.
func (f *fleet) describeLost() string {
	n := f.lost.Load()
	if n == 0 {
		return "0 slots lost"
	}
	why, _ := f.lostErr.Load().(string)
	return fmt.Sprintf("%d slots lost, first: %s", n, why)
}

// trace returns the trace of a task the fleet ran, if any.
func (f *fleet) trace(taskID string) (sessionTrace, bool) {
	v, ok := f.traces.Load(taskID)
	if !ok {
		return sessionTrace{}, false
	}
	return v.(*sessionTrace).snapshot(), true
}

// open starts n slots spread over conns and waits until every one has its
// hello acknowledged (or ctx ends).
func (f *fleet) open(ctx context.Context, conns []*grpc.ClientConn, n int) error {
	f.epoch, f.slots = time.Now(), n
	ready := make(chan error, n)
	var firstErr error
	acked := 0
	wait := func() error {
		select {
		case err := <-ready:
			acked++
			if err != nil && firstErr == nil {
				firstErr = err
			}
			return nil
		case <-ctx.Done():
			return fmt.Errorf("opening %d slots: %w", n, ctx.Err())
		}
	}
	for i := range n {
		// At most maxOpening hellos in flight: 20 000 at once starve this
		// process's transport goroutines on a small machine until the
		// dispatcher's keepalive (2 s) gives up on their connections.
		for i-acked >= maxOpening {
			if err := wait(); err != nil {
				return err
			}
		}
		conn := conns[i%len(conns)]
		f.wg.Go(func() { f.runSlot(ctx, conn, i, ready) })
	}
	for acked < n {
		if err := wait(); err != nil {
			return err
		}
	}
	return firstErr
}

// maxOpening bounds the slots fleet.open opens at once.
const maxOpening = 1000

// wait marks the fleet as shutting down and waits for its slots; the caller
// cancels the slots' context first.
func (f *fleet) wait() {
	f.closing.Store(true)
	f.wg.Wait()
}

// runSlot is one simulated slot: a ChatStream whose receive loop runs in its
// own goroutine and whose sends all happen here (one sender per stream).
func (f *fleet) runSlot(ctx context.Context, conn *grpc.ClientConn, idx int, ready chan<- error) {
	signalled := false
	signal := func(err error) {
		if !signalled {
			signalled = true
			ready <- err
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := dispatchv1.NewAgentInteractionClient(conn).ChatStream(ctx)
	if err != nil {
		signal(fmt.Errorf("slot %d: ChatStream: %w", idx, err))
		return
	}
	err = stream.Send(&dispatchv1.UpstreamPacket{
		Timestamp: time.Now().UnixMicro(),
		Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{
			CommanderId: f.id, Version: "loadgen", Capabilities: []string{benchCapability},
			Labels: map[string]string{"role": "loadgen"}, SlotIndex: int32(idx),
		}},
	})
	if err != nil {
		signal(fmt.Errorf("slot %d: hello: %w", idx, err))
		return
	}

	down := make(chan *dispatchv1.DownstreamPacket, 16)
	recvErr := make(chan error, 1)
	go f.receive(ctx, stream, down, recvErr)
	var w *slotWriter
	defer func() {
		if w != nil {
			cancel()
			<-w.done
		}
	}()

	defer func() {
		if !f.closing.Load() && ctx.Err() == nil {
			f.lost.Add(1)
		}
	}()
	lose := func(err error) {
		if !f.closing.Load() {
			f.lostErr.CompareAndSwap(nil, fmt.Sprintf("slot %d: %v", idx, err))
		}
	}

	// Wait for the hello ack.
	for !signalled {
		select {
		case pkt, ok := <-down:
			if !ok {
				err := <-recvErr
				signal(fmt.Errorf("slot %d: stream ended before the hello ack: %w", idx, err))
				return
			}
			if ack := pkt.GetAck(); ack.GetKind() == dispatchv1.AckKind_ACK_KIND_HELLO {
				// The writer starts once the ack says how many packets a batch may hold.
				if batch := min(f.plan.upBatch, int(ack.GetMaxUpstreamBatch())); batch > 1 {
					w = startWriter(ctx, stream, batch)
				} else if f.plan.credit > 0 {
					w = startWriter(ctx, stream, 1)
				}
				signal(nil)
			}
		case <-ctx.Done():
			signal(ctx.Err())
			return
		}
	}

	for {
		var start *dispatchv1.DownstreamPacket
		select {
		case pkt, ok := <-down:
			if !ok {
				lose(<-recvErr)
				return
			}
			if pkt.GetStart() == nil {
				continue // a late SESSION_CLOSED ack, a stray tool result...
			}
			start = pkt
		case <-ctx.Done():
			if w != nil {
				<-w.done // it leaves with ctx; then nobody sends
			}
			_ = stream.CloseSend()
			return
		}
		if err := f.session(ctx, stream, w, start, down, idx); err != nil {
			lose(err)
			return
		}
	}
}

// receive reads downstream packets, timestamps stops the moment they arrive,
// and hands everything else to the sender.
func (f *fleet) receive(ctx context.Context, stream grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket], down chan<- *dispatchv1.DownstreamPacket, recvErr chan<- error) {
	defer close(down)
	var cur *sessionTrace
	for {
		pkt, err := stream.Recv()
		if err != nil {
			recvErr <- err
			return
		}
		now := time.Now()
		toolTrace.received(pkt, now)
		switch {
		case pkt.GetStart() != nil:
			cur = &sessionTrace{taskID: pkt.GetStart().GetTaskId(), sessionID: pkt.GetSessionId(), started: now}
			f.traces.Store(cur.taskID, cur)
			f.sessions.Add(1)
		case pkt.GetStop() != nil:
			if cur != nil && cur.sessionID == pkt.GetSessionId() {
				cur.mu.Lock()
				if cur.stopRecv.IsZero() {
					cur.stopRecv = now
				}
				cur.mu.Unlock()
			}
		case pkt.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED:
			if cur != nil && cur.sessionID == pkt.GetSessionId() {
				cur.mu.Lock()
				cur.closedAck = now
				cur.mu.Unlock()
			}
		case pkt.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_REJECTED:
			f.rejected.Add(1)
			continue
		}
		select {
		case down <- pkt:
		case <-ctx.Done():
			recvErr <- ctx.Err()
			return
		}
	}
}

var errStreamEnded = errors.New("stream ended")

// errStopFirst: the stop arrived before a content packet was handed over.
var errStopFirst = errors.New("stop received first")

// slotWriter is the one sender of a slot's stream when the plan has a
// credit window or upstream batches: the session hands packets over (up to
// batch may wait in in) and can take a stop while the writer waits on flow
// control.
type slotWriter struct {
	in   chan *dispatchv1.UpstreamPacket
	done chan struct{} // closed when the writer left (Send failed, or ctx ended)
	err  error         // why, set before done is closed
}

// startWriter starts a slot's writer; batch > 1: the packets waiting in in
// behind the one it takes go with it as one UpstreamBatch (at most batch).
func startWriter(ctx context.Context, stream grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket], batch int) *slotWriter {
	w := &slotWriter{in: make(chan *dispatchv1.UpstreamPacket, max(batch, 1)), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		var pkts []*dispatchv1.UpstreamPacket
		for {
			select {
			case p := <-w.in:
				pkts = append(pkts[:0], p)
			waiting:
				for len(pkts) < batch {
					select {
					case q := <-w.in:
						pkts = append(pkts, q)
					default:
						break waiting
					}
				}
				if len(pkts) > 1 {
					p = &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Batch{
						Batch: &dispatchv1.UpstreamBatch{Packets: pkts}}}
					pkts = nil // the message keeps its slice until Send returns; a new one next time
				}
				if err := stream.Send(p); err != nil {
					w.err = err
					return
				}
			case <-ctx.Done():
				w.err = ctx.Err()
				return
			}
		}
	}()
	return w
}

// session plays one task: content packets at the plan's rate until the plan
// ends it (usage + result) or a stop arrives (leaked packets + stopped), then
// waits for the SESSION_CLOSED ack. slot is the slot's index (pacing).
func (f *fleet) session(ctx context.Context, stream grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket], w *slotWriter, start *dispatchv1.DownstreamPacket, down <-chan *dispatchv1.DownstreamPacket, slot int) error {
	sid := start.GetSessionId()
	v, _ := f.traces.Load(start.GetStart().GetTaskId())
	tr := v.(*sessionTrace)
	var seq, acked uint64 // the session's upstream seq, and the highest acknowledged (numbered plans)
	number := func(p *dispatchv1.UpstreamPacket) {
		p.SessionId = sid
		p.Timestamp = time.Now().UnixMicro()
		if w != nil {
			seq++
			p.Seq = seq
		}
	}
	var stop *dispatchv1.StopSignal
	noteAck := func(pkt *dispatchv1.DownstreamPacket) {
		if a := pkt.GetAck(); a.GetKind() == dispatchv1.AckKind_ACK_KIND_RECORDED && pkt.GetSessionId() == sid {
			acked = max(acked, a.GetUpstreamSeq())
		}
	}
	// handOver writes p on the stream. With a writer (plan.credit) it hands
	// p over, watching (watch) for the stop, as a commander whose planner is
	// cancelled by the stop even while it waits on flow control: a stop
	// arriving first sets stop and p is not sent (nor numbered).
	handOver := func(p *dispatchv1.UpstreamPacket, watch bool) error {
		if w == nil {
			return stream.Send(p)
		}
		watching := down
		if !watch {
			watching = nil
		}
		for {
			select {
			case w.in <- p:
				return nil
			case pkt, ok := <-watching:
				if !ok {
					return errStreamEnded
				}
				noteAck(pkt)
				if s := pkt.GetStop(); s != nil && pkt.GetSessionId() == sid {
					stop = s
					seq--
					return errStopFirst
				}
			case <-w.done:
				return w.err
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	send := func(p *dispatchv1.UpstreamPacket) error {
		number(p)
		return handOver(p, false)
	}
	var n int64 // content packets of this session
	var poisonAt int64
	var firstHalf, secondHalf string
	if f.plan.phrase != "" {
		if k, err := strconv.ParseInt(start.GetStart().GetLabels()[poisonLabel], 10, 64); err == nil && k > 0 {
			poisonAt = k
			firstHalf, secondHalf = splitPhrase(f.plan.phrase)
			tr.mu.Lock()
			tr.poisonAt = k
			tr.mu.Unlock()
		}
	}
	// counted records a content packet handed to gRPC.
	counted := func() {
		n++
		f.sent.Add(1)
		tr.mu.Lock()
		tr.sent++
		if !tr.stopRecv.IsZero() {
			tr.leaked++
		}
		tr.mu.Unlock()
	}
	contentPacket := func() *dispatchv1.UpstreamPacket {
		text := f.payload
		switch {
		case poisonAt == 0:
		case n == poisonAt-1:
			text = f.payload + firstHalf
		case n == poisonAt:
			text = secondHalf + f.payload
			tr.mu.Lock()
			tr.offendSent = time.Now()
			tr.mu.Unlock()
		}
		return &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Content{
			Content: &dispatchv1.ContentChunk{Text: text}}}
	}
	// content sends the next content packet; errStopFirst: a stop came
	// first (plan.credit) and it was not sent.
	content := func() error {
		// The credit window (plan.credit): wait for acks, or the stop.
		for f.plan.credit > 0 && seq-acked >= uint64(f.plan.credit) {
			select {
			case pkt, ok := <-down:
				if !ok {
					return errStreamEnded
				}
				noteAck(pkt)
				if s := pkt.GetStop(); s != nil && pkt.GetSessionId() == sid {
					stop = s
					return errStopFirst
				}
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		p := contentPacket()
		number(p)
		err := handOver(p, true)
		if err == nil {
			counted()
		}
		return err
	}

	began := time.Now()
	deadline := began.Add(f.plan.maxSession)
	if !f.plan.endAt.IsZero() && f.plan.endAt.Before(deadline) {
		deadline = f.plan.endAt
	}
	end := time.NewTimer(time.Until(deadline))
	defer end.Stop()
	var interval time.Duration
	if f.plan.rate > 0 {
		interval = time.Duration(float64(time.Second) / f.plan.rate)
	}
	pace := newPacer(f.plan.arrivals, interval, began, f.epoch, slot, f.slots, f.plan.seed)
	tick := time.NewTimer(time.Until(pace.first()))
	defer tick.Stop()
	var calls int64
	args := fmt.Sprintf(`{"text":%q}`, f.payload)
	// toolCall sends one tool_call and waits for its tool_result; a stop or
	// the end of the session while waiting ends the wait.
	toolCall := func() (ended bool, err error) {
		calls++
		tool := f.plan.tools[int(calls-1)%len(f.plan.tools)]
		callID := fmt.Sprintf("c%d", calls)
		callArgs, mark := args, ""
		if connTrace != nil {
			mark = fmt.Sprintf(" ~T%d~", callMarks.Add(1))
			callArgs = fmt.Sprintf(`{"text":%q,"mark":%q}`, f.payload, mark[1:])
		}
		sentAt := time.Now()
		if err := send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{
			ToolName: tool, ArgumentsJson: callArgs, CallId: callID}}}); err != nil {
			return false, err
		}
		for {
			select {
			case pkt, ok := <-down:
				if !ok {
					return false, errStreamEnded
				}
				if pkt.GetSessionId() != sid {
					continue
				}
				if s := pkt.GetStop(); s != nil {
					stop = s
					return true, nil
				}
				res := pkt.GetToolResult()
				if res == nil || res.GetCallId() != callID {
					continue
				}
				if at := sentAt.UnixMicro(); at >= f.toolFrom.Load() && at < f.toolTo.Load() {
					if ms := (at - f.toolFrom.Load()) / 1000; ms < int64(len(f.toolStarts)) {
						f.toolStarts[ms].Add(1)
					}
					f.toolCalls.Add(1)
					f.toolRTT[tool].Add(time.Since(sentAt))
					toolTrace.call(pkt, sid, tool, sentAt, mark)
				}
				if e := res.GetError(); e != nil {
					f.toolErrors.Add(1)
					f.toolErrFirst.CompareAndSwap(nil, fmt.Sprintf("%s: %s: %s", tool, e.GetCode(), e.GetMessage()))
				}
				return false, nil
			case <-end.C:
				return true, nil
			case <-ctx.Done():
				return false, ctx.Err()
			}
		}
	}

emit:
	for {
		select {
		case pkt, ok := <-down:
			if !ok {
				return errStreamEnded
			}
			noteAck(pkt)
			if s := pkt.GetStop(); s != nil && pkt.GetSessionId() == sid {
				stop = s
				break emit
			}
			continue
		case <-end.C:
			break emit
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
		if len(f.plan.tools) > 0 {
			ended, err := toolCall()
			if err != nil {
				return err
			}
			if ended {
				break emit
			}
			n++ // a call counts as a step towards maxPackets
		} else if err := content(); errors.Is(err, errStopFirst) {
			break emit
		} else if err != nil {
			return err
		}
		if f.plan.maxPackets > 0 && n >= f.plan.maxPackets && poisonAt == 0 {
			break emit
		}
		if interval == 0 {
			tick.Reset(0)
			continue
		}
		tick.Reset(pace.advance(time.Now()))
	}

	if stop != nil {
		seen := time.Now()
		for range f.plan.leakAfterStop {
			// Careless: past the stop and the credit window.
			p := contentPacket()
			number(p)
			if err := handOver(p, false); err != nil {
				return err
			}
			counted()
		}
		tr.mu.Lock()
		tr.stoppedSent = time.Now()
		sent := tr.sent
		tr.mu.Unlock()
		// Control: never waits for credit.
		if err := send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Stopped{Stopped: &dispatchv1.Stopped{
			Reason:     "bench planner cancelled: " + stop.GetReason(),
			FinalUsage: &dispatchv1.Usage{OutputTokens: sent, Steps: 1, Model: "bench"},
		}}}); err != nil {
			return err
		}
		if stopTraceFile != nil {
			stopTraceFile.Printf("%s %d %d %d %d\n", sid, tr.snapshot().stopRecv.UnixNano(), seen.UnixNano(),
				tr.snapshot().stoppedSent.UnixNano(), time.Now().UnixNano())
		}
	} else {
		tr.mu.Lock()
		sent := tr.sent
		tr.mu.Unlock()
		if err := send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Usage{
			Usage: &dispatchv1.Usage{OutputTokens: sent, Steps: 1, Model: "bench"}}}); err != nil {
			return err
		}
		if err := send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Result{Result: &dispatchv1.FinalResult{
			Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS,
			Result:  fmt.Sprintf("sent %d packets", sent),
		}}}); err != nil {
			return err
		}
	}

	// The slot is idle again once the dispatcher acknowledges the end. A
	// stop arriving now (the session ended as it was cancelled) is ignored.
	wait := time.NewTimer(30 * time.Second)
	defer wait.Stop()
	for {
		select {
		case pkt, ok := <-down:
			if !ok {
				return errStreamEnded
			}
			if pkt.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED && pkt.GetSessionId() == sid {
				return nil
			}
		case <-wait.C:
			return fmt.Errorf("session %s: no SESSION_CLOSED ack within 30s", sid)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

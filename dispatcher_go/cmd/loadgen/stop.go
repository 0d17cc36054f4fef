package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// stopStats gathers the stop scenario's measurements from all lanes.
type stopStats struct {
	cancelToStopRecv     *benchkit.Recorder // client CancelTask call → commander receives stop
	cancelToStoppedEvent *benchkit.Recorder // client CancelTask call → dispatcher records stopped (event time)
	decisionToStopped    *benchkit.Recorder // dispatcher stop event → stopped event (dispatcher clock)
	stopRecvToSent       *benchkit.Recorder // commander: stop received → stopped sent
	cancelToTerminal     *benchkit.Recorder // client CancelTask call → watcher gets CANCELLED
	cancelRPC            *benchkit.Recorder // CancelTask round trip
	// The stop's path split in legs (one host, so one clock):
	decisionToStopRecv *benchkit.Recorder // dispatcher stop event → commander receives stop
	stoppedSentToRec   *benchkit.Recorder // commander hands stopped to gRPC → dispatcher records it
	// queuedAhead is, per stopped task, the content packets the commander
	// had handed to gRPC but the dispatcher never recorded (stored as a
	// count in a Duration, 1 ns a packet): what `stopped` queued behind.
	queuedAhead *benchkit.Recorder

	tasks, cancelled, endedOtherwise, notCancelled atomic.Int64
	contentAfterStop, missingStop, missingStopped  atomic.Int64
	stopNotReceived                                atomic.Int64
	leaked                                         atomic.Int64
}

func runStop(ctx context.Context, o *options, e *env) (*result, error) {
	params := o.taskParams()
	params["stop_window"] = fmt.Sprintf("%s..%s", o.stopMin, o.stopMax)
	params["leak_after_stop"] = o.leakAfterStop
	params["credit"] = o.credit
	res := newResult("stop", params)

	rg, err := openRig(ctx, o, e, "stop", sessionPlan{rate: o.rate, packetBytes: o.packetBytes,
		maxSession: o.stopMax + 30*time.Second, leakAfterStop: o.leakAfterStop, credit: o.credit, upBatch: o.upBatch}, o.connsFor(o.sessions))
	defer rg.close()
	if err != nil {
		return nil, err
	}
	st := &stopStats{
		cancelToStopRecv: benchkit.NewRecorder(0), cancelToStoppedEvent: benchkit.NewRecorder(0),
		decisionToStopped: benchkit.NewRecorder(0), stopRecvToSent: benchkit.NewRecorder(0),
		cancelToTerminal: benchkit.NewRecorder(0), cancelRPC: benchkit.NewRecorder(0),
		decisionToStopRecv: benchkit.NewRecorder(0), stoppedSentToRec: benchkit.NewRecorder(0),
		queuedAhead: benchkit.NewRecorder(0),
	}
	elapsed := rg.runLanes(ctx, o, func(rng *rand.Rand, lane, n int) error {
		return stopOne(ctx, o, rg, st, rng, lane, n)
	})

	res.latency("cancel call → commander got stop", st.cancelToStopRecv.Summary())
	res.latency("cancel call → stopped recorded", st.cancelToStoppedEvent.Summary())
	res.latency("stop decision → stopped recorded", st.decisionToStopped.Summary())
	res.latency("commander: stop → stopped sent", st.stopRecvToSent.Summary())
	res.latency("  leg: stop decision → commander got stop", st.decisionToStopRecv.Summary())
	res.latency("  leg: commander sent stopped → recorded", st.stoppedSentToRec.Summary())
	res.latency("cancel call → watcher got CANCELLED", st.cancelToTerminal.Summary())
	res.latency("CancelTask round trip", st.cancelRPC.Summary())
	res.value("tasks", float64(st.tasks.Load()), "")
	res.value("tasks cancelled", float64(st.cancelled.Load()), "")
	res.value("stops per second", float64(st.cancelled.Load())/elapsed.Seconds(), "/s")
	res.value("content packets sent by commanders", float64(rg.f.sent.Load())/elapsed.Seconds(), "/s")
	res.value("content sent after stop (must be dropped)", float64(st.leaked.Load()), "packets")
	res.value("REJECTED acks", float64(rg.f.rejected.Load()), "")
	if q := st.queuedAhead.Summary(); q.N > 0 {
		// Packets, not time: the recorder holds 1 ns per packet.
		res.value("content queued ahead of stopped, p50", float64(q.P50), "packets")
		res.value("content queued ahead of stopped, p90", float64(q.P90), "packets")
		res.value("content queued ahead of stopped, max", float64(q.Max), "packets")
	}

	res.check("no content after stop", st.contentAfterStop.Load() == 0,
		"%d content/thought events reached a watcher after the stop event", st.contentAfterStop.Load())
	res.check("every cancel stopped its task", st.notCancelled.Load() == 0 && st.endedOtherwise.Load() == 0,
		"%d CancelTask said not cancelled, %d tasks ended otherwise", st.notCancelled.Load(), st.endedOtherwise.Load())
	res.check("stop and stopped events recorded", st.missingStop.Load() == 0 && st.missingStopped.Load() == 0,
		"%d tasks without a stop event, %d without a stopped event", st.missingStop.Load(), st.missingStopped.Load())
	res.check("every commander received its stop", st.stopNotReceived.Load() == 0,
		"%d cancelled tasks whose commander never saw a stop", st.stopNotReceived.Load())
	rg.check(res)
	res.check("at least one stop measured", st.cancelled.Load() > 0, "%d", st.cancelled.Load())
	return res, nil
}

// stopOne submits one task, watches it, cancels it at a random moment after
// its first content event, and records the stop's timings.
func stopOne(ctx context.Context, o *options, rg *rig, st *stopStats, rng *rand.Rand, lane, n int) error {
	pool, f := rg.pool, rg.f
	id, err := pool.submit(ctx, lane, n, nil)
	if err != nil {
		return err
	}
	st.tasks.Add(1)
	tc := pool.tasks()
	delay := o.stopMin
	if span := o.stopMax - o.stopMin; span > 0 {
		delay += time.Duration(rng.Int64N(int64(span)))
	}

	var (
		timer      *time.Timer
		cancelDone = make(chan struct{})
		tCancel    time.Time
		rpcResp    *dispatchv1.CancelTaskResponse
		rpcErr     error
		stopSeq    uint64
		stopAt     time.Time
		stoppedAt  time.Time
		terminalAt time.Time
		recorded   int64 // content events recorded (all before the stop)
	)
	fire := func() {
		defer close(cancelDone)
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		tCancel = time.Now()
		rpcResp, rpcErr = tc.CancelTask(cctx, &dispatchv1.CancelTaskRequest{TaskId: id, Reason: "loadgen stop scenario"})
		if rpcErr == nil {
			st.cancelRPC.Add(time.Since(tCancel))
		}
	}
	w, err := watch(ctx, tc, id, pool.watchBatch, func(ev *dispatchv1.TaskEvent, at time.Time) {
		switch ev.GetKind().(type) {
		case *dispatchv1.TaskEvent_Content, *dispatchv1.TaskEvent_Thought:
			if stopSeq > 0 {
				st.contentAfterStop.Add(1)
			}
			recorded++
			if timer == nil {
				timer = time.AfterFunc(delay, fire)
			}
		case *dispatchv1.TaskEvent_Stop:
			if stopSeq == 0 {
				stopSeq, stopAt = ev.GetSeq(), ev.GetTime().AsTime()
			}
		case *dispatchv1.TaskEvent_Stopped:
			stoppedAt = ev.GetTime().AsTime()
		case *dispatchv1.TaskEvent_State:
			terminalAt = at
		}
	})
	if timer != nil && !timer.Stop() {
		<-cancelDone // it fired: wait for the call to finish
	} else {
		close(cancelDone)
		timer = nil
	}
	rg.gaps.Add(w.gaps)
	if err != nil {
		return err
	}
	if timer == nil {
		st.endedOtherwise.Add(1)
		return fmt.Errorf("task %s ended %s before it was cancelled", id, w.status)
	}
	if rpcErr != nil {
		return fmt.Errorf("CancelTask %s: %w", id, rpcErr)
	}
	if !rpcResp.GetCancelled() {
		st.notCancelled.Add(1)
		return fmt.Errorf("CancelTask %s: not cancelled (%s: %s)", id, rpcResp.GetStatus(), rpcResp.GetMessage())
	}
	if w.status != agentpb.TaskStatus_CANCELLED {
		st.endedOtherwise.Add(1)
		return fmt.Errorf("task %s ended %s after a successful cancel", id, w.status)
	}
	st.cancelled.Add(1)
	st.cancelToTerminal.Add(terminalAt.Sub(tCancel))
	if stopSeq == 0 {
		st.missingStop.Add(1)
	}
	if stoppedAt.IsZero() {
		st.missingStopped.Add(1)
	} else {
		st.cancelToStoppedEvent.Add(stoppedAt.Sub(tCancel))
		if stopSeq > 0 {
			st.decisionToStopped.Add(stoppedAt.Sub(stopAt))
		}
	}
	if tr, ok := f.trace(id); ok && stopTraceFile != nil && stopSeq > 0 && !stoppedAt.IsZero() {
		// The events' own times (the dispatcher's clock, as recorded): the
		// stop trace's ends when the dispatcher writes none.
		stopTraceFile.Printf("# events %s %d %d\n", tr.sessionID, stopAt.UnixNano(), stoppedAt.UnixNano())
	}
	if tr, ok := f.trace(id); ok && !tr.stopRecv.IsZero() {
		st.cancelToStopRecv.Add(tr.stopRecv.Sub(tCancel))
		if stopSeq > 0 {
			st.decisionToStopRecv.Add(tr.stopRecv.Sub(stopAt))
		}
		if !tr.stoppedSent.IsZero() {
			st.stopRecvToSent.Add(tr.stoppedSent.Sub(tr.stopRecv))
			if !stoppedAt.IsZero() {
				st.stoppedSentToRec.Add(stoppedAt.Sub(tr.stoppedSent))
			}
		}
		st.queuedAhead.Add(time.Duration(max(tr.sent-recorded, 0)))
		st.leaked.Add(tr.leaked)
	} else {
		st.stopNotReceived.Add(1)
	}
	return nil
}

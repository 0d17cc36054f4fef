package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// streamRun is N lanes streaming for a fixed time: each lane submits a task,
// watches it with W watchers until it ends, and submits the next, while the
// simulated commanders stream into whichever task they are given. It is the
// shared body of the relay and throughput scenarios.
type streamRun struct {
	*rig
	o *options
	// measureFrom..measureTo is the window counted (after the warmup).
	began, measureFrom, measureTo time.Time

	e2e, in, out *benchkit.Recorder // emit → watcher, emit → recorded, recorded → watcher
	delivered    atomic.Int64       // events watchers received inside the window
	logged       atomic.Int64       // events the dispatcher logged inside the window (exact, by event time)
	loggedEst    atomic.Int64       // the same estimated from GetTask, when nobody watches (×1000)
	tasks, ok    atomic.Int64
	lostPackets  atomic.Int64
	lanes        sync.WaitGroup
}

// startStreamRun opens the slots and starts the lanes. Sessions end with a
// result after plan.maxPackets packets or at the end of the run (plus a
// margin, so the window measures steady streaming).
func startStreamRun(ctx context.Context, o *options, e *env, scenario string, maxPackets int64, tools []string) (*streamRun, func(), error) {
	rg, err := openRig(ctx, o, e, scenario, sessionPlan{rate: o.rate, packetBytes: o.packetBytes, maxPackets: maxPackets,
		maxSession: o.duration + time.Minute, tools: tools, arrivals: o.arrivals, seed: o.seed, upBatch: o.upBatch}, max(1, o.connsFor(o.sessions*max(o.watchers, 1))))
	if err != nil {
		return nil, rg.close, err
	}
	r := &streamRun{rig: rg, o: o, e2e: benchkit.NewRecorder(0), in: benchkit.NewRecorder(0), out: benchkit.NewRecorder(0)}
	r.began = time.Now()
	r.measureFrom = r.began.Add(o.warmup)
	r.measureTo = r.began.Add(o.duration)
	r.f.plan.endAt = r.measureTo.Add(500 * time.Millisecond)
	r.startLanes(ctx, o, &r.lanes, r.measureTo, func(_ *rand.Rand, lane, n int) error {
		return r.runTask(ctx, lane, n)
	})
	return r, rg.close, nil
}

// runTask is one task of a lane, from submission to its end.
func (r *streamRun) runTask(ctx context.Context, lane, n int) error {
	id, err := r.pool.submit(ctx, lane, n, nil)
	if err != nil {
		return err
	}
	r.tasks.Add(1)
	if r.o.watchers == 0 {
		return r.awaitUnwatched(ctx, id)
	}
	var wg sync.WaitGroup
	var first watched
	var firstErr error
	for w := range r.o.watchers {
		wg.Go(func() {
			got, err := r.watchOne(ctx, id, w == 0)
			if w == 0 {
				first, firstErr = got, err
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	if first.status == agentpb.TaskStatus_SUCCESS {
		r.ok.Add(1)
	} else {
		return fmt.Errorf("task %s ended %s", id, first.status)
	}
	if tr, found := r.f.trace(id); found && first.contents != tr.sent {
		r.lostPackets.Add(tr.sent - first.contents)
	}
	return nil
}

// watchOne is one watcher of one task; the first watcher of each task also
// counts what the dispatcher logged in the window.
func (r *streamRun) watchOne(ctx context.Context, id string, first bool) (watched, error) {
	w, err := watch(ctx, r.pool.tasks(), id, r.pool.watchBatch, func(ev *dispatchv1.TaskEvent, at time.Time) {
		recorded := ev.GetTime().AsTime()
		if first && !recorded.Before(r.measureFrom) && recorded.Before(r.measureTo) {
			r.logged.Add(1)
		}
		if at.Before(r.measureFrom) || !at.Before(r.measureTo) {
			return
		}
		r.delivered.Add(1)
		if ev.GetContent() == nil || ev.GetEmittedAtUs() == 0 {
			return
		}
		emitted := time.UnixMicro(ev.GetEmittedAtUs())
		r.e2e.Add(at.Sub(emitted))
		r.in.Add(recorded.Sub(emitted))
		r.out.Add(at.Sub(recorded))
	})
	r.gaps.Add(w.gaps)
	return w, err
}

// awaitUnwatched polls a task nobody watches until it ends, then estimates
// the events it logged inside the window from its event count and run time.
func (r *streamRun) awaitUnwatched(ctx context.Context, id string) error {
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		resp, err := r.pool.tasks().GetTask(cctx, &dispatchv1.GetTaskRequest{TaskId: id})
		cancel()
		if err != nil {
			return fmt.Errorf("GetTask: %w", err)
		}
		t := resp.GetTask()
		if terminal(t.GetStatus()) {
			if t.GetStatus() != agentpb.TaskStatus_SUCCESS {
				return fmt.Errorf("task %s ended %s: %s", id, t.GetStatus(), t.GetMessage())
			}
			r.ok.Add(1)
			from, to := t.GetStartedAt().AsTime(), t.GetEndedAt().AsTime()
			span := to.Sub(from)
			overlap := minTime(to, r.measureTo).Sub(maxTime(from, r.measureFrom))
			if span > 0 && overlap > 0 {
				r.loggedEst.Add(int64(1000 * float64(t.GetLastSeq()) * float64(overlap) / float64(span)))
			}
			return nil
		}
		if err := sleepUntil(ctx, time.Now().Add(20*time.Millisecond)); err != nil {
			return err
		}
	}
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// finish waits for the lanes (bounded by ctx) and adds the checks that hold
// for any streaming run: all tasks SUCCESS, no gap, every packet sent was
// delivered.
func (r *streamRun) finish(ctx context.Context, res *result) {
	done := make(chan struct{})
	go func() { r.lanes.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		res.check("lanes finished", false, "%v", ctx.Err())
		return
	}
	res.value("tasks", float64(r.tasks.Load()), "")
	res.check("all tasks SUCCESS", r.ok.Load() == r.tasks.Load() && r.tasks.Load() > 0, "%d of %d", r.ok.Load(), r.tasks.Load())
	if r.o.watchers > 0 {
		res.check("every packet sent reached the watcher", r.lostPackets.Load() == 0, "%d packets missing", r.lostPackets.Load())
	}
	r.check(res)
}

// sleepUntil waits for t or ctx.
func sleepUntil(ctx context.Context, t time.Time) error {
	timer := time.NewTimer(time.Until(t))
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func streamParams(o *options) map[string]any {
	params := o.taskParams()
	params["watchers"] = o.watchers
	params["warmup"] = o.warmup.String()
	return params
}

func runRelay(ctx context.Context, o *options, e *env) (*result, error) {
	params := streamParams(o)
	if o.rate > 0 {
		params["arrivals"] = o.arrivals
	}
	res := newResult("relay", params)
	if o.watchers == 0 {
		return nil, fmt.Errorf("relay needs --watchers >= 1")
	}
	r, cleanup, err := startStreamRun(ctx, o, e, "relay", o.taskPackets, nil)
	defer cleanup()
	if err != nil {
		return nil, err
	}
	if err := sleepUntil(ctx, r.measureFrom); err != nil {
		return nil, err
	}
	sentFrom := r.f.sent.Load()
	var dcpuFrom, cpuFrom time.Duration
	if o.dispatcherPID > 0 {
		dcpuFrom, _ = benchkit.CPUTime(o.dispatcherPID)
	}
	cpuFrom, _ = benchkit.CPUTime(0)
	if err := sleepUntil(ctx, r.measureTo); err != nil {
		return nil, err
	}
	sentTo := r.f.sent.Load()
	var dcpu time.Duration
	if o.dispatcherPID > 0 {
		dcpuTo, _ := benchkit.CPUTime(o.dispatcherPID)
		dcpu = dcpuTo - dcpuFrom
	}
	cpuTo, _ := benchkit.CPUTime(0)
	window := r.measureTo.Sub(r.measureFrom).Seconds()
	r.finish(ctx, res)
	// CPU per packet sent in the window (both processes): the relay's cost,
	// comparable between runs that could not all send the offered rate.
	if sent := float64(sentTo - sentFrom); sent > 0 {
		if o.dispatcherPID > 0 {
			res.value("dispatcher CPU", 100*dcpu.Seconds()/window, "% of one core")
			res.value("dispatcher CPU per packet", dcpu.Seconds()*1e6/sent, "µs")
		}
		res.value("loadgen CPU per packet", (cpuTo-cpuFrom).Seconds()*1e6/sent, "µs")
	}
	res.latency("emit → watcher receives", r.e2e.Summary())
	res.latency("emit → dispatcher records", r.in.Summary())
	res.latency("recorded → watcher receives", r.out.Summary())
	res.value("offered content packets", float64(o.sessions)*o.rate, "/s")
	res.value("content packets sent by commanders", float64(sentTo-sentFrom)/window, "/s")
	res.value("events delivered to watchers", float64(r.delivered.Load())/window, "/s")
	res.check("latencies measured", r.e2e.Summary().N > 0, "%d samples", r.e2e.Summary().N)
	return res, nil
}

func runThroughput(ctx context.Context, o *options, e *env) (*result, error) {
	res := newResult("throughput", streamParams(o))
	res.Params["task_packets"] = o.taskPackets
	r, cleanup, err := startStreamRun(ctx, o, e, "throughput", o.taskPackets, nil)
	defer cleanup()
	if err != nil {
		return nil, err
	}
	type snap struct {
		at                 time.Time
		sent               int64
		dispatcherCPU, cpu time.Duration
	}
	take := func() snap {
		s := snap{at: time.Now(), sent: r.f.sent.Load()}
		if o.dispatcherPID > 0 {
			s.dispatcherCPU, _ = benchkit.CPUTime(o.dispatcherPID)
		}
		s.cpu, _ = benchkit.CPUTime(0)
		return s
	}
	if err := sleepUntil(ctx, r.measureFrom); err != nil {
		return nil, err
	}
	a := take()
	if err := sleepUntil(ctx, r.measureTo); err != nil {
		return nil, err
	}
	b := take()
	r.finish(ctx, res)
	window := r.measureTo.Sub(r.measureFrom).Seconds()
	logged := float64(r.logged.Load())
	if o.watchers == 0 {
		logged = float64(r.loggedEst.Load()) / 1000
		res.note("no watchers: events logged estimated from each task's event count and run time")
	}
	res.value("upstream packets sent by commanders", float64(b.sent-a.sent)/b.at.Sub(a.at).Seconds(), "/s")
	res.value("events logged by the dispatcher", logged/window, "/s")
	res.value("events delivered to watchers", float64(r.delivered.Load())/window, "/s")
	res.value("payload logged", logged*float64(o.packetBytes)/window/1e6, "MB/s")
	if o.dispatcherPID > 0 {
		dcpu := (b.dispatcherCPU - a.dispatcherCPU).Seconds()
		res.value("dispatcher CPU", 100*dcpu/b.at.Sub(a.at).Seconds(), "% of one core")
		if dcpu > 0 {
			res.value("events logged per dispatcher CPU-second", logged/window*b.at.Sub(a.at).Seconds()/dcpu, "")
		}
	} else {
		res.note("no --dispatcher-pid: dispatcher CPU not measured")
	}
	res.value("loadgen CPU", 100*(b.cpu-a.cpu).Seconds()/b.at.Sub(a.at).Seconds(), "% of one core")
	if o.watchers > 0 {
		res.latency("emit → watcher receives (under flood)", r.e2e.Summary())
	}
	return res, nil
}

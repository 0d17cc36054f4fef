package main

import (
	"context"
	"os"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func runIdle(ctx context.Context, o *options, e *env) (*result, error) {
	params := o.baseParams()
	params["keepalive"] = o.keepalive.String()
	res := newResult("idle", params)
	rss := func() int64 {
		if o.dispatcherPID == 0 {
			return 0
		}
		v, err := benchkit.RSS(o.dispatcherPID)
		if err != nil {
			res.note("reading RSS: %v", err)
		}
		return v
	}
	before := rss()
	conns, err := dialN(o, e, o.connsFor(o.sessions), o.token, true)
	if err != nil {
		return nil, err
	}
	defer closeAll(conns)
	f := newFleet(sessionPlan{rate: 1, packetBytes: 1, maxSession: time.Second})
	// The slots' streams carry no deadline, like a commander's: the run's
	// (--timeout) would cost the dispatcher a timer and a context per
	// stream, which real slots do not. The run's end still cancels them.
	slotCtx, stopSlots := context.WithCancel(context.WithoutCancel(ctx))
	defer context.AfterFunc(ctx, stopSlots)()
	defer func() { stopSlots(); f.wait() }()
	began := time.Now()
	if err := f.open(slotCtx, conns, o.sessions); err != nil {
		return nil, err
	}
	opened := time.Since(began)
	res.value("slots opened (hello acked)", float64(o.sessions), "")
	res.value("time to open all", opened.Seconds()*1000, "ms")
	res.value("hello rate", float64(o.sessions)/opened.Seconds(), "slots/s")

	cli, err := dialN(o, e, 1, o.clientToken, false)
	if err != nil {
		return nil, err
	}
	defer closeAll(cli)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	info, err := agentpb.NewAgentClient(cli[0]).GetAgentInfo(cctx, &agentpb.GetAgentInfoRequest{})
	cancel()
	if err != nil {
		res.check("GetAgentInfo counts the slots", false, "GetAgentInfo: %v", err)
	} else {
		res.check("GetAgentInfo counts the slots", int(info.GetMaxConcurrentTasks()) >= o.sessions,
			"maxConcurrentTasks=%d with %d slots open", info.GetMaxConcurrentTasks(), o.sessions)
	}
	if err := sleepUntil(ctx, time.Now().Add(2*time.Second)); err != nil {
		return nil, err
	}
	settled := rss()
	if err := sleepUntil(ctx, began.Add(opened).Add(o.duration)); err != nil {
		return nil, err
	}
	held := rss()
	res.check("no slot lost while held", f.lost.Load() == 0, "%s of %d while held for %s", f.describeLost(), o.sessions, o.duration)
	if o.dispatcherPID > 0 {
		res.value("dispatcher RSS before", float64(before)/(1<<20), "MiB")
		res.value("dispatcher RSS with slots", float64(held)/(1<<20), "MiB")
		res.value("RSS per idle slot", float64(max(held, settled)-before)/float64(o.sessions)/1024, "KiB")
	} else {
		res.note("no --dispatcher-pid: RSS not measured")
	}
	if self, err := benchkit.RSS(os.Getpid()); err == nil {
		res.value("loadgen RSS per slot", float64(self)/float64(o.sessions)/1024, "KiB")
	}
	return res, nil
}

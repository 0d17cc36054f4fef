package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// rig is what a scenario that runs tasks drives: simulated commanders with
// their slots open (f), and client connections to submit and watch tasks
// through (pool).
type rig struct {
	f    *fleet
	pool *clientPool
	// gaps counts event seqs watchers saw out of order; errs are the
	// lanes' errors.
	gaps     atomic.Int64
	errs     errList
	cleanups []func()
}

// openRig dials the commanders' connections, opens o.sessions slots that
// follow plan, and dials clientConns client connections; the pool's run id
// is scenario-<now>. close undoes what was done, the last first: call it
// even when openRig fails.
func openRig(ctx context.Context, o *options, e *env, scenario string, plan sessionPlan, clientConns int) (*rig, error) {
	r := &rig{f: newFleet(plan)}
	cmdConns, err := dialN(o, e, o.connsFor(o.sessions), o.token, true)
	if err != nil {
		return r, err
	}
	r.cleanups = append(r.cleanups, func() { closeAll(cmdConns) })
	slotCtx, stopSlots := context.WithCancel(ctx)
	r.cleanups = append(r.cleanups, func() { stopSlots(); r.f.wait() })
	if err := r.f.open(slotCtx, cmdConns, o.sessions); err != nil {
		return r, err
	}
	cliConns, err := dialN(o, e, clientConns, o.clientToken, false)
	if err != nil {
		return r, err
	}
	r.cleanups = append(r.cleanups, func() { closeAll(cliConns) })
	r.pool = &clientPool{conns: cliConns, runID: fmt.Sprintf("%s-%d", scenario, time.Now().UnixNano()), watchBatch: uint32(o.watchBatch)}
	return r, nil
}

// close stops the slots and closes the connections.
func (r *rig) close() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

// startLanes starts o.sessions lanes on wg that run tasks until until (or
// until ctx ends): lane k calls one for its tasks n = 0, 1, …, with a
// random source of its own (seeded from --seed and k). An error is kept in
// r.errs, and the lane pauses before its next task so as not to spin on a
// failing dispatcher.
func (r *rig) startLanes(ctx context.Context, o *options, wg *sync.WaitGroup, until time.Time, one func(rng *rand.Rand, lane, n int) error) {
	for lane := range o.sessions {
		rng := rand.New(rand.NewPCG(o.seed, uint64(lane)))
		wg.Go(func() {
			for n := 0; time.Now().Before(until) && ctx.Err() == nil; n++ {
				if err := one(rng, lane, n); err != nil {
					r.errs.add(err)
					if ctx.Err() != nil {
						return
					}
					time.Sleep(100 * time.Millisecond) // do not spin on a failing dispatcher
				}
			}
		})
	}
}

// runLanes runs the lanes (startLanes) for --duration and waits for them;
// it returns how long they ran.
func (r *rig) runLanes(ctx context.Context, o *options, one func(rng *rand.Rand, lane, n int) error) time.Duration {
	began := time.Now()
	var wg sync.WaitGroup
	r.startLanes(ctx, o, &wg, began.Add(o.duration), one)
	wg.Wait()
	return time.Since(began)
}

// check adds the checks every run of tasks must pass.
func (r *rig) check(res *result) {
	res.check("events numbered without gaps", r.gaps.Load() == 0, "%d gaps or duplicates", r.gaps.Load())
	res.check("no errors", r.errs.count() == 0, "%s", r.errs.describe())
	res.check("no slot lost", r.f.lost.Load() == 0, "%s", r.f.describeLost())
}

// taskParams are the parameters of a scenario whose sessions stream
// content packets.
func (o *options) taskParams() map[string]any {
	params := o.baseParams()
	params["rate"] = o.rate
	params["packet_bytes"] = o.packetBytes
	if o.upBatch > 0 {
		params["up_batch"] = o.upBatch
	}
	return params
}

// errList keeps the first few errors of concurrent lanes.
type errList struct {
	mu   sync.Mutex
	errs []error
	n    int
}

func (l *errList) add(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.n++
	if len(l.errs) < 5 {
		l.errs = append(l.errs, err)
	}
}

func (l *errList) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.n
}

// describe says how many errors there were and what the first few said.
func (l *errList) describe() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n == 0 {
		return "0 errors"
	}
	return fmt.Sprintf("%d errors, first: %s", l.n, joinErrs(l.errs))
}

package main

import (
	"fmt"
	"math/rand/v2"
	"time"
)

// Arrival models of a paced session (--arrivals; the tools scenario).
//
// Real commanders' sessions are not phase-locked: each planner calls a tool
// when its own model says so. The old pacing ("burst") started every
// session's schedule at its task's start, and the tools scenario starts all
// its tasks together, so 50 sessions × 20 calls/s shared one 50 ms grid:
// ~60 % of the calls arrived in 5 one-millisecond slots, ~50 at once. That
// measured how the machine absorbs a synchronised burst, not a round trip
// under 1 000 calls/s. It stays available for comparison.
const (
	// arrivalsBurst: every session paces on an absolute schedule from its
	// task's start (the pacing of all other scenarios).
	arrivalsBurst = "burst"
	// arrivalsSpread: the same period, but slot i of n starts its calls
	// i/n of a period after a grid shared by the fleet, so the sessions'
	// calls are evenly spread over the period (deterministic).
	arrivalsSpread = "spread"
	// arrivalsPoisson: each session's gaps are exponential with the
	// period as their mean (seeded from --seed and the slot), so the fleet's
	// arrivals are a Poisson process of the same mean rate.
	arrivalsPoisson = "poisson"
)

// checkArrivals validates an --arrivals value.
func checkArrivals(mode string) error {
	switch mode {
	case arrivalsBurst, arrivalsSpread, arrivalsPoisson:
		return nil
	}
	return fmt.Errorf("--arrivals must be %s, %s or %s, not %q", arrivalsPoisson, arrivalsSpread, arrivalsBurst, mode)
}

// pacer says when a paced session's next step is due.
type pacer struct {
	mode     string
	interval time.Duration
	next     time.Time
	grid     time.Time // spread: the slot's own grid origin (epoch + offset)
	rng      *rand.Rand
}

// newPacer starts the schedule of a session that began at began on slot
// slot of slots, the fleet's shared grid starting at epoch. An empty mode
// is arrivalsBurst.
func newPacer(mode string, interval time.Duration, began, epoch time.Time, slot, slots int, seed uint64) *pacer {
	p := &pacer{mode: mode, interval: interval, next: began}
	if interval <= 0 {
		return p
	}
	switch mode {
	case arrivalsSpread:
		p.grid = epoch.Add(time.Duration(int64(interval) * int64(slot%max(slots, 1)) / int64(max(slots, 1))))
		p.next = p.onGrid(began)
	case arrivalsPoisson:
		p.rng = rand.New(rand.NewPCG(seed, uint64(slot)))
		p.next = began.Add(p.gap())
	}
	return p
}

// first is when the session's first step is due.
func (p *pacer) first() time.Time { return p.next }

// onGrid is the first point of the slot's grid at or after t.
func (p *pacer) onGrid(t time.Time) time.Time {
	d := t.Sub(p.grid)
	if d <= 0 {
		return p.grid.Add(-(-d / p.interval * p.interval)) // division rounds toward zero: at or after t
	}
	k := (d + p.interval - 1) / p.interval
	return p.grid.Add(k * p.interval)
}

// gap is one exponential gap of mean interval.
func (p *pacer) gap() time.Duration {
	return time.Duration(p.rng.ExpFloat64() * float64(p.interval))
}

// advance moves to the next step after the one just done at now and
// returns how long to wait for it (0: due already). The schedule is
// absolute, so pacing does not drift; after a stall (flow control, a slow
// result) of more than one period it does not burst to catch up: burst
// and poisson restart from now, spread from the slot's next grid point.
func (p *pacer) advance(now time.Time) time.Duration {
	if p.interval <= 0 {
		return 0
	}
	switch p.mode {
	case arrivalsSpread:
		p.next = p.next.Add(p.interval)
		if p.next.Sub(now) < -p.interval {
			p.next = p.onGrid(now)
		}
	case arrivalsPoisson:
		p.next = p.next.Add(p.gap())
		if p.next.Before(now.Add(-p.interval)) {
			p.next = now.Add(p.gap())
		}
	default:
		p.next = p.next.Add(p.interval)
		if p.next.Sub(now) < -p.interval {
			p.next = now
		}
	}
	return max(p.next.Sub(now), 0)
}

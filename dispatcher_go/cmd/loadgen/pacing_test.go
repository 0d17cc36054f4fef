package main

import (
	"io"
	"sync/atomic"
	"testing"
	"time"
)

func TestPacerBurstLocksEverySessionToItsStart(t *testing.T) {
	began := time.Unix(1000, 0)
	for slot := range 3 {
		p := newPacer(arrivalsBurst, 50*time.Millisecond, began, began.Add(-time.Second), slot, 3, 1)
		if !p.first().Equal(began) {
			t.Fatalf("slot %d: first %v, want the task's start", slot, p.first().Sub(began))
		}
		if w := p.advance(began.Add(time.Millisecond)); w != 49*time.Millisecond {
			t.Fatalf("slot %d: wait %v, want 49ms", slot, w)
		}
	}
}

func TestPacerSpreadGivesEachSlotItsOwnPhase(t *testing.T) {
	const n = 50
	interval := 50 * time.Millisecond
	epoch := time.Unix(1000, 0)
	began := epoch.Add(123 * time.Millisecond) // every task starts at the same moment
	seen := map[time.Duration]bool{}
	for slot := range n {
		p := newPacer(arrivalsSpread, interval, began, epoch, slot, n, 1)
		first := p.first()
		if first.Before(began) || first.Sub(began) >= interval {
			t.Fatalf("slot %d: first call %v after the start, want within one period", slot, first.Sub(began))
		}
		phase := first.Sub(epoch) % interval
		if phase != time.Duration(slot)*time.Millisecond {
			t.Fatalf("slot %d: phase %v, want %dms", slot, phase, slot)
		}
		seen[phase] = true
		// On schedule: one period later, same phase.
		now := first.Add(2 * time.Millisecond)
		if w := p.advance(now); w != interval-2*time.Millisecond {
			t.Fatalf("slot %d: wait %v", slot, w)
		}
		// After a stall of several periods: back on the slot's grid, no catch-up burst.
		now = p.next.Add(3*interval + 7*time.Millisecond)
		w := p.advance(now)
		if w <= 0 || w > interval || now.Add(w).Sub(epoch)%interval != phase {
			t.Fatalf("slot %d: after a stall wait %v, phase %v", slot, w, now.Add(w).Sub(epoch)%interval)
		}
	}
	if len(seen) != n {
		t.Fatalf("%d distinct phases for %d slots", len(seen), n)
	}
	// A grid origin after the start still gives a point at or after it.
	p := newPacer(arrivalsSpread, interval, epoch, epoch.Add(120*time.Millisecond), 0, 1, 1)
	if got := p.first().Sub(epoch); got != 20*time.Millisecond {
		t.Fatalf("grid after the start: first at %v, want 20ms", got)
	}
}

func TestPacerPoissonKeepsTheMeanRate(t *testing.T) {
	interval := 50 * time.Millisecond
	began := time.Unix(1000, 0)
	p := newPacer(arrivalsPoisson, interval, began, began, 7, 50, 1)
	q := newPacer(arrivalsPoisson, interval, began, began, 7, 50, 1)
	if !p.first().Equal(q.first()) {
		t.Fatal("same seed and slot, different schedules")
	}
	r := newPacer(arrivalsPoisson, interval, began, began, 8, 50, 1)
	if p.first().Equal(r.first()) {
		t.Fatal("two slots share a schedule")
	}
	const steps = 20000
	var short int
	for range steps {
		now := p.next // the call is made on time and answered at once
		w := p.advance(now)
		if w < interval/10 {
			short++
		}
	}
	mean := p.next.Sub(began) / steps
	if mean < interval*95/100 || mean > interval*105/100 {
		t.Fatalf("mean gap %v, want %v ± 5%%", mean, interval)
	}
	// Exponential: P(gap < interval/10) = 1 - e^-0.1 ≈ 9.5 %.
	if f := float64(short) / steps; f < 0.08 || f > 0.11 {
		t.Fatalf("%.3f of the gaps are under a tenth of the mean, want ≈ 0.095", f)
	}
}

func TestSameMillisecond(t *testing.T) {
	starts := make([]atomic.Int32, 10)
	// 1 ms with 50 calls and 5 ms with 1 call each: 55 calls, 50 of them
	// in the burst, so both quantiles are the burst's.
	starts[0].Store(50)
	for i := 1; i <= 5; i++ {
		starts[i].Store(1)
	}
	starts[9].Store(100) // outside the window
	p50, p99 := sameMillisecond(starts, 9)
	if p50 != 50 || p99 != 50 {
		t.Fatalf("p50 %v p99 %v, want 50 50", p50, p99)
	}
	for i := range starts {
		starts[i].Store(1)
	}
	if p50, p99 := sameMillisecond(starts, 10); p50 != 1 || p99 != 1 {
		t.Fatalf("evenly spread: p50 %v p99 %v, want 1 1", p50, p99)
	}
	if p50, p99 := sameMillisecond(nil, 10); p50 != 0 || p99 != 0 {
		t.Fatalf("nothing: %v %v", p50, p99)
	}
}

func TestArrivalsFlag(t *testing.T) {
	o, err := parseFlags([]string{"--scenario", "tools", "--rate", "20"}, io.Discard)
	if err != nil || o.arrivals != arrivalsPoisson {
		t.Fatalf("tools default: %v %q", err, o.arrivals)
	}
	o, err = parseFlags([]string{"--scenario", "tools", "--arrivals", "burst"}, io.Discard)
	if err != nil || o.arrivals != arrivalsBurst {
		t.Fatalf("burst: %v %q", err, o.arrivals)
	}
	if _, err := parseFlags([]string{"--scenario", "tools", "--arrivals", "lumpy"}, io.Discard); err == nil {
		t.Fatal("an unknown --arrivals was accepted")
	}
	// relay: Poisson by default too (real sessions are not phase-locked);
	// burst keeps the old in-step pacing.
	o, err = parseFlags([]string{"--scenario", "relay"}, io.Discard)
	if err != nil || o.arrivals != arrivalsPoisson {
		t.Fatalf("relay default: %v %q", err, o.arrivals)
	}
	for _, mode := range []string{arrivalsBurst, arrivalsSpread, arrivalsPoisson} {
		o, err = parseFlags([]string{"--scenario", "relay", "--arrivals", mode}, io.Discard)
		if err != nil || o.arrivals != mode {
			t.Fatalf("relay %s: %v %q", mode, err, o.arrivals)
		}
	}
	if _, err := parseFlags([]string{"--scenario", "relay", "--arrivals", "lumpy"}, io.Discard); err == nil {
		t.Fatal("an unknown --arrivals was accepted for relay")
	}
	// Other scenarios keep their pacing and refuse the option.
	for _, sc := range []string{"stop", "policy", "throughput"} {
		if _, err := parseFlags([]string{"--scenario", sc, "--arrivals", "spread"}, io.Discard); err == nil {
			t.Fatalf("--arrivals was accepted for %s", sc)
		}
		o, err = parseFlags([]string{"--scenario", sc}, io.Discard)
		if err != nil || o.arrivals != "" {
			t.Fatalf("%s keeps its pacing: %v %q", sc, err, o.arrivals)
		}
	}
}

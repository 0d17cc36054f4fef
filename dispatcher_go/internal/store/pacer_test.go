package store

import (
	"testing"
	"time"
)

// TestPacer: the first write waits Interval; after a quiet spell Burst
// writes start back to back, then one per Interval; a steady stream is
// paced at one per Interval as with a fixed least gap.
func TestPacer(t *testing.T) {
	const iv = 10 * time.Millisecond
	t0 := time.Unix(1000, 0)
	p := newPacer(t0, iv, 4)
	if w := p.wait(t0); w != iv {
		t.Fatalf("first write waits %v, want %v", w, iv)
	}
	p.start(t0.Add(iv))
	// Quiet until t0+1s: four writes at once, the fifth waits Interval.
	now := t0.Add(time.Second)
	for i := range 4 {
		if w := p.wait(now); w > 0 {
			t.Fatalf("write %d of the burst waits %v", i+1, w)
		}
		p.start(now)
	}
	if w := p.wait(now); w != iv {
		t.Fatalf("write 5 after the burst waits %v, want %v", w, iv)
	}
	// Steady: starting each write as soon as allowed gives one per
	// Interval.
	now = now.Add(iv)
	for i := range 10 {
		if w := p.wait(now); w != 0 {
			t.Fatalf("steady write %d waits %v, want 0", i, w)
		}
		p.start(now)
		if w := p.wait(now); w != iv {
			t.Fatalf("after steady write %d the next waits %v, want %v", i, w, iv)
		}
		now = now.Add(iv)
	}
	// Burst 1 is a fixed least gap between two starts.
	q := newPacer(t0, iv, 1)
	q.start(t0.Add(time.Second))
	if w := q.wait(t0.Add(time.Second)); w != iv {
		t.Fatalf("burst 1: next write waits %v, want %v", w, iv)
	}
}

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
	p := newPacer(t0, iv, 4, 0)
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
	q := newPacer(t0, iv, 1, 0)
	q.start(t0.Add(time.Second))
	if w := q.wait(t0.Add(time.Second)); w != iv {
		t.Fatalf("burst 1: next write waits %v, want %v", w, iv)
	}
}

// TestPacerPacesOnlyUnderLoad: with from > 0 the bucket applies only while
// records are taken at from or more per interval on average: a moderate
// rate is never paced, a flood is from its first writes on, and the load
// decays after it so that a moderate rate is not paced again.
func TestPacerPacesOnlyUnderLoad(t *testing.T) {
	const iv = time.Millisecond
	t0 := time.Unix(1000, 0)
	if p := newPacer(t0, iv, 4, 0); !p.paces(t0, 1) {
		t.Fatal("from 0: a write is not paced")
	}
	p := newPacer(t0, iv, 4, 8)
	if p.paces(t0, 1) {
		t.Fatal("a lone record at start is paced")
	}
	// 4 records per interval (half of from) for a second, one write each
	// interval (the records pending at each write are counted too).
	now := t0
	for i := range 1000 {
		now = now.Add(iv)
		if p.paces(now, 4) {
			t.Fatalf("4 records per interval: write %d paced (load %.1f)", i, p.decayed(now))
		}
		p.took(now, 4)
	}
	// A flood of 100 records per interval: paced within a few writes.
	paced := -1
	for i := range 20 {
		now = now.Add(iv)
		if p.paces(now, 100) {
			paced = i
			break
		}
		p.took(now, 100)
	}
	if paced < 0 || paced > 1 {
		t.Fatalf("a flood of 100 per interval is first paced at write %d", paced)
	}
	// 16 records per interval (twice from): paced, steadily.
	for i := range 1000 {
		now = now.Add(iv)
		if i >= 4*paceTau && !p.paces(now, 16) {
			t.Fatalf("16 records per interval: write %d not paced (load %.1f)", i, p.decayed(now))
		}
		p.took(now, 16)
	}
	// Quiet for 10 time constants: a lone record is not paced.
	now = now.Add(10 * paceTau * iv)
	if p.paces(now, 1) {
		t.Fatalf("after a quiet spell a lone record is paced (load %.1f)", p.decayed(now))
	}
	// 4 records per interval again, then a stall of 20 intervals and the
	// 80 records that arrived meanwhile in one write: the same rate, not
	// paced (nor the write after it).
	for range 200 {
		now = now.Add(iv)
		p.took(now, 4)
	}
	now = now.Add(20 * iv)
	if p.paces(now, 80) {
		t.Fatalf("a backlog after a stall is paced (load %.1f)", p.decayed(now))
	}
	p.took(now, 80)
	now = now.Add(iv)
	if p.paces(now, 4) {
		t.Fatalf("the write after a stall's backlog is paced (load %.1f)", p.decayed(now))
	}
	// from 0 counts nothing.
	q := newPacer(t0, iv, 4, 0)
	q.took(t0, 1000)
	if q.load != 0 {
		t.Fatalf("from 0: load %v", q.load)
	}
}

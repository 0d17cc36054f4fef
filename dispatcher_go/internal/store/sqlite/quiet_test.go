package sqlite

import (
	"testing"
	"time"
)

// TestWaitQuiet: the fold and the checkpoint start at once after a quiet
// spell, wait quietFor after a commit, at most quietMax while writes keep
// coming, and give up when the store closes.
func TestWaitQuiet(t *testing.T) {
	s := &Store{epoch: time.Now()}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	stop := make(chan struct{})
	waited := func() time.Duration {
		t.Helper()
		t0 := time.Now()
		if !s.waitQuiet(timer, stop) {
			t.Fatal("waitQuiet gave up without a stop")
		}
		return time.Since(t0)
	}

	closed := make(chan struct{})
	close(closed)
	s.lastWrite.Store(int64(-time.Hour)) // quiet for an hour: no wait at all
	if !s.waitQuiet(timer, closed) {
		t.Error("quiet store: waitQuiet waited (and saw the stop)")
	}
	s.lastWrite.Store(int64(time.Since(s.epoch))) // a commit now
	if d := waited(); d < quietFor {
		t.Errorf("after a commit: waited %v, want at least %v", d, quietFor)
	}
	s.lastWrite.Store(int64(time.Since(s.epoch) + time.Hour)) // never quiet
	if d := waited(); d < quietMax {
		t.Errorf("writes never pausing: waited %v, want at least %v", d, quietMax)
	}
	s.lastWrite.Store(int64(time.Since(s.epoch) + time.Hour)) // never quiet
	if s.waitQuiet(timer, closed) {
		t.Error("waitQuiet went on after the stop")
	}
}

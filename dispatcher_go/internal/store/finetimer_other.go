//go:build !linux

package store

import "time"

// fineTimer exists on Linux only (finetimer_linux.go); elsewhere the
// Writer's pacing waits on its Go timer alone.
type fineTimer struct{}

func newFineTimer() *fineTimer { return nil }

func (*fineTimer) channel() <-chan struct{} { return nil }
func (*fineTimer) reset(time.Duration)      {}
func (*fineTimer) stop()                    {}
func (*fineTimer) close()                   {}

package taskstore

import (
	"context"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// RunRetention removes, every interval until ctx ends, the tasks that ended
// more than maxAge ago and their events. maxAge <= 0 keeps everything.
func RunRetention(ctx context.Context, st store.Store, maxAge, interval time.Duration, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}) {
	if maxAge <= 0 || st == nil {
		return
	}
	if interval <= 0 {
		interval = min(maxAge/10, time.Hour)
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		n, err := st.DeleteEndedBefore(ctx, time.Now().Add(-maxAge))
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("retention failed", "error", err)
		case n > 0:
			log.Info("retention removed old tasks", "tasks", n, "max_age", maxAge)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

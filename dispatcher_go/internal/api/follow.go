package api

import (
	"context"
	"errors"
	"io"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// follow calls fn for each event of t with seq > after, history first, then
// live, until the log's terminal event (nil), ctx's end or fn's error. It
// reads the log by cursor: a slow caller only falls behind in the log.
func (s *Server) follow(ctx context.Context, t *task.Task, after uint64, fn func(*dispatchv1.TaskEvent) error) error {
	s.d.Watchers().Add(1)
	defer s.d.Watchers().Add(-1)
	ctx, cancel := s.streamContext(ctx)
	defer cancel()
	buf := make([]*dispatchv1.TaskEvent, 0, 64)
	for {
		evs, err := t.Log().Read(ctx, after, buf)
		for _, ev := range evs {
			if err := fn(ev); err != nil {
				return err
			}
			after = ev.GetSeq()
		}
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case err != nil:
			if cause := context.Cause(ctx); cause != nil {
				return cause
			}
			return err
		}
	}
}

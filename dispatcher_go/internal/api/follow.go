package api

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Bounds of a WatchTask batch (WatchTaskRequest.max_batch): a batch holds
// at most maxWatchBatch events and, unless it is a single event (which is
// sent as it is, as without batching), at most maxWatchBatchBytes, so that
// every response fits what a default gRPC client receives (see bounds.go).
// 32 KiB, not more: grpc-go marshals a response into a buffer of its pool's
// next size class (256 B, 4, 16, 32 KiB, then 1 MiB) and zeroes the whole
// buffer on each Get; a 40 KiB response (256 flood events) cost a 1 MiB
// memclr, ~4 % of the dispatcher's CPU under the throughput flood.
const (
	maxWatchBatch      = 256
	maxWatchBatchBytes = 32 << 10
	// followChunk is how many events follow reads from the log at once
	// when the caller takes them one by one.
	followChunk = 64
)

// follow calls fn for each event of t with seq > after, history first, then
// live, until the log's terminal event (nil), ctx's end or fn's error. It
// reads the log by cursor: a slow caller only falls behind in the log.
func (s *Server) follow(ctx context.Context, t *task.Task, after uint64, fn func(*dispatchv1.TaskEvent) error) error {
	return s.followBatches(ctx, t, after, followChunk, func(evs []*dispatchv1.TaskEvent) error {
		for _, ev := range evs {
			if err := fn(ev); err != nil {
				return err
			}
		}
		return nil
	})
}

// followBatches is follow handing over the events in runs of 1..limit
// consecutive events: whatever the log holds past the last run when fn
// returns (so a caller that keeps up gets one event per call, one that is
// behind gets several). It never waits to fill a run. fn must not keep the
// slice after it returns.
func (s *Server) followBatches(ctx context.Context, t *task.Task, after uint64, limit int, fn func([]*dispatchv1.TaskEvent) error) error {
	if err := pastTheEnd(t, after); err != nil {
		return err
	}
	s.d.Watchers().Add(1)
	defer s.d.Watchers().Add(-1)
	ctx, cancel := s.streamContext(ctx)
	defer cancel()
	buf := make([]*dispatchv1.TaskEvent, 0, max(limit, 1))
	for {
		evs, err := t.Log().Read(ctx, after, buf)
		if len(evs) > 0 {
			if err := fn(evs); err != nil {
				return err
			}
			after = evs[len(evs)-1].GetSeq()
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

// cachedSize sizes an event for the cut of a batch from the size protobuf
// cached when it last walked the event (the log's append, the store's
// marshal, an earlier send): walking it again was ~4 % of the dispatcher's
// CPU under a flood. The cut needs no exact size: an event's cached size
// may miss the seq numbered after the append's walk (≤ 11 bytes, in the
// slack added per event); the response itself is sized afresh by the codec.
var cachedSize = proto.MarshalOptions{UseCachedSize: true}

// sendBatches sends evs as WatchTaskResponse.events, split where a response
// would exceed maxWatchBatchBytes (an event over it goes alone). The
// sizes are walked only when there is more than one event.
func sendBatches(evs []*dispatchv1.TaskEvent, send func(*dispatchv1.WatchTaskResponse) error) error {
	if len(evs) == 1 {
		return send(&dispatchv1.WatchTaskResponse{Events: evs})
	}
	start, bytes := 0, 0
	for i, ev := range evs {
		n := cachedSize.Size(ev) + 24 // the field's tag and length (≤ 6), and slack
		if i > start && bytes+n > maxWatchBatchBytes {
			if err := send(&dispatchv1.WatchTaskResponse{Events: evs[start:i]}); err != nil {
				return err
			}
			start, bytes = i, 0
		}
		bytes += n
	}
	return send(&dispatchv1.WatchTaskResponse{Events: evs[start:]})
}

// pastTheEnd refuses to resume an ended task's log after a seq it never
// reached: the log is complete (sealed before the task is done), so such a
// resume point was not one the client got from us, and the stream it asked
// for would be empty without saying why. A task still running waits for
// its next events instead: on a fleet replica that does not run it, the
// view of its log may lag the seqs a client got from the replica that does.
func pastTheEnd(t *task.Task, after uint64) error {
	select {
	case <-t.Done():
		if last := t.Log().LastSeq(); after > last {
			return status.Errorf(codes.OutOfRange, "after_seq %d is past the task's last event (seq %d): the task has ended", after, last)
		}
	default:
	}
	return nil
}

package main

import (
	"context"
	"fmt"
	"maps"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// clientPool spreads simulated clients over a few connections.
type clientPool struct {
	conns []*grpc.ClientConn
	next  atomic.Uint64
	runID string
	// watchBatch is WatchTaskRequest.max_batch of the pool's watchers.
	watchBatch uint32
}

func (p *clientPool) tasks() dispatchv1.TaskServiceClient {
	i := p.next.Add(1)
	return dispatchv1.NewTaskServiceClient(p.conns[i%uint64(len(p.conns))])
}

// submit queues one bench task, labelled with the run id and labels.
func (p *clientPool) submit(ctx context.Context, lane, n int, labels map[string]string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	all := map[string]string{"bench_run": p.runID}
	maps.Copy(all, labels)
	resp, err := p.tasks().SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{
		Instruction: fmt.Sprintf("bench %s lane %d task %d", p.runID, lane, n),
		Planner:     benchPlanner,
		Labels:      all,
	})
	if err != nil {
		return "", fmt.Errorf("SubmitTask: %w", err)
	}
	return resp.GetTaskId(), nil
}

// watched is what one watcher saw of a task.
type watched struct {
	status   agentpb.TaskStatus
	events   int64
	contents int64
	// gaps counts seq numbers that were not exactly the previous one + 1.
	gaps int64
}

// watch reads a task's events until its terminal state, calling each for
// every event with the moment it was received (the events of one response
// share it). maxBatch is WatchTaskRequest.max_batch.
func watch(ctx context.Context, tc dispatchv1.TaskServiceClient, id string, maxBatch uint32, each func(ev *dispatchv1.TaskEvent, at time.Time)) (watched, error) {
	var w watched
	stream, err := tc.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: id, MaxBatch: maxBatch})
	if err != nil {
		return w, fmt.Errorf("WatchTask: %w", err)
	}
	var (
		last uint64
		one  [1]*dispatchv1.TaskEvent
	)
	for {
		resp, err := stream.Recv()
		if err != nil {
			return w, fmt.Errorf("WatchTask %s after seq %d: %w", id, last, err)
		}
		at := time.Now()
		evs := resp.GetEvents()
		if ev := resp.GetEvent(); ev != nil || len(evs) == 0 {
			one[0] = ev // one event per response (max_batch 0, or an older dispatcher)
			evs = one[:]
		}
		for _, ev := range evs {
			if ev.GetSeq() != last+1 {
				w.gaps++
			}
			last = ev.GetSeq()
			w.events++
			if ev.GetContent() != nil {
				w.contents++
			}
			if each != nil {
				each(ev, at)
			}
			if st := ev.GetState(); st != nil && terminal(st.GetStatus()) {
				w.status = st.GetStatus()
				return w, nil
			}
		}
	}
}

func terminal(s agentpb.TaskStatus) bool {
	return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
}

package taskstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// RestartFailureMessage is the message of a task that was running when the
// dispatcher stopped without draining (crash, kill -9): its commander's
// session is gone with the process, so the task cannot have finished.
const RestartFailureMessage = "dispatcher restarted while the task was running; its session was lost"

// RequeuedMessage is the state message of a pending task queued again
// after a restart.
const RequeuedMessage = "queued again after a dispatcher restart"

// liveStatuses are the statuses of tasks that had not ended; terminalStatuses
// those a task can have in the store only (live tasks are always in memory).
var (
	liveStatuses     = []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING}
	terminalStatuses = []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS, agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_CANCELLED}
)

// Recover implements task.Persistence. It reads back the global config and
// the tasks of the previous run, and judges each task that had not ended
// by its last durable event, which is also the last thing any watcher saw:
// tasks nobody saw start are queued again (Pending, RequeuedMessage); tasks
// that were running are FAILURE with RestartFailureMessage (their sessions
// died with the process, so counting them as running would be a lie, and
// only tasks that really run occupy a slot); tasks whose terminal event was
// stored but not their record take the status the event shows. The newest
// maxKept finished tasks are loaded as they were. The final events and
// records of the tasks it ends are written before it returns.
func (s *Store) Recover(ctx context.Context, maxKept int) (task.Recovered, error) {
	var out task.Recovered
	if data, err := s.st.GetConfig(ctx, task.GlobalConfigID); err == nil {
		out.Global = s.decodeConfig(data)
	} else if !errors.Is(err, store.ErrNotFound) {
		return out, fmt.Errorf("restore global config: %w", err)
	}
	live, err := s.st.ListTasks(ctx, statusCodes(liveStatuses), 0)
	if err != nil {
		return out, fmt.Errorf("restore tasks: %w", err)
	}
	done, err := s.st.ListTasks(ctx, statusCodes(terminalStatuses), maxKept)
	if err != nil {
		return out, fmt.Errorf("restore tasks: %w", err)
	}
	all := append(live, done...)
	slices.SortStableFunc(all, func(a, b store.TaskRecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	for _, rec := range all {
		snap, err := s.load(rec)
		if err != nil {
			s.log.Warn("skipping unreadable stored task", "task_id", rec.ID, "error", err)
			continue
		}
		if task.Terminal(snap.Status) {
			out.Finished = append(out.Finished, snap)
			out.Report.Loaded++
			continue
		}
		last, lastEv, err := s.lastEvent(ctx, snap.ID)
		if err != nil {
			return out, err
		}
		switch st := lastEv.GetState().GetStatus(); {
		case lastEv != nil && task.Terminal(st):
			// Ended; only the record lagged.
			snap.Status, snap.Message = st, lastEv.GetState().GetMessage()
			if snap.EndedAt = lastEv.GetTime().AsTime(); snap.EndedAt.IsZero() {
				snap.EndedAt = time.Now()
			}
			snap.LastSeq = last
			if err := s.finish(ctx, &snap, nil); err != nil {
				// As before: a task whose record cannot be rewritten is
				// left out of memory rather than failing the start.
				s.log.Warn("restored task not stored", "task_id", snap.ID, "error", err)
				continue
			}
			out.Finished = append(out.Finished, snap)
			out.Report.Finished++
		case lastEv == nil || st == agentpb.TaskStatus_PENDING:
			// Nobody ever saw it start: queue it again.
			snap.Status, snap.Message, snap.StartedAt, snap.CommanderID, snap.SessionID = agentpb.TaskStatus_PENDING, RequeuedMessage, time.Time{}, "", ""
			snap.LastSeq = last
			out.Pending = append(out.Pending, snap)
		case s.keep:
			// Its session may still run in its commander, which
			// re-attaches it (task.Manager.Reattach). Its last event
			// shows it ran, even if its record lagged behind.
			snap.Status, snap.LastSeq = agentpb.TaskStatus_RUNNING, last
			if snap.StartedAt.IsZero() {
				snap.StartedAt = time.Now()
			}
			if snap.UpstreamSeq, err = s.upstreamSeq(ctx, snap.ID, last); err != nil {
				return out, err
			}
			out.Running = append(out.Running, snap)
		default:
			snap.Status, snap.Message, snap.EndedAt = agentpb.TaskStatus_FAILURE, RestartFailureMessage, time.Now()
			snap.LastSeq = last + 1
			ev := &dispatchv1.TaskEvent{TaskId: snap.ID, Seq: snap.LastSeq, Time: timestamppb.New(snap.EndedAt),
				Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: snap.Status, Message: snap.Message}}}
			if err := s.finish(ctx, &snap, ev); err != nil {
				return out, err
			}
			out.Finished = append(out.Finished, snap)
			out.Report.Failed++
		}
	}
	return out, nil
}

// lastEvent returns the seq and content of taskID's newest stored event.
func (s *Store) lastEvent(ctx context.Context, taskID string) (uint64, *dispatchv1.TaskEvent, error) {
	last, err := s.st.LastSeq(ctx, taskID)
	if err != nil || last == 0 {
		return 0, nil, err
	}
	evs, err := s.w.ReadStored(ctx, taskID, last-1, 1)
	if err != nil || len(evs) == 0 {
		return last, nil, err
	}
	return last, evs[0], nil
}

// upstreamScanPage is how many events upstreamSeq reads at a time.
const upstreamScanPage = 64

// upstreamSeq is the highest upstream seq among taskID's stored events up
// to last: that of the newest event that has one (a session's seqs grow
// with its events; the dispatcher's own events have none), 0 if none has.
func (s *Store) upstreamSeq(ctx context.Context, taskID string, last uint64) (uint64, error) {
	for hi := last; hi > 0; {
		lo := uint64(0)
		if hi > upstreamScanPage {
			lo = hi - upstreamScanPage
		}
		evs, err := s.w.ReadStored(ctx, taskID, lo, int(hi-lo))
		if err != nil {
			return 0, fmt.Errorf("restore task %s: %w", taskID, err)
		}
		for i := len(evs) - 1; i >= 0; i-- {
			if u := evs[i].GetUpstreamSeq(); u > 0 {
				return u, nil
			}
		}
		hi = lo
	}
	return 0, nil
}

// Claim implements task.Claimer on one node: the attempt after the one in
// the task's stored record (the Manager stores the new one with the task).
func (s *Store) Claim(ctx context.Context, taskID string) (int64, error) {
	rec, err := s.st.GetTask(ctx, taskID)
	if err != nil {
		return 0, fmt.Errorf("claim task %s: %w", taskID, err)
	}
	var b body
	if err := json.Unmarshal(rec.Body, &b); err != nil {
		return 0, fmt.Errorf("claim task %s: stored body: %w", taskID, err)
	}
	return b.Attempt + 1, nil
}

var _ task.Claimer = (*Store)(nil)

// finish writes snap, which Recover ended (and ev, its terminal event, if
// not stored yet), synchronously. Its config keeps no secret from here on.
func (s *Store) finish(ctx context.Context, snap *task.Snapshot, ev *dispatchv1.TaskEvent) error {
	if snap.Config != nil {
		snap.Config = secret.Mask(snap.Config)
	}
	var b store.Batch
	if ev != nil {
		data, err := proto.Marshal(ev)
		if err != nil {
			return err
		}
		b.Events = []store.Event{{TaskID: snap.ID, Seq: ev.GetSeq(), Data: data}}
	}
	b.Tasks = []store.TaskRecord{s.encode(snap)}
	if err := s.st.Apply(ctx, b); err != nil {
		return fmt.Errorf("restore task %s: %w", snap.ID, err)
	}
	return nil
}

// statusCodes is ss as stored.
func statusCodes(ss []agentpb.TaskStatus) []int32 {
	out := make([]int32, len(ss))
	for i, s := range ss {
		out[i] = int32(s)
	}
	return out
}

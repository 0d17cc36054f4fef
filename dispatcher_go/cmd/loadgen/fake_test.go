package main

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// toyDispatcher is the smallest dispatcher the load generator can run
// against: slots, a FIFO of tasks, an event log per task, stop → stopped.
// leakAfterStop makes it forward content after a stop, as a buggy
// dispatcher would, so a test can see loadgen catch it.
type toyDispatcher struct {
	dispatchv1.UnimplementedTaskServiceServer
	dispatchv1.UnimplementedAgentInteractionServer

	leakAfterStop bool
	// phrase, when set, is a forbidden phrase: the chunk that completes it
	// (across chunks) stops the session by policy, as the dispatcher does;
	// with leakPhrase the toy records that chunk anyway, as a buggy one would.
	phrase     string
	leakPhrase bool
	// maxUpBatch is announced in the hello ack (Ack.max_upstream_batch);
	// upBatches counts the UpstreamBatch messages received (a longer one
	// than announced ends the stream).
	maxUpBatch uint32
	upBatches  atomic.Int64
	idle       chan *toySlot
	slots      atomic.Int32
	mu         sync.Mutex
	tasks      map[string]*toyTask
	nextID     int
	// lastHello is when the toy last acked a hello, firstSubmit when the
	// first SubmitTask came: a run's start lies between (see checkLogged).
	lastHello, firstSubmit time.Time
}

type toySlot struct {
	out     chan *dispatchv1.DownstreamPacket
	mu      sync.Mutex
	task    *toyTask
	session string
}

type toyTask struct {
	id      string
	feed    testutil.Feed
	mu      sync.Mutex
	status  agentpb.TaskStatus
	slot    *toySlot
	stopped bool
	// tail is the end of the content stream (phrase matching); byPolicy
	// marks a policy stop, which ends the task FAILURE.
	tail     string
	byPolicy bool
	started  *timestamppb.Timestamp
	ended    *timestamppb.Timestamp
}

func newToy() *toyDispatcher {
	return &toyDispatcher{idle: make(chan *toySlot, 10000), tasks: map[string]*toyTask{}}
}

func (t *toyTask) append(ev *dispatchv1.TaskEvent) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.appendLocked(ev)
}

// appendContent appends a content event unless the task was stopped (and
// leak is off), checked under the lock the stop is recorded under: content
// the stop fenced never lands after the stop event.
func (t *toyTask) appendContent(ev *dispatchv1.TaskEvent, leak bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped && !leak {
		return
	}
	t.appendLocked(ev)
}

func (t *toyTask) appendLocked(ev *dispatchv1.TaskEvent) {
	ev.TaskId, ev.Time = t.id, timestamppb.Now()
	if st := ev.GetState(); st != nil {
		t.status = st.GetStatus()
		switch {
		case st.GetStatus() == agentpb.TaskStatus_RUNNING:
			t.started = ev.Time
		case terminal(st.GetStatus()):
			t.ended = ev.Time
		}
	}
	t.feed.Append(ev)
}

func stateEv(s agentpb.TaskStatus) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: s}}}
}

func (d *toyDispatcher) task(id string) (*toyTask, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	t, ok := d.tasks[id]
	if !ok {
		return nil, status.Error(codes.NotFound, "no such task")
	}
	return t, nil
}

func (d *toyDispatcher) SubmitTask(_ context.Context, req *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error) {
	now := time.Now()
	d.mu.Lock()
	if d.nextID == 0 {
		d.firstSubmit = now
	}
	d.nextID++
	t := &toyTask{id: fmt.Sprintf("task-%d", d.nextID)}
	d.tasks[t.id] = t
	d.mu.Unlock()
	t.append(stateEv(agentpb.TaskStatus_PENDING))
	go func() {
		s := <-d.idle
		t.mu.Lock()
		t.slot = s
		t.mu.Unlock()
		s.mu.Lock()
		s.task, s.session = t, t.id+"-s"
		s.mu.Unlock()
		t.append(stateEv(agentpb.TaskStatus_RUNNING))
		s.out <- &dispatchv1.DownstreamPacket{SessionId: t.id + "-s", Signal: &dispatchv1.DownstreamPacket_Start{
			Start: &dispatchv1.StartSession{TaskId: t.id, Instruction: req.GetInstruction(), Planner: req.GetPlanner(), Labels: req.GetLabels()}}}
	}()
	return &dispatchv1.SubmitTaskResponse{TaskId: t.id}, nil
}

func (d *toyDispatcher) ChatStream(stream dispatchv1.AgentInteraction_ChatStreamServer) error {
	if _, err := stream.Recv(); err != nil {
		return err
	}
	s := &toySlot{out: make(chan *dispatchv1.DownstreamPacket, 16)}
	ctx := stream.Context()
	sendErr := make(chan error, 1)
	go func() {
		for {
			select {
			case p := <-s.out:
				if err := stream.Send(p); err != nil {
					sendErr <- err
					return
				}
			case <-ctx.Done():
				return
			}
		}
	}()
	// The slot counts before its hello is acked, as in the dispatcher: a
	// client that saw the ack must see the slot in GetAgentInfo.
	d.slots.Add(1)
	defer d.slots.Add(-1)
	d.mu.Lock()
	d.lastHello = time.Now()
	d.mu.Unlock()
	s.out <- &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_HELLO, MaxUpstreamBatch: d.maxUpBatch}}}
	d.idle <- s
	var batch []*dispatchv1.UpstreamPacket // the rest of an UpstreamBatch, handled one by one
	recv := func() (*dispatchv1.UpstreamPacket, error) {
		for len(batch) == 0 {
			p, err := stream.Recv()
			if err != nil || p.GetBatch() == nil {
				return p, err
			}
			if n := len(p.GetBatch().GetPackets()); n > int(d.maxUpBatch) {
				return nil, fmt.Errorf("a batch of %d packets, %d announced", n, d.maxUpBatch)
			}
			d.upBatches.Add(1)
			batch = p.GetBatch().GetPackets()
		}
		p := batch[0]
		batch = batch[1:]
		return p, nil
	}
	for {
		p, err := recv()
		if err != nil {
			return err
		}
		s.mu.Lock()
		t, sid := s.task, s.session
		s.mu.Unlock()
		if t == nil || p.GetSessionId() != sid {
			continue
		}
		t.mu.Lock()
		stopped := t.stopped
		t.mu.Unlock()
		ev := &dispatchv1.TaskEvent{EmittedAtUs: p.GetTimestamp()}
		closeSession := func(final agentpb.TaskStatus) {
			t.append(ev)
			t.append(stateEv(final))
			s.mu.Lock()
			s.task, s.session = nil, ""
			s.mu.Unlock()
			s.out <- &dispatchv1.DownstreamPacket{SessionId: sid, Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED}}}
			d.idle <- s
		}
		switch {
		case p.GetContent() != nil:
			if stopped && !d.leakAfterStop {
				continue
			}
			leak := d.leakAfterStop
			if d.phrase != "" && !stopped && d.policyCheck(t, sid, p.GetContent().GetText()) {
				if !d.leakPhrase {
					continue
				}
				leak = true // recorded although its own policy stop came first
			}
			ev.Kind = &dispatchv1.TaskEvent_Content{Content: p.GetContent()}
			t.appendContent(ev, leak)
		case p.GetUsage() != nil:
			ev.Kind = &dispatchv1.TaskEvent_Usage{Usage: p.GetUsage()}
			t.append(ev)
		case p.GetStopped() != nil:
			ev.Kind = &dispatchv1.TaskEvent_Stopped{Stopped: p.GetStopped()}
			t.mu.Lock()
			final := agentpb.TaskStatus_CANCELLED
			if t.byPolicy {
				final = agentpb.TaskStatus_FAILURE
			}
			t.mu.Unlock()
			closeSession(final)
		case p.GetResult() != nil:
			ev.Kind = &dispatchv1.TaskEvent_Result{Result: p.GetResult()}
			closeSession(agentpb.TaskStatus_SUCCESS)
		}
	}
}

// policyCheck matches the phrase against the stream's tail + text; on a
// match it records PolicyDecision{STOP} and the stop, and stops the session.
func (d *toyDispatcher) policyCheck(t *toyTask, sid, text string) bool {
	t.mu.Lock()
	window := t.tail + text
	t.tail = window[max(0, len(window)-len(d.phrase)+1):]
	hit := strings.Contains(window, d.phrase)
	if hit {
		t.stopped, t.byPolicy = true, true
	}
	slot := t.slot
	t.mu.Unlock()
	if !hit {
		return false
	}
	t.append(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Policy{Policy: &dispatchv1.PolicyDecision{
		Action: dispatchv1.PolicyAction_POLICY_ACTION_STOP, RuleId: "bench-phrase", PacketKind: "content"}}})
	stop := &dispatchv1.StopSignal{Reason: "forbidden phrase", Code: dispatchv1.StopCode_STOP_CODE_POLICY, RuleId: "bench-phrase"}
	t.append(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: stop}})
	slot.out <- &dispatchv1.DownstreamPacket{SessionId: sid, Signal: &dispatchv1.DownstreamPacket_Stop{Stop: stop}}
	return true
}

func (d *toyDispatcher) CancelTask(_ context.Context, req *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error) {
	t, err := d.task(req.GetTaskId())
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	if t.stopped || t.slot == nil || terminal(t.status) {
		st := t.status
		t.mu.Unlock()
		return &dispatchv1.CancelTaskResponse{Status: st}, nil
	}
	t.stopped = true
	slot := t.slot
	t.appendLocked(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{Reason: req.GetReason(), Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}}})
	t.mu.Unlock()
	slot.out <- &dispatchv1.DownstreamPacket{SessionId: t.id + "-s", Signal: &dispatchv1.DownstreamPacket_Stop{Stop: &dispatchv1.StopSignal{Reason: req.GetReason()}}}
	return &dispatchv1.CancelTaskResponse{Cancelled: true, Status: agentpb.TaskStatus_RUNNING}, nil
}

func (d *toyDispatcher) WatchTask(req *dispatchv1.WatchTaskRequest, stream dispatchv1.TaskService_WatchTaskServer) error {
	t, err := d.task(req.GetTaskId())
	if err != nil {
		return err
	}
	return t.feed.Follow(stream.Context(), req.GetAfterSeq(), func(ev *dispatchv1.TaskEvent) error {
		if req.GetMaxBatch() > 0 {
			// A batch of one: the feed hands the events over one by one.
			return stream.Send(&dispatchv1.WatchTaskResponse{Events: []*dispatchv1.TaskEvent{ev}})
		}
		return stream.Send(&dispatchv1.WatchTaskResponse{Event: ev})
	})
}

func (d *toyDispatcher) GetTask(_ context.Context, req *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error) {
	t, err := d.task(req.GetTaskId())
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return &dispatchv1.GetTaskResponse{Task: &dispatchv1.Task{TaskId: t.id, Status: t.status,
		LastSeq: uint64(t.feed.Len()), StartedAt: t.started, EndedAt: t.ended}}, nil
}

// toyAgent is the seed-000 API of the toy: GetAgentInfo only.
type toyAgent struct {
	agentpb.UnimplementedAgentServer
	d *toyDispatcher
}

func (a toyAgent) GetAgentInfo(context.Context, *agentpb.GetAgentInfoRequest) (*agentpb.AgentInfo, error) {
	return &agentpb.AgentInfo{Version: "toy", MaxConcurrentTasks: a.d.slots.Load()}, nil
}

// events is every event the toy logged, of every task, once the tasks have
// ended (call it after the run).
func (d *toyDispatcher) events(ctx context.Context) ([]*dispatchv1.TaskEvent, error) {
	d.mu.Lock()
	tasks := make([]*toyTask, 0, len(d.tasks))
	for _, t := range d.tasks {
		tasks = append(tasks, t)
	}
	d.mu.Unlock()
	var all []*dispatchv1.TaskEvent
	for _, t := range tasks {
		if err := t.feed.Follow(ctx, 0, func(ev *dispatchv1.TaskEvent) error {
			all = append(all, ev)
			return nil
		}); err != nil {
			return nil, fmt.Errorf("task %s: %w", t.id, err)
		}
	}
	return all, nil
}

// runStart is when a loadgen run against the toy can have started its
// clock: after it opened its slots (the last hello acked) and before its
// first task was submitted.
func (d *toyDispatcher) runStart() (earliest, latest time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.lastHello, d.firstSubmit
}

package session

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// recordSink makes every event durable at once.
type recordSink struct{}

func (recordSink) WaitRoom(<-chan struct{}) {}
func (recordSink) Persist(c eventlog.Committer, _ string, ev *dispatchv1.TaskEvent) {
	go c.Commit(ev.GetSeq()) // Commit takes the log's lock, held by the caller
}
func (recordSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}

// lastRecord keeps the newest task record queued.
type lastRecord struct {
	mu   sync.Mutex
	last task.Snapshot
}

func (p *lastRecord) Save(s *task.Snapshot) {
	p.mu.Lock()
	p.last = *s
	p.mu.Unlock()
}
func (p *lastRecord) stored() task.Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.last
}
func (p *lastRecord) SaveConfig(*agentpb.CommonConfig)        {}
func (p *lastRecord) Flush(context.Context) error             { return nil }
func (p *lastRecord) FlushWhileHealthy(context.Context) error { return nil }
func (p *lastRecord) Health() error                           { return nil }
func (p *lastRecord) Evicted()                                {}
func (p *lastRecord) Finished(context.Context, string) (task.Snapshot, error) {
	return task.Snapshot{}, task.ErrNotFound
}
func (p *lastRecord) ListFinished(context.Context, []agentpb.TaskStatus, *task.ListKey, *task.ListKey, int, func(string) bool) ([]task.Info, error) {
	return nil, nil
}
func (p *lastRecord) Recover(context.Context, int) (task.Recovered, error) {
	return task.Recovered{}, nil
}

// The stop goes out before the task's record with it is queued (stopWith,
// FenceSaveLater), but the record is queued all the same, while the session
// still waits for stopped: a restart then finds the stop (handover.go).
func TestStopIsRecordedWhileTheSessionWaitsForStopped(t *testing.T) {
	b, err := broker.New(broker.Options{DefaultTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sched := scheduler.New(16)
	p := &lastRecord{}
	mgr := task.NewManager(eventlog.NewDurable(eventlog.Limits{}, recordSink{}), task.NewConfigStore(nil),
		task.ManagerOptions{DefaultPlanner: "chat", StopGrace: testutil.Wait, Persistence: p})
	mgr.SetQueue(sched)
	srv := NewServer(sched, b, Options{StopGrace: testutil.Wait})
	t.Cleanup(srv.Shutdown)
	e := &env{srv: srv, sched: sched, mgr: mgr}

	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	if out, err := mgr.Cancel(context.Background(), tk.ID(), "user pressed stop", false); err != nil || !out.Cancelled {
		t.Fatalf("cancel %+v %v", out, err)
	}
	if p := c.recv(); p.GetStop() == nil || p.GetSessionId() != sid {
		t.Fatalf("want the stop, got %v", p)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool { return p.stored().Stop != nil },
		"the task's record with the stop to be queued")
	if s := p.stored(); s.Status != agentpb.TaskStatus_RUNNING || s.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Fatalf("record before stopped: %s, stop %v", s.Status, s.Stop)
	}
	c.send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("ended %s", info.Status)
	}
}

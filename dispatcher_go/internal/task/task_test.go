package task

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeQueue keeps tasks in a slice; full makes Enqueue fail.
type fakeQueue struct {
	mu    sync.Mutex
	tasks []*Task
	full  bool
}

var errFull = errors.New("full")

func (q *fakeQueue) Enqueue(t *Task) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.full {
		return errFull
	}
	q.tasks = append(q.tasks, t)
	return nil
}

func (q *fakeQueue) Remove(t *Task) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := slices.Index(q.tasks, t)
	if i < 0 {
		return false
	}
	q.tasks = slices.Delete(q.tasks, i, i+1)
	return true
}

// take dequeues t as a scheduler would before starting it.
func (q *fakeQueue) take(t *Task) { q.Remove(t) }

// fakeRunner ends its task on Stop with the given behaviour.
type fakeRunner struct {
	t       *Task
	onStop  func(r *fakeRunner, reason string, code dispatchv1.StopCode)
	mu      sync.Mutex
	stopped bool
	inputs  []string
}

func (r *fakeRunner) Stop(reason string, code dispatchv1.StopCode) bool {
	r.mu.Lock()
	if r.stopped {
		r.mu.Unlock()
		return false
	}
	r.stopped = true
	r.mu.Unlock()
	if r.onStop != nil {
		r.onStop(r, reason, code)
	}
	return true
}

func (r *fakeRunner) Interject(_ context.Context, text string) (string, uint64, error) {
	r.mu.Lock()
	r.inputs = append(r.inputs, text)
	r.mu.Unlock()
	seq, err := r.t.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_UserInput{UserInput: &dispatchv1.UserInput{Text: text}}}, eventlog.Capped)
	return "m1", seq, err
}

func newManager(t *testing.T, opts ManagerOptions) (*Manager, *fakeQueue) {
	t.Helper()
	q := &fakeQueue{}
	if opts.StopGrace == 0 {
		opts.StopGrace = 200 * time.Millisecond
	}
	m := NewManager(eventlog.NewMemory(eventlog.Limits{}), NewConfigStore(nil), opts)
	m.SetQueue(q)
	return m, q
}

func events(t *testing.T, tk *Task) []*dispatchv1.TaskEvent {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	var out []*dispatchv1.TaskEvent
	var after uint64
	for after < tk.Log().LastSeq() {
		evs, err := tk.Log().Read(ctx, after, nil)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, evs...)
		after = evs[len(evs)-1].GetSeq()
	}
	return out
}

func TestSubmitValidates(t *testing.T) {
	t.Parallel()
	m, _ := newManager(t, ManagerOptions{})
	for name, spec := range map[string]Spec{
		"empty instruction":  {Instruction: "  "},
		"negative timeout":   {Instruction: "x", TimeoutSeconds: -1},
		"empty capability":   {Instruction: "x", RequiredCapabilities: []string{""}},
		"negative cfg limit": {Instruction: "x", RunningConfig: &agentpb.CommonConfig{TaskTimeout: proto.Int32(-5)}},
		"negative steps":     {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Steps: proto.Int32(-5)}},
		"zero steps":         {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Steps: proto.Int32(0)}},
		// A fleet keeps the request id as PostgreSQL text (no NUL, UTF-8).
		"NUL request id":       {Instruction: "x", Labels: map[string]string{RequestIDLabel: "r\x00"}},
		"non-UTF-8 request id": {Instruction: "x", Labels: map[string]string{RequestIDLabel: "\xff"}},
		// A fleet's queue names carry them as PostgreSQL text too.
		"NUL capability":       {Instruction: "x", RequiredCapabilities: []string{"gpu\x00"}},
		"non-UTF-8 capability": {Instruction: "x", RequiredCapabilities: []string{"\xff"}},
	} {
		if _, err := m.Submit(spec); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
	// An unknown previous task is not found (as another tenant's is).
	if _, err := m.Submit(Spec{Instruction: "x", PreviousTaskID: "nope"}); !errors.Is(err, ErrNotFound) {
		t.Errorf("unknown previous: err = %v, want ErrNotFound", err)
	}
}

func TestSubmitCreatesPendingTaskWithDefaults(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{DefaultPlanner: "chat"})
	tk, err := m.Submit(Spec{Instruction: "hello"})
	if err != nil {
		t.Fatal(err)
	}
	if tk.Planner() != "chat" || tk.Status() != agentpb.TaskStatus_PENDING || tk.Timeout() != time.Hour {
		t.Fatalf("planner=%q status=%v timeout=%v", tk.Planner(), tk.Status(), tk.Timeout())
	}
	if len(q.tasks) != 1 {
		t.Fatal("task not queued")
	}
	evs := events(t, tk)
	if len(evs) != 1 || evs[0].GetState().GetStatus() != agentpb.TaskStatus_PENDING || evs[0].GetSeq() != 1 || evs[0].GetTaskId() != tk.ID() {
		t.Fatalf("first event: %v", evs)
	}
	got, err := m.Get(tk.ID())
	if err != nil || got != tk {
		t.Fatalf("Get: %v %v", got, err)
	}
	if _, err := m.Get("missing"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(missing) = %v", err)
	}
}

func TestSubmitQueueFullKeepsNothing(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	q.full = true
	if _, err := m.Submit(Spec{Instruction: "x"}); !errors.Is(err, errFull) {
		t.Fatalf("err = %v", err)
	}
	if m.Registry().Len() != 0 {
		t.Fatal("refused task kept in the registry")
	}
}

func TestTimeoutResolution(t *testing.T) {
	t.Parallel()
	m, _ := newManager(t, ManagerOptions{})
	m.Configs().SetGlobal(&agentpb.CommonConfig{TaskTimeout: proto.Int32(100)})
	a, _ := m.Submit(Spec{Instruction: "x"})
	b, _ := m.Submit(Spec{Instruction: "x", RunningConfig: &agentpb.CommonConfig{TaskTimeout: proto.Int32(50)}})
	c, _ := m.Submit(Spec{Instruction: "x", TimeoutSeconds: 7, RunningConfig: &agentpb.CommonConfig{TaskTimeout: proto.Int32(50)}})
	if a.Timeout() != 100*time.Second || b.Timeout() != 50*time.Second || c.Timeout() != 7*time.Second {
		t.Fatalf("timeouts %v %v %v", a.Timeout(), b.Timeout(), c.Timeout())
	}
}

func TestCancelPendingDequeues(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	tk, _ := m.Submit(Spec{Instruction: "x"})
	out, err := m.Cancel(context.Background(), tk.ID(), "", true)
	if err != nil || !out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	if len(q.tasks) != 0 {
		t.Fatal("still queued")
	}
	out, _ = m.Cancel(context.Background(), tk.ID(), "", true)
	if out.Cancelled || out.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("second cancel must say it did nothing: %+v", out)
	}
	if _, err := m.Cancel(context.Background(), "nope", "", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown: %v", err)
	}
}

func TestCancelRunningWaitsForTheRealOutcome(t *testing.T) {
	t.Parallel()
	// The grace is long: Cancel gives up only if the test is stuck.
	m, q := newManager(t, ManagerOptions{StopGrace: testutil.Wait})

	// The commander obeys: CANCELLED, cancelled=true. The task ends only
	// once Cancel is waiting for it.
	tk, _ := m.Submit(Spec{Instruction: "x"})
	q.take(tk)
	stopped := make(chan string, 1)
	r := &fakeRunner{t: tk, onStop: func(_ *fakeRunner, reason string, code dispatchv1.StopCode) {
		if code != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
			t.Errorf("code = %v", code)
		}
		stopped <- reason
	}}
	if err := tk.Start(r, "c1", "s1"); err != nil {
		t.Fatal(err)
	}
	cancelled := testutil.Async(func() (CancelOutcome, error) { return m.Cancel(context.Background(), tk.ID(), "", true) })
	reason := testutil.Recv(t, stopped, testutil.Wait, "the stop")
	testutil.WaitFor(t, testutil.Wait, func() bool { return testutil.Blocked("task.(*Manager).cancel") }, "Cancel to wait for the outcome")
	tk.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
	out := testutil.Recv(t, cancelled, testutil.Wait, "Cancel to return")
	if out.Err != nil || !out.V.Cancelled || out.V.Status != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel: %+v %v", out.V, out.Err)
	}

	// The planner finished first: the truth is SUCCESS, cancelled=false.
	tk2, _ := m.Submit(Spec{Instruction: "x"})
	q.take(tk2)
	r2 := &fakeRunner{t: tk2, onStop: func(r *fakeRunner, _ string, _ dispatchv1.StopCode) {
		go r.t.Finish(agentpb.TaskStatus_SUCCESS, "done", "42")
	}}
	_ = tk2.Start(r2, "c1", "s2")
	out2, _ := m.Cancel(context.Background(), tk2.ID(), "", true)
	if out2.Cancelled || out2.Status != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("cancel after finish: %+v", out2)
	}
}

func TestInterject(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	tk, _ := m.Submit(Spec{Instruction: "x"})
	if _, _, err := m.Interject(context.Background(), tk.ID(), "hi"); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("pending: %v", err)
	}
	q.take(tk)
	r := &fakeRunner{t: tk}
	_ = tk.Start(r, "c", "s")
	if _, _, err := m.Interject(context.Background(), tk.ID(), ""); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("empty: %v", err)
	}
	// Refused on every deployment alike (a fleet's command row cannot
	// hold it; a planner's text is not altered on the way).
	if _, _, err := m.Interject(context.Background(), tk.ID(), "a\x00b"); !errors.Is(err, ErrInvalidArgument) || len(r.inputs) != 0 {
		t.Fatalf("a NUL byte: %v (delivered %v)", err, r.inputs)
	}
	_, seq, err := m.Interject(context.Background(), tk.ID(), "hi")
	if err != nil || seq != 3 || len(r.inputs) != 1 {
		t.Fatalf("seq=%d err=%v inputs=%v", seq, err, r.inputs)
	}
}

func TestStatisticsAndFinish(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	tk, _ := m.Submit(Spec{Instruction: "x"})
	q.take(tk)
	_ = tk.Start(&fakeRunner{t: tk}, "c", "s")
	tk.AddUsage(&dispatchv1.Usage{InputTokens: 10, OutputTokens: 5, Cost: 0.5, Currency: "USD", Steps: 1})
	tk.AddUsage(&dispatchv1.Usage{InputTokens: 1, OutputTokens: 1, Cost: 0.25, Steps: 2, Model: "smollm2"})
	if !tk.Finish(agentpb.TaskStatus_SUCCESS, "ok", "the answer") {
		t.Fatal("Finish refused")
	}
	if tk.Finish(agentpb.TaskStatus_FAILURE, "late", "") {
		t.Fatal("second Finish must not count")
	}
	info := tk.Info()
	want := Stats{Steps: 3, InputTokens: 11, OutputTokens: 6, Cost: 0.75, Currency: "USD", Models: "smollm2"}
	if info.Stats != want || info.Result != "the answer" || info.Status != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("info %+v", info)
	}
	select {
	case <-tk.Done():
	default:
		t.Fatal("Done not closed")
	}
	evs := events(t, tk)
	last := evs[len(evs)-1]
	if last.GetState().GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("terminal event %v", last)
	}
}

func TestRegistryEvictsOldestFinishedAndLists(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{MaxTasksKept: 2})
	var ts []*Task
	for range 4 {
		tk, _ := m.Submit(Spec{Instruction: "x"})
		ts = append(ts, tk)
	}
	// Finish 0, 1, 2; only the two newest finished stay. 3 is pending.
	for _, tk := range ts[:3] {
		q.take(tk)
		tk.Finish(agentpb.TaskStatus_FAILURE, "f", "")
	}
	if _, err := m.Get(ts[0].ID()); !errors.Is(err, ErrNotFound) {
		t.Fatal("oldest finished task not evicted")
	}
	for _, tk := range ts[1:] {
		if _, err := m.Get(tk.ID()); err != nil {
			t.Fatalf("task evicted too early: %v", err)
		}
	}
	all, next := m.Registry().List(nil, 10, 0)
	if len(all) != 3 || all[0] != ts[3] || all[2] != ts[1] || next != 0 {
		t.Fatalf("list newest first: %v next=%d", all, next)
	}
	page, next := m.Registry().List(nil, 2, 0)
	if len(page) != 2 || next == 0 {
		t.Fatalf("page 1: %d next=%d", len(page), next)
	}
	page2, next2 := m.Registry().List(nil, 2, next)
	if len(page2) != 1 || page2[0] != ts[1] || next2 != 0 {
		t.Fatalf("page 2: %v next=%d", page2, next2)
	}
	pending, _ := m.Registry().List([]agentpb.TaskStatus{agentpb.TaskStatus_PENDING}, 10, 0)
	if len(pending) != 1 || pending[0] != ts[3] {
		t.Fatalf("status filter: %v", pending)
	}
}

func TestConversationHistoryFromPreviousTask(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{})
	prev, _ := m.Submit(Spec{Instruction: "what is 2+2"})
	q.take(prev)
	prev.Finish(agentpb.TaskStatus_SUCCESS, "ok", "4")
	next, err := m.Submit(Spec{Instruction: "and times 3?", PreviousTaskID: prev.ID()})
	if err != nil {
		t.Fatal(err)
	}
	h := next.History()
	if len(h) != 2 || h[0].GetRole() != "user" || h[0].GetContent() != "what is 2+2" || h[1].GetContent() != "4" {
		t.Fatalf("history %v", h)
	}
}

func TestShutdownStopsWhatIsLeft(t *testing.T) {
	t.Parallel()
	m, q := newManager(t, ManagerOptions{StopGrace: 100 * time.Millisecond})
	pending, _ := m.Submit(Spec{Instruction: "x"})
	running, _ := m.Submit(Spec{Instruction: "x"})
	q.take(running)
	var code dispatchv1.StopCode
	_ = running.Start(&fakeRunner{t: running, onStop: func(r *fakeRunner, reason string, c dispatchv1.StopCode) {
		code = c
		r.t.Finish(agentpb.TaskStatus_FAILURE, reason, "")
	}}, "c", "s")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	m.Shutdown(ctx)
	if pending.Status() != agentpb.TaskStatus_FAILURE || running.Status() != agentpb.TaskStatus_FAILURE || code != dispatchv1.StopCode_STOP_CODE_SHUTDOWN {
		t.Fatalf("pending=%v running=%v code=%v", pending.Status(), running.Status(), code)
	}
	if _, err := m.Submit(Spec{Instruction: "x"}); !errors.Is(err, ErrClosed) {
		t.Fatalf("submit after shutdown: %v", err)
	}
}

func TestNewIDIsUUIDShaped(t *testing.T) {
	t.Parallel()
	a, b := NewID(), NewID()
	if len(a) != 36 || a[14] != '4' || a == b {
		t.Fatalf("ids %q %q", a, b)
	}
}

// TestStatsModels: the models usage names, each once, in order, bounded.
func TestStatsModels(t *testing.T) {
	t.Parallel()
	m, _ := newManager(t, ManagerOptions{})
	tk, _ := m.Submit(Spec{Instruction: "x"})
	for _, name := range []string{"smollm2", "", "ui-tars", "smollm2", "a, b"} {
		tk.AddUsage(&dispatchv1.Usage{Model: name})
	}
	if got := tk.Info().Stats.ModelList(); strings.Join(got, "|") != "smollm2|ui-tars|a b" {
		t.Fatalf("models %q", got)
	}
	for i := range 20 {
		tk.AddUsage(&dispatchv1.Usage{Model: fmt.Sprint("m", i)})
	}
	if got := tk.Info().Stats.ModelList(); len(got) != maxStatsModels {
		t.Fatalf("models not bounded: %q", got)
	}
}

// A cancel's reason with a NUL byte is kept as U+FFFD on every deployment
// (as a fleet's command row keeps it), not refused: the task's message is
// the same whichever replica took the call.
func TestCancelReasonNULIsReplaced(t *testing.T) {
	t.Parallel()
	m, _ := newManager(t, ManagerOptions{})
	tk, _ := m.Submit(Spec{Instruction: "x"})
	out, err := m.Cancel(context.Background(), tk.ID(), "a\x00b", true)
	if err != nil || !out.Cancelled {
		t.Fatalf("cancel: %+v %v", out, err)
	}
	if msg := tk.Snapshot().Message; !strings.Contains(msg, "a\ufffdb") || strings.ContainsRune(msg, 0) {
		t.Fatalf("message %q, want the reason with U+FFFD for the NUL", msg)
	}
}

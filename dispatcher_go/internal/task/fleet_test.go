package task

import (
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// nowSink makes every event durable at once.
type nowSink struct{}

func (nowSink) WaitRoom(<-chan struct{}) {}
func (nowSink) Persist(c eventlog.Committer, _ string, ev *dispatchv1.TaskEvent) {
	go c.Commit(ev.GetSeq()) // Commit takes the log's lock, held by the caller
}
func (nowSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}

// memPersist keeps the last snapshot of each task.
type memPersist struct {
	mu    sync.Mutex
	saved map[string]Snapshot
}

func (p *memPersist) Save(s *Snapshot) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.saved[s.ID] = *s
}
func (p *memPersist) last(id string) Snapshot {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.saved[id]
}
func (p *memPersist) SaveConfig(*agentpb.CommonConfig)        {}
func (p *memPersist) Flush(context.Context) error             { return nil }
func (p *memPersist) FlushWhileHealthy(context.Context) error { return nil }
func (p *memPersist) Health() error                           { return nil }
func (p *memPersist) Evicted()                                {}
func (p *memPersist) Finished(context.Context, string) (Snapshot, error) {
	return Snapshot{}, ErrNotFound
}
func (p *memPersist) ListFinished(context.Context, []agentpb.TaskStatus, *ListKey, *ListKey, int, func(string) bool) ([]Info, error) {
	return nil, nil
}
func (p *memPersist) Recover(context.Context, int) (Recovered, error) { return Recovered{}, nil }

// fakeFleet records what the Manager asks of it.
type fakeFleet struct {
	p         *memPersist
	mu        sync.Mutex
	placed    []string
	cancelled []string
	callers   []*tenant.Caller // each Cancel's caller, in order
	kept      []string         // each KeepCancel's task, in order
	health    error
	placeErr  error
	requests  map[string]string
	take      func(ctx context.Context, id, sessionID string, serves func(string) bool) error
	// claim, when set, answers ClaimSession.
	claim func(ctx context.Context, id, sessionID string) (int64, *dispatchv1.StopSignal, error)
	// viewLog, when set, is the log of every view Lookup returns (the
	// events the replica running the task stored).
	viewLog eventlog.Log
	// slowLookup, when set, is waited for by the Lookup of a task id it
	// holds (a slow previous-task look-up).
	slowLookup map[string]chan struct{}
}

func (f *fakeFleet) Health() error { return f.health }
func (f *fakeFleet) Reserve(_ context.Context, rid, id string) (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if got, ok := f.requests[rid]; ok {
		return got, nil
	}
	f.requests[rid] = id
	return "", nil
}
func (f *fakeFleet) Unreserve(_ context.Context, rid, id string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.requests[rid] == id {
		delete(f.requests, rid)
	}
	return nil
}
func (f *fakeFleet) Place(_ context.Context, t *Task) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.placeErr != nil {
		return f.placeErr
	}
	f.placed = append(f.placed, t.ID())
	return nil
}
func (f *fakeFleet) Lookup(ctx context.Context, id string) (*Task, error) {
	f.mu.Lock()
	gate := f.slowLookup[id]
	f.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		// A previous task: its view needs a log (its conversation).
		return NewView(f.p.last(id), eventlog.NewDurable(eventlog.Limits{}, nowSink{}).Stored(id, 0)), nil
	}
	if f.viewLog != nil {
		return NewView(Snapshot{Summary: Summary{ID: id, Status: agentpb.TaskStatus_RUNNING}}, f.viewLog), nil
	}
	s := f.p.last(id)
	if s.ID == "" {
		return nil, ErrNotFound
	}
	return NewView(s, nil), nil
}
func (f *fakeFleet) List(context.Context, []agentpb.TaskStatus, int, *ListKey, func(string) *Task) ([]Info, *ListKey, error) {
	return nil, nil, nil
}
func (f *fakeFleet) Cancel(_ context.Context, caller *tenant.Caller, id, _ string, _ bool) (CancelOutcome, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cancelled = append(f.cancelled, id)
	f.callers = append(f.callers, caller)
	return CancelOutcome{Cancelled: true, Status: agentpb.TaskStatus_CANCELLED}, nil
}
func (f *fakeFleet) Interject(context.Context, string, string) (string, uint64, error) {
	return "remote", 9, nil
}
func (f *fakeFleet) Approve(context.Context, string, string, bool, string) (dispatchv1.HoldOutcome, uint64, error) {
	return dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED, 10, nil
}
func (f *fakeFleet) TakeSession(ctx context.Context, id, sessionID string, serves func(string) bool) error {
	if f.take != nil {
		return f.take(ctx, id, sessionID, serves)
	}
	return ErrNotFound
}
func (f *fakeFleet) ClaimSession(ctx context.Context, t *Task, sessionID string) (int64, *dispatchv1.StopSignal, error) {
	if f.claim != nil {
		return f.claim(ctx, t.id, sessionID)
	}
	return 0, nil, ErrNotFound
}
func (f *fakeFleet) KeepCancel(id, _ string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kept = append(f.kept, id)
}

func newFleetManager(t *testing.T) (*Manager, *fakeQueue, *fakeFleet, *memPersist) {
	t.Helper()
	p := &memPersist{saved: map[string]Snapshot{}}
	q := &fakeQueue{}
	m := NewManager(eventlog.NewDurable(eventlog.Limits{}, nowSink{}), NewConfigStore(nil),
		ManagerOptions{DefaultPlanner: "chat", StopGrace: 100 * time.Millisecond, Persistence: p})
	m.SetQueue(q)
	f := &fakeFleet{p: p, requests: map[string]string{}}
	m.SetFleet(f)
	return m, q, f, p
}

func TestFleetSubmitPlacesAndKeepsNothing(t *testing.T) {
	m, q, f, p := newFleetManager(t)
	tk, err := m.Submit(Spec{Instruction: "hi"})
	if err != nil {
		t.Fatal(err)
	}
	if len(f.placed) != 1 || f.placed[0] != tk.ID() || len(q.tasks) != 0 || m.Registry().Get(tk.ID()) != nil {
		t.Fatalf("placed %v, local queue %d, in registry %v", f.placed, len(q.tasks), m.Registry().Get(tk.ID()) != nil)
	}
	if s := p.last(tk.ID()); s.Status != agentpb.TaskStatus_PENDING {
		t.Fatalf("stored status %s before the placement", s.Status)
	}
	got, err := m.Get(tk.ID())
	if err != nil || !got.IsView() {
		t.Fatalf("Get of a placed task: %v, view %v", err, got != nil && got.IsView())
	}
	if out, err := m.Cancel(context.Background(), tk.ID(), "", true); err != nil || !out.Cancelled || len(f.cancelled) != 1 {
		t.Fatalf("cancel of a view: %+v %v (fleet cancels %v)", out, err, f.cancelled)
	}
	if id, seq, err := m.Interject(context.Background(), tk.ID(), "more"); err != nil || id != "remote" || seq != 9 {
		t.Fatalf("interject of a view: %q %d %v", id, seq, err)
	}
	// The same client request id twice: the first task, placed once.
	a, err := m.Submit(Spec{Instruction: "once", Labels: map[string]string{RequestIDLabel: "r1"}})
	if err != nil {
		t.Fatal(err)
	}
	b, err := m.Submit(Spec{Instruction: "once", Labels: map[string]string{RequestIDLabel: "r1"}})
	if err != nil || b.ID() != a.ID() || len(f.placed) != 2 {
		t.Fatalf("duplicate submit: %v, ids %s %s, placed %d", err, a.ID(), b.ID(), len(f.placed))
	}
}

// A duplicate submission that arrives while the first one is still
// storing its task (its id reserved, its record not yet readable) waits
// for that task: it was answered NOT_FOUND ("task not found") in 7 of 20
// concurrent submits of one id on three replicas.
func TestFleetDuplicateWaitsForTheFirstSubmissionsTask(t *testing.T) {
	m, _, f, p := newFleetManager(t)
	f.requests[requestKey("", "r-wait")] = "first"
	go func() {
		time.Sleep(200 * time.Millisecond)
		p.Save(&Snapshot{Summary: Summary{ID: "first", Status: agentpb.TaskStatus_PENDING}})
	}()
	tk, err := m.Submit(Spec{Instruction: "once", Labels: map[string]string{RequestIDLabel: "r-wait"}})
	if err != nil || tk.ID() != "first" || len(f.placed) != 0 {
		t.Fatalf("duplicate of a task being stored: %v %v, placed %v; want the first submission's task", tk, err, f.placed)
	}
}

// A submission that fails before its task is stored gives its client
// request id back: a retry with the same id submits anew (it was
// NOT_FOUND for a day). A refusal that needs no I/O never holds it.
func TestFleetRequestIDOfASubmissionThatFailedIsFreed(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	labels := map[string]string{RequestIDLabel: "r-fail"}
	if _, err := m.Submit(Spec{Instruction: "x", PreviousTaskID: "nope", Labels: labels}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("submit with an unknown previous task: %v", err)
	}
	if _, err := m.Submit(Spec{Instruction: "x", PreviousTaskID: "no\x00pe", Labels: labels}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("submit with a previous task id that is not text: %v", err)
	}
	if len(f.requests) != 0 {
		t.Fatalf("request ids held after refused submissions: %v", f.requests)
	}
	tk, err := m.Submit(Spec{Instruction: "x", Labels: labels})
	if err != nil || len(f.placed) != 1 || f.placed[0] != tk.ID() {
		t.Fatalf("retry with the same request id: %v, placed %v", err, f.placed)
	}
}

// A first submission that is slow (its previous-task look-up, its flush,
// a stopped replica) keeps its client request id: duplicates are answered
// UNAVAILABLE within DuplicateWait and never take the id over, and once
// it stores its task every duplicate gets that task. A duplicate took
// the id over after its wait and ran a second task.
func TestFleetDuplicateOfASlowFirstSubmissionIsUnavailableNeverASecondTask(t *testing.T) {
	m, _, f, p := newFleetManager(t)
	m.opts.DuplicateWait = 300 * time.Millisecond
	p.Save(&Snapshot{Summary: Summary{ID: "prev", Status: agentpb.TaskStatus_SUCCESS}})
	gate := make(chan struct{})
	f.slowLookup = map[string]chan struct{}{"prev": gate}
	spec := Spec{Instruction: "once", PreviousTaskID: "prev", Labels: map[string]string{RequestIDLabel: "r-slow"}}
	type answer struct {
		t   *Task
		err error
	}
	first := make(chan answer, 1)
	go func() {
		tk, err := m.Submit(spec)
		first <- answer{tk, err}
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		f.mu.Lock()
		n := len(f.requests)
		f.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first submission reserved no id")
		}
	}
	var wg sync.WaitGroup
	dups := make([]answer, 4)
	for i := range dups {
		wg.Add(1)
		go func() {
			defer wg.Done()
			began := time.Now()
			tk, err := m.Submit(spec)
			dups[i] = answer{tk, err}
			if d := time.Since(began); d > 2*time.Second {
				t.Errorf("duplicate answered after %v", d)
			}
		}()
	}
	wg.Wait()
	for i, d := range dups {
		if !errors.Is(d.err, ErrFirstSubmissionPending) || !errors.Is(d.err, store.ErrUnavailable) {
			t.Fatalf("duplicate %d of a slow first submission: %v %v, want ErrFirstSubmissionPending", i, d.t, d.err)
		}
	}
	close(gate)
	a := <-first
	if a.err != nil {
		t.Fatal(a.err)
	}
	again, err := m.Submit(spec)
	if err != nil || again.ID() != a.t.ID() {
		t.Fatalf("duplicate after the first stored its task: %v %v, want %s", again, err, a.t.ID())
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.placed) != 1 || f.placed[0] != a.t.ID() {
		t.Fatalf("placed %v, want only %s", f.placed, a.t.ID())
	}
}

// A duplicate whose caller goes away stops waiting with the caller's
// error, not the bound's.
func TestFleetDuplicateWaitEndsWithTheCallersContext(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	m.opts.DuplicateWait = time.Minute
	f.requests[requestKey("", "r-ctx")] = "being-created"
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := m.SubmitContext(ctx, Spec{Instruction: "x", Labels: map[string]string{RequestIDLabel: "r-ctx"}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("duplicate whose caller went away: %v", err)
	}
}

// CancelAs of a task another replica runs goes to the fleet with the
// caller, for the fleet to check (no look-up before the stop); of a task
// run here, the caller is checked here: another tenant's task is
// ErrNotFound and keeps running.
func TestFleetCancelAsChecksTheCaller(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	remote, err := m.Submit(Spec{Instruction: "there", Caller: tenant.Caller{Tenant: "acme"}})
	if err != nil {
		t.Fatal(err)
	}
	other := tenant.Caller{Tenant: "globex"}
	if _, err := m.CancelAs(context.Background(), other, remote.ID(), "", false); err != nil || len(f.callers) != 1 || f.callers[0] == nil || *f.callers[0] != other {
		t.Fatalf("CancelAs of a remote task: %v, the fleet was given callers %v", err, f.callers)
	}
	if _, err := m.Cancel(context.Background(), remote.ID(), "", false); err != nil || len(f.callers) != 2 || f.callers[1] != nil {
		t.Fatalf("Cancel of a remote task: %v, callers %v (want nil: no caller to check)", err, f.callers)
	}
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "here", Planner: "chat", Tenant: "acme", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
	local, err := m.Adopt(s, 0, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.CancelAs(context.Background(), other, local.ID(), "", false); !errors.Is(err, ErrNotFound) || local.Status() != agentpb.TaskStatus_PENDING || len(f.callers) != 2 {
		t.Fatalf("another tenant's CancelAs of a local task: %v, status %s, fleet cancels %d", err, local.Status(), len(f.callers))
	}
	out, err := m.CancelAs(context.Background(), tenant.Caller{Tenant: "acme"}, local.ID(), "", false)
	if err != nil || !out.Cancelled || local.Status() != agentpb.TaskStatus_CANCELLED || len(f.callers) != 2 {
		t.Fatalf("its tenant's CancelAs of a local task: %+v %v, status %s", out, err, local.Status())
	}
}

func TestFleetSubmitRefusedOrNotPlaced(t *testing.T) {
	m, _, f, p := newFleetManager(t)
	f.health = errors.New("bus down")
	if _, err := m.Submit(Spec{Instruction: "hi"}); err == nil || len(p.saved) != 0 {
		t.Fatalf("submit while the fleet is unhealthy: %v, stored %d", err, len(p.saved))
	}
	f.health = nil
	f.placeErr = errors.New("redis gone")
	if _, err := m.Submit(Spec{Instruction: "hi"}); err == nil {
		t.Fatal("submit succeeded though the task was not placed")
	}
	for id, s := range p.saved {
		if s.Status != agentpb.TaskStatus_FAILURE {
			t.Fatalf("task %s not placed is stored %s, want FAILURE (it must never run)", id, s.Status)
		}
	}
}

func TestFleetAdoptRunsAndDropEnds(t *testing.T) {
	m, q, _, p := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
	tk, err := m.Adopt(s, 4, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(q.tasks) != 1 || m.Registry().Get(s.ID) != tk || tk.Log().LastSeq() != 4 {
		t.Fatalf("adopted: queued %d, registered %v, last seq %d", len(q.tasks), m.Registry().Get(s.ID) == tk, tk.Log().LastSeq())
	}
	m.Drop(s.ID, "lease lost")
	if tk.Status() != agentpb.TaskStatus_FAILURE || len(q.tasks) != 0 {
		t.Fatalf("dropped: %s, queued %d", tk.Status(), len(q.tasks))
	}
	testutil.WaitFor(t, 2*time.Second, func() bool { return m.Registry().Get(s.ID) == nil }, "dropped task forgotten")
	if p.last(s.ID).Status != agentpb.TaskStatus_FAILURE {
		t.Fatal("the local end was not saved (the fenced store refuses it, not the manager)")
	}
	// Adopting again (a later attempt) replaces any copy.
	if _, err := m.Adopt(s, 6, 0, false); err != nil {
		t.Fatal(err)
	}
}

func TestFleetReattachTakesAnotherReplicasTaskOver(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	id := NewID()
	var served []string
	f.take = func(_ context.Context, tid, ses string, serves func(string) bool) error {
		if !serves("acme") {
			return ErrNotFound
		}
		served = append(served, tid+"/"+ses)
		s := Snapshot{Summary: Summary{ID: tid, Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
			CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: ses, Tenant: "acme"}, UpstreamSeq: 7}
		_, err := m.AdoptWaiting(s, 9, 5)
		return err
	}
	mk := func(tk *Task) Runner { return &fakeRunner{t: tk} }
	// Another tenant's commander: as unknown, nothing taken.
	if _, err := m.Reattach(context.Background(), id, "ses-1", "c2", func(string) bool { return false }, mk); !errors.Is(err, ErrNotFound) {
		t.Fatalf("other tenant: %v, want ErrNotFound", err)
	}
	r, err := m.Reattach(context.Background(), id, "ses-1", "c2", func(tn string) bool { return tn == "acme" }, mk)
	if err != nil {
		t.Fatal(err)
	}
	if r.Attempt != 5 || r.UpstreamSeq != 7 || r.Task.Attempt() != 5 || len(served) != 1 {
		t.Fatalf("re-attached: attempt %d (task %d), upstream seq %d, takes %v", r.Attempt, r.Task.Attempt(), r.UpstreamSeq, served)
	}
	if r.Task.HandingOver() || r.Task.Status() != agentpb.TaskStatus_RUNNING || r.Task.Log().LastSeq() != 10 {
		t.Fatalf("after the re-attach: handing over %v, %s, last seq %d", r.Task.HandingOver(), r.Task.Status(), r.Task.Log().LastSeq())
	}
	// A second re-attach of the same session finds it attached here.
	if _, err := m.Reattach(context.Background(), id, "ses-1", "c3", nil, mk); !errors.Is(err, ErrNotRunning) {
		t.Fatalf("second re-attach: %v", err)
	}
}

// A session re-attaching to the replica that holds its task's waiting
// copy, whose claim (ClaimSession) finds a client's cancel open for the
// task: the session re-attaches with that cancel as its stop, stored with
// the task, and the copy has the cancel recorded (it is not carried out
// again, the task is never requeued). Before, the claim's cancel was
// dropped: no stop, the session ran on until the fleet's reconcile.
func TestFleetReattachIsStoppedWithTheClaimsOpenCancel(t *testing.T) {
	m, _, f, p := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
		CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}}
	tk, err := m.Adopt(s, 3, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	tk.waitForReattach(time.Minute)
	cancel := &dispatchv1.StopSignal{Reason: "by the client", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}
	f.claim = func(_ context.Context, id, ses string) (int64, *dispatchv1.StopSignal, error) {
		if id != s.ID || ses != "ses-1" {
			return 0, nil, ErrNotFound
		}
		return 4, cancel, nil
	}
	r, err := m.Reattach(context.Background(), s.ID, "ses-1", "c2", nil, func(tk *Task) Runner { return &fakeRunner{t: tk} })
	if err != nil {
		t.Fatal(err)
	}
	if r.Attempt != 4 || r.Stop.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL || r.Stop.GetReason() != "by the client" {
		t.Fatalf("re-attached: attempt %d, stop %v; want attempt 4 stopped with the open cancel", r.Attempt, r.Stop)
	}
	if reason, ok := tk.CancelRequested(); !ok || reason != "by the client" {
		t.Fatalf("cancel recorded: %q %v", reason, ok)
	}
	if st := p.last(s.ID).Stop; st.GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Fatalf("stored stop %v, want the cancel's (a later re-attach is stopped with it too)", st)
	}
}

func TestFleetDropOfAWaitingTaskEndsNothing(t *testing.T) {
	m, _, _, p := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
		CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}}
	tk, err := m.AdoptWaiting(s, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	// Its session re-attached to another replica, which took the lease.
	m.Drop(s.ID, "lease lost")
	if m.Registry().Get(s.ID) != nil || tk.Status() != agentpb.TaskStatus_RUNNING || tk.Log().LastSeq() != 3 {
		t.Fatalf("dropped waiter: registered %v, %s, last seq %d", m.Registry().Get(s.ID) != nil, tk.Status(), tk.Log().LastSeq())
	}
	if got := p.last(s.ID).Status; got == agentpb.TaskStatus_FAILURE {
		t.Fatal("the dropped waiter recorded a FAILURE")
	}
}

// A replica that lost a task's lease (a stale owner: paused past its
// lease, the task moved on to another replica) ends its copy FAILURE
// (Drop); the store refuses that end, and a watcher of the copy here must
// not see it either: it follows the fleet's view (the truth) from the seq
// it had, without a gap or a repeat.
func TestFleetDroppedCopyWatchersFollowTheView(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
	tk, err := m.Adopt(s, 0, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	content := func(text string) *dispatchv1.TaskEvent {
		return &dispatchv1.TaskEvent{TaskId: s.ID, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: text}}}
	}
	// The truth: the copy's first event, then what the new owner stored.
	truth, err := eventlog.NewMemory(eventlog.Limits{}).Create(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range []*dispatchv1.TaskEvent{content("here"), content("elsewhere")} {
		if _, err := truth.Append(ev, eventlog.Control); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := truth.Seal(&dispatchv1.TaskEvent{TaskId: s.ID, Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_CANCELLED}}}); err != nil {
		t.Fatal(err)
	}
	f.viewLog = truth
	if _, err := tk.log.Append(content("here"), eventlog.Control); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var mu sync.Mutex
	var got []*dispatchv1.TaskEvent
	done := make(chan error, 1)
	go func() {
		var after uint64
		for {
			evs, err := tk.Log().Read(ctx, after, make([]*dispatchv1.TaskEvent, 0, 8))
			mu.Lock()
			got = append(got, evs...)
			mu.Unlock()
			if len(evs) > 0 {
				after = evs[len(evs)-1].GetSeq()
			}
			if err != nil {
				done <- err
				return
			}
		}
	}()
	testutil.WaitFor(t, 2*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) == 1
	}, "the watcher read the copy's first event")

	m.Drop(s.ID, "lease lost")
	if tk.Status() != agentpb.TaskStatus_FAILURE {
		t.Fatalf("the copy: %s, want FAILURE (its end is refused by the store)", tk.Status())
	}
	if err := <-done; !errors.Is(err, io.EOF) {
		t.Fatalf("watcher ended with %v, want io.EOF", err)
	}
	var seqs []uint64
	var last *dispatchv1.TaskState
	for _, ev := range got {
		seqs = append(seqs, ev.GetSeq())
		if st := ev.GetState(); st != nil {
			last = st
			if st.GetStatus() == agentpb.TaskStatus_FAILURE {
				t.Fatalf("the watcher of the dropped copy saw its local FAILURE (%q), which the task never had", st.GetMessage())
			}
		}
	}
	if len(seqs) != 3 || seqs[0] != 1 || seqs[1] != 2 || seqs[2] != 3 || last.GetStatus() != agentpb.TaskStatus_CANCELLED || got[1].GetContent().GetText() != "elsewhere" {
		t.Fatalf("watcher saw seqs %v ending %v, want 1 2 3 ending CANCELLED from the view", seqs, last)
	}
	// A new reader here is given the view too.
	if v, err := m.Get(s.ID); err != nil || !v.IsView() {
		t.Fatalf("Get of the dropped copy: %v, view %v", err, v != nil && v.IsView())
	}
}

// A copy that waited for its session records nothing when dropped: a
// watcher waiting on it for the next event is woken by the loss and
// follows the view.
func TestFleetDroppedWaiterWakesItsWatchers(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
		CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}}
	tk, err := m.AdoptWaiting(s, 3, 2)
	if err != nil {
		t.Fatal(err)
	}
	truth, err := eventlog.NewMemory(eventlog.Limits{}).Create(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	for range 4 {
		if _, err := truth.Append(&dispatchv1.TaskEvent{TaskId: s.ID, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "x"}}}, eventlog.Control); err != nil {
			t.Fatal(err)
		}
	}
	f.viewLog = truth
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	type res struct {
		evs []*dispatchv1.TaskEvent
		err error
	}
	got := make(chan res, 1)
	go func() {
		evs, err := tk.Log().Read(ctx, 3, nil)
		got <- res{evs, err}
	}()
	m.Drop(s.ID, "lease lost")
	r := <-got
	if r.err != nil || len(r.evs) != 1 || r.evs[0].GetSeq() != 4 {
		t.Fatalf("waiting watcher after the drop: %d events (first seq %d), %v; want seq 4 from the view", len(r.evs), func() uint64 {
			if len(r.evs) > 0 {
				return r.evs[0].GetSeq()
			}
			return 0
		}(), r.err)
	}
}

// heldSink keeps what is persisted until commit says it is durable.
type heldSink struct {
	mu      sync.Mutex
	pending []heldEvent
}

type heldEvent struct {
	c   eventlog.Committer
	seq uint64
}

func (*heldSink) WaitRoom(<-chan struct{}) {}
func (s *heldSink) Persist(c eventlog.Committer, _ string, ev *dispatchv1.TaskEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending = append(s.pending, heldEvent{c, ev.GetSeq()})
}
func (*heldSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}

// commit reports every persisted event up to seq durable.
func (s *heldSink) commit(seq uint64) {
	s.mu.Lock()
	var due []heldEvent
	kept := s.pending[:0]
	for _, p := range s.pending {
		if p.seq <= seq {
			due = append(due, p)
		} else {
			kept = append(kept, p)
		}
	}
	s.pending = kept
	s.mu.Unlock()
	for _, p := range due {
		p.c.Commit(p.seq)
	}
}

// A copy that lost its lease never runs a WhenDurable callback: the
// fenced store reports the refused records done, and a tool call held for
// its tool_call event would otherwise be invoked on the stale copy while
// the replica that took the task over runs it too.
func TestLeaseLogWhenDurableNotAfterTheLoss(t *testing.T) {
	sink := &heldSink{}
	own, err := eventlog.NewDurable(eventlog.Limits{}, sink).Create("t")
	if err != nil {
		t.Fatal(err)
	}
	l := newLeaseLog("t", own, &fakeFleet{})
	for range 2 {
		if _, err := own.Append(&dispatchv1.TaskEvent{TaskId: "t"}, eventlog.Capped); err != nil {
			t.Fatal(err)
		}
	}
	var got []uint64
	l.WhenDurable(1, func() { got = append(got, 1) })
	l.WhenDurable(2, func() { got = append(got, 2) })
	sink.commit(1)
	if len(got) != 1 || got[0] != 1 {
		t.Fatalf("after committing 1 with the lease held: %v, want [1]", got)
	}
	l.lose() // the loss is marked before the refused records are reported done
	sink.commit(2)
	if len(got) != 1 {
		t.Fatalf("after the loss: %v, want [1] (2's callback must not run)", got)
	}
}

// A copy Drop is still stopping (its runner has not ended yet) and that a
// new Adopt replaces ends when its runner does: Drop's clean-up, which
// waits for the copy's end, must not wait for ever (goleak) — a copy
// marked "forgotten, ends nothing" by the new Adopt left it waiting.
func TestFleetDroppedCopyReplacedByAnAdoptStillEnds(t *testing.T) {
	m, q, _, _ := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
	old, err := m.Adopt(s, 0, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	startOn(t, q, old)
	m.Drop(s.ID, "lease lost")
	s.Status = agentpb.TaskStatus_RUNNING
	if _, err := m.Adopt(s, 3, 0, false); err != nil {
		t.Fatal(err)
	}
	if !old.Finish(agentpb.TaskStatus_FAILURE, "its runner stopped", "") {
		t.Fatal("the dropped copy's runner could not end it")
	}
	select {
	case <-old.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("the dropped copy never ended")
	}
}

func (f *fakeFleet) keptCancels() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.kept)
}

// A client's cancel received by the replica that runs the task (CancelAs)
// is made durable for the task's next owner (Fleet.KeepCancel) once the
// stop was decided, never before it: a running task's and a queued one's.
// A command's cancel (Cancel, from the fleet: its row exists) is not kept
// again, nor is a second cancel. (The local cancel wrote nothing durable:
// the owner killed before the task's end was stored, the cancel was lost.)
func TestFleetLocalCancelIsKeptAfterTheStop(t *testing.T) {
	m, q, f, _ := newFleetManager(t)
	ctx := context.Background()
	adopt := func() *Task {
		s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "here", Planner: "chat", Status: agentpb.TaskStatus_PENDING, CreatedAt: time.Now()}}
		tk, err := m.Adopt(s, 0, 0, true)
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
	running := adopt()
	q.take(running)
	var keptAtStop []string
	r := &fakeRunner{t: running, onStop: func(*fakeRunner, string, dispatchv1.StopCode) { keptAtStop = f.keptCancels() }}
	if err := running.Start(r, "c1", "ses-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.CancelAs(ctx, tenant.Caller{Admin: true}, running.ID(), "by the client", false); err != nil {
		t.Fatal(err)
	}
	if len(keptAtStop) != 0 || !slices.Equal(f.keptCancels(), []string{running.ID()}) {
		t.Fatalf("kept before the stop %v, after %v; want none, then the task", keptAtStop, f.keptCancels())
	}
	if _, err := m.CancelAs(ctx, tenant.Caller{Admin: true}, running.ID(), "again", false); err != nil || len(f.keptCancels()) != 1 {
		t.Fatalf("a second cancel: %v, kept %v", err, f.keptCancels())
	}
	queued := adopt()
	if out, err := m.CancelAs(ctx, tenant.Caller{Admin: true}, queued.ID(), "", false); err != nil || queued.Status() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("cancel of a queued task: %+v %v", out, err)
	}
	if !slices.Equal(f.keptCancels(), []string{running.ID(), queued.ID()}) {
		t.Fatalf("kept %v, want the running and the queued task", f.keptCancels())
	}
	byCommand := adopt()
	q.take(byCommand)
	if err := byCommand.Start(&fakeRunner{t: byCommand}, "c1", "ses-2"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Cancel(ctx, byCommand.ID(), "by a command", false); err != nil || len(f.keptCancels()) != 2 {
		t.Fatalf("a command's cancel: %v, kept %v (its row exists)", err, f.keptCancels())
	}
}

// A task adopted with a stored stop that is a client's cancel has the
// cancel recorded (the fleet's reconcile does not carry it out again; a
// takeover ends it CANCELLED; it is never requeued); another stop does
// not make a cancel.
func TestAdoptedClientCancelStopIsACancelRequested(t *testing.T) {
	m, _, _, _ := newFleetManager(t)
	adopt := func(code dispatchv1.StopCode, reason string) *Task {
		s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
			CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}, Stop: &dispatchv1.StopSignal{Reason: reason, Code: code}}
		tk, err := m.AdoptWaiting(s, 3, 2)
		if err != nil {
			t.Fatal(err)
		}
		return tk
	}
	if reason, ok := adopt(dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL, "by the client").CancelRequested(); !ok || reason != "by the client" {
		t.Fatalf("client cancel stop: cancel requested %v %q", ok, reason)
	}
	if reason, ok := adopt(dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL, "").CancelRequested(); !ok || reason != DefaultCancelReason {
		t.Fatalf("client cancel stop without a reason: cancel requested %v %q", ok, reason)
	}
	if _, ok := adopt(dispatchv1.StopCode_STOP_CODE_DEADLINE, "deadline").CancelRequested(); ok {
		t.Fatal("a stop that is no client's cancel made a cancel requested")
	}
}

// A PENDING snapshot that still carries a client-cancel stop (written by
// an older build: Requeue kept the stop) adopted to run has no cancel
// recorded: Start clears its stop, and a recorded cancel would outlive it
// (a drain's hand-back or a requeue would end the running task CANCELLED).
func TestAdoptedPendingCopyWithAClientCancelStopHasNoCancelRequested(t *testing.T) {
	m, _, _, _ := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_PENDING,
		CreatedAt: time.Now()}, Stop: &dispatchv1.StopSignal{Reason: "old", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}}
	tk, err := m.Adopt(s, 2, 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if reason, ok := tk.CancelRequested(); ok {
		t.Fatalf("a PENDING copy's stored stop made a cancel requested (%q)", reason)
	}
}

// A fleet's Adopt never replaces a copy given a newer attempt (a re-attach
// took the task after the adopting claim): ErrNewerCopy, that copy stays
// registered and is not disowned. A copy of an older attempt is replaced.
// Each copy's records carry its own attempt (Snapshot.FenceToken), also
// after SetFenceToken moves it.
func TestFleetAdoptNeverReplacesACopyWithANewerAttempt(t *testing.T) {
	m, _, _, p := newFleetManager(t)
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING,
		CreatedAt: time.Now(), StartedAt: time.Now(), SessionID: "ses-1"}}
	newer, err := m.AdoptWaiting(s, 3, 5)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Adopt(s, 3, 4, false); !errors.Is(err, ErrNewerCopy) {
		t.Fatalf("adopt with an older attempt: %v, want ErrNewerCopy", err)
	}
	if m.Registry().Get(s.ID) != newer || newer.Disowned() || newer.FenceToken() != 5 {
		t.Fatal("the copy with the newer attempt was replaced or disowned")
	}
	newer.Resave()
	if got := p.last(s.ID).FenceToken; got != 5 {
		t.Fatalf("the newer copy's record carries %d, want 5", got)
	}
	newer.SetFenceToken(6)
	newer.Resave()
	if got := p.last(s.ID).FenceToken; got != 6 {
		t.Fatalf("after SetFenceToken(6) its record carries %d", got)
	}
	newest, err := m.Adopt(s, 3, 7, false)
	if err != nil || m.Registry().Get(s.ID) != newest || !newer.Disowned() {
		t.Fatalf("adopt with a newer attempt: %v (replaced: %v)", err, m.Registry().Get(s.ID) == newest)
	}
}

// A copy forgotten (Forget, ForgetCopy: the fleet moved its task away or
// replaced it) has lost its lease: a watcher holding its Log() never sees
// WhenDurable fire for what it records after (the store refuses it).
func TestFleetForgottenCopyLosesItsLease(t *testing.T) {
	for _, forget := range []struct {
		name string
		f    func(m *Manager, tk *Task)
	}{
		{"Forget", func(m *Manager, tk *Task) { m.Forget(tk.ID()) }},
		{"ForgetCopy", func(m *Manager, tk *Task) { m.ForgetCopy(tk) }},
	} {
		t.Run(forget.name, func(t *testing.T) {
			m, _, _, _ := newFleetManager(t)
			s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING, CreatedAt: time.Now()}}
			tk, err := m.Adopt(s, 2, 3, false)
			if err != nil {
				t.Fatal(err)
			}
			log := tk.Log()
			forget.f(m, tk)
			seq, err := tk.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Message: "after the forget"}}}, eventlog.Control)
			if err != nil {
				t.Fatal(err)
			}
			fired := make(chan struct{}, 1)
			log.WhenDurable(seq, func() { fired <- struct{}{} })
			select {
			case <-fired:
				t.Fatalf("WhenDurable fired for event %d of a forgotten copy", seq)
			case <-time.After(50 * time.Millisecond):
			}
		})
	}
}

// opaqueStore's logs hide the durable log they wrap (no Unwrap): they
// cannot carry a fencing token.
type opaqueStore struct{ *eventlog.Durable }

type opaqueLog struct{ eventlog.Log }

func (s opaqueStore) Restore(id string, lastSeq uint64, sealed bool) (eventlog.Log, error) {
	l, err := s.Durable.Restore(id, lastSeq, sealed)
	if err != nil {
		return nil, err
	}
	return opaqueLog{l}, nil
}

// A fleet copy whose log cannot carry the fencing token would have every
// record refused while it ran on: Adopt fails, SetFenceToken says so.
func TestFleetCopyWithoutFencingTokenIsRefused(t *testing.T) {
	p := &memPersist{saved: map[string]Snapshot{}}
	m := NewManager(opaqueStore{eventlog.NewDurable(eventlog.Limits{}, nowSink{})}, NewConfigStore(nil),
		ManagerOptions{DefaultPlanner: "chat", StopGrace: 100 * time.Millisecond, Persistence: p})
	m.SetQueue(&fakeQueue{})
	m.SetFleet(&fakeFleet{p: p, requests: map[string]string{}})
	s := Snapshot{Summary: Summary{ID: NewID(), Instruction: "x", Planner: "chat", Status: agentpb.TaskStatus_RUNNING, CreatedAt: time.Now()}}
	if tk, err := m.Adopt(s, 2, 3, false); !errors.Is(err, errNoFenceToken) || tk != nil || m.Registry().Get(s.ID) != nil {
		t.Fatalf("Adopt with attempt 3 of a log without a token: %v, %v, registered %v", tk, err, m.Registry().Get(s.ID) != nil)
	}
	tk, err := m.Adopt(s, 2, 0, false) // no fence: nothing to carry
	if err != nil {
		t.Fatal(err)
	}
	if err := tk.SetFenceToken(4); !errors.Is(err, errNoFenceToken) || tk.FenceToken() != 0 {
		t.Fatalf("SetFenceToken on a log without a token: %v, token %d", err, tk.FenceToken())
	}
}

// Client request ids are a tenant's own: bob's job-1 is not alice's (bob
// was answered alice's task, and could follow it).
func TestFleetRequestIDsAreScopedByTenant(t *testing.T) {
	m, _, f, _ := newFleetManager(t)
	labels := map[string]string{RequestIDLabel: "job-1"}
	alice, err := m.Submit(Spec{Instruction: "a", Caller: tenant.Caller{Tenant: "alice"}, Labels: labels})
	if err != nil {
		t.Fatal(err)
	}
	bob, err := m.Submit(Spec{Instruction: "b", Caller: tenant.Caller{Tenant: "bob"}, Labels: labels})
	if err != nil || bob.ID() == alice.ID() {
		t.Fatalf("bob's job-1: %v %v, alice's task %s", bob, err, alice.ID())
	}
	again, err := m.Submit(Spec{Instruction: "a", Caller: tenant.Caller{Tenant: "alice"}, Labels: labels})
	if err != nil || again.ID() != alice.ID() {
		t.Fatalf("alice's job-1 again: %v %v, want %s", again, err, alice.ID())
	}
	// The tenant is length-prefixed: ("ab", "c") and ("a", "bc") differ.
	if requestKey("ab", "c") == requestKey("a", "bc") {
		t.Fatal("request keys of different tenants collide")
	}
	if len(f.placed) != 2 {
		t.Fatalf("placed %v, want alice's and bob's", f.placed)
	}
}

package dispatcher

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/task"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newDispatcher(t *testing.T, cfg Config) *Dispatcher {
	t.Helper()
	d, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	return d
}

// A negative FlushInterval (the --event-flush-interval flag's 0) is kept:
// no pacing, not the default.
func TestNegativeFlushIntervalMeansNoPacing(t *testing.T) {
	d := newDispatcher(t, Config{Store: Store{FlushInterval: -1}})
	if got := d.Config().Store.FlushInterval; got >= 0 {
		t.Fatalf("FlushInterval %v: want it negative (no pacing)", got)
	}
}

// The zero Config is a working dispatcher with the documented defaults,
// and the components run with them.
func TestZeroConfigTakesDefaults(t *testing.T) {
	d := newDispatcher(t, Config{})
	c := d.Config()
	if c.Version != DefaultVersion || c.GRPC.MaxRecvMsgBytes != DefaultMaxRecvMsgBytes || c.GRPC.StreamWindowBytes != DefaultStreamWindow ||
		c.GRPC.Keepalive != DefaultKeepalive || c.Limits.QueueSize != DefaultQueueSize || c.Limits.MaxTasksKept != DefaultMaxTasksKept ||
		c.Limits.Events != DefaultEventLimits || c.Tasks.DefaultPlanner != DefaultPlanner || c.Tasks.StopGrace != DefaultStopGrace ||
		c.Tasks.ToolTimeout != DefaultToolTimeout || c.Policy.Poll != DefaultPolicyPoll || c.Store.FlushInterval != DefaultFlushInterval ||
		c.Logger == nil {
		t.Fatalf("config with defaults %+v", c)
	}
	// The documented figures (cmd/dispatcher's flags show them).
	if DefaultStopGrace != 2*time.Second || DefaultPlanner != "chat" || DefaultQueueSize != 1024 || DefaultMaxTasksKept != 10_000 {
		t.Fatal("a documented default changed")
	}
	tk, err := d.Tasks().Submit(task.Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if tk.Planner() != DefaultPlanner {
		t.Fatalf("planner %q, want the default %q", tk.Planner(), DefaultPlanner)
	}
	if !d.Serving(t.Context()) {
		t.Fatal("a new dispatcher is not serving")
	}
}

// Values given win over the defaults and reach the components.
func TestConfigReachesComponents(t *testing.T) {
	d := newDispatcher(t, Config{Limits: Limits{QueueSize: 2}, Tasks: Tasks{DefaultPlanner: "gui"}, Store: Store{Retention: time.Hour}})
	if c := d.Config(); c.Limits.QueueSize != 2 || c.Tasks.DefaultPlanner != "gui" || c.Store.Retention != time.Hour {
		t.Fatalf("config %+v", c)
	}
	for i := range 2 {
		tk, err := d.Tasks().Submit(task.Spec{Instruction: "x"})
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		if tk.Planner() != "gui" {
			t.Fatalf("planner %q", tk.Planner())
		}
	}
	if _, err := d.Tasks().Submit(task.Spec{Instruction: "x"}); !errors.Is(err, scheduler.ErrQueueFull) {
		t.Fatalf("third submit into a queue of 2: %v", err)
	}
}

// OnEvent sees every event recorded on a task of this run, seq set.
func TestOnEventObservesRecordedEvents(t *testing.T) {
	var mu sync.Mutex
	var seen []*dispatchv1.TaskEvent
	d := newDispatcher(t, Config{OnEvent: func(ev *dispatchv1.TaskEvent) {
		mu.Lock()
		seen = append(seen, ev)
		mu.Unlock()
	}})
	tk, err := d.Tasks().Submit(task.Spec{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) == 0 || seen[0].GetTaskId() != tk.ID() || seen[0].GetSeq() == 0 ||
		seen[0].GetState().GetStatus() != agentpb.TaskStatus_PENDING {
		t.Fatalf("observed %v", seen)
	}
}

// A policy that fails at start is an error (the dispatcher does not run
// without the policy it was given).
func TestBrokenPolicyFileRefusesStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.yaml")
	src := "rules:\n  - {id: a, phrases: [x], action: stop}\ntests:\n  - {packets: [{kind: content, text: x}], expect: {action: allow}}\n"
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(Config{Policy: Policy{File: path}})
	if err == nil || !strings.Contains(err.Error(), "got stop") {
		t.Fatalf("error %v", err)
	}
}

// Drain turns health NOT_SERVING, refuses new tasks, ends the stream
// contexts with ErrShuttingDown, and gives watchers a bounded time to
// finish.
func TestDrain(t *testing.T) {
	d := newDispatcher(t, Config{})
	ctx, cancel := d.StreamContext(t.Context())
	defer cancel()
	d.Watchers().Add(1) // a watcher that never ends
	if h := d.HealthText(t.Context()); h != "" {
		t.Fatalf("health text %q before Drain, want none", h)
	}
	start := time.Now()
	dctx, dcancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer dcancel()
	d.Drain(dctx)
	if took := time.Since(start); took < watcherDrainWait {
		t.Fatalf("Drain returned after %s without waiting for the watcher (up to %s)", took, watcherDrainWait)
	}
	select {
	case <-ctx.Done():
		if !errors.Is(context.Cause(ctx), ErrShuttingDown) {
			t.Fatalf("stream context cause %v", context.Cause(ctx))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("stream context still open after Drain")
	}
	if d.Serving(t.Context()) {
		t.Fatal("serving after Drain")
	}
	if h := d.HealthText(t.Context()); h != "draining" {
		t.Fatalf("health text %q after Drain, want draining", h)
	}
	if _, err := d.Tasks().Submit(task.Spec{Instruction: "x"}); !errors.Is(err, task.ErrClosed) {
		t.Fatalf("submit after Drain: %v", err)
	}
	d.Close() // after Drain: harmless
}

// A stream context ended by its caller leaves the dispatcher alone.
func TestStreamContextCancelledByCaller(t *testing.T) {
	d := newDispatcher(t, Config{})
	ctx, cancel := d.StreamContext(t.Context())
	cancel()
	if !errors.Is(context.Cause(ctx), context.Canceled) {
		t.Fatalf("cause %v", context.Cause(ctx))
	}
	if !d.Serving(t.Context()) {
		t.Fatal("not serving")
	}
}

// With a store, a policy file and retention, New starts the store writer,
// the policy watch and retention; Close stops all of them before it
// returns (goleak checks no goroutine is left once the store is closed).
func TestCloseStopsBackgroundWork(t *testing.T) {
	dir := t.TempDir()
	st, err := sqlite.Open(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(path, []byte("rules:\n  - {id: a, phrases: [x], action: stop}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := New(Config{
		Policy: Policy{File: path, Poll: time.Millisecond},
		Store:  Store{Backend: st, Retention: time.Hour},
	})
	if err != nil {
		t.Fatal(err)
	}
	if d.Policy().Current().NumRules() != 1 {
		t.Fatal("policy not loaded")
	}
	if _, err := d.Tasks().Submit(task.Spec{Instruction: "x"}); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	goleak.VerifyNone(t)

	// The next run finds the task the first one stored before Close.
	st2, err := sqlite.Open(t.Context(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st2.Close() }) // after d2.Close (cleanups run last first)
	d2 := newDispatcher(t, Config{Store: Store{Backend: st2}})
	infos, _, err := d2.Tasks().List(t.Context(), nil, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 {
		t.Fatalf("restored %d tasks, want 1", len(infos))
	}
}

func TestFleetNeedsThePostgresStore(t *testing.T) {
	if d, err := New(Config{Fleet: Fleet{RedisURL: "redis://127.0.0.1:1/0"}}); err == nil {
		d.Close()
		t.Fatal("a fleet without the postgres store was accepted")
	}
}

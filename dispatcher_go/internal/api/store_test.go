package api

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func openSQLite(t *testing.T, dir string) store.Store {
	t.Helper()
	st, err := sqlite.Open(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// storeHarness is a harness with cfg whose store is the SQLite database in
// dir: crash it, and another storeHarness on dir is the dispatcher after a
// restart.
func storeHarness(t *testing.T, dir string, cfg dispatcher.Config) (*harness, context.Context) {
	t.Helper()
	cfg.Store.Backend = openSQLite(t, dir)
	h, ctx := newHarness(t, cfg)
	h.store = cfg.Store.Backend
	return h, ctx
}

// crash ends h as a crash would, minus the process: no drain. Its store is
// closed.
func (h *harness) crash() {
	_ = h.conn.Close()
	h.d.Close()
	h.g.Server.Stop()
	_ = h.store.Close()
}

// TestStoreContinuationAndConfigAcrossRestart: a task that continues a
// task of the previous run gets its conversation from the store; the global
// config comes back, its secret usable by commanders (sealed with the key)
// and masked for clients; finished tasks and their events are served from
// the store.
func TestStoreContinuationAndConfigAcrossRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := []byte("k")
	h1, ctx := storeHarness(t, dir, dispatcher.Config{Store: dispatcher.Store{SecretKey: key}})
	if _, err := h1.agent.SetGlobalCommonLLMConfig(ctx, &agentpb.SetGlobalCommonLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "gpt", ApiKey: proto.String("sk-global-secret-abcd")}}); err != nil {
		t.Fatal(err)
	}
	c := testutil.Connect(t, ctx, h1.conn, "planner:chat")
	r, err := h1.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "what is 1+1?"})
	if err != nil {
		t.Fatal(err)
	}
	playChat(t, c, "2")
	first := r.GetTaskId()
	waitStatus(t, h1, first, agentpb.TaskStatus_SUCCESS)
	lastSeq := storeGetTask(t, h1, first).GetLastSeq()
	h1.crash()

	h2, _ := storeHarness(t, dir, dispatcher.Config{Store: dispatcher.Store{SecretKey: key}})
	g, err := h2.agent.GetGlobalCommonConfig(ctx, &agentpb.GetGlobalCommonConfigRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if k := g.GetStageModelConfig().GetActionGeneratorModel().GetApiKey(); k != "****abcd" {
		t.Fatalf("global api key read back as %q", k)
	}
	got := storeGetTask(t, h2, first)
	if got.GetStatus() != agentpb.TaskStatus_SUCCESS || got.GetResult() != "2" || got.GetLastSeq() != lastSeq {
		t.Fatalf("finished task after restart: %v", got)
	}
	// Its events, from the store, to the end.
	evs := watchAll(t, h2, first, 0)
	for i, ev := range evs {
		if ev.GetSeq() != uint64(i+1) {
			t.Fatalf("event %d has seq %d", i+1, ev.GetSeq())
		}
	}
	if uint64(len(evs)) != lastSeq {
		t.Fatalf("watched %d events, want %d", len(evs), lastSeq)
	}

	c2 := testutil.Connect(t, ctx, h2.conn, "planner:chat")
	if _, err := h2.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "and times 3?", PreviousTaskId: first}); err != nil {
		t.Fatal(err)
	}
	_, start := c2.Start()
	hist := start.GetHistory()
	if len(hist) != 2 || hist[0].GetContent() != "what is 1+1?" || hist[1].GetRole() != "assistant" || hist[1].GetContent() != "2" {
		t.Fatalf("history after restart: %v", hist)
	}
	if k := start.GetConfig().GetStageModelConfig().GetActionGeneratorModel().GetApiKey(); k != "sk-global-secret-abcd" {
		t.Fatalf("commander got api key %q after restart", k)
	}
}

// TestStoreWithoutKeyDropsSecrets: without DISPATCHER_SECRET_KEY secrets
// are not stored at all, so after a restart there is none to hand out.
func TestStoreWithoutKeyDropsSecrets(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	h1, ctx := storeHarness(t, dir, dispatcher.Config{})
	if _, err := h1.agent.SetGlobalCommonLLMConfig(ctx, &agentpb.SetGlobalCommonLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "gpt", ApiKey: proto.String("sk-global-secret-abcd")}}); err != nil {
		t.Fatal(err)
	}
	h1.crash()
	h2, _ := storeHarness(t, dir, dispatcher.Config{})
	g, err := h2.agent.GetGlobalCommonConfig(ctx, &agentpb.GetGlobalCommonConfigRequest{})
	if err != nil {
		t.Fatal(err)
	}
	m := g.GetStageModelConfig().GetActionGeneratorModel()
	if m.GetModelName() != "gpt" || m.GetApiKey() != "" {
		t.Fatalf("after restart without key: %v", m)
	}
}

// TestStoreRetentionRemovesOldTasks: a finished task older than the
// retention is gone from the store.
func TestStoreRetentionRemovesOldTasks(t *testing.T) {
	t.Parallel()
	h, ctx := storeHarness(t, t.TempDir(), dispatcher.Config{Store: dispatcher.Store{Retention: 50 * time.Millisecond}})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	r, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	playChat(t, c, "y")
	waitStatus(t, h, r.GetTaskId(), agentpb.TaskStatus_SUCCESS)
	testutil.WaitFor(t, testutil.Wait, func() bool {
		_, err := h.store.GetTask(ctx, r.GetTaskId())
		return errors.Is(err, store.ErrNotFound)
	}, "task removed from the store by retention")
	if n, _ := h.store.LastSeq(ctx, r.GetTaskId()); n != 0 {
		t.Fatalf("%d events left", n)
	}
}

// eventsSeen collects what an OnEvent observer (metrics) sees, per task.
type eventsSeen struct {
	mu   sync.Mutex
	byID map[string][]*dispatchv1.TaskEvent
}

func (e *eventsSeen) observe(ev *dispatchv1.TaskEvent) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.byID == nil {
		e.byID = make(map[string][]*dispatchv1.TaskEvent)
	}
	e.byID[ev.GetTaskId()] = append(e.byID[ev.GetTaskId()], ev)
}

// states are the statuses of the state events seen of task id.
func (e *eventsSeen) states(id string) []agentpb.TaskStatus {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []agentpb.TaskStatus
	for _, ev := range e.byID[id] {
		if s := ev.GetState(); s != nil {
			out = append(out, s.GetStatus())
		}
	}
	return out
}

// TestStoreRequeuedTaskIsObserved: a task still queued when the dispatcher
// stopped is queued again after the restart and observed (metrics) like a
// new task, from its requeue to its end.
func TestStoreRequeuedTaskIsObserved(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	h1, ctx := storeHarness(t, dir, dispatcher.Config{})
	r, err := h1.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "queued across a restart"})
	if err != nil {
		t.Fatal(err)
	}
	id := r.GetTaskId()
	h1.crash()

	seen := &eventsSeen{}
	h2, _ := storeHarness(t, dir, dispatcher.Config{OnEvent: seen.observe})
	if got := seen.states(id); !slices.Equal(got, []agentpb.TaskStatus{agentpb.TaskStatus_PENDING}) {
		t.Fatalf("observed states after the restart %v, want the requeue", got)
	}
	c := testutil.Connect(t, ctx, h2.conn, "planner:chat")
	playChat(t, c, "done")
	want := []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_SUCCESS}
	testutil.WaitFor(t, testutil.Wait, func() bool { return slices.Equal(seen.states(id), want) }, "observed states %v", want)
}

func storeGetTask(t *testing.T, h *harness, id string) *dispatchv1.Task {
	t.Helper()
	r, err := h.tasks.GetTask(testutil.Context(t, testTimeout), &dispatchv1.GetTaskRequest{TaskId: id})
	if err != nil {
		t.Fatal(err)
	}
	return r.GetTask()
}

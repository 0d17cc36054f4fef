package mcp

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// fakeTasks is a task API whose one task plays the events sent on events
// and ends with the state it is given (or when cancelled).
type fakeTasks struct {
	events    chan *dispatchv1.TaskEvent
	mu        sync.Mutex
	submitted []*dispatchv1.SubmitTaskRequest
	cancelled chan string
	final     agentpb.TaskStatus
	result    string
}

func newFakeTasks() *fakeTasks {
	return &fakeTasks{events: make(chan *dispatchv1.TaskEvent), cancelled: make(chan string, 1), final: agentpb.TaskStatus_SUCCESS}
}

func (f *fakeTasks) SubmitTask(_ context.Context, r *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.submitted = append(f.submitted, r)
	return &dispatchv1.SubmitTaskResponse{TaskId: "t1"}, nil
}

func (f *fakeTasks) GetTask(_ context.Context, r *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error) {
	return &dispatchv1.GetTaskResponse{Task: &dispatchv1.Task{TaskId: r.GetTaskId(), Status: f.final, Result: f.result}}, nil
}

func (f *fakeTasks) CancelTask(_ context.Context, r *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error) {
	f.cancelled <- r.GetTaskId()
	return &dispatchv1.CancelTaskResponse{Cancelled: true}, nil
}

func (f *fakeTasks) Watch(ctx context.Context, id string, _ uint64, fn func(*dispatchv1.TaskEvent) error) error {
	if id != "t1" {
		return status.Error(codes.NotFound, "no such task")
	}
	for {
		select {
		case ev, ok := <-f.events:
			if !ok {
				return nil
			}
			if err := fn(ev); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func serve(t *testing.T, f *fakeTasks, pol policy.Source) *sdk.ClientSession {
	t.Helper()
	return serveVersion(t, f, pol, "")
}

// serveVersion connects with protocol version v ("": the SDK's latest).
func serveVersion(t *testing.T, f *fakeTasks, pol policy.Source, v string) *sdk.ClientSession {
	t.Helper()
	b := newBroker(t)
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: f, Tools: b, Policy: pol}))
	t.Cleanup(hs.Close)
	c := sdk.NewClient(&sdk.Implementation{Name: "test", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &sdk.StreamableClientTransport{Endpoint: hs.URL}, &sdk.ClientSessionOptions{ProtocolVersion: v})
	if err != nil {
		t.Fatal(err)
	}
	if got := cs.InitializeResult().ProtocolVersion; v != "" && got != v {
		t.Fatalf("protocol %s, want %s", got, v)
	}
	t.Cleanup(func() { _ = cs.Close() })
	return cs
}

func text(r *sdk.CallToolResult) string {
	var parts []string
	for _, c := range r.Content {
		if tc, ok := c.(*sdk.TextContent); ok {
			parts = append(parts, tc.Text)
		}
	}
	return strings.Join(parts, "")
}

func TestServerListsAndCallsBrokeredTools(t *testing.T) {
	eng := policy.NewEngine(nil)
	if _, err := eng.Load([]byte("version: 1\nrules:\n  - {id: no-echo, when: 'tool_name == \"echo\"', action: deny, reason: echo is off}\n")); err != nil {
		t.Fatal(err)
	}
	cs := serve(t, newFakeTasks(), eng)
	ctx := context.Background()
	lt, err := cs.ListTools(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, tl := range lt.Tools {
		names = append(names, tl.Name)
	}
	for _, want := range []string{RunTaskTool, "calculator", "sleep", "echo", "time_now"} {
		if !slices.Contains(names, want) {
			t.Errorf("tools %v lack %s", names, want)
		}
	}
	r, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: "calculator", Arguments: map[string]any{"expression": "6*7"}})
	if err != nil || r.IsError || !strings.Contains(text(r), `"result":42`) {
		t.Errorf("calculator: %v %+v", err, r)
	}
	r, err = cs.CallTool(ctx, &sdk.CallToolParams{Name: "calculator", Arguments: map[string]any{"expr": "1"}})
	if err != nil || !r.IsError || !strings.HasPrefix(text(r), "INVALID_ARGUMENTS") {
		t.Errorf("bad arguments: %v %+v", err, r)
	}
	r, err = cs.CallTool(ctx, &sdk.CallToolParams{Name: "echo", Arguments: map[string]any{"x": 1}})
	if err != nil || !r.IsError || !strings.Contains(text(r), "no-echo") {
		t.Errorf("a denied tool: %v %s", err, text(r))
	}
}

func TestRunTaskProgressAndResult(t *testing.T) {
	f := newFakeTasks()
	f.result = "the answer"
	var mu sync.Mutex
	var progress []string
	got := make(chan struct{}, 16)
	c := sdk.NewClient(&sdk.Implementation{Name: "p", Version: "1"}, &sdk.ClientOptions{
		ProgressNotificationHandler: func(_ context.Context, r *sdk.ProgressNotificationClientRequest) {
			mu.Lock()
			progress = append(progress, r.Params.Message)
			mu.Unlock()
			got <- struct{}{}
		},
	})
	b := newBroker(t)
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: f, Tools: b}))
	defer hs.Close()
	pcs, err := c.Connect(context.Background(), &sdk.StreamableClientTransport{Endpoint: hs.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pcs.Close()

	res := make(chan *sdk.CallToolResult, 1)
	go func() {
		p := &sdk.CallToolParams{Name: RunTaskTool, Arguments: map[string]any{"instruction": "do it", "planner": "chat", "labels": map[string]string{"a": "b"}}}
		p.SetProgressToken("tok")
		r, err := pcs.CallTool(context.Background(), p)
		if err != nil {
			t.Error(err)
		}
		res <- r
	}()
	testutil.Recv(t, got, testutil.Wait, "progress 0")
	f.events <- &dispatchv1.TaskEvent{Seq: 1, Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING}}}
	testutil.Recv(t, got, testutil.Wait, "progress 1")
	f.events <- &dispatchv1.TaskEvent{Seq: 2, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "the answer"}}}
	testutil.Recv(t, got, testutil.Wait, "progress 2")
	close(f.events)
	r := testutil.Recv(t, res, testutil.Wait, "run_task's result")
	if r == nil || r.IsError || text(r) != "the answer" {
		t.Fatalf("result %+v", r)
	}
	var sc map[string]any
	raw, _ := json.Marshal(r.StructuredContent)
	_ = json.Unmarshal(raw, &sc)
	if sc["task_id"] != "t1" || sc["status"] != "success" {
		t.Errorf("structured %v", sc)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(progress, []string{"task t1", "status running", "content: the answer"}) {
		t.Errorf("progress %q", progress)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.submitted[0]; s.GetInstruction() != "do it" || s.GetPlanner() != "chat" || s.GetLabels()["a"] != "b" {
		t.Errorf("submitted %v", s)
	}
}

// The client giving up the call (its context: the request's stream
// closes) cancels the task.
func TestRunTaskCancelledByTheClient(t *testing.T) {
	// 2026-07-28: the request is the call; 2025-11-25: a stateless server
	// sees only the request's stream close (the notifications/cancelled
	// POST reaches no session).
	for _, v := range []string{"2026-07-28", "2025-11-25"} {
		t.Run(v, func(t *testing.T) { testRunTaskCancelled(t, v) })
	}
}

func testRunTaskCancelled(t *testing.T, v string) {
	f := newFakeTasks()
	cs := serveVersion(t, f, nil, v)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := cs.CallTool(ctx, &sdk.CallToolParams{Name: RunTaskTool, Arguments: map[string]any{"instruction": "wait"}})
		done <- err
	}()
	f.events <- &dispatchv1.TaskEvent{Seq: 1, Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING}}}
	cancel()
	if id := testutil.Recv(t, f.cancelled, testutil.Wait, "CancelTask"); id != "t1" {
		t.Errorf("cancelled %q", id)
	}
	if err := testutil.Recv(t, done, testutil.Wait, "the call's end"); err == nil {
		t.Error("a cancelled call succeeded")
	}
}

func TestRunTaskBadArguments(t *testing.T) {
	cs := serve(t, newFakeTasks(), nil)
	for _, args := range []map[string]any{{}, {"instruction": " "}, {"instruction": "x", "bogus": 1}} {
		r, err := cs.CallTool(context.Background(), &sdk.CallToolParams{Name: RunTaskTool, Arguments: args})
		if err != nil || !r.IsError {
			t.Errorf("%v: %v %+v", args, err, r)
		}
	}
}

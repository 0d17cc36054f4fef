package metrics_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/metrics"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// scrape returns /metrics as text.
func scrape(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("scrape: %d %s", resp.StatusCode, b)
	}
	return string(b)
}

// value finds the sample of name whose labels include every one of labels
// (`key="value"`); -1 if there is none.
func value(text, name string, labels ...string) float64 {
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "#") {
			continue
		}
		rest, ok := strings.CutPrefix(line, name)
		if !ok || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		i := strings.LastIndexByte(rest, ' ')
		if i < 0 {
			continue
		}
		lbls, v := rest[:i], rest[i+1:]
		match := true
		for _, l := range labels {
			if !strings.Contains(lbls, l) {
				match = false
				break
			}
		}
		if match {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

// TestScrapeAfterTasks runs a task with a tool call, a denied call and a
// cancelled task, then finds in /metrics the counters they moved.
func TestScrapeAfterTasks(t *testing.T) {
	policyFile := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(policyFile, []byte("rules:\n  - id: no-echo\n    when: tool_name == \"echo\"\n    action: deny\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m := metrics.New()
	d, err := dispatcher.New(dispatcher.Config{Policy: dispatcher.Policy{File: policyFile}, Tasks: dispatcher.Tasks{StopGrace: time.Second}, OnEvent: m.ObserveEvent})
	if err != nil {
		t.Fatal(err)
	}
	srv := api.New(d)
	g := testutil.ServeGRPC(t, func(gs *grpc.Server) {
		srv.Register(gs)
		m.InitializeGRPC(gs)
	}, append(m.ServerOptions(), srv.ServerOptions()...)...)
	g.OnStop(d.Close)
	m.Watch(metrics.Sources{Tasks: d.Tasks(), Scheduler: d.Scheduler(), Sessions: d.Sessions(), Policy: d.Policy()})
	hs := httptest.NewServer(m.Handler())
	t.Cleanup(hs.Close)
	ctx := testutil.Context(t, 20*time.Second)

	tasks := dispatchv1.NewTaskServiceClient(g.Conn)
	c := testutil.Connect(t, ctx, g.Conn, "planner:chat")

	before := scrape(t, hs.URL)
	if v := value(before, "dispatcher_slots"); v != 1 {
		t.Fatalf("dispatcher_slots %v", v)
	}

	// Task 1: a calculator call, a denied echo, an answer, SUCCESS.
	if _, err := tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "add"}); err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"1+1"}`}))
	c.Recv() // result
	c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "k2", ToolName: "echo", ArgumentsJson: `{"text":"x"}`}))
	if r := c.Recv().GetToolResult(); r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
		t.Fatalf("echo not denied: %v", r)
	}
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "2"}))
	c.Send(testutil.Up(sid, testutil.Success("2")))
	c.Recv() // session closed

	// Task 2: cancelled while running; the commander acks the stop.
	sub, err := tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "wait"})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ = c.Start()
	done := testutil.Async(func() (*dispatchv1.CancelTaskResponse, error) {
		return tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId()})
	})
	if c.Recv().GetStop() == nil {
		t.Fatal("want stop")
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	if r := testutil.Recv(t, done, testutil.Wait, "CancelTask to return"); r.Err != nil {
		t.Fatal(r.Err)
	}
	c.Recv() // session closed
	if r, err := tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: sub.GetTaskId()}); err != nil || r.GetTask().GetStatus() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("task 2: %v %v", r, err)
	}

	text := scrape(t, hs.URL)
	checks := []struct {
		name   string
		labels []string
		want   func(float64) bool
	}{
		{"grpc_server_msg_received_total", []string{`grpc_method="ChatStream"`}, func(v float64) bool { return v == 6 }}, // hello, 2 tool calls, content, result, stopped
		{"grpc_server_handled_total", []string{`grpc_method="SubmitTask"`, `grpc_code="OK"`}, func(v float64) bool { return v == 2 }},
		{"grpc_server_started_total", []string{`grpc_method="CancelTask"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_tasks_submitted_total", nil, func(v float64) bool { return v == 2 }},
		{"dispatcher_tasks_ended_total", []string{`status="success"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_tasks_ended_total", []string{`status="cancelled"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_tasks", []string{`status="success"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_tasks", []string{`status="running"`}, func(v float64) bool { return v == 0 }},
		{"dispatcher_queue_depth", nil, func(v float64) bool { return v == 0 }},
		{"dispatcher_slots", nil, func(v float64) bool { return v == 1 }},
		{"dispatcher_slots_idle", nil, func(v float64) bool { return v == 1 }},
		{"dispatcher_task_events_total", []string{`kind="content"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_task_events_total", []string{`kind="tool_call"`}, func(v float64) bool { return v == 2 }},
		{"dispatcher_tool_call_duration_seconds_count", []string{`tool="calculator"`, `outcome="ok"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_tool_call_duration_seconds_count", []string{`tool="echo"`, `outcome="denied"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_policy_decisions_total", []string{`action="deny"`, `outcome="none"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_policy_evaluations_total", nil, func(v float64) bool { return v >= 3 }},
		{"dispatcher_stop_latency_seconds_count", nil, func(v float64) bool { return v == 1 }},
		{"dispatcher_stop_latency_seconds_bucket", []string{`le="+Inf"`}, func(v float64) bool { return v == 1 }},
		{"dispatcher_stops_total", []string{`result="acked"`}, func(v float64) bool { return v == 1 }},
	}
	for _, c := range checks {
		if v := value(text, c.name, c.labels...); !c.want(v) {
			t.Errorf("%s%v = %v", c.name, c.labels, v)
		}
	}
	if value(before, "grpc_server_handled_total", `grpc_method="SubmitTask"`, `grpc_code="OK"`) != 0 {
		t.Error("SubmitTask series not pre-initialized at zero")
	}
	if t.Failed() {
		t.Log(text)
	}
}

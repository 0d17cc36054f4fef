package metrics_test

import (
	"context"
	"io"
	"net"
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
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/metrics"
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

func up(sid string, p *dispatchv1.UpstreamPacket) *dispatchv1.UpstreamPacket {
	p.SessionId = sid
	p.Timestamp = time.Now().UnixMicro()
	return p
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
	gs := grpc.NewServer(append(m.ServerOptions(), srv.ServerOptions()...)...)
	srv.Register(gs)
	m.InitializeGRPC(gs)
	m.Watch(metrics.Sources{Tasks: d.Tasks(), Scheduler: d.Scheduler(), Sessions: d.Sessions(), Policy: d.Policy()})
	lis := bufconn.Listen(1 << 20)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(m.Handler())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(func() {
		cancel()
		hs.Close()
		conn.Close()
		d.Close()
		gs.Stop()
	})

	tasks := dispatchv1.NewTaskServiceClient(conn)
	chat, err := dispatchv1.NewAgentInteractionClient(conn).ChatStream(ctx)
	if err != nil {
		t.Fatal(err)
	}
	send := func(p *dispatchv1.UpstreamPacket) {
		if err := chat.Send(p); err != nil {
			t.Fatal(err)
		}
	}
	recv := func() *dispatchv1.DownstreamPacket {
		p, err := chat.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{CommanderId: "c", Capabilities: []string{"planner:chat"}}}})
	recv() // hello ack

	before := scrape(t, hs.URL)
	if v := value(before, "dispatcher_slots"); v != 1 {
		t.Fatalf("dispatcher_slots %v", v)
	}

	// Task 1: a calculator call, a denied echo, an answer, SUCCESS.
	if _, err := tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "add"}); err != nil {
		t.Fatal(err)
	}
	start := recv()
	sid := start.GetSessionId()
	send(up(sid, &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"1+1"}`}}}))
	recv() // result
	send(up(sid, &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_ToolCall{ToolCall: &dispatchv1.ToolCallRequest{CallId: "k2", ToolName: "echo", ArgumentsJson: `{"text":"x"}`}}}))
	if r := recv().GetToolResult(); r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_DENIED {
		t.Fatalf("echo not denied: %v", r)
	}
	send(up(sid, &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Content{Content: &dispatchv1.ContentChunk{Text: "2"}}}))
	send(up(sid, &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Result{Result: &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "2"}}}))
	recv() // session closed

	// Task 2: cancelled while running; the commander acks the stop.
	sub, err := tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "wait"})
	if err != nil {
		t.Fatal(err)
	}
	sid = recv().GetSessionId()
	done := make(chan error, 1)
	go func() {
		_, err := tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId()})
		done <- err
	}()
	if recv().GetStop() == nil {
		t.Fatal("want stop")
	}
	send(up(sid, &dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Stopped{Stopped: &dispatchv1.Stopped{Reason: "ok"}}}))
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	recv() // session closed
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

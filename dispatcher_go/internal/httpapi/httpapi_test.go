package httpapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// waitStatus polls the seed status endpoint until the task has status.
func (e *env) waitStatus(id, token, want string) map[string]any {
	e.t.Helper()
	var st map[string]any
	testutil.WaitFor(e.t, wait, func() bool {
		st = nil
		e.do("GET", "/api/agent/task/status/"+id, token, "", &st)
		return st["status"] == want
	}, "task %s to be %s", id, want)
	return st
}

func TestHealthIsOpenAndAPINeedsToken(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{Auth: dispatcher.Auth{ClientToken: "secret"}}, Options{})
	var h map[string]string
	if r := e.do("GET", "/api/health", "", "", &h); r.StatusCode != 200 || h["status"] != "ok" {
		t.Fatalf("health %d %v", r.StatusCode, h)
	}
	var eb errorBody
	r := e.do("GET", "/api/tasks", "", "", &eb)
	if r.StatusCode != http.StatusUnauthorized || eb.Code != "UNAUTHENTICATED" || r.Header.Get("WWW-Authenticate") == "" {
		t.Fatalf("no token: %d %+v", r.StatusCode, eb)
	}
	if r := e.do("GET", "/api/tasks", "wrong", "", &eb); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("wrong token: %d", r.StatusCode)
	}
	if r := e.do("GET", "/api/tasks", "secret", "", nil); r.StatusCode != 200 {
		t.Fatalf("with token: %d", r.StatusCode)
	}
	// The cookie is accepted on GET (EventSource) but never on a POST.
	get, _ := http.NewRequest("GET", e.url+"/api/tasks", nil)
	get.AddCookie(&http.Cookie{Name: TokenCookie, Value: "secret"})
	post, _ := http.NewRequest("POST", e.url+"/api/agent/task/submit", strings.NewReader(`{"instruction":"x"}`))
	post.AddCookie(&http.Cookie{Name: TokenCookie, Value: "secret"})
	for req, want := range map[*http.Request]int{get: 200, post: 401} {
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Errorf("%s with cookie: %d, want %d", req.Method, resp.StatusCode, want)
		}
	}
	// The page itself is open: it holds no data.
	if r := e.do("GET", "/", "", "", nil); r.StatusCode != 200 || !strings.HasPrefix(r.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("page: %d %s", r.StatusCode, r.Header.Get("Content-Type"))
	}
}

// TestBadInputIs4xxJSON: bad JSON, wrong types, oversized bodies, unknown
// ids and endpoints are 4xx with a JSON error, never a 500.
func TestBadInputIs4xxJSON(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{MaxBodyBytes: 1024})
	big := `{"instruction":"` + strings.Repeat("x", 2000) + `"}`
	cases := []struct {
		method, path, body string
		want               int
	}{
		{"POST", "/api/agent/task/submit", `{"instruction":`, 400},
		{"POST", "/api/agent/task/submit", `not json`, 400},
		{"POST", "/api/agent/task/submit", `[1,2]`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": 5}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x", "max_steps": "ten"}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x", "authentication": "key"}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x"} {}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": ""}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x", "max_steps": -1}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x", "continue_context": true}`, 400},
		{"POST", "/api/agent/task/submit", `{"instruction": "x", "continue_context": true, "task_id": "nope"}`, 404}, // as another tenant's task (issue 12 class 7)
		{"POST", "/api/agent/task/submit", big, 413},
		{"POST", "/api/agent/run", `{"instruction": 1}`, 400},
		{"POST", "/api/agent/run", big, 413},
		{"POST", "/api/tasks", `{"instruction": "x", "bogus": 1}`, 400},
		{"POST", "/api/tasks", `{"instruction": "x", "timeout_seconds": "soon"}`, 400},
		{"POST", "/api/tasks", `{"instruction": "x", "planner": "a\u0000b"}`, 400},
		{"POST", "/api/tasks", `{"instruction": "x", "policy_yaml": "rules: [oops"}`, 400},
		{"GET", "/api/agent/task/status/nope", "", 404},
		{"POST", "/api/agent/cancel", `{"task_id": "nope"}`, 404},
		{"POST", "/api/agent/cancel", `{"task_id": 7}`, 400},
		{"GET", "/api/tasks/nope", "", 404},
		{"GET", "/api/tasks/nope/events", "", 404},
		{"GET", "/api/tasks?status=BOGUS", "", 400},
		{"GET", "/api/tasks?page_size=x", "", 400},
		{"GET", "/api/tasks?page_token=zzz", "", 400},
		{"GET", "/api/tasks?page_token=%%%", "", 400},                          // was the first page
		{"POST", "/api/agent/task/submit", "{\"instruction\": \"\xff\"}", 400}, // was stored as U+FFFD
		{"POST", "/api/tasks", "{\"instruction\": \"\xc3\x28\"}", 400},
		{"GET", "/api/tasks/nope/events?after_seq=%zz", "", 400},
		{"POST", "/api/tasks/nope/cancel", `{}`, 404},
		{"POST", "/api/tasks/nope/interject", `{"text": "hi"}`, 404},
		{"POST", "/api/tasks/nope/interject", `{"text": 3}`, 400},
		{"POST", "/api/tasks/nope/interject", `{"txt": "hi"}`, 400},
		{"POST", "/api/tasks/nope/tool-calls/c1/approve", `{}`, 404},
		{"POST", "/api/tasks/nope/tool-calls/c1/reject", `{"reason": false}`, 400},
		{"POST", "/api/sandbox/create", `{"name": "box", "maxLifeSeconds": 3600}`, 501},
		{"POST", "/api/sandbox/create", `{"maxLifeSeconds": "long"}`, 400},
		{"GET", "/api/agent/run", "", 405},
		{"DELETE", "/api/tasks", "", 405},
		{"GET", "/api/nothing", "", 404},
		// Outside /api/ too (was net/http's text/plain "404 page not found").
		{"GET", "/nope", "", 404},
		{"GET", "/favicon.ico", "", 404},
		{"GET", "/app.js/x", "", 404},
		{"POST", "/", "", 405},
		{"DELETE", "/style.css", "", 405},
	}
	for _, c := range cases {
		var eb errorBody
		r := e.do(c.method, c.path, "", c.body, &eb)
		if r.StatusCode != c.want || eb.Error == "" || eb.Success || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("%s %s %.60q: %d %+v (%s), want %d with a JSON error", c.method, c.path, c.body, r.StatusCode, eb, r.Header.Get("Content-Type"), c.want)
		}
	}
	// An integer field out of its range says so (it was "must be a number,
	// not number 1e20").
	var eb errorBody
	if r := e.do("POST", "/api/agent/task/submit", "", `{"instruction":"x","max_steps":1e20}`, &eb); r.StatusCode != 400 ||
		!strings.Contains(eb.Error, `"max_steps" must be an integer of -2147483648..2147483647, not number 1e20`) {
		t.Errorf("max_steps 1e20: %d %+v", r.StatusCode, eb)
	}
	// A bad resume point on a real task.
	var sub map[string]any
	e.do("POST", "/api/agent/task/submit", "", `{"instruction":"x"}`, &sub)
	id := sub["task_id"].(string)
	req, _ := http.NewRequest("GET", e.url+"/api/tasks/"+id+"/events", nil)
	req.Header.Set("Last-Event-ID", "minus one")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("bad Last-Event-ID: %d", resp.StatusCode)
	}
}

// TestEventsResumeWithoutGapOrDuplicate reads a task's SSE stream, drops
// the connection mid-task, resumes with Last-Event-ID, and checks that the
// union is seq 1..last exactly once each, ending with "event: end".
func TestEventsResumeWithoutGapOrDuplicate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{})
	ctx := testutil.Context(t, testTimeout)
	release := make(chan struct{})
	chunks := func(from, to int) []any {
		var steps []any
		for i := from; i < to; i++ {
			steps = append(steps, &dispatchv1.ContentChunk{Text: fmt.Sprintf("chunk %d ", i)})
		}
		return steps
	}
	e.commander(t, func(ctx context.Context, c *testutil.Commander) error {
		s, err := c.NextSession(ctx)
		if err != nil {
			return err
		}
		if err := s.Play(ctx, chunks(0, 10)...); err != nil {
			return err
		}
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
		return s.Play(ctx, append(chunks(10, 20), testutil.Success("done"))...)
	})
	var sub map[string]any
	e.do("POST", "/api/tasks", "", `{"instruction":"stream"}`, &sub)
	id := sub["task_id"].(string)

	var seqs []uint64
	read := func(lastID string, until func(sseEvent) bool) (ended bool) {
		req, _ := http.NewRequestWithContext(ctx, "GET", e.url+"/api/tasks/"+id+"/events", nil)
		if lastID != "" {
			req.Header.Set("Last-Event-ID", lastID)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
		}
		_ = readSSE(resp.Body, func(ev sseEvent) bool {
			if ev.Event == "end" {
				ended = true
				return false
			}
			var te map[string]any
			if err := json.Unmarshal([]byte(ev.Data), &te); err != nil {
				t.Fatalf("event data %q: %v", ev.Data, err)
			}
			seq, _ := strconv.ParseUint(ev.ID, 10, 64)
			if fmt.Sprint(te["seq"]) != ev.ID || te["task_id"] != id {
				t.Fatalf("event id %s, data %v", ev.ID, te)
			}
			seqs = append(seqs, seq)
			return until(ev)
		})
		return ended
	}
	// First connection: read until chunk 5, then drop the connection.
	read("", func(ev sseEvent) bool { return !strings.Contains(ev.Data, "chunk 5 ") })
	close(release)
	// Resume from the last id received (as EventSource does).
	if !read(strconv.FormatUint(seqs[len(seqs)-1], 10), func(sseEvent) bool { return true }) {
		t.Fatal("stream did not end with event: end")
	}
	for i, s := range seqs {
		if s != uint64(i+1) {
			t.Fatalf("seqs %v: gap or duplicate at %d", seqs, i)
		}
	}
	var task map[string]any
	e.do("GET", "/api/tasks/"+id, "", "", &task)
	if task["status"] != "SUCCESS" || fmt.Sprint(task["last_seq"]) != strconv.Itoa(len(seqs)) {
		t.Fatalf("task %v after %d events", task, len(seqs))
	}
	// ?after_seq= on a finished task: the rest of the history, then end.
	seqs = nil
	req, _ := http.NewRequest("GET", e.url+"/api/tasks/"+id+"/events?after_seq=20", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	ended := false
	_ = readSSE(resp.Body, func(ev sseEvent) bool {
		if ev.Event == "end" {
			ended = true
			return false
		}
		n, _ := strconv.ParseUint(ev.ID, 10, 64)
		seqs = append(seqs, n)
		return true
	})
	resp.Body.Close()
	if !ended || len(seqs) == 0 || seqs[0] != 21 {
		t.Fatalf("after_seq=20: %v ended=%v", seqs, ended)
	}
	// Resuming at the last event: nothing more, then end. Past it: 400
	// OUT_OF_RANGE (it was an empty stream ending as if all had been read;
	// black-box attack run).
	last := fmt.Sprint(task["last_seq"])
	for _, c := range []struct {
		after  string
		status int
	}{{last, 200}, {strconv.Itoa(len(seqs) + 21), 400}, {"18446744073709551615", 400}} {
		req, _ := http.NewRequest("GET", e.url+"/api/tasks/"+id+"/events", nil)
		req.Header.Set("Last-Event-ID", c.after)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Fatalf("Last-Event-ID %s of %s: %d %s", c.after, last, resp.StatusCode, body)
		}
		if c.status == 200 && (strings.Contains(string(body), "id: ") || !strings.Contains(string(body), "event: end")) {
			t.Fatalf("Last-Event-ID %s (the last): %s", c.after, body)
		}
		if c.status == 400 && !strings.Contains(string(body), `"code":"OUT_OF_RANGE"`) {
			t.Fatalf("Last-Event-ID %s: %s", c.after, body)
		}
	}
}

// TestInterjectApproveAndCancelOverHTTP: a held tool call is approved over
// HTTP, an interjection reaches the planner, and a cancel ends the task.
func TestInterjectApproveAndCancelOverHTTP(t *testing.T) {
	t.Parallel()
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(policy, []byte(`
rules:
  - id: echo-needs-approval
    when: tool_name == "echo"
    action: hold
`), 0o600); err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, dispatcher.Config{Policy: dispatcher.Policy{File: policy}}, Options{})
	got := make(chan string, 4)
	e.commander(t, func(ctx context.Context, c *testutil.Commander) error {
		s, err := c.NextSession(ctx)
		if err != nil {
			return err
		}
		if err := s.Send(&dispatchv1.ToolCallRequest{CallId: "h1", ToolName: "echo", ArgumentsJson: `{"text":"hi"}`}); err != nil {
			return err
		}
		if err := s.Send(&dispatchv1.StageChange{Stage: "call_user", Message: "what is the password?"}); err != nil {
			return err
		}
		for {
			p, err := s.Next(ctx)
			if err != nil {
				return err
			}
			if r := p.GetToolResult(); r != nil {
				got <- "result:" + r.GetResultJson()
			}
			if u := p.GetUserInput(); u != nil {
				got <- "user:" + u.GetText()
			}
		}
	})
	var sub map[string]any
	e.do("POST", "/api/agent/task/submit", "", `{"instruction":"hold me"}`, &sub)
	id := sub["task_id"].(string)
	e.waitStatus(id, "", "running")
	// Approve once the hold is recorded (until then: 404).
	var out map[string]any
	testutil.WaitFor(t, wait, func() bool {
		out = nil
		r := e.do("POST", "/api/tasks/"+id+"/tool-calls/h1/approve", "", `{"reason":"fine"}`, &out)
		if r.StatusCode != 200 && r.StatusCode != 404 {
			t.Fatalf("approve: %d %v", r.StatusCode, out)
		}
		return r.StatusCode == 200
	}, "the held call h1 to be approved")
	if out["outcome"] != "HOLD_OUTCOME_APPROVED" {
		t.Fatalf("approve: %v", out)
	}
	if g := testutil.Recv(t, got, wait, "the planner to get the result"); !strings.HasPrefix(g, "result:") || !strings.Contains(g, "hi") {
		t.Fatalf("planner got %q", g)
	}
	// A second approve of the same call: 404 (not held any more).
	if r := e.do("POST", "/api/tasks/"+id+"/tool-calls/h1/reject", "", ``, nil); r.StatusCode != 404 {
		t.Fatalf("second resolve: %d", r.StatusCode)
	}
	var ij map[string]any
	if r := e.do("POST", "/api/tasks/"+id+"/interject", "", `{"text":"hunter2"}`, &ij); r.StatusCode != 200 || ij["message_id"] == "" {
		t.Fatalf("interject %d %v", r.StatusCode, ij)
	}
	if g := testutil.Recv(t, got, wait, "the planner to get the user's answer"); g != "user:hunter2" {
		t.Fatalf("planner got %q", g)
	}
	var cr map[string]any
	if r := e.do("POST", "/api/tasks/"+id+"/cancel", "", `{"reason":"enough"}`, &cr); r.StatusCode != 200 || cr["cancelled"] != true || cr["status"] != "CANCELLED" {
		t.Fatalf("cancel %d %v", r.StatusCode, cr)
	}
	// Interjecting into an ended task is a conflict, not a 500.
	var eb errorBody
	if r := e.do("POST", "/api/tasks/"+id+"/interject", "", `{"text":"late"}`, &eb); r.StatusCode != 409 {
		t.Fatalf("late interject %d %+v", r.StatusCode, eb)
	}
	var list struct {
		Tasks []map[string]any `json:"tasks"`
	}
	e.do("GET", "/api/tasks?status=CANCELLED", "", "", &list)
	if len(list.Tasks) != 1 || list.Tasks[0]["task_id"] != id {
		t.Fatalf("list %v", list)
	}
}

// TestRunDisconnectCancels: a client of /api/agent/run that goes away
// cancels its task (nobody else knows its id).
func TestRunDisconnectCancels(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{})
	ctx := testutil.Context(t, testTimeout)
	e.serve(t, chatScript(time.Hour))
	rctx, cancel := context.WithCancel(ctx)
	req, _ := http.NewRequestWithContext(rctx, "POST", e.url+"/api/agent/run", strings.NewReader(`{"instruction":"x"}`))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Header.Get("X-Task-Id")
	_ = readSSE(resp.Body, func(ev sseEvent) bool { return !strings.Contains(ev.Data, `"thinking"`) })
	cancel()
	resp.Body.Close()
	st := e.waitStatus(id, "", "cancelled")
	if !strings.Contains(fmt.Sprint(st["message"]), "client disconnected") {
		t.Fatalf("status %v", st)
	}
}

// TestSeedCurlExamples runs seed 001's curl examples, as written there
// (only the host changed), against the dispatcher with a fake commander.
func TestSeedCurlExamples(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl not installed")
	}
	e := newEnv(t, dispatcher.Config{}, Options{})
	ctx := testutil.Context(t, testTimeout)
	e.serve(t, chatScript(0))
	run := func(args ...string) string {
		t.Helper()
		for i, a := range args {
			args[i] = strings.ReplaceAll(a, "http://localhost:5000", e.url)
		}
		out, err := exec.CommandContext(ctx, curl, append([]string{"-sS"}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("curl %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	obj := func(s string) map[string]any {
		t.Helper()
		var m map[string]any
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			t.Fatalf("%q: %v", s, err)
		}
		return m
	}

	// Verify Installation.
	if h := obj(run("http://localhost:5000/api/health")); h["status"] != "ok" {
		t.Fatalf("health %v", h)
	}

	// Example 1: Simple Task Execution (SSE).
	out := run("-X", "POST", "http://localhost:5000/api/agent/run",
		"-H", "Content-Type: application/json",
		"-d", `{
    "instruction": "Open calculator and compute 123 * 456",
    "sandbox_id": "sbx-abc123",
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }`)
	var types []string
	var finished map[string]any
	_ = readSSE(strings.NewReader(out), func(ev sseEvent) bool {
		if ev.Event != "" {
			return true
		}
		m := obj(ev.Data)
		types = append(types, m["type"].(string))
		if m["type"] == "finished" {
			finished = m
		}
		return true
	})
	want := []string{"thinking", "action", "observation", "message", "result", "finished"}
	if strings.Join(types, ",") != strings.Join(want, ",") {
		t.Fatalf("run event types %v, want %v\n%s", types, want, out)
	}
	if finished["output"] != "Calculation completed: 56088" || finished["status"] != "finished" {
		t.Fatalf("finished %v", finished)
	}
	if !strings.Contains(out, `"content":"123 * 456 = 56088"`) && !strings.Contains(out, "56088") {
		t.Fatalf("no tool result in %s", out)
	}

	// Example 2: Async Task with Status Polling.
	sub := obj(run("-X", "POST", "http://localhost:5000/api/agent/task/submit",
		"-H", "Content-Type: application/json",
		"-d", `{
    "instruction": "Create a text file named report.txt with content: Meeting notes",
    "sandbox_id": "box-abc123",
    "max_steps": 50,
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }`))
	id, _ := sub["task_id"].(string)
	if sub["success"] != true || id == "" || sub["message"] != "Task submitted successfully" {
		t.Fatalf("submit %v", sub)
	}
	e.waitStatus(id, "", "finished")
	st := obj(run("http://localhost:5000/api/agent/task/status/" + id))
	if st["task_id"] != id || st["query"] != "Create a text file named report.txt with content: Meeting notes" ||
		st["finished_output"] != "Calculation completed: 56088" || st["sandbox_info"].(map[string]any)["sandbox_id"] != "box-abc123" {
		t.Fatalf("status %v", st)
	}
	// The credentials reached the task's config and are masked when read back.
	cfg, err := e.d.Tasks().ConfigByID(id)
	if err != nil || cfg.GetSteps() != 50 || cfg.GetAuthorizationInfo().GetOrgID() != "org-123" ||
		cfg.GetAuthorizationInfo().GetApiKey() == "sk-lybic-key" || cfg.GetStageModelConfig().GetActionGeneratorModel().GetApiKey() == "ark-api-key" {
		t.Fatalf("config %v %v", cfg, err)
	}

	// Example 3: Creating a sandbox is not the dispatcher's: 501, JSON.
	sb := run("-X", "POST", "http://localhost:5000/api/sandbox/create",
		"-H", "Content-Type: application/json",
		"-d", `{
    "name": "automation-env",
    "shape": "beijing-2c-4g-cpu",
    "maxLifeSeconds": 7200,
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    }
  }`, "-w", "\n%{http_code}")
	i := strings.LastIndex(sb, "\n")
	if body, code := sb[:i], sb[i+1:]; code != "501" || obj(body)["code"] != "UNIMPLEMENTED" {
		t.Fatalf("sandbox create: %s", sb)
	}

	// Example 4 / Context Continuation: continue the finished task.
	out = run("-X", "POST", "http://localhost:5000/api/agent/run",
		"-d", `{
    "instruction": "Now search for Artificial Intelligence",
    "sandbox_id": "BOX-123",
    "continue_context": true,
    "task_id": "`+id+`",
    "ark_apikey": "..."
  }`)
	if !strings.Contains(out, `"type":"finished"`) {
		t.Fatalf("continued run: %s", out)
	}

	// Cancelling Tasks: one (unknown, so 404), then all.
	cancelOne := run("-X", "POST", "http://localhost:5000/api/agent/cancel",
		"-d", `{
    "task_id": "task-id-to-cancel",
    "authentication": {}
  }`)
	if obj(cancelOne)["code"] != "NOT_FOUND" {
		t.Fatalf("cancel one: %s", cancelOne)
	}
	c2 := obj(run("-X", "POST", "http://localhost:5000/api/agent/cancel", "-d", `{
    "authentication": {}
  }`))
	if c2["success"] != true {
		t.Fatalf("cancel all: %v", c2)
	}
}

// TestCancelAll cancels every pending and running task.
func TestCancelAll(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{})
	e.serve(t, chatScript(time.Hour))
	var ids []string
	for range 3 {
		var sub map[string]any
		e.do("POST", "/api/agent/task/submit", "", `{"instruction":"long"}`, &sub)
		ids = append(ids, sub["task_id"].(string))
	}
	e.waitStatus(ids[0], "", "running")
	var out struct {
		Success   bool     `json:"success"`
		Cancelled []string `json:"cancelled"`
	}
	e.do("POST", "/api/agent/cancel", "", `{"authentication": null}`, &out)
	if !out.Success || len(out.Cancelled) != 3 {
		t.Fatalf("cancel all: %+v", out)
	}
	for _, id := range ids {
		e.waitStatus(id, "", "cancelled")
	}
}

// TestHeartbeatAndDrain: an idle event stream gets keepalive comments; a
// drain turns /api/health to 503, refuses submissions, and the stream
// gets the task's end.
func TestHeartbeatAndDrain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{Heartbeat: 20 * time.Millisecond})
	var sub map[string]any
	e.do("POST", "/api/tasks", "", `{"instruction":"nobody runs me"}`, &sub)
	id := sub["task_id"].(string)
	resp, err := http.Get(e.url + "/api/tasks/" + id + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		buf := make([]byte, 4096)
		var acc string
		for {
			n, err := resp.Body.Read(buf)
			acc += string(buf[:n])
			for {
				i := strings.IndexByte(acc, '\n')
				if i < 0 {
					break
				}
				lines <- acc[:i]
				acc = acc[i+1:]
			}
			if err != nil {
				return
			}
		}
	}()
	waitLine := func(want string) {
		t.Helper()
		deadline := time.After(wait)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("stream ended before %q", want)
				}
				if strings.HasPrefix(l, want) {
					return
				}
			case <-deadline:
				t.Fatalf("no %q", want)
			}
		}
	}
	waitLine(": keepalive")
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	e.d.Drain(ctx)     // the pending task fails; the stream ends
	waitLine("data: ") // the FAILURE state event
	var h map[string]string
	if r := e.do("GET", "/api/health", "", "", &h); r.StatusCode != 503 || h["status"] != "draining" {
		t.Fatalf("health while draining: %d %v", r.StatusCode, h)
	}
	var eb errorBody
	if r := e.do("POST", "/api/tasks", "", `{"instruction":"late"}`, &eb); r.StatusCode != 503 {
		t.Fatalf("submit while draining: %d %+v", r.StatusCode, eb)
	}
}

// runSSE posts body to /api/agent/run (path may carry a query) and returns
// the raw stream and its data events decoded.
func (e *env) runSSE(ctx context.Context, path, header, body string) (string, []map[string]any) {
	e.t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "POST", e.url+path, strings.NewReader(body))
	if header != "" {
		k, v, _ := strings.Cut(header, ": ")
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	var raw strings.Builder
	var evs []map[string]any
	_ = readSSE(io.TeeReader(resp.Body, &raw), func(ev sseEvent) bool {
		if ev.Event != "" {
			return true // event: end (asked for with events=all)
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(ev.Data), &m); err != nil {
			e.t.Fatalf("data %q: %v", ev.Data, err)
		}
		evs = append(evs, m)
		return true
	})
	return raw.String(), evs
}

// TestSeedRunEndsAsTheSeedSays: every data line of /api/agent/run has a
// "type"; a failed task ends with "error" (status "error", also in the
// status endpoint), a cancelled one with "cancelled" — never "finished"
// without output — and no "event: end" follows unless asked for
// (?events=all or X-Dispatcher-Events: all, which also bring the
// dispatcher's status and usage events).
func TestSeedRunEndsAsTheSeedSays(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{})
	ctx := testutil.Context(t, testTimeout)
	e.serve(t, func(s *dispatchv1.StartSession) []any {
		switch {
		case strings.Contains(s.GetInstruction(), "fail"):
			return []any{
				&dispatchv1.ThoughtChain{Delta: "trying"},
				&dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_FAILURE, Message: "model refused the request"},
			}
		case strings.Contains(s.GetInstruction(), "long"):
			return chatScript(time.Hour)(s)
		}
		return chatScript(0)(s)
	})
	lastType := func(evs []map[string]any) string {
		if len(evs) == 0 {
			return ""
		}
		return fmt.Sprint(evs[len(evs)-1]["type"])
	}
	for _, q := range []struct{ path, header string }{{"/api/agent/run", ""}, {"/api/agent/run?events=all", ""}, {"/api/agent/run", "X-Dispatcher-Events: all"}} {
		all := q.path != "/api/agent/run" || q.header != ""
		raw, evs := e.runSSE(ctx, q.path, q.header, `{"instruction":"please fail"}`)
		for _, m := range evs {
			if _, ok := m["type"]; !ok {
				t.Fatalf("%s %s: an event without type: %v\n%s", q.path, q.header, m, raw)
			}
		}
		last := evs[len(evs)-1]
		if lastType(evs) != "error" || last["status"] != "error" || last["content"] != "model refused the request" {
			t.Fatalf("%s %s: failed run ends with %v\n%s", q.path, q.header, last, raw)
		}
		hasEnd, hasStatus := strings.Contains(raw, "event: end"), strings.Contains(raw, `"type":"status"`)
		if hasEnd != all || hasStatus != all {
			t.Fatalf("%s %s: event: end %v, status events %v, want %v\n%s", q.path, q.header, hasEnd, hasStatus, all, raw)
		}
		id := fmt.Sprint(last["task_id"])
		if st := e.waitStatus(id, "", "error"); !strings.Contains(fmt.Sprint(st["message"]), "model refused") {
			t.Fatalf("status %v", st)
		}
	}

	// Cancelled while streaming: the stream ends with "cancelled".
	got := make(chan []map[string]any, 1)
	go func() {
		_, evs := e.runSSE(ctx, "/api/agent/run", "", `{"instruction":"long"}`)
		got <- evs
	}()
	var id string
	testutil.WaitFor(t, wait, func() bool {
		var list struct {
			Tasks []map[string]any `json:"tasks"`
		}
		e.do("GET", "/api/tasks?status=RUNNING", "", "", &list)
		if len(list.Tasks) == 1 {
			id = fmt.Sprint(list.Tasks[0]["task_id"])
		}
		return id != ""
	}, "the long task to run")
	var c map[string]any
	e.do("POST", "/api/agent/cancel", "", `{"task_id":"`+id+`"}`, &c)
	evs := testutil.Recv(t, got, wait, "the stream to end")
	if lastType(evs) != "cancelled" || evs[len(evs)-1]["status"] != "cancelled" {
		t.Fatalf("cancelled run ends with %v", evs[len(evs)-1])
	}
	for _, m := range evs {
		if m["type"] == "finished" {
			t.Fatalf("a cancelled run said finished: %v", evs)
		}
	}
}

// TestSeedUserSystemPromptAndLLMContext: user_system_prompt reaches the
// commander's StartSession; llm_context is the conversation the task ran
// with (secrets masked), and a continued task's includes the turns it
// continued from.
func TestSeedUserSystemPromptAndLLMContext(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dispatcher.Config{}, Options{})
	starts := make(chan *dispatchv1.StartSession, 4)
	e.serve(t, func(s *dispatchv1.StartSession) []any {
		starts <- s
		return []any{testutil.Success("answer to " + s.GetInstruction())}
	})
	var sub map[string]any
	if r := e.do("POST", "/api/agent/task/submit", "", `{"instruction":"first, my key is sk-abcdefghijklmnop","user_system_prompt":"Answer in French.","ark_apikey":"ark-secret-1234567"}`, &sub); r.StatusCode != 200 {
		t.Fatalf("submit with user_system_prompt: %d %v", r.StatusCode, sub)
	}
	first := sub["task_id"].(string)
	if s := testutil.Recv(t, starts, wait, "the start"); s.GetUserSystemPrompt() != "Answer in French." {
		t.Fatalf("StartSession.user_system_prompt = %q", s.GetUserSystemPrompt())
	}
	st := e.waitStatus(first, "", "finished")
	b, _ := json.Marshal(st["llm_context"])
	want := `{"messages":[{"content":"first, my key is ****mnop","role":"user"},{"content":"answer to first, my key is ****mnop","role":"assistant"}],"user_system_prompt":"Answer in French."}`
	if string(b) != want {
		t.Fatalf("llm_context\n %s\nwant\n %s", b, want)
	}
	e.do("POST", "/api/agent/task/submit", "", `{"instruction":"second","continue_context":true,"task_id":"`+first+`"}`, &sub)
	second := sub["task_id"].(string)
	if s := testutil.Recv(t, starts, wait, "the second start"); len(s.GetHistory()) != 2 || s.GetUserSystemPrompt() != "" {
		t.Fatalf("continued start: %v", s)
	}
	st = e.waitStatus(second, "", "finished")
	b, _ = json.Marshal(st["llm_context"])
	want = `{"messages":[{"content":"first, my key is ****mnop","role":"user"},{"content":"answer to first, my key is ****mnop","role":"assistant"},{"content":"second","role":"user"},{"content":"answer to second","role":"assistant"}]}`
	if string(b) != want {
		t.Fatalf("continued llm_context\n %s\nwant\n %s", b, want)
	}
	var eb errorBody
	big := strings.Repeat("p", 64<<10+1)
	if r := e.do("POST", "/api/agent/task/submit", "", `{"instruction":"x","user_system_prompt":"`+big+`"}`, &eb); r.StatusCode != 400 {
		t.Fatalf("oversized user_system_prompt: %d %+v", r.StatusCode, eb)
	}
}

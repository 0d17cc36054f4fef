package httpapi

// Tests of the origin rules (issue 12, class 3): the Host and Origin checks,
// the page's frame-ancestors, the body read timeout, SSE outliving a server
// read timeout, and the token cookie. They run the handler on a real
// loopback listener over a fake Backend that records what reached it, so a
// refused request is shown to have changed nothing.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// fakeBackend is a Backend that records the calls that reach it. Its one
// task is "t-1"; Watch plays watch (default: three events, the last
// terminal).
type fakeBackend struct {
	mu    sync.Mutex
	calls []string
	watch func(ctx context.Context, after uint64, fn func(*dispatchv1.TaskEvent) error) error
}

func (f *fakeBackend) record(name string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, name)
}

// called returns the calls so far.
func (f *fakeBackend) called() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.calls)
}

func (f *fakeBackend) task(id string) (*dispatchv1.Task, error) {
	if id != "t-1" {
		return nil, status.Error(codes.NotFound, "task not found")
	}
	return &dispatchv1.Task{TaskId: "t-1", Instruction: "hello", Status: agentpb.TaskStatus_RUNNING, LastSeq: 3}, nil
}

func (f *fakeBackend) SubmitTask(context.Context, *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error) {
	f.record("SubmitTask")
	return &dispatchv1.SubmitTaskResponse{TaskId: "t-1"}, nil
}

func (f *fakeBackend) GetTask(_ context.Context, r *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error) {
	f.record("GetTask")
	t, err := f.task(r.GetTaskId())
	if err != nil {
		return nil, err
	}
	return &dispatchv1.GetTaskResponse{Task: t}, nil
}

func (f *fakeBackend) ListTasks(context.Context, *dispatchv1.ListTasksRequest) (*dispatchv1.ListTasksResponse, error) {
	f.record("ListTasks")
	t, _ := f.task("t-1")
	return &dispatchv1.ListTasksResponse{Tasks: []*dispatchv1.Task{t}}, nil
}

func (f *fakeBackend) CancelTask(_ context.Context, r *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error) {
	f.record("CancelTask")
	if _, err := f.task(r.GetTaskId()); err != nil {
		return nil, err
	}
	return &dispatchv1.CancelTaskResponse{Cancelled: true, Status: agentpb.TaskStatus_CANCELLED}, nil
}

func (f *fakeBackend) Interject(context.Context, *dispatchv1.InterjectRequest) (*dispatchv1.InterjectResponse, error) {
	f.record("Interject")
	return &dispatchv1.InterjectResponse{}, nil
}

func (f *fakeBackend) ApproveToolCall(context.Context, *dispatchv1.ApproveToolCallRequest) (*dispatchv1.ApproveToolCallResponse, error) {
	f.record("ApproveToolCall")
	return &dispatchv1.ApproveToolCallResponse{}, nil
}

func (f *fakeBackend) Watch(ctx context.Context, taskID string, after uint64, fn func(*dispatchv1.TaskEvent) error) error {
	f.record("Watch")
	if _, err := f.task(taskID); err != nil {
		return err
	}
	if f.watch != nil {
		return f.watch(ctx, after, fn)
	}
	for _, ev := range fakeEvents() {
		if ev.GetSeq() > after {
			if err := fn(ev); err != nil {
				return err
			}
		}
	}
	return nil
}

func (f *fakeBackend) Serving(context.Context) bool { return true }

// fakeEvents are task t-1's events: running, one content chunk, success.
func fakeEvents() []*dispatchv1.TaskEvent {
	return []*dispatchv1.TaskEvent{
		{TaskId: "t-1", Seq: 1, Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING}}},
		{TaskId: "t-1", Seq: 2, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "hello from the fake task", IsFinish: true}}},
		{TaskId: "t-1", Seq: 3, Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_SUCCESS, Message: "done"}}},
	}
}

// guardServer serves New(fake, opts) on a loopback listener; cfg, when
// set, adjusts the http.Server before it starts.
func guardServer(t *testing.T, f *fakeBackend, opts Options, cfg func(*http.Server)) *httptest.Server {
	t.Helper()
	s := httptest.NewUnstartedServer(New(f, opts))
	if cfg != nil {
		cfg(s.Config)
	}
	s.Start()
	t.Cleanup(func() {
		s.CloseClientConnections()
		s.Close()
	})
	return s
}

// port is the port of the test server.
func port(t *testing.T, s *httptest.Server) string {
	t.Helper()
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	return u.Port()
}

// call sends one request: host, when set, replaces the Host header; hdr
// adds headers. It returns the status and the body.
func call(t *testing.T, s *httptest.Server, method, path, host, body string, hdr map[string]string) (int, string) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.URL+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: read: %v", method, path, err)
	}
	return resp.StatusCode, string(b)
}

// errorCode is the "code" of an error body, or "" if b is not one.
func errorCode(b string) string {
	var e struct {
		Success *bool  `json:"success"`
		Code    string `json:"code"`
		Error   string `json:"error"`
	}
	if json.Unmarshal([]byte(b), &e) != nil || e.Success == nil || *e.Success || e.Error == "" {
		return ""
	}
	return e.Code
}

// A page on another origin can send a "simple" request (text/plain, no
// preflight) to the dispatcher: it must be refused before it reaches the
// task API, whatever its content type and whether or not it names an Origin
// (a fetch with Sec-Fetch-Site: cross-site and no Origin, as some browsers
// send for no-cors requests).
func TestCrossOriginRequestsRefused(t *testing.T) {
	f := &fakeBackend{}
	s := guardServer(t, f, Options{}, nil)
	other := "http://127.0.0.1:" + fmt.Sprint(mustAtoi(t, port(t, s))+1) // same host, another port: another origin
	for _, tc := range []struct {
		name, method, path, body string
		hdr                      map[string]string
	}{
		{"submit text/plain", "POST", "/api/agent/task/submit", `{"instruction":"exfiltrate"}`,
			map[string]string{"Origin": "https://evil.example", "Content-Type": "text/plain"}},
		{"cancel all text/plain", "POST", "/api/agent/cancel", `{}`,
			map[string]string{"Origin": "https://evil.example", "Content-Type": "text/plain"}},
		{"cancel all form", "POST", "/api/agent/cancel", `{"x":"="}`,
			map[string]string{"Origin": "http://evil.example", "Content-Type": "application/x-www-form-urlencoded"}},
		{"run, Origin null", "POST", "/api/agent/run", `{"instruction":"x"}`,
			map[string]string{"Origin": "null", "Content-Type": "text/plain"}},
		{"cancel from a local page on another port", "POST", "/api/agent/cancel", `{}`,
			map[string]string{"Origin": other, "Content-Type": "text/plain"}},
		{"native cancel", "POST", "/api/tasks/t-1/cancel", `{}`,
			map[string]string{"Origin": "https://evil.example", "Content-Type": "text/plain"}},
		{"native submit JSON", "POST", "/api/tasks", `{"instruction":"x"}`,
			map[string]string{"Origin": "https://evil.example", "Content-Type": "application/json"}},
		{"submit, cross-site without Origin", "POST", "/api/agent/task/submit", `{"instruction":"x"}`,
			map[string]string{"Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}},
		{"read tasks cross-site", "GET", "/api/tasks", "",
			map[string]string{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}},
		{"read events with a foreign Origin", "GET", "/api/tasks/t-1/events", "",
			map[string]string{"Origin": "https://evil.example"}},
	} {
		code, body := call(t, s, tc.method, tc.path, "", tc.body, tc.hdr)
		if code != http.StatusForbidden || errorCode(body) == "" {
			t.Errorf("%s: %d %s, want 403 with an error body", tc.name, code, body)
		}
	}
	if c := f.called(); len(c) != 0 {
		t.Fatalf("refused requests reached the task API: %v", c)
	}
}

func mustAtoi(t *testing.T, s string) int {
	t.Helper()
	var n int
	if _, err := fmt.Sscan(s, &n); err != nil {
		t.Fatal(err)
	}
	return n
}

// A DNS-rebinding page (its own host name, now resolving to 127.0.0.1)
// reads with its own Host: tasks, one task, the event stream, the seed
// status, the page itself — all refused, before the task API.
func TestRebindingHostRefused(t *testing.T) {
	f := &fakeBackend{}
	s := guardServer(t, f, Options{}, nil)
	p := port(t, s)
	for _, host := range []string{"rebind.evil.example:" + p, "rebind.evil.example", "127.0.0.1.evil.example:" + p, "localhost.evil.example:" + p} {
		for _, path := range []string{"/api/tasks", "/api/tasks/t-1", "/api/tasks/t-1/events", "/api/agent/task/status/t-1", "/"} {
			code, body := call(t, s, "GET", path, host, "", nil)
			if code != http.StatusMisdirectedRequest || errorCode(body) == "" {
				t.Errorf("GET %s with Host %s: %d %.200s, want 421 with an error body", path, host, code, body)
			}
		}
	}
	// Same-origin requests of the rebinding page also carry its Origin.
	code, body := call(t, s, "POST", "/api/agent/cancel", "rebind.evil.example:"+p, `{}`,
		map[string]string{"Origin": "http://rebind.evil.example:" + p})
	if code != http.StatusMisdirectedRequest || errorCode(body) == "" {
		t.Errorf("cancel from the rebinding page: %d %s", code, body)
	}
	if c := f.called(); len(c) != 0 {
		t.Fatalf("refused requests reached the task API: %v", c)
	}
}

// What is allowed by default: the loopback names with the listening port,
// with or without an Origin of one of them (the page's own requests).
func TestLoopbackNamesAllowed(t *testing.T) {
	f := &fakeBackend{}
	s := guardServer(t, f, Options{}, nil)
	p := port(t, s)
	for _, host := range []string{"127.0.0.1:" + p, "localhost:" + p, "LocalHost:" + p, "[::1]:" + p} {
		if code, body := call(t, s, "GET", "/api/tasks", host, "", nil); code != 200 {
			t.Errorf("GET with Host %s: %d %s", host, code, body)
		}
		origin := "http://" + host
		if code, body := call(t, s, "POST", "/api/agent/task/submit", host, `{"instruction":"x"}`,
			map[string]string{"Origin": origin, "Content-Type": "application/json", "Sec-Fetch-Site": "same-origin"}); code != 200 {
			t.Errorf("POST with Origin %s: %d %s", origin, code, body)
		}
	}
	// The page's origin may be another of the loopback names (the page at
	// localhost calling 127.0.0.1 is cross-site for the browser, but both
	// are this dispatcher).
	if code, body := call(t, s, "POST", "/api/tasks/t-1/cancel", "127.0.0.1:"+p, `{}`,
		map[string]string{"Origin": "http://localhost:" + p, "Sec-Fetch-Site": "cross-site"}); code != 200 {
		t.Errorf("page at localhost → 127.0.0.1: %d %s", code, body)
	}
	// A link from another site to the page opens it (a top-level
	// navigation; the page holds no data and cannot be framed).
	if code, body := call(t, s, "GET", "/", "", "",
		map[string]string{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}); code != 200 {
		t.Errorf("navigation to the page from another site: %d %.200s", code, body)
	}
	// But not to the API.
	if code, body := call(t, s, "GET", "/api/tasks", "", "",
		map[string]string{"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}); code != 403 {
		t.Errorf("navigation to the API from another site: %d %.200s", code, body)
	}
	// Another port on a loopback name is another server.
	if code, _ := call(t, s, "GET", "/api/tasks", "localhost:1", "", nil); code != http.StatusMisdirectedRequest {
		t.Errorf("Host localhost:1: %d", code)
	}
}

// Seed 001's curl examples post with -d: no Origin, and no JSON content
// type (curl sends application/x-www-form-urlencoded). They keep working,
// with localhost or 127.0.0.1 as the host.
func TestSeedCurlStylePostWithoutOriginAccepted(t *testing.T) {
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl not installed")
	}
	f := &fakeBackend{}
	s := guardServer(t, f, Options{}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, base := range []string{s.URL, "http://localhost:" + port(t, s)} {
		for _, tc := range []struct{ path, body, want string }{
			{"/api/agent/task/submit", `{"instruction": "Open browser and go to wikipedia.org", "sandbox_id": "BOX-123"}`, `"task_id":"t-1"`},
			{"/api/agent/cancel", `{"task_id": "t-1"}`, `"success":true`},
			{"/api/agent/cancel", `{}`, `"cancelled":["t-1"]`},
		} {
			out, err := exec.CommandContext(ctx, curl, "-sS", "-X", "POST", base+tc.path, "-d", tc.body).CombinedOutput()
			if err != nil || !strings.Contains(string(out), tc.want) {
				t.Errorf("curl -d %s%s: %v %s", base, tc.path, err, out)
			}
		}
	}
	if c := f.called(); !slices.Contains(c, "SubmitTask") || !slices.Contains(c, "CancelTask") {
		t.Fatalf("calls %v", c)
	}
}

// --http-allowed-hosts (Options.AllowedHosts): names and *.suffix patterns,
// with or without a port, for Host and Origin alike.
func TestAllowedHostsOption(t *testing.T) {
	f := &fakeBackend{}
	s := guardServer(t, f, Options{AllowedHosts: []string{"dispatcher.example.com", "*.corp.example:8443", "10.0.0.7:9000"}}, nil)
	p := port(t, s)
	for host, want := range map[string]int{
		"dispatcher.example.com":      200,
		"dispatcher.example.com:8088": 200,
		"DISPATCHER.example.com.":     200,
		"a.corp.example:8443":         200,
		"a.b.corp.example:8443":       200,
		"a.corp.example:80":           421,
		"a.corp.example":              421,
		"corp.example:8443":           421,
		"evilcorp.example:8443":       421,
		"10.0.0.7:9000":               200,
		"10.0.0.7:" + p:               421,
		"example.com":                 421,
		"localhost:" + p:              200, // the loopback names stay allowed
	} {
		if code, body := call(t, s, "GET", "/api/tasks", host, "", nil); code != want {
			t.Errorf("Host %s: %d %.200s, want %d", host, code, body, want)
		}
	}
	for origin, want := range map[string]int{
		"https://dispatcher.example.com":      200,
		"http://dispatcher.example.com:8088":  200,
		"https://a.corp.example:8443":         200,
		"https://a.corp.example":              403, // port 443
		"https://dispatcher.example.com.evil": 403,
		"https://evil.example":                403,
	} {
		if code, body := call(t, s, "POST", "/api/agent/cancel", "dispatcher.example.com", `{"task_id":"t-1"}`,
			map[string]string{"Origin": origin, "Content-Type": "text/plain"}); code != want {
			t.Errorf("Origin %s: %d %.200s, want %d", origin, code, body, want)
		}
	}
}

func TestValidateAllowedHosts(t *testing.T) {
	for _, ok := range []string{"example.com", "example.com:443", "*.example.com", "*.example.com:8443", "10.1.2.3", "[::1]:80", "[fd00::1]", "dispatcher"} {
		if err := ValidateAllowedHosts([]string{ok}); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "*", "*.", "a.*.com", "http://example.com", "example.com/x", "example.com:", "example.com:http", "example.com:99999", "ex ample.com", "*example.com", "[::1"} {
		if err := ValidateAllowedHosts([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

// The page may not be framed: clickjacking the cancel button.
func TestPageCannotBeFramed(t *testing.T) {
	s := guardServer(t, &fakeBackend{}, Options{}, nil)
	resp, err := s.Client().Get(s.URL + "/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	csp := resp.Header.Get("Content-Security-Policy")
	if !strings.Contains(csp, "frame-ancestors 'none'") || resp.Header.Get("X-Frame-Options") != "DENY" {
		t.Fatalf("CSP %q, X-Frame-Options %q", csp, resp.Header.Get("X-Frame-Options"))
	}
}

// A client that sends its headers and then trickles (or stops sending) the
// body gets 408 when the server's ReadTimeout passes (cmd/dispatcher sets
// one), not a connection held forever or a misleading 400.
func TestBodyReadTimeout(t *testing.T) {
	f := &fakeBackend{}
	s := guardServer(t, f, Options{}, func(hs *http.Server) { hs.ReadTimeout = 300 * time.Millisecond })
	conn, err := net.Dial("tcp", s.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /api/agent/task/submit HTTP/1.1\r\nHost: %s\r\nContent-Length: 100\r\n\r\n{\"instr", s.Listener.Addr())
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer to a stalled body: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout || errorCode(string(b)) == "" {
		t.Fatalf("stalled body: %d %s", resp.StatusCode, b)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("answered after %v", d)
	}
	if c := f.called(); len(c) != 0 {
		t.Fatalf("calls %v", c)
	}
}

// An event stream lives longer than the server's ReadTimeout (which bounds
// headers and bodies): the stream is not cut when the read deadline passes.
func TestEventStreamOutlivesServerReadTimeout(t *testing.T) {
	const readTimeout = 200 * time.Millisecond
	f := &fakeBackend{watch: func(ctx context.Context, after uint64, fn func(*dispatchv1.TaskEvent) error) error {
		evs := fakeEvents()
		if err := fn(evs[0]); err != nil {
			return err
		}
		// A task that is quiet for a while: longer than the read timeout.
		t := time.NewTimer(5 * readTimeout)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
		for _, ev := range evs[1:] {
			if err := fn(ev); err != nil {
				return err
			}
		}
		return nil
	}}
	s := guardServer(t, f, Options{}, func(hs *http.Server) { hs.ReadTimeout = readTimeout; hs.ReadHeaderTimeout = readTimeout })
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/api/tasks/t-1/events", ""},
		{"POST", "/api/agent/run?events=all", `{"instruction":"x"}`}, // events=all: the stream closes with event: end
	} {
		code, body := call(t, s, tc.method, tc.path, "", tc.body, nil)
		if code != 200 || !strings.Contains(body, `"seq":"3"`) && !strings.Contains(body, "id: 3\n") || !strings.Contains(body, "event: end") {
			t.Errorf("%s %s: %d, stream cut: %q", tc.method, tc.path, code, body)
		}
	}
}

// The page's cookie holds the token URL-encoded (encodeURIComponent): a
// token with characters such as / + = (base64) must still match.
func TestTokenCookieEncoded(t *testing.T) {
	const token = "Zm9v/YmFy+YmF6=="
	s := guardServer(t, &fakeBackend{}, Options{ClientToken: token}, nil)
	for _, v := range []string{url.QueryEscape(token), strings.NewReplacer("/", "%2F", "+", "%2B", "=", "%3D").Replace(token)} {
		code, body := call(t, s, "GET", "/api/tasks/t-1/events", "", "", map[string]string{"Cookie": TokenCookie + "=" + v})
		if code != 200 || !strings.Contains(body, "event: end") {
			t.Errorf("cookie %s: %d %.200s", v, code, body)
		}
	}
	if code, _ := call(t, s, "GET", "/api/tasks", "", "", map[string]string{"Cookie": TokenCookie + "=" + url.QueryEscape("Zm9v/YmFy+YmF6=")}); code != 401 {
		t.Errorf("wrong token in the cookie: %d", code)
	}
	if code, _ := call(t, s, "GET", "/api/tasks", "", "", map[string]string{"Authorization": "Bearer " + token}); code != 200 {
		t.Errorf("header: %d", code)
	}
}

package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// fuzzEndpoints are the requests with a JSON body.
var fuzzEndpoints = []string{
	"/api/agent/task/submit",
	"/api/agent/run",
	"/api/agent/cancel",
	"/api/sandbox/create",
	"/api/tasks",
	"/api/tasks/t-1/cancel",
	"/api/tasks/t-1/interject",
	"/api/tasks/t-1/tool-calls/call-1/approve",
	"/api/tasks/t-1/tool-calls/call-1/reject",
}

// panicLog collects what net/http logs, which is where a handler's panic
// goes (the server recovers it and drops the connection).
type panicLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *panicLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *panicLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// FuzzHTTPBodies: whatever body and content type a client POSTs to an
// endpoint that reads JSON, the answer is never a 5xx (except the 501 of
// /api/sandbox/create, which is its answer to every valid body) and never a
// panic; an error is a 4xx with the JSON error body.
func FuzzHTTPBodies(f *testing.F) {
	srv, client, plog := fuzzServer(f, &fakeBackend{})
	for i := range fuzzEndpoints {
		e := uint8(i)
		f.Add(e, "", []byte(""))
		f.Add(e, "application/json", []byte(`{}`))
		f.Add(e, "text/plain", []byte(`{"instruction":"hi","max_steps":3,"labels":{"a":"b"}}`))
	}
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"x","continue_context":true}`))
	f.Add(uint8(0), "application/json", []byte(`{"max_steps":-1}`))
	f.Add(uint8(0), "application/json", []byte(`{"max_steps":99999999999}`))
	f.Add(uint8(0), "application/json", []byte(`{"user_system_prompt":"x"}`))
	f.Add(uint8(2), "application/json", []byte(`{"task_id":""}`))
	f.Add(uint8(4), "application/json", []byte(`{"instruction":"x","runningConfig":{"steps":-1},"timeoutSeconds":"9"}`))
	f.Add(uint8(4), "application/json", []byte(`{"instruction":"\ud800"}`))
	f.Add(uint8(5), "application/json", []byte(`{"reason":1}`))
	f.Add(uint8(6), "application/json", []byte(`{"text":"a"} {"text":"b"}`))
	f.Add(uint8(1), "application/x-www-form-urlencoded", []byte(`instruction=hi`))
	f.Add(uint8(0), "application/json", []byte("\xff\xfe{\"instruction\":\"\xc3\"}"))
	f.Add(uint8(0), "application/json", []byte(strings.Repeat("[", 10000)))

	f.Fuzz(func(t *testing.T, endpoint uint8, contentType string, body []byte) {
		postFuzzed(t, client, srv.URL, fuzzEndpoints[int(endpoint)%len(fuzzEndpoints)], contentType, body, plog)
	})
}

// fuzzServer is the handler over b on an httptest server whose error log
// (where a recovered handler panic goes) is the returned panicLog.
func fuzzServer(f *testing.F, b Backend) (*httptest.Server, *http.Client, *panicLog) {
	plog := &panicLog{}
	srv := httptest.NewUnstartedServer(New(b, Options{ClientToken: "tok", MaxBodyBytes: 64 << 10}))
	srv.Config.ErrorLog = log.New(plog, "", 0)
	srv.Start()
	client := srv.Client()
	f.Cleanup(func() {
		client.CloseIdleConnections()
		srv.Close()
	})
	return srv, client, plog
}

// postFuzzed POSTs body to path and checks the answer: a success, or a 4xx
// with the JSON error body (the 501 of /api/sandbox/create aside); never a
// 5xx, a dropped connection or a panic. It returns the status and body.
func postFuzzed(t *testing.T, client *http.Client, base, path, contentType string, body []byte, plog *panicLog) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, base+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer tok")
	if contentType != "" {
		if !validHeaderValue(contentType) {
			return 0, nil // not a header value a client can send
		}
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST %s %q: %v (server log: %s)", path, body, err, plog.String())
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("POST %s %q: reading the answer: %v (server log: %s)", path, body, err, plog.String())
	}
	if s := plog.String(); strings.Contains(s, "panic") {
		t.Fatalf("POST %s %q: the handler panicked: %s", path, body, s)
	}
	code := resp.StatusCode
	switch {
	case code == http.StatusNotImplemented && path == "/api/sandbox/create":
	case code >= 500:
		t.Fatalf("POST %s (%q) %q: %d %s", path, contentType, body, code, got)
	}
	if code < 400 {
		return code, got
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("POST %s %q: %d with content type %q", path, body, code, ct)
	}
	var eb errorBody
	if err := json.Unmarshal(got, &eb); err != nil || eb.Success || eb.Code == "" || eb.Error == "" {
		t.Fatalf("POST %s %q: %d with error body %q (%v)", path, body, code, got, err)
	}
	return code, got
}

// validHeaderValue: what net/http would send (no control characters but
// tab, no bytes a Go client refuses).
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		c := v[i]
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// realSubmitEndpoints reach the real API layer's checks (api.Local over a
// dispatcher without commanders): a task submitted is pending, then
// cancelled, so none piles up.
var realSubmitEndpoints = []string{
	"/api/tasks",
	"/api/agent/task/submit",
	"/api/agent/cancel",
	"/api/tasks/t-none/interject",
}

// FuzzHTTPSubmitReal is FuzzHTTPBodies against the real backend for the
// submit and cancel bodies: whatever the client sends (policies, configs,
// labels, timeouts, previous tasks), the dispatcher's own validation answers
// a 4xx or accepts the task, never a 5xx.
func FuzzHTTPSubmitReal(f *testing.F) {
	d, err := dispatcher.New(dispatcher.Config{})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(d.Close)
	local := api.New(d).Local()
	srv, client, plog := fuzzServer(f, local)

	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi"}`))
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi","planner":"gui","timeoutSeconds":-1,"labels":{"":""}}`))
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi","policyYaml":"rules: [{id: a, when: 'true', action: stop}]"}`))
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi","policyYaml":"rules: ["}`))
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi","previousTaskId":"nope"}`))
	f.Add(uint8(0), "application/json", []byte(`{"instruction":"hi","runningConfig":{"steps":-5}}`))
	f.Add(uint8(1), "", []byte(`{"instruction":"hi","max_steps":2,"authentication":{"api_key":"k","api_endpoint":"http://169.254.169.254/"}}`))
	f.Add(uint8(1), "", []byte(`{"instruction":"hi","continue_context":true,"task_id":"x"}`))
	f.Add(uint8(1), "", []byte(`{"instruction":"","sandbox_id":"s","timeout_seconds":2147483647}`))
	f.Add(uint8(2), "", []byte(`{"task_id":"nope"}`))
	f.Add(uint8(2), "", []byte(`{}`))
	f.Add(uint8(3), "", []byte(`{"text":"x"}`))

	f.Fuzz(func(t *testing.T, endpoint uint8, contentType string, body []byte) {
		path := realSubmitEndpoints[int(endpoint)%len(realSubmitEndpoints)]
		code, got := postFuzzed(t, client, srv.URL, path, contentType, body, plog)
		if code < 200 || code >= 300 || (path != "/api/tasks" && path != "/api/agent/task/submit") {
			return
		}
		var r struct {
			TaskID string `json:"task_id"`
			Native string `json:"taskId"`
		}
		if err := json.Unmarshal(got, &r); err != nil {
			t.Fatalf("POST %s %q: %d %q: %v", path, body, code, got, err)
		}
		id := r.TaskID + r.Native
		if id == "" {
			t.Fatalf("POST %s %q: %d without a task id: %s", path, body, code, got)
		}
		ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
		defer cancel()
		if _, err := local.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: id}); err != nil {
			t.Fatalf("cancel %s: %v", id, err)
		}
	})
}

package httpapi

import (
	"bytes"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
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
	plog := &panicLog{}
	srv := httptest.NewUnstartedServer(New(&fakeBackend{}, Options{ClientToken: "tok", MaxBodyBytes: 64 << 10}))
	srv.Config.ErrorLog = log.New(plog, "", 0)
	srv.Start()
	client := srv.Client()
	f.Cleanup(func() {
		client.CloseIdleConnections()
		srv.Close()
	})

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
		path := fuzzEndpoints[int(endpoint)%len(fuzzEndpoints)]
		req, err := http.NewRequest(http.MethodPost, srv.URL+path, bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer tok")
		if contentType != "" {
			if strings.ContainsAny(contentType, "\r\n\x00") || !validHeaderValue(contentType) {
				return // not a header value a client can send
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
			return
		}
		if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
			t.Fatalf("POST %s %q: %d with content type %q", path, body, code, ct)
		}
		var eb errorBody
		if err := json.Unmarshal(got, &eb); err != nil || eb.Success || eb.Code == "" || eb.Error == "" {
			t.Fatalf("POST %s %q: %d with error body %q (%v)", path, body, code, got, err)
		}
	})
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

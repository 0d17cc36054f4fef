package httpapi

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/lybicsandbox"
)

// fakeLybic is the two paths of the Lybic sandbox API that sandbox create
// uses, as the local sandbox server answers them.
type fakeLybic struct {
	mu      sync.Mutex
	created []map[string]any
	keys    []string
}

func (f *fakeLybic) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.keys = append(f.keys, r.Header.Get("x-api-key"))
	if r.Header.Get("x-api-key") != "sk-lybic-key" {
		w.WriteHeader(401)
		_, _ = w.Write([]byte(`{"code":"UNAUTHORIZED","message":"invalid API key"}`))
		return
	}
	switch {
	case r.Method == "GET" && r.URL.Path == "/api/orgs/org-123/shapes":
		_, _ = w.Write([]byte(`[{"name":"local-1280x720","os":"Linux"}]`))
	case r.Method == "POST" && r.URL.Path == "/api/orgs/org-123/sandboxes":
		var body map[string]any
		_ = json.NewDecoder(r.Body).Decode(&body)
		f.created = append(f.created, body)
		if body["shape"] != "local-1280x720" {
			w.WriteHeader(400)
			_, _ = w.Write([]byte(`{"code":"BAD_REQUEST","message":"unknown shape"}`))
			return
		}
		_, _ = w.Write([]byte(`{"id":"SBX-1","name":"` + body["name"].(string) + `","shapeName":"local-1280x720","expiresAt":"2026-01-01T00:00:00.000Z",
			"shape":{"name":"local-1280x720","os":"Linux","virtualization":"Container","architecture":"x86_64","hardwareAcceleratedEncoding":false}}`))
	default:
		w.WriteHeader(404)
		_, _ = w.Write([]byte(`{"code":"NOT_FOUND","message":"no route"}`))
	}
}

// TestSeedSandboxCreate: POST /api/sandbox/create creates the sandbox on
// the configured Lybic API with the seed's fields; its limits and the
// API's refusals are 4xx with the reason.
func TestSeedSandboxCreate(t *testing.T) {
	t.Parallel()
	fake := &fakeLybic{}
	api := httptest.NewServer(fake)
	t.Cleanup(api.Close)
	mk := func(shape string) *env {
		c, err := lybicsandbox.New(lybicsandbox.Config{Endpoint: api.URL, Shape: shape})
		if err != nil {
			t.Fatal(err)
		}
		return newEnv(t, dispatcher.Config{}, Options{Sandboxes: c})
	}
	e := mk("local-1280x720")
	seedBody := `{"name": "automation-env", "shape": "beijing-2c-4g-cpu", "maxLifeSeconds": 7200,
	  "authentication": {"api_key": "sk-lybic-key", "org_id": "org-123"}}`
	var out map[string]any
	if r := e.do("POST", "/api/sandbox/create", "", seedBody, &out); r.StatusCode != 200 {
		t.Fatalf("create: %d %v", r.StatusCode, out)
	}
	if out["success"] != true || out["sandbox_id"] != "SBX-1" || out["shape"] != "local-1280x720" || out["os"] != "Linux" ||
		!strings.Contains(out["message"].(string), "beijing-2c-4g-cpu is not offered") {
		t.Fatalf("create answer %v", out)
	}
	if got := fake.created[len(fake.created)-1]; got["maxLifeSeconds"] != float64(7200) || got["name"] != "automation-env" {
		t.Fatalf("sent %v", got)
	}

	cases := []struct {
		name, body string
		code       int
		errCode    string
	}{
		{"life over a day", `{"maxLifeSeconds": 86401, "authentication": {"api_key": "sk-lybic-key", "org_id": "org-123"}}`, 400, "INVALID_ARGUMENT"},
		{"life zero", `{"maxLifeSeconds": 0, "authentication": {"api_key": "sk-lybic-key", "org_id": "org-123"}}`, 400, "INVALID_ARGUMENT"},
		{"life not a number", `{"maxLifeSeconds": "long"}`, 400, "INVALID_ARGUMENT"},
		{"no credentials", `{}`, 400, "INVALID_ARGUMENT"},
		{"wrong key", `{"authentication": {"api_key": "sk-wrong", "org_id": "org-123"}}`, 401, "UNAUTHORIZED"},
		{"another endpoint", `{"authentication": {"api_key": "sk-lybic-key", "org_id": "org-123", "api_endpoint": "http://169.254.169.254"}}`, 400, "INVALID_ARGUMENT"},
	}
	for _, tc := range cases {
		var eb errorBody
		if r := e.do("POST", "/api/sandbox/create", "", tc.body, &eb); r.StatusCode != tc.code || eb.Code != tc.errCode || eb.Error == "" {
			t.Errorf("%s: %d %+v, want %d %s", tc.name, r.StatusCode, eb, tc.code, tc.errCode)
		}
	}
	// At 86400 exactly it is created.
	if r := e.do("POST", "/api/sandbox/create", "", `{"maxLifeSeconds": 86400, "authentication": {"api_key": "sk-lybic-key", "org_id": "org-123"}}`, &out); r.StatusCode != 200 {
		t.Fatalf("a day: %d %v", r.StatusCode, out)
	}
	// Without a fallback shape the API's own refusal of the shape is told.
	var eb errorBody
	if r := mk("").do("POST", "/api/sandbox/create", "", seedBody, &eb); r.StatusCode != 400 || !strings.Contains(eb.Error, "unknown shape") {
		t.Fatalf("unknown shape: %d %+v", r.StatusCode, eb)
	}
	// No sandbox API configured: 501.
	if r := newEnv(t, dispatcher.Config{}, Options{}).do("POST", "/api/sandbox/create", "", seedBody, &eb); r.StatusCode != 501 {
		t.Fatalf("unconfigured: %d %+v", r.StatusCode, eb)
	}
}

package httpapi

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

const (
	tokA     = "token-of-team-a"
	tokB     = "token-of-team-b"
	tokAdmin = "the-admin-token"
)

// tenantEnv is an env whose HTTP API takes the dispatcher's tenants (a
// tenants file with team-a and team-b, and --admin-token). No commander is
// connected: every task stays PENDING, so each can be acted on.
func tenantEnv(t *testing.T) *env {
	t.Helper()
	e, _ := tenantEnvAt(t)
	return e
}

// tenantEnvAt is tenantEnv that also says where its tenants file is.
func tenantEnvAt(t *testing.T) (*env, string) {
	t.Helper()
	src := "tenants:\n" +
		"  - {name: team-a, tokens: [\"" + tenant.HashToken(tokA).String() + "\"]}\n" +
		"  - {name: team-b, tokens: [\"" + tenant.HashToken(tokB).String() + "\"]}\n"
	path := filepath.Join(t.TempDir(), "tenants.yaml")
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := dispatcher.New(dispatcher.Config{Auth: dispatcher.Auth{AdminToken: tokAdmin, CommanderToken: "cmd", TenantsFile: path}})
	if err != nil {
		t.Fatal(err)
	}
	s := api.New(d)
	g := testutil.ServeGRPC(t, s.Register, s.ServerOptions()...)
	g.OnStop(d.Close)
	e := &env{t: t, d: d, conn: g.Conn}
	hs := httptest.NewServer(New(s.Local(), Options{Auth: d.Auth()}))
	t.Cleanup(func() {
		hs.CloseClientConnections()
		hs.Close()
	})
	e.http, e.url = hs, hs.URL
	return e, path
}

type submitted struct {
	TaskID string `json:"task_id"`
}

type taskJSON struct {
	TaskID string `json:"task_id"`
	Status string `json:"status"`
	Tenant string `json:"tenant"`
}

type listJSON struct {
	Tasks         []taskJSON `json:"tasks"`
	NextPageToken string     `json:"next_page_token"`
}

func (e *env) list(token string) map[string]taskJSON {
	e.t.Helper()
	out := map[string]taskJSON{}
	path := "/api/tasks?page_size=1"
	for {
		var l listJSON
		if r := e.do("GET", path, token, "", &l); r.StatusCode != http.StatusOK {
			e.t.Fatalf("list: %d", r.StatusCode)
		}
		for _, tk := range l.Tasks {
			out[tk.TaskID] = tk
		}
		if l.NextPageToken == "" {
			return out
		}
		path = "/api/tasks?page_size=1&page_token=" + url.QueryEscape(l.NextPageToken)
	}
}

// getWithCookie is a GET as the web page makes it: the token in the cookie.
func (e *env) getWithCookie(path, token string) int {
	e.t.Helper()
	req, err := http.NewRequest("GET", e.url+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	req.AddCookie(&http.Cookie{Name: TokenCookie, Value: url.PathEscape(token)})
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestHTTPTenantsSeeOnlyTheirOwnTasks: on the seed-001 and native HTTP
// endpoints (and the web page's cookie), a tenant gets 404 for the other
// tenant's task — as for one that does not exist — lists only its own, and
// its cancel-all cancels only its own; the admin sees everything, with
// each task's tenant.
func TestHTTPTenantsSeeOnlyTheirOwnTasks(t *testing.T) {
	t.Parallel()
	e := tenantEnv(t)
	var a1, a2, b1 submitted
	if r := e.do("POST", "/api/agent/task/submit", tokA, `{"instruction": "a one"}`, &a1); r.StatusCode != 200 {
		t.Fatalf("submit: %d", r.StatusCode)
	}
	if r := e.do("POST", "/api/tasks", tokA, `{"instruction": "a two"}`, &a2); r.StatusCode != 201 {
		t.Fatalf("submit: %d", r.StatusCode)
	}
	if r := e.do("POST", "/api/agent/task/submit", tokB, `{"instruction": "b one"}`, &b1); r.StatusCode != 200 {
		t.Fatalf("submit: %d", r.StatusCode)
	}

	for _, id := range []string{a1.TaskID, "no-such-task"} {
		for _, c := range []struct{ method, path, body string }{
			{"GET", "/api/agent/task/status/" + id, ""},
			{"GET", "/api/tasks/" + id, ""},
			{"GET", "/api/tasks/" + id + "/events", ""},
			{"POST", "/api/tasks/" + id + "/cancel", `{}`},
			{"POST", "/api/tasks/" + id + "/interject", `{"text": "psst"}`},
			{"POST", "/api/tasks/" + id + "/tool-calls/c1/approve", `{}`},
			{"POST", "/api/tasks/" + id + "/tool-calls/c1/reject", `{}`},
			{"POST", "/api/agent/cancel", `{"task_id": "` + id + `"}`},
			{"POST", "/api/agent/task/submit", `{"instruction": "go on", "continue_context": true, "task_id": "` + id + `"}`},
			{"POST", "/api/agent/run", `{"instruction": "go on", "continue_context": true, "task_id": "` + id + `"}`},
			{"POST", "/api/tasks", `{"instruction": "go on", "previous_task_id": "` + id + `"}`},
		} {
			var eb errorBody
			if r := e.do(c.method, c.path, tokB, c.body, &eb); r.StatusCode != http.StatusNotFound || eb.Code != "NOT_FOUND" {
				t.Errorf("team-b %s %s: %d %+v, want 404 NOT_FOUND", c.method, c.path, r.StatusCode, eb)
			}
		}
		for _, path := range []string{"/api/tasks/" + id, "/api/tasks/" + id + "/events", "/api/agent/task/status/" + id} {
			if code := e.getWithCookie(path, tokB); code != http.StatusNotFound {
				t.Errorf("team-b's cookie GET %s: %d, want 404", path, code)
			}
		}
	}
	// The owner reaches its task (it is pending: interject is a conflict,
	// not a 404).
	if r := e.do("GET", "/api/tasks/"+a1.TaskID, tokA, "", nil); r.StatusCode != 200 {
		t.Fatalf("owner's get: %d", r.StatusCode)
	}
	if code := e.getWithCookie("/api/agent/task/status/"+a1.TaskID, tokA); code != 200 {
		t.Fatalf("owner's cookie get: %d", code)
	}
	if r := e.do("POST", "/api/tasks/"+a1.TaskID+"/interject", tokA, `{"text": "hi"}`, nil); r.StatusCode != http.StatusConflict {
		t.Fatalf("owner's interject on a pending task: %d", r.StatusCode)
	}
	var cont submitted
	if r := e.do("POST", "/api/agent/task/submit", tokA, `{"instruction": "go on", "continue_context": true, "task_id": "`+a1.TaskID+`"}`, &cont); r.StatusCode != 200 {
		t.Fatalf("owner's continue: %d", r.StatusCode)
	}

	if got := e.list(tokB); len(got) != 1 || got[b1.TaskID].TaskID == "" {
		t.Fatalf("team-b lists %v", got)
	}
	got := e.list(tokA)
	if len(got) != 3 || got[a1.TaskID].Tenant != "" {
		t.Fatalf("team-a lists %v (the tenant is shown to admins only)", got)
	}
	all := e.list(tokAdmin)
	if len(all) != 4 || all[a1.TaskID].Tenant != "team-a" || all[cont.TaskID].Tenant != "team-a" || all[b1.TaskID].Tenant != "team-b" {
		t.Fatalf("admin lists %v", all)
	}

	// team-b's cancel-all cancels team-b's tasks only.
	var out struct {
		Success   bool     `json:"success"`
		Cancelled []string `json:"cancelled"`
	}
	if r := e.do("POST", "/api/agent/cancel", tokB, `{}`, &out); r.StatusCode != 200 || len(out.Cancelled) != 1 || out.Cancelled[0] != b1.TaskID {
		t.Fatalf("team-b's cancel-all: %d %+v", r.StatusCode, out)
	}
	for id, tk := range e.list(tokAdmin) {
		want := "TASK_STATUS_PENDING"
		if id == b1.TaskID {
			want = "TASK_STATUS_CANCELLED"
		}
		if !strings.HasSuffix(tk.Status, strings.TrimPrefix(want, "TASK_STATUS_")) {
			t.Errorf("%s is %s after team-b's cancel-all, want %s", id, tk.Status, want)
		}
	}
	// The admin's cancel-all cancels everything.
	if r := e.do("POST", "/api/agent/cancel", tokAdmin, `{}`, &out); r.StatusCode != 200 || len(out.Cancelled) != 3 {
		t.Fatalf("admin's cancel-all: %d %+v", r.StatusCode, out)
	}
	// No token, or another's: refused.
	if r := e.do("GET", "/api/tasks", "", "", nil); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("no token: %d", r.StatusCode)
	}
	if r := e.do("GET", "/api/tasks", "cmd", "", nil); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("the commander token as a client's: %d", r.StatusCode)
	}
}

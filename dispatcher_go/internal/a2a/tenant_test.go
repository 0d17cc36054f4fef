package a2a

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
)

func tokenHash(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return "sha256:" + hex.EncodeToString(h[:])
}

// rpc posts one JSON-RPC 1.0-binding call with a bearer token and returns
// the decoded result and error code (0: none).
func rpc(t *testing.T, h http.Handler, token, method, params string) (json.RawMessage, int) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "http://127.0.0.1/a2a",
		strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"`+method+`","params":`+params+`}`))
	req.Header.Set("A2A-Version", "1.0")
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+token)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	var resp struct {
		Result json.RawMessage     `json:"result"`
		Error  *struct{ Code int } `json:"error"`
	}
	if rec.Code == http.StatusUnauthorized {
		return nil, http.StatusUnauthorized
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
		t.Fatalf("%s: %d %s", method, rec.Code, rec.Body.String())
	}
	if resp.Error != nil {
		return nil, resp.Error.Code
	}
	return resp.Result, 0
}

// TestTenantsSeeOnlyTheirOwnTasks: over the JSON-RPC binding a tenant's
// token scopes every call, as on the other APIs: another tenant's task is
// TaskNotFound (as a missing one), lists show only the caller's tasks, and
// an admin sees all.
func TestTenantsSeeOnlyTheirOwnTasks(t *testing.T) {
	file := filepath.Join(t.TempDir(), "tenants.yaml")
	body := "tenants:\n" +
		"  - name: red\n    tokens: [" + tokenHash("red-token") + "]\n" +
		"  - name: blue\n    tokens: [" + tokenHash("blue-token") + "]\n" +
		"  - name: ops\n    admin: true\n    tokens: [" + tokenHash("ops-token") + "]\n"
	if err := os.WriteFile(file, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := dispatcher.New(dispatcher.Config{Auth: dispatcher.Auth{TenantsFile: file, CommanderToken: "cmd-token"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(d.Close)
	srv := api.New(d)
	h := New(srv.Local(), Options{Auth: d.Auth()})

	res, code := rpc(t, h, "red-token", "SendMessage",
		`{"message":{"messageId":"m1","role":"ROLE_USER","parts":[{"text":"hello"}]},"configuration":{"returnImmediately":true}}`)
	if code != 0 {
		t.Fatalf("send as red: error %d", code)
	}
	var sent struct {
		Task struct{ ID string } `json:"task"`
	}
	if err := json.Unmarshal(res, &sent); err != nil || sent.Task.ID == "" {
		t.Fatalf("send result: %s", res)
	}
	id := sent.Task.ID

	if _, code := rpc(t, h, "red-token", "GetTask", `{"id":"`+id+`"}`); code != 0 {
		t.Fatalf("red must see its own task: error %d", code)
	}
	if _, code := rpc(t, h, "blue-token", "GetTask", `{"id":"`+id+`"}`); code != -32001 {
		t.Fatalf("blue reading red's task: error %d, want -32001 TaskNotFound", code)
	}
	if _, code := rpc(t, h, "blue-token", "CancelTask", `{"id":"`+id+`"}`); code != -32001 {
		t.Fatalf("blue cancelling red's task: error %d, want -32001 TaskNotFound", code)
	}
	if _, code := rpc(t, h, "nobody", "GetTask", `{"id":"`+id+`"}`); code != http.StatusUnauthorized {
		t.Fatalf("unknown token: %d, want 401", code)
	}
	count := func(token string) int {
		res, code := rpc(t, h, token, "ListTasks", `{}`)
		if code != 0 {
			t.Fatalf("list: error %d", code)
		}
		var l struct{ Tasks []json.RawMessage }
		if err := json.Unmarshal(res, &l); err != nil {
			t.Fatal(err)
		}
		return len(l.Tasks)
	}
	if n := count("blue-token"); n != 0 {
		t.Fatalf("blue lists %d tasks, want 0", n)
	}
	if n := count("red-token"); n != 1 {
		t.Fatalf("red lists %d tasks, want 1", n)
	}
	if n := count("ops-token"); n != 1 {
		t.Fatalf("admin lists %d tasks, want 1", n)
	}
	if _, code := rpc(t, h, "ops-token", "CancelTask", `{"id":"`+id+`"}`); code != 0 {
		t.Fatalf("admin cancelling red's task: error %d", code)
	}
}

package httpapi

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestRevokedTokenEndsItsEventStream: an SSE stream opened with a token
// that a tenants file reload takes away ends (the browser's reconnect then
// gets 401), as its gRPC watch would; the other tenant's stream goes on.
func TestRevokedTokenEndsItsEventStream(t *testing.T) {
	t.Parallel()
	e, path := tenantEnvAt(t)
	var a, b submitted
	e.do("POST", "/api/tasks", tokA, `{"instruction": "a's"}`, &a)
	e.do("POST", "/api/tasks", tokB, `{"instruction": "b's"}`, &b)
	ctx, cancel := context.WithTimeout(context.Background(), testutil.Wait)
	defer cancel()
	open := func(token, id string) *bufio.Reader {
		req, err := http.NewRequestWithContext(ctx, "GET", e.url+"/api/tasks/"+id+"/events", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("events of %s: %v %v", id, resp, err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		r := bufio.NewReader(resp.Body)
		if line, err := r.ReadString('\n'); err != nil { // the stream is up
			t.Fatalf("first line %q: %v", line, err)
		}
		return r
	}
	streamA, streamB := open(tokA, a.TaskID), open(tokB, b.TaskID)

	src := "tenants:\n  - {name: team-b, tokens: [\"" + tenant.HashToken(tokB).String() + "\"]}\n"
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.d.Auth().Reload(); err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := streamA.ReadString('\n'); err != nil {
			if ctx.Err() != nil {
				t.Fatalf("team-a's stream did not end after its token was revoked: %v", err)
			}
			break
		}
	}
	if r := e.do("GET", "/api/tasks/"+a.TaskID+"/events", tokA, "", nil); r.StatusCode != http.StatusUnauthorized {
		t.Fatalf("reconnect with the revoked token: %d", r.StatusCode)
	}
	// team-b's stream is still up: it sees its task's cancel.
	if r := e.do("POST", "/api/tasks/"+b.TaskID+"/cancel", tokB, `{}`, nil); r.StatusCode != http.StatusOK {
		t.Fatalf("cancel: %d", r.StatusCode)
	}
	for {
		line, err := streamB.ReadString('\n')
		if err != nil {
			t.Fatalf("team-b's stream ended before its task: %v", err)
		}
		if strings.Contains(line, "CANCELLED") {
			break
		}
	}
}

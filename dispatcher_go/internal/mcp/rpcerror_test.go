package mcp

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// What the SDK refused with net/http's text/plain error — a body that is
// not JSON, a message that is not JSON-RPC, an id of 10^400, a method it
// does not serve — is a JSON-RPC error (-32700, -32600, -32601) with the
// request's id where there is one; requests that are fine are answered as
// before.
func TestBadRequestsAreJSONRPCErrors(t *testing.T) {
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: newFakeTasks(), Tools: newBroker(t)}))
	t.Cleanup(hs.Close)
	do := func(method, body string) (int, string, string) {
		req, _ := http.NewRequest(method, hs.URL, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
	}
	for _, c := range []struct {
		name, method, body string
		status             int
		code               int
		id                 any
	}{
		{"not JSON", "POST", `{"jsonrpc":"2.0","id":1,`, 400, -32700, nil},
		{"empty body", "POST", ``, 400, -32700, nil},
		{"not JSON-RPC", "POST", `{"hello":"world"}`, 400, -32600, nil},
		{"huge id", "POST", `{"jsonrpc":"2.0","id":1` + strings.Repeat("0", 400) + `,"method":"tools/list"}`, 400, -32600, nil},
		{"empty batch", "POST", `[]`, 400, -32600, nil},
		{"unknown method", "POST", `{"jsonrpc":"2.0","id":7,"method":"no/such"}`, 400, -32601, float64(7)},
		{"unknown method, string id", "POST", `{"jsonrpc":"2.0","id":"a","method":"no/such"}`, 400, -32601, "a"},
		{"GET without a session", "GET", ``, 0, -32600, nil},
		// Found by the black-box attack run: id 1.5 was answered with id 1,
		// initialize params of the wrong type with error code 0.
		{"fractional id", "POST", `{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}`, 400, -32600, nil},
		{"fractional id in a batch", "POST", `[{"jsonrpc":"2.0","id":2,"method":"tools/list"},{"jsonrpc":"2.0","id":-0.5,"method":"tools/list"}]`, 400, -32600, nil},
		{"initialize params of the wrong type", "POST", `{"jsonrpc":"2.0","id":3,"method":"initialize","params":{"protocolVersion":5}}`, 400, -32602, float64(3)},
		{"initialize params not an object", "POST", `{"jsonrpc":"2.0","id":"i","method":"initialize","params":[1]}`, 400, -32602, "i"},
	} {
		status, ct, got := do(c.method, c.body)
		var e struct {
			JSONRPC string `json:"jsonrpc"`
			ID      any    `json:"id"`
			Error   struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if (c.status != 0 && status != c.status) || status < 400 || ct != "application/json" || json.Unmarshal([]byte(got), &e) != nil ||
			e.JSONRPC != "2.0" || e.Error.Code != c.code || e.Error.Message == "" || e.ID != c.id {
			t.Errorf("%s: %d %s %.200q, want %d with JSON-RPC error %d, id %v", c.name, status, ct, got, c.status, c.code, c.id)
		}
	}
	status, _, got := do("POST", `{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
	if status != http.StatusOK || !strings.Contains(got, `"tools":[`) {
		t.Fatalf("tools/list: %d %.200q", status, got)
	}
	// A version header that is no version: -32600 naming the versions (the
	// SDK compared it as a string, took "bogus" for a version after
	// 2026-07-28 and asked for a _meta field; black-box attack run).
	req, _ := http.NewRequest("POST", hs.URL, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "application/json, text/event-stream")
	req.Header.Set("MCP-Protocol-Version", "bogus")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(b), `"code":-32600`) || !strings.Contains(string(b), `unsupported MCP-Protocol-Version \"bogus\" (supported: 2026-07-28`) {
		t.Fatalf("MCP-Protocol-Version bogus: %d %s", resp.StatusCode, b)
	}
	// An integral id written as a float is still an integer.
	status, _, got = do("POST", `{"jsonrpc":"2.0","id":4.0,"method":"tools/list"}`)
	if status != http.StatusOK || !strings.Contains(got, `"id":4,`) {
		t.Fatalf("tools/list id 4.0: %d %.200q", status, got)
	}
}

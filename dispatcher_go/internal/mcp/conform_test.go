package mcp

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
)

// Prompts and resources are capabilities we do not declare: their methods
// are "method not found", not empty lists (the MCP conformance suite,
// 2026-07-28: sep-2575-server-declares-prompts-in-discover). Tools still list.
func TestUndeclaredCapabilitiesAreMethodNotFound(t *testing.T) {
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: newFakeTasks(), Tools: newBroker(t)}))
	defer hs.Close()

	// 2025-11-25, through the SDK's client.
	c := sdk.NewClient(&sdk.Implementation{Name: "c", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &sdk.StreamableClientTransport{Endpoint: hs.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	if _, err := cs.ListPrompts(context.Background(), nil); err == nil || !strings.Contains(err.Error(), "method not found") {
		t.Errorf("prompts/list: %v, want method not found", err)
	}
	if _, err := cs.ListResources(context.Background(), nil); err == nil || !strings.Contains(err.Error(), "method not found") {
		t.Errorf("resources/list: %v, want method not found", err)
	}
	if _, err := cs.ListTools(context.Background(), nil); err != nil {
		t.Errorf("tools/list: %v", err)
	}

	// 2026-07-28, stateless: the code on the wire.
	meta := `{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientInfo":{"name":"x","version":"1"}}`
	for _, m := range []string{"prompts/list", "resources/list", "resources/templates/list"} {
		req, _ := http.NewRequest(http.MethodPost, hs.URL, strings.NewReader(`{"jsonrpc":"2.0","id":1,"method":"`+m+`","params":{"_meta":`+meta+`}}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		req.Header.Set("MCP-Protocol-Version", "2026-07-28")
		req.Header.Set("Mcp-Method", m)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		s := string(body)
		if i := strings.Index(s, "data: "); i >= 0 {
			s = strings.TrimSpace(s[i+len("data: "):])
		}
		var r struct {
			Error *struct{ Code int } `json:"error"`
		}
		if err := json.Unmarshal([]byte(s), &r); err != nil || r.Error == nil || r.Error.Code != -32601 {
			t.Errorf("%s (2026-07-28): %s, want error -32601", m, body)
		}
	}
}

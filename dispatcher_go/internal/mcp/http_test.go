package mcp

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// An HTTP server (streamable HTTP, with the configured bearer header):
// its tools are brokered, a cancel reaches it, tools/list_changed updates
// the broker, and a result over the broker's limit fails that call.
func TestHTTPServerThroughTheBroker(t *testing.T) {
	log := filepath.Join(t.TempDir(), "log")
	t.Setenv("MCPTEST_LOG", log)
	srv := testServer()
	h := sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server { return srv }, nil)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer secret" {
			http.Error(w, "no", http.StatusUnauthorized)
			return
		}
		h.ServeHTTP(w, r)
	}))
	defer hs.Close()

	b, err := broker.New(broker.Options{DefaultTimeout: 10 * time.Second, MaxResultBytes: 256})
	if err != nil {
		t.Fatal(err)
	}
	m := NewManager(Options{Registry: b, MinBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond})
	defer m.Close()
	m.Apply(Config{Servers: map[string]ServerConfig{
		"h":       {URL: hs.URL, Headers: map[string]string{"Authorization": "Bearer secret"}},
		"refused": {URL: hs.URL},
	}})
	testutil.WaitFor(t, testutil.Wait, func() bool { return hasTool(b, "mcp.h.fast") }, "the HTTP server's tools")

	ctx := context.Background()
	if r := call(ctx, b, "mcp.h.fast", `{"text":"hi"}`); code(r) != "OK" || !strings.Contains(r.GetResultJson(), `"echo":"hi"`) {
		t.Errorf("fast: %v", r)
	}
	if r := call(ctx, b, "mcp.h.fast", `{"text":"`+strings.Repeat("x", 300)+`"}`); code(r) != "EXECUTION_FAILED" || !strings.Contains(r.GetError().GetMessage(), "exceeds the limit") {
		t.Errorf("a result over the limit: %v", r)
	}

	cctx, cancel := context.WithCancel(ctx)
	done := make(chan *dispatchv1.ToolCallResult, 1)
	go func() { done <- call(cctx, b, "mcp.h.slow", `{"tag":"http","ms":30000}`) }()
	testutil.WaitFor(t, testutil.Wait, logHas(log, "BEGIN http"), "slow started")
	cancel()
	if r := testutil.Recv(t, done, testutil.Wait, "the cancelled call"); code(r) != "CANCELLED" {
		t.Errorf("cancelled: %v", r)
	}
	testutil.WaitFor(t, testutil.Wait, logHas(log, "CANCELLED http"), "the HTTP server saw the cancel")

	srv.AddTool(&sdk.Tool{Name: "extra", InputSchema: map[string]any{"type": "object"}}, func(context.Context, *sdk.CallToolRequest) (*sdk.CallToolResult, error) {
		return &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: "x"}}}, nil
	})
	testutil.WaitFor(t, testutil.Wait, func() bool { return hasTool(b, "mcp.h.extra") }, "a tool added after tools/list_changed")
	if r := call(ctx, b, "mcp.h.extra", ``); code(r) != "OK" || r.GetResultJson() != `{"content":[{"type":"text","text":"x"}]}` {
		t.Errorf("extra: %v", r)
	}

	// Without the header the server refuses: never connected, no tools.
	testutil.WaitFor(t, testutil.Wait, func() bool { st, _ := m.Status("refused"); return st.Restarts >= 2 }, "refused retried")
	if st, _ := m.Status("refused"); st.Connected || hasTool(b, "mcp.refused.fast") {
		t.Errorf("refused: %+v", st)
	}
}

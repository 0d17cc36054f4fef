package mcp

import (
	"context"
	"net/http/httptest"
	"testing"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
)

// The server declares every capability whose methods it answers: the SDK
// answers prompts/* and resources/* (with empty lists), so prompts and
// resources are declared, as the MCP conformance suite checks for
// 2026-07-28 (sep-2575-server-declares-prompts-in-discover); tools and
// logging as before.
func TestAnsweredCapabilitiesAreDeclared(t *testing.T) {
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: newFakeTasks(), Tools: newBroker(t)}))
	defer hs.Close()
	c := sdk.NewClient(&sdk.Implementation{Name: "c", Version: "1"}, nil)
	cs, err := c.Connect(context.Background(), &sdk.StreamableClientTransport{Endpoint: hs.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer cs.Close()
	caps := cs.InitializeResult().Capabilities
	if caps.Prompts == nil || caps.Resources == nil || caps.Tools == nil || caps.Logging == nil {
		t.Fatalf("capabilities %+v: want prompts, resources, tools and logging", caps)
	}
	if p, err := cs.ListPrompts(context.Background(), nil); err != nil || len(p.Prompts) != 0 {
		t.Errorf("prompts/list: %+v %v, want an empty list", p, err)
	}
	if r, err := cs.ListResources(context.Background(), nil); err != nil || len(r.Resources) != 0 {
		t.Errorf("resources/list: %+v %v, want an empty list", r, err)
	}
	if tl, err := cs.ListTools(context.Background(), nil); err != nil || len(tl.Tools) == 0 {
		t.Errorf("tools/list: %+v %v", tl, err)
	}
}

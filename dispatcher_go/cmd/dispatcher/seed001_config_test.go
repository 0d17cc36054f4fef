package main

import (
	"io"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestConfigSandboxAndQueue: the sandbox API of POST /api/sandbox/create
// comes from the flags or seed 001's LYBIC_* variables, its key only from
// the environment (DISPATCHER_SANDBOX_API_KEY first); --planners and
// --queue-timeout reach the task settings (0: never).
func TestConfigSandboxAndQueue(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(map[string]string{
		"LYBIC_API_ENDPOINT": "http://127.0.0.1:9", "LYBIC_ORG_ID": "ORG-local",
		"LYBIC_SANDBOX_SHAPE": "local-1280x720", "LYBIC_API_KEY": "lysk-env",
	}), io.Discard)
	if err != nil || c.sandboxEndpoint != "http://127.0.0.1:9" || c.sandboxOrg != "ORG-local" ||
		c.sandboxShape != "local-1280x720" || c.sandboxKey != "lysk-env" {
		t.Fatalf("from LYBIC_*: %+v %v", c, err)
	}
	c, err = parseConfig([]string{"--sandbox-endpoint", "http://127.0.0.1:8"}, env(map[string]string{
		"LYBIC_API_ENDPOINT": "http://127.0.0.1:9", "LYBIC_API_KEY": "lysk-env", "DISPATCHER_SANDBOX_API_KEY": "lysk-own",
	}), io.Discard)
	if err != nil || c.sandboxEndpoint != "http://127.0.0.1:8" || c.sandboxKey != "lysk-own" {
		t.Fatalf("flag and own key win: %+v %v", c, err)
	}
	dc := c.dispatcherConfig(nil, nil, nil)
	if dc.Tasks.QueueTimeout != 5*time.Minute || dc.Tasks.Planners != nil {
		t.Fatalf("defaults: %+v", dc.Tasks)
	}
	c, err = parseConfig([]string{"--planners", " chat, gui,", "--queue-timeout", "0"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if dc := c.dispatcherConfig(nil, nil, nil); dc.Tasks.QueueTimeout >= 0 || !slices.Equal(dc.Tasks.Planners, []string{"chat", "gui"}) {
		t.Fatalf("set: %+v", dc.Tasks)
	}
	if _, err := parseConfig([]string{"--planners", "gui", "--default-planner", "chat"}, env(nil), io.Discard); err == nil {
		t.Fatal("a default planner outside --planners was accepted")
	}
	for _, args := range [][]string{{"--planners", "chat,a b"}, {"--default-planner", "-x"}} {
		if _, err := parseConfig(args, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "not a planner name") {
			t.Fatalf("%q: %v, want refused as not a planner name", args, err)
		}
	}
}

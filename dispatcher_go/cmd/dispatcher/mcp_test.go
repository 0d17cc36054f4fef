package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConfigMCPServersFromEnv(t *testing.T) {
	c, err := parseConfig(nil, func(k string) string {
		return map[string]string{"DISPATCHER_MCP_SERVERS": "/etc/mcp.yaml"}[k]
	}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if got := c.dispatcherConfig(nil, nil, nil).MCP.ServersFile; got != "/etc/mcp.yaml" {
		t.Fatalf("mcp servers file %q", got)
	}
}

// An MCP servers file that does not parse keeps the dispatcher from
// starting, with the reason in the log.
func TestBrokenMCPServersFileExits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "mcp.yaml")
	if err := os.WriteFile(path, []byte("mcpServers:\n  bad.name: {command: x}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	code := run([]string{"--listen", "127.0.0.1:0", "--http-listen", "", "--storage-backend", "memory", "--mcp-servers", path}, func(string) string { return "" }, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), `bad.name`) {
		t.Fatalf("exit %d, log %s", code, stderr.String())
	}
}

package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestConfigPolicyFileFromEnv(t *testing.T) {
	c, err := parseConfig(nil, func(k string) string {
		return map[string]string{"DISPATCHER_POLICY_FILE": "/etc/p.yaml", "DISPATCHER_POLICY_POLL": "250ms"}[k]
	}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if c.policyFile != "/etc/p.yaml" || c.policyPoll != 250*time.Millisecond {
		t.Fatalf("policy file %q poll %v", c.policyFile, c.policyPoll)
	}
}

// A policy that fails its own tests keeps the dispatcher from starting,
// with the reason in the log.
func TestBrokenPolicyFileExits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.yaml")
	src := "rules:\n  - {id: r1, when: 'tool_name == \"x\"', action: deny}\ntests:\n  - {name: t1, packets: [{kind: tool_call, tool: x}], expect: {action: allow}}\n"
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	code := run([]string{"--listen", "127.0.0.1:0", "--policy-file", path}, func(string) string { return "" }, &stderr)
	if code == 0 || !strings.Contains(stderr.String(), `test \"t1\"`) {
		t.Fatalf("exit %d, log %s", code, stderr.String())
	}
}

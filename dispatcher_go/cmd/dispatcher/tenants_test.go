package main

// Tests of the tenant flags (issue 12, class 7): --tenants-file (also
// DISPATCHER_TENANTS_FILE) is read at start and a bad one refused,
// --admin-token must differ from the other tokens, and one side's token
// without the other's is warned about with tenants too.

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/tenant"
)

func writeTenants(t *testing.T, src string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tenants.yaml")
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConfigTenants(t *testing.T) {
	clientsOnly := writeTenants(t, "tenants:\n  - {name: a, tokens: [\""+tenant.HashToken("ta").String()+"\"]}\n")
	withCommanders := writeTenants(t, "tenants:\n  - {name: a, tokens: [\""+tenant.HashToken("ta").String()+"\"], commander_tokens: [\""+tenant.HashToken("ca").String()+"\"]}\n")
	bad := writeTenants(t, "tenants:\n  - {name: a, tokens: [\"plaintext\"]}\n")
	for _, tc := range []struct {
		name     string
		args     []string
		env      map[string]string
		wantErr  string
		warnings []string
	}{
		{"file from the environment, shared commander token", []string{"--commander-token", "c"}, map[string]string{"DISPATCHER_TENANTS_FILE": clientsOnly}, "", nil},
		{"file with commander tokens alone", []string{"--tenants-file", withCommanders}, nil, "", nil},
		{"file without commander tokens alone", []string{"--tenants-file", clientsOnly}, nil, "", []string{"only the client token"}},
		{"admin token alone", []string{"--admin-token", "adm"}, nil, "", []string{"only the client token"}},
		{"commander token alone", []string{"--commander-token", "c"}, nil, "", []string{"only the commander token"}},
		{"beyond loopback with tenants and their commanders", []string{"--listen", "0.0.0.0:0", "--tenants-file", withCommanders}, nil, "", nil},
		{"beyond loopback with tenants, no commander token", []string{"--listen", "0.0.0.0:0", "--tenants-file", clientsOnly}, nil, "without --commander-token", nil},
		{"bad file", []string{"--tenants-file", bad}, nil, "--tenants-file", nil},
		{"missing file", []string{"--tenants-file", filepath.Join(t.TempDir(), "none.yaml")}, nil, "--tenants-file", nil},
		{"admin = commander", []string{"--admin-token", "x", "--commander-token", "x"}, nil, "--admin-token must differ", nil},
		{"admin = client", []string{"--admin-token", "x", "--client-token", "x", "--commander-token", "y"}, nil, "--admin-token must differ", nil},
	} {
		c, err := parseConfig(tc.args, env(tc.env), io.Discard)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
			continue
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%s: err %v, want %q", tc.name, err, tc.wantErr)
			}
			continue
		}
		got := c.warnings()
		if len(got) != len(tc.warnings) {
			t.Errorf("%s: warnings %q, want %q", tc.name, got, tc.warnings)
			continue
		}
		for i, w := range tc.warnings {
			if !strings.Contains(got[i], w) {
				t.Errorf("%s: warning %q lacks %q", tc.name, got[i], w)
			}
		}
		if cfg := c.dispatcherConfig(nil, nil, nil); cfg.Auth.TenantsFile != c.tenantsFile || cfg.Auth.AdminToken != c.adminToken {
			t.Errorf("%s: dispatcher config %+v", tc.name, cfg.Auth)
		}
	}
}

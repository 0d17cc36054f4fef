package tenant

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestReloadNeverOpensCommanderAuth: commanders need a token because the
// file held commander tokens at start (no --commander-token); a reload that
// drops them must not let every commander in, unrestricted, to receive
// every tenant's task configs. Once commanders need a token, they always do.
func TestReloadNeverOpensCommanderAuth(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "tenants.yaml")
	write(t, path, fileOf(entry("team-a", false, []string{"a"}, []string{"cmd-a"})))
	a := newAuth(t, Options{File: path})
	if !a.CommanderAuth() {
		t.Fatal("commander auth off with a commander token in the file")
	}
	write(t, path, fileOf(entry("team-a", false, []string{"a"}, nil)))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if !a.CommanderAuth() {
		t.Fatal("a reload without commander tokens turned commander auth off")
	}
	for _, tok := range []string{"", "cmd-a", "anything"} {
		if c, ok := a.Commander(tok); ok {
			t.Fatalf("commander token %q admitted as %+v after its removal", tok, c)
		}
	}
}

// TestEmptyTokenHashRefused: the hash of the empty token (what the
// documented one-liner prints when $TOKEN is unset) would make every
// request without a token that tenant, or an admin. The file is refused.
func TestEmptyTokenHashRefused(t *testing.T) {
	t.Parallel()
	empty := HashToken("").String()
	for _, src := range []string{
		"tenants:\n  - name: ops\n    admin: true\n    tokens: [\"" + empty + "\"]\n",
		"tenants:\n  - name: team-a\n    tokens: [\"" + hashOf("a") + "\"]\n    commander_tokens: [\"" + empty + "\"]\n",
	} {
		_, err := Parse([]byte(src))
		if err == nil || !strings.Contains(err.Error(), "empty token") {
			t.Fatalf("a file with the empty token's hash: %v", err)
		}
	}
}

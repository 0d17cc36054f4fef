package tenant

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func hashOf(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return "sha256:" + hex.EncodeToString(s[:])
}

func fileOf(entries ...string) string { return "tenants:\n" + strings.Join(entries, "") }

func entry(name string, admin bool, tokens, commanderTokens []string) string {
	var b strings.Builder
	b.WriteString("  - name: " + name + "\n")
	if admin {
		b.WriteString("    admin: true\n")
	}
	if len(tokens) > 0 {
		b.WriteString("    tokens:\n")
		for _, t := range tokens {
			b.WriteString("      - " + hashOf(t) + "\n")
		}
	}
	if len(commanderTokens) > 0 {
		b.WriteString("    commander_tokens:\n")
		for _, t := range commanderTokens {
			b.WriteString("      - " + hashOf(t) + "\n")
		}
	}
	return b.String()
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestHashFormat(t *testing.T) {
	// The documented one-liner: printf %s abc | sha256sum → "sha256:" + its hex.
	if got := HashToken("abc").String(); got != "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" {
		t.Fatalf("hash %q", got)
	}
	if h, ok := ParseHash(HashToken("abc").String()); !ok || h != HashToken("abc") {
		t.Fatal("a hash does not read back")
	}
	for _, bad := range []string{"", "sha256:", "sha256:zz", "md5:" + strings.Repeat("a", 64), "sha256:" + strings.Repeat("a", 63), "sha256:" + strings.Repeat("g", 64)} {
		if _, ok := ParseHash(bad); ok {
			t.Errorf("ParseHash(%q) accepted", bad)
		}
	}
	if h, ok := ParseHash(strings.ToUpper(hashOf("x")[7:])); ok {
		t.Errorf("a hash without its prefix accepted: %v", h)
	}
}

func TestParse(t *testing.T) {
	good := fileOf(
		entry("team-a", false, []string{"a1", "a2"}, []string{"ca"}),
		entry("team-b", false, []string{"b1"}, nil),
		entry("ops", true, []string{"root"}, nil),
	)
	d, err := Parse([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if d.Tenants() != 3 {
		t.Fatalf("tenants %d", d.Tenants())
	}
	// JSON is accepted too.
	js := `{"tenants": [{"name": "j", "tokens": ["` + hashOf("j") + `"]}]}`
	if _, err := Parse([]byte(js)); err != nil {
		t.Fatalf("json: %v", err)
	}
	for name, src := range map[string]string{
		"empty":             "",
		"no tenants":        "tenants: []\n",
		"unknown field":     "tenants:\n  - name: a\n    admn: true\n    tokens: [" + hashOf("a") + "]\n",
		"bad hash":          "tenants:\n  - name: a\n    tokens: [\"plaintext-token\"]\n",
		"no tokens":         "tenants:\n  - name: a\n",
		"bad name":          fileOf(entry("a b", false, []string{"x"}, nil)),
		"empty name":        "tenants:\n  - tokens: [" + hashOf("a") + "]\n",
		"duplicate name":    fileOf(entry("a", false, []string{"x"}, nil), entry("a", false, []string{"y"}, nil)),
		"token twice":       fileOf(entry("a", false, []string{"x"}, nil), entry("b", false, []string{"x"}, nil)),
		"client=commander":  fileOf(entry("a", false, []string{"x"}, []string{"x"})),
		"not yaml":          "tenants: [",
		"top-level unknown": "tenant:\n  - name: a\n",
	} {
		if _, err := Parse([]byte(src)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func newAuth(t *testing.T, o Options) *Auth {
	t.Helper()
	a, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestClientAndCommanderTokens(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tenants.yaml")
	write(t, path, fileOf(
		entry("team-a", false, []string{"a1", "a2"}, []string{"ca"}),
		entry("team-b", false, []string{"b1"}, nil),
		entry("ops", true, []string{"root"}, nil),
	))
	a := newAuth(t, Options{File: path, ClientToken: "plain", CommanderToken: "shared", AdminToken: "adm"})
	for tok, want := range map[string]Caller{
		"a1":    {Tenant: "team-a"},
		"a2":    {Tenant: "team-a"},
		"b1":    {Tenant: "team-b"},
		"root":  {Tenant: "ops", Admin: true},
		"adm":   {Admin: true},
		"plain": {},
	} {
		if got, ok := a.Client(tok); !ok || got != want {
			t.Errorf("Client(%q) = %+v %v, want %+v", tok, got, ok, want)
		}
	}
	for _, tok := range []string{"", "ca", "shared", "a1 ", "A1", hashOf("a1")} {
		if _, ok := a.Client(tok); ok {
			t.Errorf("Client(%q) accepted", tok)
		}
	}
	if c, ok := a.Commander("ca"); !ok || c != (Commander{Tenant: "team-a", Restricted: true}) {
		t.Errorf("tenant commander token: %+v %v", c, ok)
	}
	if c, ok := a.Commander("shared"); !ok || c.Restricted {
		t.Errorf("shared commander token: %+v %v", c, ok)
	}
	for _, tok := range []string{"a1", "plain", "adm", ""} {
		if _, ok := a.Commander(tok); ok {
			t.Errorf("Commander(%q) accepted", tok)
		}
	}
}

func TestNoAuthIsTheDefaultTenant(t *testing.T) {
	a := newAuth(t, Options{})
	if c, ok := a.Client("anything"); !ok || c != (Caller{}) {
		t.Fatalf("%+v %v", c, ok)
	}
	if c, ok := a.Commander(""); !ok || c.Restricted {
		t.Fatalf("%+v %v", c, ok)
	}
	if FromContext(context.Background()) != (Caller{}) {
		t.Fatal("a context without a caller must be the default tenant, not an admin")
	}
	if !(Caller{Admin: true}).Sees("x") || (Caller{Tenant: "a"}).Sees("b") || !(Caller{Tenant: "a"}).Sees("a") || (Caller{}).Sees("a") {
		t.Fatal("Sees")
	}
}

func TestTokensMustDiffer(t *testing.T) {
	for _, o := range []Options{
		{ClientToken: "x", CommanderToken: "x"},
		{AdminToken: "x", CommanderToken: "x"},
		{AdminToken: "x", ClientToken: "x"},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
	// A file token that is a flag's token is refused too.
	path := filepath.Join(t.TempDir(), "t.yaml")
	write(t, path, fileOf(entry("a", false, []string{"shared"}, nil)))
	if _, err := New(Options{File: path, CommanderToken: "shared"}); err == nil {
		t.Error("a file token equal to --commander-token accepted")
	}
	write(t, path, "tenants: [")
	if _, err := New(Options{File: path}); err == nil {
		t.Error("a bad file accepted at start")
	}
}

// TestLookupFindsEveryEntry: the first, the last and no entry are found
// as they should be. The lookup has no early exit (it runs the
// constant-time compare against every credential, see lookup), and it
// allocates nothing per call.
func TestLookupFindsEveryEntry(t *testing.T) {
	var creds []credential
	for i := range 50 {
		creds = append(creds, credential{hash: HashToken(string(rune('a' + i))), tenant: string(rune('a' + i))})
	}
	got, ok := lookup(creds, HashToken("a"))
	if !ok || got.tenant != "a" {
		t.Fatalf("%+v %v", got, ok)
	}
	got, ok = lookup(creds, HashToken(string(rune('a'+49))))
	if !ok || got.tenant != string(rune('a'+49)) {
		t.Fatalf("%+v %v", got, ok)
	}
	if _, ok := lookup(creds, HashToken("zz")); ok {
		t.Fatal("unknown token found")
	}
	allocs := testing.AllocsPerRun(100, func() { lookup(creds, HashToken("a")) })
	if allocs != 0 {
		t.Fatalf("lookup allocates %v times", allocs)
	}
}

// syncBuffer is a log sink safe for the watcher's goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReloadAndBadReload(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tenants.yaml")
	write(t, path, fileOf(entry("team-a", false, []string{"a1"}, nil)))
	var logs syncBuffer
	a := newAuth(t, Options{File: path, Poll: 10 * time.Millisecond, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); a.Watch(ctx) }()
	defer func() { cancel(); <-done }()

	if _, ok := a.Client("b1"); ok {
		t.Fatal("b1 known before the reload")
	}
	// A new tenant appears; a1 moves to another tenant.
	write(t, path, fileOf(entry("team-b", false, []string{"b1"}, nil), entry("team-c", false, []string{"a1"}, nil)))
	waitFor(t, "the reload", func() bool { c, ok := a.Client("b1"); return ok && c.Tenant == "team-b" })
	if c, _ := a.Client("a1"); c.Tenant != "team-c" {
		t.Fatalf("a1 is %+v after the reload", c)
	}
	// A bad file keeps the previous tenants and logs an error.
	write(t, path, "tenants:\n  - name: broken\n    tokens: [\"not-a-hash\"]\n")
	waitFor(t, "the rejected reload", func() bool { return strings.Contains(logs.String(), "tenants file reload rejected") })
	if c, ok := a.Client("b1"); !ok || c.Tenant != "team-b" {
		t.Fatalf("b1 after a bad reload: %+v %v", c, ok)
	}
	if !strings.Contains(logs.String(), "level=ERROR") {
		t.Fatalf("rejected reload not logged as an error:\n%s", logs.String())
	}
	// A removed file keeps them too; the next good file is read.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := a.Reload(); err == nil {
		t.Fatal("Reload of a missing file succeeded")
	}
	if _, ok := a.Client("b1"); !ok {
		t.Fatal("b1 lost with the file")
	}
	write(t, path, fileOf(entry("team-d", false, []string{"d1"}, nil)))
	waitFor(t, "the reload after the bad file", func() bool { _, ok := a.Client("d1"); return ok })
	if _, ok := a.Client("b1"); ok {
		t.Fatal("b1 still known after the tenant was removed")
	}
}

package main

// Tests of the exposure rules (issue 12, class 3): listening beyond
// loopback needs both tokens unless --insecure; identical tokens are
// refused; one token alone is warned about; --http-allowed-hosts reaches
// the HTTP API; the HTTP API's server bounds request reading in time.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

func TestConfigExposureNeedsTokens(t *testing.T) {
	both := map[string]string{"DISPATCHER_CLIENT_TOKEN": "cl", "DISPATCHER_COMMANDER_TOKEN": "cm"}
	for _, tc := range []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string // "" → accepted
	}{
		{"defaults (loopback), no tokens", nil, nil, ""},
		{"localhost and [::1]", []string{"--listen", "localhost:0", "--http-listen", "[::1]:0"}, nil, ""},
		{"gRPC on all interfaces", []string{"--listen", "0.0.0.0:50051"}, nil, `--listen "0.0.0.0:50051" beyond loopback without --client-token and --commander-token`},
		{"gRPC on :port", []string{"--listen", ":50051"}, nil, "beyond loopback"},
		{"gRPC on a LAN address", []string{"--listen", "192.168.1.5:50051"}, nil, "beyond loopback"},
		{"gRPC on a host name", []string{"--listen", "myhost:50051"}, nil, "beyond loopback"},
		{"HTTP on all interfaces", []string{"--http-listen", "0.0.0.0:8088"}, nil, `--http-listen "0.0.0.0:8088" beyond loopback`},
		{"from the environment", nil, map[string]string{"DISPATCHER_LISTEN": "0.0.0.0:50051", "DISPATCHER_HTTP_LISTEN": "0.0.0.0:8088"}, `--listen "0.0.0.0:50051" and --http-listen "0.0.0.0:8088"`},
		{"client token only", []string{"--listen", "0.0.0.0:50051", "--client-token", "cl"}, nil, "without --commander-token:"},
		{"commander token only", []string{"--listen", "0.0.0.0:50051", "--commander-token", "cm"}, nil, "without --client-token:"},
		{"both tokens", []string{"--listen", "0.0.0.0:50051", "--http-listen", "0.0.0.0:8088"}, both, ""},
		{"--insecure", []string{"--listen", "0.0.0.0:50051", "--insecure"}, nil, ""},
		{"DISPATCHER_INSECURE", nil, map[string]string{"DISPATCHER_LISTEN": "0.0.0.0:50051", "DISPATCHER_INSECURE": "true"}, ""},
		{"HTTP disabled", []string{"--listen", "127.0.0.1:0", "--http-listen", ""}, nil, ""},
		{"identical tokens", []string{"--client-token", "same", "--commander-token", "same"}, nil, "must differ"},
		{"identical tokens, --insecure", []string{"--client-token", "same", "--commander-token", "same", "--insecure"}, nil, "must differ"},
		{"identical tokens from the environment", nil, map[string]string{"DISPATCHER_CLIENT_TOKEN": "x", "DISPATCHER_COMMANDER_TOKEN": "x"}, "must differ"},
	} {
		_, err := parseConfig(tc.args, env(tc.env), io.Discard)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%s: refused: %v", tc.name, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%s: got %v, want an error with %q", tc.name, err, tc.wantErr)
		case tc.wantErr != "" && tc.wantErr != "must differ" && !strings.Contains(err.Error(), "--insecure"):
			t.Errorf("%s: the error does not say how to proceed: %v", tc.name, err)
		}
	}
}

func TestConfigTokenWarnings(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want []string // substrings, one per warning
	}{
		{"none", nil, nil},
		{"both", []string{"--client-token", "a", "--commander-token", "b"}, nil},
		{"client only", []string{"--client-token", "a"}, []string{"only the client token"}},
		{"commander only", []string{"--commander-token", "b"}, []string{"only the commander token"}},
		{"insecure", []string{"--listen", "0.0.0.0:0", "--insecure"}, []string{"--insecure: --listen"}},
		{"insecure, both tokens", []string{"--listen", "0.0.0.0:0", "--insecure", "--client-token", "a", "--commander-token", "b"}, nil},
	} {
		c, err := parseConfig(tc.args, env(nil), io.Discard)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		got := c.warnings()
		if len(got) != len(tc.want) {
			t.Errorf("%s: warnings %q, want %d", tc.name, got, len(tc.want))
			continue
		}
		for i, w := range tc.want {
			if !strings.Contains(got[i], w) {
				t.Errorf("%s: warning %q lacks %q", tc.name, got[i], w)
			}
		}
	}
}

func TestConfigHTTPAllowedHosts(t *testing.T) {
	c, err := parseConfig([]string{"--http-allowed-hosts", " dispatcher.example.com, *.corp.example:8443 ,,10.0.0.7"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.allowedHosts(); !slices.Equal(got, []string{"dispatcher.example.com", "*.corp.example:8443", "10.0.0.7"}) {
		t.Fatalf("allowed hosts %q", got)
	}
	c, err = parseConfig(nil, env(map[string]string{"DISPATCHER_HTTP_ALLOWED_HOSTS": "a.example"}), io.Discard)
	if err != nil || !slices.Equal(c.allowedHosts(), []string{"a.example"}) {
		t.Fatalf("from the environment: %v %v", c, err)
	}
	for _, bad := range []string{"*", "http://a.example", "a.example/", "a.example:0", "*.", "a b"} {
		if _, err := parseConfig([]string{"--http-allowed-hosts", bad}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "--http-allowed-hosts") {
			t.Errorf("%q: %v", bad, err)
		}
	}
}

// runDispatcher runs the binary (the test binary as main) to its end and
// returns its exit code and output; the process must end within 20 s.
func runDispatcher(t *testing.T, extraEnv []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), beDispatcher+"=1", "DISPATCHER_DATA_DIR="+filepath.Join(t.TempDir(), "data")), extraEnv...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%v: still running after 20 s (it should have refused to start)\n%s", args, out)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), string(out)
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0, string(out)
}

// TestProcessRefusesExposureWithoutTokens: the real binary, asked to listen
// beyond loopback without both tokens, exits 2 with a clear error before it
// listens; with identical tokens too.
func TestProcessRefusesExposureWithoutTokens(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"gRPC", nil, []string{"--listen", "0.0.0.0:0", "--http-listen", ""}, "beyond loopback"},
		{"HTTP", []string{"DISPATCHER_CLIENT_TOKEN=a"}, []string{"--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"}, "without --commander-token"},
		{"identical tokens", []string{"DISPATCHER_CLIENT_TOKEN=same", "DISPATCHER_COMMANDER_TOKEN=same"}, []string{"--listen", "127.0.0.1:0", "--http-listen", ""}, "must differ"},
	} {
		code, out := runDispatcher(t, tc.env, append(tc.args, "--storage-backend", "memory")...)
		if code != 2 || !strings.Contains(out, tc.want) {
			t.Errorf("%s: exit %d, want 2 with %q:\n%s", tc.name, code, tc.want, out)
		}
	}
}

// TestProcessInsecureExposureStarts: with --insecure the binary listens on
// every interface without tokens, says so in its log, and serves.
func TestProcessInsecureExposureStarts(t *testing.T) {
	p := startDispatcher(t, nil, "--listen", "0.0.0.0:0", "--http-listen", "0.0.0.0:0", "--insecure", "--storage-backend", "memory")
	httpAddr := servingAddr(t, p, "http api")
	if !strings.Contains(p.stderr.String(), "--insecure: --listen") {
		t.Fatalf("no warning about the insecure exposure:\n%s", p.stderr.String())
	}
	resp, err := http.Get("http://" + httpAddr + "/api/tasks")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("GET /api/tasks: %d", resp.StatusCode)
	}
}

// TestProcessHTTPAllowedHosts: --http-allowed-hosts reaches the HTTP API:
// the named host is answered (Host and Origin), another is not.
func TestProcessHTTPAllowedHosts(t *testing.T) {
	p := startDispatcher(t, nil, "--http-listen", "127.0.0.1:0", "--http-allowed-hosts", "dispatcher.test", "--storage-backend", "memory")
	addr := servingAddr(t, p, "http api")
	_, port, _ := net.SplitHostPort(addr)
	do := func(method, path, host, origin string) int {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+addr+path, strings.NewReader(`{"task_id":"nope"}`))
		req.Host = host
		if origin != "" {
			req.Header.Set("Origin", origin)
			req.Header.Set("Content-Type", "text/plain")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		method, path, host, origin string
		want                       int
	}{
		{"GET", "/api/tasks", "dispatcher.test", "", 200},
		{"GET", "/api/tasks", "dispatcher.test:" + port, "", 200},
		{"GET", "/api/tasks", "localhost:" + port, "", 200},
		{"GET", "/api/tasks", "other.test:" + port, "", 421},
		{"POST", "/api/agent/cancel", "dispatcher.test", "https://dispatcher.test", 404}, // reached the API: no such task
		{"POST", "/api/agent/cancel", "dispatcher.test", "https://evil.test", 403},
	} {
		if got := do(tc.method, tc.path, tc.host, tc.origin); got != tc.want {
			t.Errorf("%s %s Host %s Origin %q: %d, want %d", tc.method, tc.path, tc.host, tc.origin, got, tc.want)
		}
	}
}

// TestHTTPAPIServerTimeouts: the HTTP API's server bounds how long a
// request's headers and body take (a stalled body gets 408, see the httpapi
// tests) and has no write timeout (it would cut event streams).
func TestHTTPAPIServerTimeouts(t *testing.T) {
	cfg, err := parseConfig([]string{"--http-listen", "127.0.0.1:0", "--storage-backend", "memory"}, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	d, err := dispatcher.New(dispatcher.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	tracing, err := telemetry.Setup(context.Background(), "dispatcher", "test", env(nil))
	if err != nil {
		t.Fatal(err)
	}
	hs, err := startHTTP(cfg, d, api.New(d).Local(), nil, tracing, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer hs.close()
	if len(hs.servers) != 1 {
		t.Fatalf("%d servers", len(hs.servers))
	}
	s := hs.servers[0]
	if s.ReadTimeout <= 0 || s.ReadTimeout > time.Minute || s.ReadHeaderTimeout <= 0 || s.WriteTimeout != 0 {
		t.Fatalf("read %v, read header %v, write %v", s.ReadTimeout, s.ReadHeaderTimeout, s.WriteTimeout)
	}
}

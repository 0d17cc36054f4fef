package main

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestConfigHTTPAndPrometheusEnv(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.httpListen != "127.0.0.1:8088" || !c.httpDefault || c.metricsListen != "" {
		t.Fatalf("defaults: http %q (default %v), metrics %q", c.httpListen, c.httpDefault, c.metricsListen)
	}
	c, err = parseConfig(nil, env(map[string]string{"ENABLE_PROMETHEUS": "true", "DISPATCHER_HTTP_LISTEN": ""}), io.Discard)
	if err != nil || c.metricsListen != ":8000" {
		t.Fatalf("ENABLE_PROMETHEUS: %q %v", c.metricsListen, err)
	}
	c, err = parseConfig([]string{"--http-listen", ""}, env(map[string]string{"ENABLE_PROMETHEUS": "TRUE", "PROMETHEUS_PORT": "9100"}), io.Discard)
	if err != nil || c.metricsListen != ":9100" || c.httpListen != "" || c.httpDefault {
		t.Fatalf("PROMETHEUS_PORT / disabled http: %+v %v", c, err)
	}
	c, err = parseConfig([]string{"--metrics-listen", "127.0.0.1:9999"}, env(map[string]string{"ENABLE_PROMETHEUS": "true"}), io.Discard)
	if err != nil || c.metricsListen != "127.0.0.1:9999" {
		t.Fatalf("flag wins: %q %v", c.metricsListen, err)
	}
}

func TestConfigPprofLoopbackOnly(t *testing.T) {
	t.Parallel()
	for _, ok := range []string{"127.0.0.1:0", "[::1]:6060", "localhost:6060"} {
		t.Run(ok, func(t *testing.T) {
			t.Parallel()
			if c, err := parseConfig([]string{"--pprof-listen", ok}, env(nil), io.Discard); err != nil || c.pprofListen != ok {
				t.Errorf("%s: %v", ok, err)
			}
		})
	}
	for _, bad := range []string{":6060", "0.0.0.0:6060", "10.1.2.3:6060", "nohost"} {
		t.Run(bad, func(t *testing.T) {
			t.Parallel()
			if _, err := parseConfig([]string{"--pprof-listen", bad}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "loopback") {
				t.Errorf("%s: want a loopback error, got %v", bad, err)
			}
		})
	}
}

// servingAddr finds "<what> serving" addr=HOST:PORT in the text log.
func servingAddr(t *testing.T, p *proc, what string) string {
	t.Helper()
	re := regexp.MustCompile(`msg="` + what + ` serving" addr=(\S+)`)
	var addr string
	testutil.WaitFor(t, 10*time.Second, func() bool {
		m := re.FindStringSubmatch(p.stderr.String())
		if m == nil {
			return false
		}
		_, port, _ := net.SplitHostPort(m[1])
		addr = "127.0.0.1:" + port
		return true
	}, "a %q line in the log:\n%v", what+" serving", p.stderr)
	return addr
}

// TestProcessServesHTTPAndMetrics: the real binary serves the HTTP API
// (with the client token) and, with seed 000's ENABLE_PROMETHEUS, /metrics.
func TestProcessServesHTTPAndMetrics(t *testing.T) {
	p := startDispatcher(t, []string{"DISPATCHER_CLIENT_TOKEN=client-tok", "ENABLE_PROMETHEUS=true", "PROMETHEUS_PORT=0"},
		"--http-listen", "127.0.0.1:0", "--storage-backend", "memory")
	httpAddr := servingAddr(t, p, "http api")
	metricsAddr := servingAddr(t, p, "metrics")

	get := func(url, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get("http://"+httpAddr+"/api/health", ""); code != 200 || !strings.Contains(body, `"ok"`) {
		t.Fatalf("health %d %s", code, body)
	}
	if code, _ := get("http://"+httpAddr+"/api/tasks", ""); code != 401 {
		t.Fatalf("tasks without token: %d", code)
	}
	req, _ := http.NewRequest("POST", "http://"+httpAddr+"/api/agent/task/submit", strings.NewReader(`{"instruction":"hello"}`))
	req.Header.Set("Authorization", "Bearer client-tok")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var sub map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&sub)
	resp.Body.Close()
	if resp.StatusCode != 200 || sub["task_id"] == nil {
		t.Fatalf("submit %d %v", resp.StatusCode, sub)
	}
	code, text := get("http://"+metricsAddr+"/metrics", "")
	for _, want := range []string{
		"dispatcher_tasks_submitted_total 1",
		`dispatcher_tasks{status="pending"} 1`,
		"dispatcher_queue_depth 1",
		"dispatcher_slots 0",
		`grpc_server_started_total{grpc_method="ChatStream"`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("metrics (%d) lack %q", code, want)
		}
	}
}

func TestConfigStreamWindow(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(nil), io.Discard)
	if err != nil || c.streamWindow != 128<<10 || streamWindow(c.streamWindow) != 128<<10 {
		t.Fatalf("default: %d %v", c.streamWindow, err)
	}
	c, err = parseConfig([]string{"--stream-window-bytes", "0"}, env(nil), io.Discard)
	if err != nil || streamWindow(c.streamWindow) >= 0 {
		t.Fatalf("0 must mean grpc-go's dynamic window: %d %v", c.streamWindow, err)
	}
	if _, err := parseConfig([]string{"--stream-window-bytes", "1000"}, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), "65536") {
		t.Fatalf("under 64 KiB: %v", err)
	}
}

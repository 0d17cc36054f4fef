package mcp

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// The test binary is also the stdio MCP server of the tests: run with
// MCPTEST_STDIO=1 it serves fast and slow on stdin/stdout (see
// serveStdio) and exits.
func TestMain(m *testing.M) {
	if os.Getenv("MCPTEST_STDIO") == "1" {
		serveStdio()
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// record appends a line to the file MCPTEST_LOG.
func record(line string) {
	f, err := os.OpenFile(os.Getenv("MCPTEST_LOG"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintln(f, line)
}

type fastIn struct {
	Text string `json:"text"`
}

type slowIn struct {
	Tag string `json:"tag"`
	MS  int    `json:"ms"`
}

// testServer is an MCP server with the tools fast (answers at once with
// its text and pid) and slow (waits ms, or until cancelled, and records
// which).
func testServer() *sdk.Server {
	s := sdk.NewServer(&sdk.Implementation{Name: "test", Version: "1"}, nil)
	sdk.AddTool(s, &sdk.Tool{Name: "fast", Description: "answers at once"},
		func(_ context.Context, _ *sdk.CallToolRequest, in fastIn) (*sdk.CallToolResult, map[string]any, error) {
			if in.Text == "fail" {
				return &sdk.CallToolResult{IsError: true, Content: []sdk.Content{&sdk.TextContent{Text: "asked to fail"}}}, nil, nil
			}
			return nil, map[string]any{"echo": in.Text, "pid": os.Getpid()}, nil
		})
	sdk.AddTool(s, &sdk.Tool{Name: "slow", Description: "waits ms"},
		func(ctx context.Context, _ *sdk.CallToolRequest, in slowIn) (*sdk.CallToolResult, map[string]any, error) {
			record("BEGIN " + in.Tag)
			t := time.NewTimer(time.Duration(in.MS) * time.Millisecond)
			defer t.Stop()
			select {
			case <-t.C:
				record("DONE " + in.Tag)
				return nil, map[string]any{"tag": in.Tag}, nil
			case <-ctx.Done():
				record("CANCELLED " + in.Tag)
				return nil, nil, ctx.Err()
			}
		})
	return s
}

func serveStdio() {
	_ = testServer().Run(context.Background(), &sdk.StdioTransport{})
}

func newBroker(t *testing.T) *broker.Broker {
	t.Helper()
	b, err := broker.New(broker.Options{DefaultTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func hasTool(b *broker.Broker, name string) bool {
	specs, _ := b.Tools()
	for _, s := range specs {
		if s.GetName() == name {
			return true
		}
	}
	return false
}

func call(ctx context.Context, b *broker.Broker, tool, args string) *dispatchv1.ToolCallResult {
	return b.Call(ctx, broker.Call{CallID: "c", ToolName: tool, ArgumentsJSON: args}).Result
}

func code(r *dispatchv1.ToolCallResult) string {
	if r.GetError() == nil {
		return "OK"
	}
	return strings.TrimPrefix(r.GetError().GetCode().String(), "TOOL_ERROR_CODE_")
}

func logHas(path, line string) func() bool {
	return func() bool {
		b, _ := os.ReadFile(path)
		return strings.Contains(string(b), line+"\n")
	}
}

func stdioConfig(t *testing.T, log string, timeout time.Duration) ServerConfig {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return ServerConfig{Command: exe, Env: map[string]string{"MCPTEST_STDIO": "1", "MCPTEST_LOG": log}, Timeout: timeout}
}

func TestParseConfig(t *testing.T) {
	cfg, err := ParseConfig([]byte(`{"mcpServers": {"a": {"command": "x", "args": ["1"], "timeout": "2s"}, "b-2": {"url": "https://h/mcp", "headers": {"Authorization": "Bearer t"}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Servers["a"]; got.Command != "x" || got.Timeout != 2*time.Second || len(got.Args) != 1 {
		t.Errorf("a = %+v", got)
	}
	if got := cfg.Servers["b-2"]; got.URL != "https://h/mcp" || got.Headers["Authorization"] != "Bearer t" {
		t.Errorf("b-2 = %+v", got)
	}
	if cfg, err := ParseConfig([]byte("servers:\n  c: {command: y}\n")); err != nil || cfg.Servers["c"].Command != "y" {
		t.Errorf("servers key: %v %+v", err, cfg)
	}
	if cfg, err := ParseConfig(nil); err != nil || len(cfg.Servers) != 0 {
		t.Errorf("empty file: %v %+v", err, cfg)
	}
	for _, bad := range []string{
		`{"mcpServers": {"a.b": {"command": "x"}}}`,                      // a dot in the name
		`{"mcpServers": {"a": {}}}`,                                      // neither
		`{"mcpServers": {"a": {"command": "x", "url": "http://h"}}}`,     // both
		`{"mcpServers": {"a": {"url": "ftp://h"}}}`,                      // not http
		`{"mcpServers": {"a": {"url": "http://h", "args": ["x"]}}}`,      // args for a url
		`{"mcpServers": {"a": {"command": "x", "headers": {"a": "b"}}}}`, // headers for a command
		`{"mcpServers": {"a": {"command": "x", "timeout": "-1s"}}}`,
		`{"mcpServers": {"a": {"command": "x", "bogus": 1}}}`,
		`{"mcpServers": {}, "servers": {}}`,
		`[1, 2]`,
	} {
		if _, err := ParseConfig([]byte(bad)); err == nil {
			t.Errorf("ParseConfig(%s) succeeded", bad)
		}
	}
}

// A stdio server's tools are brokered as mcp.<server>.<tool>: a call
// answers; a cancelled call and a timed-out call are cancelled on the
// server; an error result is EXECUTION_FAILED; a killed server fails its
// calls at once and is started again.
func TestStdioServerThroughTheBroker(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	b := newBroker(t)
	m := NewManager(Options{Registry: b, MinBackoff: 50 * time.Millisecond, MaxBackoff: 100 * time.Millisecond})
	defer m.Close()
	m.Apply(Config{Servers: map[string]ServerConfig{"s": stdioConfig(t, log, 2*time.Second)}})
	testutil.WaitFor(t, 20*time.Second, func() bool { return hasTool(b, "mcp.s.fast") && hasTool(b, "mcp.s.slow") }, "the tools brokered")

	ctx := context.Background()
	r := call(ctx, b, "mcp.s.fast", `{"text":"hi"}`)
	var out struct {
		Echo string `json:"echo"`
		PID  int    `json:"pid"`
	}
	if code(r) != "OK" || json.Unmarshal([]byte(r.GetResultJson()), &out) != nil || out.Echo != "hi" {
		t.Fatalf("fast: %v", r)
	}
	if r := call(ctx, b, "mcp.s.fast", `{"text":"fail"}`); code(r) != "EXECUTION_FAILED" || r.GetError().GetMessage() != "asked to fail" {
		t.Errorf("an error result: %v", r)
	}
	if r := call(ctx, b, "mcp.s.fast", `{"text": 3}`); code(r) != "INVALID_ARGUMENTS" {
		t.Errorf("arguments against the server's schema: %v", r)
	}

	// A stop: the caller's context ends mid-call.
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan *dispatchv1.ToolCallResult, 1)
	go func() { done <- call(cctx, b, "mcp.s.slow", `{"tag":"stop","ms":30000}`) }()
	testutil.WaitFor(t, testutil.Wait, logHas(log, "BEGIN stop"), "slow started")
	cancel()
	if r := testutil.Recv(t, done, testutil.Wait, "the cancelled call's result"); code(r) != "CANCELLED" {
		t.Errorf("cancelled call: %v", r)
	}
	testutil.WaitFor(t, testutil.Wait, logHas(log, "CANCELLED stop"), "the server saw the cancel")

	// The server's timeout (2 s here) ends the call and cancels it there.
	start := time.Now()
	if r := call(ctx, b, "mcp.s.slow", `{"tag":"late","ms":30000}`); code(r) != "TIMEOUT" {
		t.Errorf("timed-out call: %v", r)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the timeout took %s", d)
	}
	testutil.WaitFor(t, testutil.Wait, logHas(log, "CANCELLED late"), "the server saw the timeout's cancel")

	// Killed mid-call: that call and the ones until the restart fail at
	// once; then the server answers again (another process).
	go func() { done <- call(ctx, b, "mcp.s.slow", `{"tag":"kill","ms":30000}`) }()
	testutil.WaitFor(t, testutil.Wait, logHas(log, "BEGIN kill"), "slow started")
	if err := syscall.Kill(out.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if r := testutil.Recv(t, done, testutil.Wait, "the killed call's result"); code(r) != "PROVIDER_UNAVAILABLE" {
		t.Errorf("call of a killed server: %v", r)
	}
	var sawUnavailable bool
	testutil.WaitFor(t, 20*time.Second, func() bool {
		r := call(ctx, b, "mcp.s.fast", `{"text":"again"}`)
		switch code(r) {
		case "PROVIDER_UNAVAILABLE":
			sawUnavailable = true
			return false
		case "OK":
			var again struct{ PID int }
			_ = json.Unmarshal([]byte(r.GetResultJson()), &again)
			if again.PID == out.PID || again.PID == 0 {
				t.Fatalf("answered by the killed process: %v", r)
			}
			return true
		}
		t.Fatalf("while restarting: %v", r)
		return false
	}, "the server answers again")
	st, _ := m.Status("s")
	if st.Restarts < 1 || !st.Connected {
		t.Errorf("status %+v", st)
	}
	t.Logf("a call during the restart was PROVIDER_UNAVAILABLE: %v", sawUnavailable)
}

// The tools of a server that cannot start are never listed; its restarts
// back off.
func TestServerThatCannotStart(t *testing.T) {
	b := newBroker(t)
	m := NewManager(Options{Registry: b, MinBackoff: 10 * time.Millisecond, MaxBackoff: 20 * time.Millisecond})
	defer m.Close()
	m.Apply(Config{Servers: map[string]ServerConfig{"gone": {Command: filepath.Join(t.TempDir(), "no-such-binary")}}})
	testutil.WaitFor(t, testutil.Wait, func() bool { st, _ := m.Status("gone"); return st.Restarts >= 3 }, "restarts")
	st, _ := m.Status("gone")
	if st.Connected || st.LastError == "" || len(st.Tools) != 0 {
		t.Errorf("status %+v", st)
	}
	specs, _ := b.Tools()
	for _, s := range specs {
		if strings.HasPrefix(s.GetName(), ToolPrefix) {
			t.Errorf("tool %s listed", s.GetName())
		}
	}
}

// The servers file is reloaded on change: a new server's tools appear, a
// removed one's go; a bad file is refused and the servers in force stay.
func TestReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "servers.json")
	log := filepath.Join(dir, "log")
	generation := "1"
	write := func(names ...string) {
		servers := map[string]ServerConfig{}
		for _, n := range names {
			servers[n] = stdioConfig(t, log, 0)
			servers[n].Env["GENERATION"] = generation
		}
		type wire struct {
			Command string            `json:"command"`
			Env     map[string]string `json:"env"`
		}
		w := map[string]wire{}
		for n, s := range servers {
			w[n] = wire{s.Command, s.Env}
		}
		src, _ := json.Marshal(map[string]any{"mcpServers": w})
		if err := os.WriteFile(file, src, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("one")
	b := newBroker(t)
	rejected := make(chan struct{}, 1)
	m := NewManager(Options{Registry: b, Logger: slog.New(onMessage{"mcp servers file rejected", rejected})})
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { m.Run(ctx, file, 10*time.Millisecond) })
	defer func() { cancel(); wg.Wait() }()
	testutil.WaitFor(t, 20*time.Second, func() bool { return hasTool(b, "mcp.one.fast") }, "server one's tools")

	write("two")
	testutil.WaitFor(t, 20*time.Second, func() bool { return hasTool(b, "mcp.two.fast") && !hasTool(b, "mcp.one.fast") }, "two in, one out")

	// A changed entry: the server is started again (another process) and
	// its tools stay listed.
	pid := func() int {
		var out struct{ PID int }
		if r := call(context.Background(), b, "mcp.two.fast", `{"text":"pid"}`); code(r) == "OK" {
			_ = json.Unmarshal([]byte(r.GetResultJson()), &out)
		}
		return out.PID
	}
	first := pid()
	if first == 0 {
		t.Fatal("server two does not answer")
	}
	generation = "2"
	write("two")
	testutil.WaitFor(t, 20*time.Second, func() bool { p := pid(); return p != 0 && p != first }, "two restarted")
	if !hasTool(b, "mcp.two.fast") {
		t.Error("a changed server's tools were removed")
	}

	if err := os.WriteFile(file, []byte(`{"mcpServers": {"bad name": {}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.Recv(t, rejected, testutil.Wait, "the bad file rejected")
	if !hasTool(b, "mcp.two.fast") {
		t.Error("a bad file removed the servers in force")
	}
	if r := call(context.Background(), b, "mcp.two.fast", `{"text":"still"}`); code(r) != "OK" {
		t.Errorf("after the bad file: %v", r)
	}
	cancel()
	wg.Wait()
	if hasTool(b, "mcp.two.fast") {
		t.Error("tools left after Run ended")
	}
}

// onMessage is a log handler that signals ch when a record with msg is
// logged.
type onMessage struct {
	msg string
	ch  chan struct{}
}

func (h onMessage) Enabled(context.Context, slog.Level) bool { return true }
func (h onMessage) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h onMessage) WithGroup(string) slog.Handler            { return h }
func (h onMessage) Handle(_ context.Context, r slog.Record) error {
	if strings.HasPrefix(r.Message, h.msg) {
		select {
		case h.ch <- struct{}{}:
		default:
		}
	}
	return nil
}

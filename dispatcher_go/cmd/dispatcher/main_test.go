package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/fleet"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// The test binary doubles as the dispatcher: with this variable set it runs
// main, so the process tests exercise the real binary's code without a
// separate build.
const beDispatcher = "DISPATCHER_TEST_BE_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(beDispatcher) == "1" {
		os.Exit(run(os.Args[1:], os.Getenv, os.Stderr))
	}
	goleak.VerifyTestMain(m)
}

func env(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.listen != "127.0.0.1:50051" || c.queueSize != 1024 || c.stopGrace != 2*time.Second || c.toolTimeout != 30*time.Second ||
		c.maxMsgBytes != 4<<20 || c.drainTimeout != 15*time.Second || c.kaTime != 5*time.Second || c.kaTimeout != 2*time.Second ||
		c.kaMinTime != 3*time.Second || c.defaultPlanner != "chat" || c.maxTasksKept != 10000 || c.logFormat != "json" || c.logLevel != "info" {
		t.Fatalf("defaults %+v", c)
	}
}

// The flags' defaults are the dispatcher's: passing them changes nothing
// from what the dispatcher would pick for an unset field, and each flag
// reaches its field.
func TestDispatcherConfigFromFlags(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	fromFlags := c.dispatcherConfig(nil, nil, nil)
	d, err := dispatcher.New(dispatcher.Config{})
	if err != nil {
		t.Fatal(err)
	}
	defaults := d.Config()
	d.Close()
	if fromFlags.GRPC != defaults.GRPC || fromFlags.Limits.QueueSize != defaults.Limits.QueueSize ||
		fromFlags.Limits.MaxTasksKept != defaults.Limits.MaxTasksKept || fromFlags.Tasks.DefaultPlanner != defaults.Tasks.DefaultPlanner ||
		fromFlags.Tasks.StopGrace != defaults.Tasks.StopGrace || fromFlags.Tasks.ToolTimeout != defaults.Tasks.ToolTimeout ||
		fromFlags.Policy.Poll != defaults.Policy.Poll || fromFlags.Store.FlushInterval != defaults.Store.FlushInterval {
		t.Fatalf("flag defaults %+v differ from the dispatcher's %+v", fromFlags, defaults)
	}
	c, err = parseConfig([]string{"--queue-size", "7", "--stop-grace", "3s", "--default-planner", "gui", "--client-token", "cl",
		"--keepalive-time", "9s", "--policy-poll", "4s", "--retention", "1h", "--stream-window-bytes", "0",
		"--event-flush-interval", "0"},
		env(map[string]string{"DISPATCHER_SECRET_KEY": "k"}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	got := c.dispatcherConfig(nil, nil, nil)
	if got.Limits.QueueSize != 7 || got.Tasks.StopGrace != 3*time.Second || got.Tasks.DefaultPlanner != "gui" || got.Auth.ClientToken != "cl" ||
		got.GRPC.Keepalive.Time != 9*time.Second || got.Policy.Poll != 4*time.Second || got.Store.Retention != time.Hour ||
		got.GRPC.StreamWindowBytes >= 0 || string(got.Store.SecretKey) != "k" || got.Version != version ||
		got.Store.FlushInterval >= 0 { // the flag's 0 is "no pacing", not the default
		t.Fatalf("dispatcher config %+v", got)
	}
}

func TestConfigEnvFallbackAndFlagsWin(t *testing.T) {
	t.Parallel()
	c, err := parseConfig([]string{"--queue-size", "7"}, env(map[string]string{
		"DISPATCHER_LISTEN":           "0.0.0.0:0",
		"DISPATCHER_QUEUE_SIZE":       "99",
		"DISPATCHER_COMMANDER_TOKEN":  "ct",
		"DISPATCHER_CLIENT_TOKEN":     "cl",
		"DISPATCHER_STOP_GRACE":       "750ms",
		"DISPATCHER_KEEPALIVE_TIME":   "10s",
		"DISPATCHER_LOG_FORMAT":       "text",
		"DISPATCHER_DEFAULT_PLANNER":  "gui",
		"DISPATCHER_MAX_TASKS_KEPT":   "5",
		"DISPATCHER_TLS_CERT":         "",
		"DISPATCHER_UNRELATED_OPTION": "x",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.listen != "0.0.0.0:0" || c.queueSize != 7 || c.commanderToken != "ct" || c.clientToken != "cl" || c.stopGrace != 750*time.Millisecond ||
		c.kaTime != 10*time.Second || c.logFormat != "text" || c.defaultPlanner != "gui" || c.maxTasksKept != 5 {
		t.Fatalf("config %+v", c)
	}
}

func TestFleetFlags(t *testing.T) {
	t.Parallel()
	c, err := parseConfig([]string{"--storage-backend", "postgres", "--postgres-dsn", "postgres://x"}, env(map[string]string{
		"DISPATCHER_FLEET_REDIS": "redis://127.0.0.1:6379/0",
		"DISPATCHER_REPLICA_ID":  "r7",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	got := c.dispatcherConfig(nil, nil, nil).Fleet
	if got.RedisURL != "redis://127.0.0.1:6379/0" || got.ReplicaID != "r7" || got.Lease != fleet.DefaultLease ||
		got.Grace != fleet.DefaultGrace || got.ReclaimIdle != fleet.DefaultReclaimIdle || got.MaxReadFailures != fleet.DefaultMaxReadFailures {
		t.Fatalf("fleet config %+v", got)
	}
	// The single node: no fleet unless asked.
	c, err = parseConfig(nil, env(nil), io.Discard)
	if err != nil || c.dispatcherConfig(nil, nil, nil).Fleet.RedisURL != "" {
		t.Fatalf("default config joins a fleet: %v", err)
	}
}

func TestConfigRejectsBadValues(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		args []string
		env  map[string]string
	}{
		"bad env duration": {nil, map[string]string{"DISPATCHER_STOP_GRACE": "soon"}},
		"half TLS":         {[]string{"--tls-cert", "c.pem"}, nil},
		"zero queue":       {[]string{"--queue-size", "0"}, nil},
		"log format":       {[]string{"--log-format", "xml"}, nil},
		"log level":        {[]string{"--log-level", "loud"}, nil},
		"negative grace":   {[]string{"--stop-grace", "-1s"}, nil},
		"stray argument":   {[]string{"serve"}, nil},
		"fleet on sqlite":  {[]string{"--fleet-redis", "redis://127.0.0.1:6379/0"}, nil},
		"fleet lease":      {[]string{"--storage-backend", "postgres", "--postgres-dsn", "x", "--fleet-redis", "redis://r", "--fleet-lease", "0s"}, nil},
		"fleet read fails": {[]string{"--storage-backend", "postgres", "--postgres-dsn", "x", "--fleet-redis", "redis://r", "--fleet-max-read-failures", "0"}, nil},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if _, err := parseConfig(tc.args, env(tc.env), io.Discard); err == nil {
				t.Errorf("%v %v accepted", tc.args, tc.env)
			}
		})
	}
	if _, err := parseConfig([]string{"-h"}, env(nil), io.Discard); !errors.Is(err, flag.ErrHelp) {
		t.Fatalf("-h: %v", err)
	}
}

// syncBuffer collects a child's stderr safely.
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

type proc struct {
	cmd    *exec.Cmd
	addr   string
	stderr *syncBuffer
	exited chan error // holds the exit once it came (wait puts it back)
}

// wait waits for the process to exit and returns how it exited.
func (p *proc) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	err := testutil.Recv(t, p.exited, timeout, "the dispatcher to exit; log:\n%v", p.stderr)
	p.exited <- err
	return err
}

// startDispatcher runs the dispatcher as a child process on a free port and
// waits for its --addr-file.
func startDispatcher(t *testing.T, extraEnv []string, args ...string) *proc {
	t.Helper()
	dir := t.TempDir()
	addrFile := filepath.Join(dir, "addr")
	args = append([]string{"--listen", "127.0.0.1:0", "--addr-file", addrFile, "--log-format", "text"}, args...)
	cmd := exec.Command(os.Args[0], args...)
	// Each process gets its own embedded store unless extraEnv names one.
	cmd.Env = append(append(os.Environ(), beDispatcher+"=1", "DISPATCHER_DATA_DIR="+filepath.Join(dir, "data")), extraEnv...)
	p := &proc{cmd: cmd, stderr: &syncBuffer{}, exited: make(chan error, 1)}
	cmd.Stderr = p.stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		p.wait(t, testutil.Wait)
	})
	testutil.WaitFor(t, 10*time.Second, func() bool {
		select {
		case err := <-p.exited:
			p.exited <- err
			t.Fatalf("dispatcher exited: %v\n%s", err, p.stderr.String())
		default:
		}
		b, err := os.ReadFile(addrFile)
		if err != nil || !strings.HasSuffix(string(b), "\n") {
			return false
		}
		p.addr = strings.TrimSpace(string(b))
		return true
	}, "the addr file; log:\n%v", p.stderr)
	return p
}

func TestProcessServesAuthAndDrainsOnSIGTERM(t *testing.T) {
	p := startDispatcher(t, []string{"DISPATCHER_CLIENT_TOKEN=client-tok", "DISPATCHER_COMMANDER_TOKEN=cmd-tok"}, "--drain-timeout", "2s")
	conn, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	hc := healthpb.NewHealthClient(conn)
	if r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v %v", r, err)
	}
	agent := agentpb.NewAgentClient(conn)
	if _, err := agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{}); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("no token: %v", err)
	}
	cctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer client-tok")
	info, err := agent.GetAgentInfo(cctx, &agentpb.GetAgentInfoRequest{})
	if err != nil || info.GetVersion() != "dev" {
		t.Fatalf("info %v %v", info, err)
	}

	// A commander with a running task: SIGTERM lets it finish.
	c := testutil.Connect(t, metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer cmd-tok"), conn, "planner:chat")
	start, err := agent.RunAgentInstructionAsync(cctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()

	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool {
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_NOT_SERVING
	}, "health NOT_SERVING while draining")
	if _, err := agent.RunAgentInstructionAsync(cctx, &agentpb.RunAgentInstructionRequest{Instruction: "y"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("new work while draining: %v", err)
	}
	c.Send(testutil.Up(sid, testutil.Success("finished during drain")))
	// The task ends SUCCESS; once it has, the dispatcher may be gone.
	var st *agentpb.QueryTaskStatusResponse
	testutil.WaitFor(t, testutil.Wait, func() bool {
		st, err = agent.QueryTaskStatus(cctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
		return err != nil || st.GetStatus() != agentpb.TaskStatus_RUNNING
	}, "the task to end during the drain")
	if err == nil && st.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("task during drain: %v", st)
	}

	if err := p.wait(t, 10*time.Second); err != nil {
		t.Fatalf("exit: %v\n%s", err, p.stderr.String())
	}
	logs := p.stderr.String()
	for _, want := range []string{"dispatcher serving", "draining", "dispatcher stopped"} {
		if !strings.Contains(logs, want) {
			t.Fatalf("log lacks %q:\n%s", want, logs)
		}
	}
	if strings.Contains(logs, "client-tok") || strings.Contains(logs, "cmd-tok") {
		t.Fatal("a token reached the logs")
	}
}

func TestProcessServesTLS(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, pool := selfSigned(t, dir)
	p := startDispatcher(t, nil, "--tls-cert", certFile, "--tls-key", keyFile)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	conn, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || r.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("TLS health %v %v", r, err)
	}
	plain, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	sctx, scancel := context.WithTimeout(ctx, time.Second)
	defer scancel()
	if _, err := healthpb.NewHealthClient(plain).Check(sctx, &healthpb.HealthCheckRequest{}); err == nil {
		t.Fatal("plaintext accepted by a TLS server")
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	p.wait(t, 10*time.Second)
}

func TestProcessRefusesBadFlags(t *testing.T) {
	cmd := exec.Command(os.Args[0], "--queue-size", "-3")
	cmd.Env = append(os.Environ(), beDispatcher+"=1")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "queue-size") {
		t.Fatalf("exit %v\n%s", err, out)
	}
}

func selfSigned(t *testing.T, dir string) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "dispatcher-test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IPAddresses:           []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

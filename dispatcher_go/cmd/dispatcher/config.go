package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/fleet"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/httpapi"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// config is the dispatcher's command-line configuration. Every flag can
// also come from the environment: DISPATCHER_ + the flag name in upper case
// with - as _ (e.g. --queue-size ↔ DISPATCHER_QUEUE_SIZE). A flag given on
// the command line wins over the environment. Prefer the environment for
// tokens: command lines are visible to every user of the host.
//
// The defaults of the dispatcher's own settings are internal/dispatcher's
// (its Default* constants); the flags show them. Only this command's own
// settings (addresses, store backend, logging) have their defaults here.
type config struct {
	listen         string
	addrFile       string
	commanderToken string
	clientToken    string
	adminToken     string
	tenantsFile    string
	tenantsPoll    time.Duration
	// fileCommanders: the tenants file holds commander tokens (read by
	// validate), so commanders need a token even without --commander-token.
	fileCommanders bool
	tlsCert        string
	tlsKey         string
	queueSize      int
	stopGrace      time.Duration
	toolTimeout    time.Duration
	helloTimeout   time.Duration // 0: never
	maxMsgBytes    int
	drainTimeout   time.Duration
	handOverWindow time.Duration
	linkLossWindow time.Duration
	kaTime         time.Duration
	kaTimeout      time.Duration
	kaMinTime      time.Duration
	defaultPlanner string
	planners       string        // --planners, a comma list ("": any)
	queueTimeout   time.Duration // 0: never
	maxTasksKept   int
	policyFile     string
	policyPoll     time.Duration
	mcpServers     string
	storage        string
	postgresDSN    string
	dataDir        string
	retention      time.Duration
	flushInterval  time.Duration
	secretKey      string // DISPATCHER_SECRET_KEY only: never a flag
	logLevel       string
	logFormat      string
	httpListen     string // "" disables the HTTP API and the web page
	httpDefault    bool   // httpListen is the default, not asked for
	httpHosts      string // --http-allowed-hosts, a comma list
	insecure       bool   // allow listening beyond loopback without tokens
	metricsListen  string // "" disables /metrics
	pprofListen    string // "" disables /debug/pprof
	streamWindow   int
	// The sandbox API behind seed 001's POST /api/sandbox/create.
	sandboxEndpoint string
	sandboxOrg      string
	sandboxShape    string
	sandboxKey      string // DISPATCHER_SANDBOX_API_KEY or LYBIC_API_KEY only: never a flag
	fleetRedis      string // "" : single node
	replicaID       string
	fleetLease      time.Duration
	fleetGrace      time.Duration
	fleetReclaim    time.Duration
	fleetReadFails  int
}

// seedEnv are the seed-000 variable names a flag also reads, after its
// DISPATCHER_ name.
var seedEnv = map[string]string{
	"storage-backend":  "TASK_STORAGE_BACKEND",
	"postgres-dsn":     "POSTGRES_CONNECTION_STRING",
	"sandbox-endpoint": "LYBIC_API_ENDPOINT",
	"sandbox-org":      "LYBIC_ORG_ID",
	"sandbox-shape":    "LYBIC_SANDBOX_SHAPE",
}

// envName is the environment variable of a flag.
func envName(flagName string) string {
	return "DISPATCHER_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// parseConfig reads flags from args with environment fallbacks from getenv.
// It returns flag.ErrHelp for -h.
func parseConfig(args []string, getenv func(string) string, usage io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet("dispatcher", flag.ContinueOnError)
	fs.SetOutput(usage)
	fs.StringVar(&c.listen, "listen", "127.0.0.1:50051", "address to listen on (port 0 picks a free port)")
	fs.StringVar(&c.addrFile, "addr-file", "", "write the actual listen address to this file once serving")
	fs.StringVar(&c.commanderToken, "commander-token", "", "bearer token commanders and tool providers must present (empty: no auth)")
	fs.StringVar(&c.clientToken, "client-token", "", "bearer token clients must present (empty: no auth); with --tenants-file, the default tenant's token")
	fs.StringVar(&c.adminToken, "admin-token", "", "client token that sees and acts on every tenant's tasks")
	fs.StringVar(&c.tenantsFile, "tenants-file", "", "YAML or JSON file of tenants and the sha256 hashes of their client (and commander) tokens (docs/operations.md), reloaded when it changes; empty: one tenant")
	fs.DurationVar(&c.tenantsPoll, "tenants-poll", dispatcher.DefaultPolicyPoll, "how often the tenants file is checked for changes")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "TLS certificate file (with --tls-key: serve TLS)")
	fs.StringVar(&c.tlsKey, "tls-key", "", "TLS private key file")
	fs.IntVar(&c.queueSize, "queue-size", dispatcher.DefaultQueueSize, "pending tasks the queue holds (of each tenant) before RESOURCE_EXHAUSTED")
	fs.DurationVar(&c.stopGrace, "stop-grace", dispatcher.DefaultStopGrace, "time a stopped session has to send stopped before its stream is aborted")
	fs.DurationVar(&c.toolTimeout, "tool-timeout", dispatcher.DefaultToolTimeout, "default timeout of a tool call")
	fs.DurationVar(&c.helloTimeout, "hello-timeout", dispatcher.DefaultHelloTimeout, "a commander's ChatStream, or a tool provider's Connect stream, that sent no hello this long after it opened is ended (DEADLINE_EXCEEDED); 0: never")
	fs.IntVar(&c.maxMsgBytes, "max-msg-bytes", dispatcher.DefaultMaxRecvMsgBytes, "message limit, checked per message (an oversized result fails its call, a packet its session); the transport accepts up to twice it")
	fs.IntVar(&c.streamWindow, "stream-window-bytes", dispatcher.DefaultStreamWindow, "fixed HTTP/2 receive window per stream (connection: 8x); bounds a commander's output queued ahead of its stopped. 0: grpc-go's dynamic (BDP) window")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", dispatcher.DefaultDrainTimeout, "on SIGTERM, how long running tasks may finish before they are stopped")
	fs.DurationVar(&c.handOverWindow, "handover-window", dispatcher.DefaultHandOverWindow,
		"with a store: after a restart, how long a task that was running waits for its commander to re-attach its session before it fails; on SIGTERM commanders are told to move instead of their tasks being stopped (0: no hand-over)")
	fs.DurationVar(&c.linkLossWindow, "link-loss-window", dispatcher.DefaultLinkLossWindow,
		"with hand-over: how long a running session whose commander's stream broke (network cut, reset, keepalive, a commander that died) waits for the commander to re-attach it before its task fails (0: it fails with the stream)")
	fs.DurationVar(&c.kaTime, "keepalive-time", dispatcher.DefaultKeepalive.Time, "ping a connection silent for this long")
	fs.DurationVar(&c.kaTimeout, "keepalive-timeout", dispatcher.DefaultKeepalive.Timeout, "close a connection whose ping is not acked within this")
	fs.DurationVar(&c.kaMinTime, "keepalive-min-time", dispatcher.DefaultKeepalive.MinTime, "clients may ping at most this often")
	fs.StringVar(&c.defaultPlanner, "default-planner", dispatcher.DefaultPlanner, "planner of tasks that name none")
	fs.StringVar(&c.planners, "planners", "", "comma list of the planners this deployment's commanders serve (e.g. chat,gui): a task naming another is refused at submit; empty: any name (commanders may bring their own)")
	fs.DurationVar(&c.queueTimeout, "queue-timeout", dispatcher.DefaultQueueTimeout, "a pending task that no connected commander can run (its planner or capabilities) for this long ends FAILURE with that reason; 0: it waits forever")
	fs.IntVar(&c.maxTasksKept, "max-tasks-kept", dispatcher.DefaultMaxTasksKept, "finished tasks kept in memory (oldest evicted)")
	fs.StringVar(&c.policyFile, "policy-file", "", "YAML policy file (docs/policies.md), reloaded when it changes; empty: no policy")
	fs.StringVar(&c.mcpServers, "mcp-servers", "", "MCP servers file (YAML or JSON, docs/mcp.md): their tools are served as mcp.<server>.<tool>; reloaded when it changes (checked every --policy-poll); empty: none")
	fs.DurationVar(&c.policyPoll, "policy-poll", dispatcher.DefaultPolicyPoll, "how often the policy file is checked for changes")
	fs.StringVar(&c.storage, "storage-backend", "sqlite", "sqlite (a file in --data-dir), postgres (--postgres-dsn) or memory (nothing survives a restart); env also TASK_STORAGE_BACKEND")
	fs.StringVar(&c.postgresDSN, "postgres-dsn", "", "PostgreSQL connection string for --storage-backend postgres; env also POSTGRES_CONNECTION_STRING")
	fs.StringVar(&c.dataDir, "data-dir", "./.data", "directory of the embedded (sqlite) store")
	fs.DurationVar(&c.retention, "retention", dispatcher.DefaultRetention, "remove tasks and their events this long after they ended (0: keep forever)")
	fs.DurationVar(&c.flushInterval, "event-flush-interval", dispatcher.DefaultFlushInterval, "paces the store writes: a few back to back, then one per interval on average; with one write under way at a time (SQLite) only under load (6 or more records per interval), below that rate a write starts as soon as the previous one ended; 0: never paced")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "json", "json or text")
	fs.StringVar(&c.httpListen, "http-listen", "127.0.0.1:8088", "address of the HTTP API (seed-001 REST/SSE, native /api/tasks) and the web page; empty disables")
	fs.StringVar(&c.httpHosts, "http-allowed-hosts", "", "comma list of host[:port] names or *.domain[:port] patterns the HTTP API answers to (Host, and a browser's Origin) besides the loopback names and its own address; e.g. the name of a proxy in front of it")
	fs.BoolVar(&c.insecure, "insecure", false, "allow --listen or --http-listen beyond loopback without --client-token and --commander-token (anyone who reaches the port can then submit, read and cancel tasks, or register as a commander)")
	fs.StringVar(&c.metricsListen, "metrics-listen", "", "address of the Prometheus /metrics endpoint; empty disables, unless ENABLE_PROMETHEUS=true (then :PROMETHEUS_PORT, default 8000)")
	fs.StringVar(&c.pprofListen, "pprof-listen", "", "address of Go's /debug/pprof profiles (loopback only, for profiling); empty disables")
	fs.StringVar(&c.sandboxEndpoint, "sandbox-endpoint", "", "Lybic sandbox API of POST /api/sandbox/create: the cloud (default https://api.lybic.cn) or the local sandbox server's http://HOST:PORT; env also LYBIC_API_ENDPOINT. The API key comes from DISPATCHER_SANDBOX_API_KEY or LYBIC_API_KEY")
	fs.StringVar(&c.sandboxOrg, "sandbox-org", "", "Lybic organisation of sandboxes created for requests without credentials; env also LYBIC_ORG_ID")
	fs.StringVar(&c.sandboxShape, "sandbox-shape", "", "shape of sandboxes whose request names none, and of those naming a shape the endpoint does not offer (e.g. local-1280x720 on the local sandbox server); env also LYBIC_SANDBOX_SHAPE")
	fs.StringVar(&c.fleetRedis, "fleet-redis", "", "Redis URL (redis://host:port/db): join a fleet of replicas sharing the postgres store and this bus (docs/operations.md, the fleet); empty: a single node")
	fs.StringVar(&c.replicaID, "replica-id", "", "this replica's id in the fleet (default: host name plus random digits)")
	fs.DurationVar(&c.fleetLease, "fleet-lease", fleet.DefaultLease, "fleet: a task lease's length (renewed every third of it)")
	fs.DurationVar(&c.fleetGrace, "fleet-grace", fleet.DefaultGrace, "fleet: how long past its expiry a lease is left for a hand-over before another replica ends the task (a dead replica's tasks end within lease + grace + 1s)")
	fs.DurationVar(&c.fleetReclaim, "fleet-reclaim-idle", fleet.DefaultReclaimIdle, "fleet: how long a bus entry read by a replica may stay unacknowledged before another reclaims it")
	fs.IntVar(&c.fleetReadFails, "fleet-max-read-failures", fleet.DefaultMaxReadFailures, "fleet: how many claims of a task in a row (takeovers, adoptions from the bus, by any replica) may find its stored body undecodable before the next ends it FAILURE unread")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] {
			return
		}
		v := getenv(envName(f.Name))
		if v == "" && seedEnv[f.Name] != "" {
			v = getenv(seedEnv[f.Name])
		}
		if v != "" {
			if err := fs.Set(f.Name, v); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", envName(f.Name), err))
			}
		}
	})
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	c.secretKey = getenv("DISPATCHER_SECRET_KEY")
	c.sandboxKey = getenv("DISPATCHER_SANDBOX_API_KEY")
	if c.sandboxKey == "" {
		c.sandboxKey = getenv("LYBIC_API_KEY")
	}
	c.httpDefault = !given["http-listen"] && getenv(envName("http-listen")) == ""
	if c.metricsListen == "" && strings.EqualFold(getenv("ENABLE_PROMETHEUS"), "true") {
		// Seed 000: ENABLE_PROMETHEUS=true, PROMETHEUS_PORT=8000, metrics
		// at http://HOST:PORT/metrics (all interfaces, as in its containers).
		port := getenv("PROMETHEUS_PORT")
		if port == "" {
			port = "8000"
		}
		c.metricsListen = ":" + port
	}
	return c, c.validate()
}

func (c *config) validate() error {
	var errs []error
	if (c.tlsCert == "") != (c.tlsKey == "") {
		errs = append(errs, errors.New("--tls-cert and --tls-key go together"))
	}
	if c.queueSize <= 0 {
		errs = append(errs, errors.New("--queue-size must be positive"))
	}
	if c.streamWindow != 0 && c.streamWindow < 64<<10 {
		errs = append(errs, errors.New("--stream-window-bytes must be 0 (dynamic) or at least 65536"))
	}
	if c.maxMsgBytes <= 0 {
		errs = append(errs, errors.New("--max-msg-bytes must be positive"))
	}
	if c.maxTasksKept <= 0 {
		errs = append(errs, errors.New("--max-tasks-kept must be positive"))
	}
	for name, d := range map[string]time.Duration{
		"--stop-grace": c.stopGrace, "--tool-timeout": c.toolTimeout, "--drain-timeout": c.drainTimeout,
		"--keepalive-time": c.kaTime, "--keepalive-timeout": c.kaTimeout, "--keepalive-min-time": c.kaMinTime,
		"--policy-poll": c.policyPoll, "--tenants-poll": c.tenantsPoll,
	} {
		if d <= 0 {
			errs = append(errs, fmt.Errorf("%s must be positive", name))
		}
	}
	switch c.storage {
	case "sqlite":
		if c.dataDir == "" {
			errs = append(errs, errors.New("--data-dir must not be empty with the sqlite store"))
		}
	case "postgres":
		if c.postgresDSN == "" {
			errs = append(errs, errors.New("--storage-backend postgres needs --postgres-dsn (or POSTGRES_CONNECTION_STRING)"))
		}
	case "memory":
	default:
		errs = append(errs, fmt.Errorf("--storage-backend: %q is not sqlite, postgres or memory", c.storage))
	}
	if c.fleetRedis != "" && c.storage != "postgres" {
		errs = append(errs, errors.New("--fleet-redis needs --storage-backend postgres: the fleet's truth is PostgreSQL"))
	}
	if c.fleetLease <= 0 || c.fleetGrace < 0 || c.fleetReclaim <= 0 || c.fleetReadFails <= 0 {
		errs = append(errs, errors.New("--fleet-lease, --fleet-reclaim-idle and --fleet-max-read-failures must be positive, --fleet-grace not negative"))
	}
	if c.retention < 0 || c.flushInterval < 0 {
		errs = append(errs, errors.New("--retention and --event-flush-interval must not be negative"))
	}
	if c.defaultPlanner == "" {
		errs = append(errs, errors.New("--default-planner must not be empty"))
	}
	for _, p := range append(c.plannerList(), c.defaultPlanner) {
		if p != "" && !task.ValidPlannerName(p) {
			errs = append(errs, fmt.Errorf("planner %q (--default-planner, --planners) is not a planner name: 1-64 letters, digits, '.', '_', '-', starting with a letter or digit", p))
		}
	}
	if ps := c.plannerList(); len(ps) > 0 && !slices.Contains(ps, c.defaultPlanner) {
		errs = append(errs, fmt.Errorf("--default-planner %q is not one of --planners %s", c.defaultPlanner, c.planners))
	}
	if _, err := parseLevel(c.logLevel); err != nil {
		errs = append(errs, err)
	}
	if c.logFormat != "json" && c.logFormat != "text" {
		errs = append(errs, errors.New("--log-format must be json or text"))
	}
	if err := httpapi.ValidateAllowedHosts(c.allowedHosts()); err != nil {
		errs = append(errs, fmt.Errorf("--http-allowed-hosts: %w", err))
	}
	if c.tenantsFile != "" {
		// Read here too, so that a bad file stops the start with the
		// other configuration errors (the dispatcher reads it again).
		if d, err := tenant.LoadFile(c.tenantsFile); err != nil {
			errs = append(errs, fmt.Errorf("--tenants-file: %w", err))
		} else {
			c.fileCommanders = d.CommanderTokens() > 0
		}
	}
	if c.adminToken != "" && (c.adminToken == c.commanderToken || c.adminToken == c.clientToken) {
		errs = append(errs, errors.New("--admin-token must differ from --client-token and --commander-token"))
	}
	if c.clientToken != "" && c.clientToken == c.commanderToken {
		// A client could register as a commander and receive every
		// task's config (keys included), and a commander act as a client.
		errs = append(errs, errors.New("--client-token and --commander-token must differ: with one token every client can also serve as a commander and receive every task's config"))
	}
	if exposed := c.exposed(); len(exposed) > 0 && !c.insecure && (!c.clientAuth() || !c.commanderAuth()) {
		errs = append(errs, fmt.Errorf("%s beyond loopback without %s: anyone who can reach the port could submit, read and cancel tasks or register as a commander and receive every task's config; "+
			"set both tokens (DISPATCHER_CLIENT_TOKEN, DISPATCHER_COMMANDER_TOKEN), listen on 127.0.0.1, or pass --insecure",
			strings.Join(exposed, " and "), c.missingTokens()))
	}
	if c.pprofListen != "" && !isLoopback(c.pprofListen) {
		// Profiles expose memory contents and cost CPU: never on a
		// reachable interface.
		errs = append(errs, fmt.Errorf("--pprof-listen %q: must be a loopback address (127.0.0.1:PORT, [::1]:PORT, localhost:PORT)", c.pprofListen))
	}
	return errors.Join(errs...)
}

// allowedHosts is --http-allowed-hosts as a list.
func (c *config) allowedHosts() []string {
	var hosts []string
	for _, h := range strings.Split(c.httpHosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hosts = append(hosts, h)
		}
	}
	return hosts
}

// exposed names the listeners that the tokens guard (gRPC and the HTTP
// API) and that listen beyond loopback.
func (c *config) exposed() []string {
	var out []string
	if !isLoopback(c.listen) {
		out = append(out, fmt.Sprintf("--listen %q", c.listen))
	}
	if c.httpListen != "" && !isLoopback(c.httpListen) {
		out = append(out, fmt.Sprintf("--http-listen %q", c.httpListen))
	}
	return out
}

// clientAuth: clients need a token (a client or admin token, or tenants).
func (c *config) clientAuth() bool {
	return c.clientToken != "" || c.adminToken != "" || c.tenantsFile != ""
}

// commanderAuth: commanders need a token (the shared one, or tenants'
// commander tokens in the tenants file).
func (c *config) commanderAuth() bool { return c.commanderToken != "" || c.fileCommanders }

// missingTokens names the token flags that are not set.
func (c *config) missingTokens() string {
	var m []string
	if !c.clientAuth() {
		m = append(m, "--client-token")
	}
	if !c.commanderAuth() {
		m = append(m, "--commander-token")
	}
	return strings.Join(m, " and ")
}

// warnings are what a valid configuration still deserves to be told about.
func (c *config) warnings() []string {
	var w []string
	if exposed := c.exposed(); len(exposed) > 0 && (!c.clientAuth() || !c.commanderAuth()) {
		w = append(w, fmt.Sprintf("--insecure: %s beyond loopback without %s; anyone who can reach the port can use it", strings.Join(exposed, " and "), c.missingTokens()))
	}
	switch {
	case c.clientAuth() && !c.commanderAuth():
		w = append(w, "only the client token is set: commanders and tool providers connect without a token (anyone who reaches the gRPC port can register as a commander and receive every task's config); set --commander-token too")
	case c.commanderAuth() && !c.clientAuth():
		w = append(w, "only the commander token is set: clients connect without a token (anyone who reaches the ports can submit, read and cancel tasks); set --client-token too")
	}
	return w
}

// dispatcherConfig is the dispatcher's configuration from c, with the
// opened store st (nil: in memory), the logger and the event hook (nil: none).
func (c *config) dispatcherConfig(st store.Store, log *slog.Logger, onEvent func(*dispatchv1.TaskEvent)) dispatcher.Config {
	var secretKey []byte
	if c.secretKey != "" {
		secretKey = []byte(c.secretKey)
	}
	return dispatcher.Config{
		Version:  version,
		LogLevel: c.logLevel,
		Auth: dispatcher.Auth{
			CommanderToken: c.commanderToken, ClientToken: c.clientToken, AdminToken: c.adminToken,
			TenantsFile: c.tenantsFile, TenantsPoll: c.tenantsPoll,
		},
		GRPC: dispatcher.GRPC{
			MaxRecvMsgBytes:   c.maxMsgBytes,
			StreamWindowBytes: streamWindow(c.streamWindow),
			Keepalive:         dispatcher.Keepalive{Time: c.kaTime, Timeout: c.kaTimeout, MinTime: c.kaMinTime},
		},
		Limits: dispatcher.Limits{QueueSize: c.queueSize, MaxTasksKept: c.maxTasksKept},
		Tasks: dispatcher.Tasks{DefaultPlanner: c.defaultPlanner, StopGrace: c.stopGrace, ToolTimeout: c.toolTimeout, HelloTimeout: offIfZero(c.helloTimeout),
			HandOverWindow: offIfZero(c.handOverWindow), LinkLossWindow: offIfZero(c.linkLossWindow), Planners: c.plannerList(), QueueTimeout: c.queueTimeoutValue()},
		Policy: dispatcher.Policy{File: c.policyFile, Poll: c.policyPoll},
		MCP:    dispatcher.MCP{ServersFile: c.mcpServers, Poll: c.policyPoll},
		Store:  dispatcher.Store{Backend: st, SecretKey: secretKey, Retention: c.retention, FlushInterval: offIfZero(c.flushInterval)},
		Fleet: dispatcher.Fleet{RedisURL: c.fleetRedis, ReplicaID: c.replicaID, Lease: c.fleetLease,
			Grace: c.fleetGrace, ReclaimIdle: c.fleetReclaim, MaxReadFailures: c.fleetReadFails},
		Logger:  log,
		OnEvent: onEvent,
	}
}

// streamWindow maps the flag (0: dynamic) to dispatcher.GRPC's (negative:
// dynamic).
func streamWindow(flag int) int {
	if flag == 0 {
		return -1
	}
	return flag
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("--log-level: %q is not debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(c *config, w io.Writer) *slog.Logger {
	level, _ := parseLevel(c.logLevel)
	opts := &slog.HandlerOptions{Level: level}
	if c.logFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// isLoopback reports whether the host of addr is a loopback name or
// address (an empty host, ":PORT", is every interface).
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// offIfZero is a duration flag's value as dispatcher.Config wants it: 0
// (the flag's "none": no hand-over, no write pacing) is negative there,
// where 0 means the default.
func offIfZero(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

// plannerList is --planners as a list (nil: any planner).
func (c *config) plannerList() []string {
	var out []string
	for _, p := range strings.Split(c.planners, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// queueTimeoutValue is --queue-timeout for dispatcher.Tasks: 0 there means
// the default, so "never" is negative.
func (c *config) queueTimeoutValue() time.Duration {
	if c.queueTimeout <= 0 {
		return -1
	}
	return c.queueTimeout
}

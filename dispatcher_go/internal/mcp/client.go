package mcp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	sdk "github.com/modelcontextprotocol/go-sdk/mcp"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// ToolPrefix starts the broker name of every MCP server's tool:
// mcp.<server>.<tool>.
const ToolPrefix = "mcp."

// Registry is where a Manager publishes the servers' tools (*broker.Broker).
type Registry interface {
	SetLocalTools(id string, specs []*dispatchv1.ToolSpec, run broker.LocalFunc) ([]string, error)
	RemoveLocal(id string)
}

// Options configure a Manager.
type Options struct {
	// Registry receives the tools (required).
	Registry Registry
	// Version is announced to servers as the client's version.
	Version string
	// MinBackoff and MaxBackoff bound the wait before a server that ended
	// (crashed, or failed to start) is started again; the wait doubles
	// from MinBackoff on each failure in a row (defaults 200 ms, 30 s).
	MinBackoff, MaxBackoff time.Duration
	// ConnectTimeout bounds starting a server and listing its tools
	// (default 30 s).
	ConnectTimeout time.Duration
	// Logger receives the servers' life and their stderr; nil discards.
	Logger *slog.Logger
}

// healthyAfter is how long a server must have run for its next failure to
// start the backoff from MinBackoff again.
const healthyAfter = 30 * time.Second

// maxStderrLine bounds a line of a stdio server's stderr in the log.
const maxStderrLine = 512

// childEnv are the variables of the dispatcher's environment a stdio server
// inherits; the rest (tokens, the secret key) are not passed on. A server
// gets more through its env.
var childEnv = []string{"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SYSTEMROOT"}

// Manager runs the configured MCP servers and publishes their tools. Safe
// for concurrent use.
type Manager struct {
	opts Options
	log  *slog.Logger

	mu      sync.Mutex
	servers map[string]*server
	closed  bool
}

// NewManager returns a Manager with no servers; Apply starts them.
func NewManager(opts Options) *Manager {
	if opts.MinBackoff <= 0 {
		opts.MinBackoff = 200 * time.Millisecond
	}
	if opts.MaxBackoff < opts.MinBackoff {
		opts.MaxBackoff = max(30*time.Second, opts.MinBackoff)
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = 30 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Manager{opts: opts, log: opts.Logger, servers: make(map[string]*server)}
}

// Apply makes cfg the servers in force: servers no longer listed or whose
// entry changed are stopped (their tools removed), then new and changed
// ones started. Unchanged servers keep running.
func (m *Manager) Apply(cfg Config) {
	m.mu.Lock()
	var stop []*server
	for name, s := range m.servers {
		if c, ok := cfg.Servers[name]; !ok || c.Disabled || !c.equal(s.cfg) {
			stop = append(stop, s)
			delete(m.servers, name)
		}
	}
	m.mu.Unlock()
	// Stopped first: a changed server's old instance removes the tools of
	// its id, which must not be the new instance's.
	for _, s := range stop {
		s.close()
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Servers)) {
		c := cfg.Servers[name]
		if _, ok := m.servers[name]; ok || c.Disabled {
			continue
		}
		s := newServer(m, name, c)
		m.servers[name] = s
		go s.run()
	}
}

// Close stops every server and waits for them; their tools are removed.
func (m *Manager) Close() {
	m.mu.Lock()
	m.closed = true
	all := slices.Collect(maps.Values(m.servers))
	m.servers = map[string]*server{}
	m.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range all {
		wg.Go(s.close)
	}
	wg.Wait()
}

// Status is one server's state, for logs and tests.
type Status struct {
	Connected bool
	Tools     []string // published broker names
	Restarts  int      // sessions that ended and were started again
	LastError string
}

// Status returns the state of the server name (false if not configured).
func (m *Manager) Status(name string) (Status, bool) {
	m.mu.Lock()
	s := m.servers[name]
	m.mu.Unlock()
	if s == nil {
		return Status{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return Status{Connected: s.cs != nil, Tools: slices.Clone(s.tools), Restarts: s.restarts, LastError: s.lastErr}, true
}

// Run loads the file at path, applies it, and reloads it when it changes
// (polled every poll; a change is read once the file held still for one
// poll). A file that fails to load is logged and the servers in force
// stay. Run returns when ctx ends, after closing every server.
func (m *Manager) Run(ctx context.Context, path string, poll time.Duration) {
	defer m.Close()
	if poll <= 0 {
		poll = time.Second
	}
	var last, seen []byte
	load := func() {
		src, err := os.ReadFile(path)
		if err != nil {
			m.log.Warn("mcp servers file unreadable; keeping the servers in force", "file", path, "error", err)
			return
		}
		if bytes.Equal(src, last) {
			return
		}
		// A file being written (truncated, then filled) must not be read
		// half done: a change is loaded once it held still for one poll.
		if last != nil && !bytes.Equal(src, seen) {
			seen = src
			return
		}
		last, seen = src, src
		cfg, err := ParseConfig(src)
		if err != nil {
			m.log.Error("mcp servers file rejected; keeping the servers in force", "file", path, "error", err)
			return
		}
		m.log.Info("mcp servers loaded", "file", path, "servers", slices.Sorted(maps.Keys(cfg.Servers)))
		m.Apply(cfg)
	}
	load()
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			load()
		}
	}
}

// server is one configured MCP server and its session, restarted with
// backoff when it ends.
type server struct {
	m    *Manager
	name string
	id   string // executor id: mcp.<name>
	cfg  ServerConfig
	log  *slog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{}

	mu       sync.Mutex
	cs       *sdk.ClientSession // nil while not connected
	tools    []string
	restarts int
	lastErr  string
	relist   chan struct{} // tools/list_changed
	broken   chan struct{} // a call saw the transport fail: start again
}

func newServer(m *Manager, name string, cfg ServerConfig) *server {
	ctx, cancel := context.WithCancel(context.Background())
	return &server{
		m: m, name: name, id: ToolPrefix + name, cfg: cfg,
		log: m.log.With("mcp_server", name),
		ctx: ctx, cancel: cancel, done: make(chan struct{}),
		relist: make(chan struct{}, 1),
		broken: make(chan struct{}, 1),
	}
}

// close stops the server, removes its tools and waits for its goroutine.
func (s *server) close() {
	s.cancel()
	<-s.done
	s.m.opts.Registry.RemoveLocal(s.id)
}

// run keeps a session open until the server is closed, starting it again
// with backoff when it ends. Calls made meanwhile fail at once with
// PROVIDER_UNAVAILABLE (the tools stay listed).
func (s *server) run() {
	defer close(s.done)
	backoff := s.m.opts.MinBackoff
	for {
		started := time.Now()
		err := s.session()
		if s.ctx.Err() != nil {
			return
		}
		if time.Since(started) > healthyAfter {
			backoff = s.m.opts.MinBackoff
		}
		s.mu.Lock()
		s.restarts++
		if err != nil {
			s.lastErr = err.Error()
		}
		s.mu.Unlock()
		s.log.Warn("mcp server ended; starting it again", "error", err, "backoff", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-s.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, s.m.opts.MaxBackoff)
	}
}

// session connects, publishes the tools and waits until the session ends.
func (s *server) session() error {
	transport, err := s.transport()
	if err != nil {
		return err
	}
	client := sdk.NewClient(&sdk.Implementation{Name: "agentdispatch-dispatcher", Version: s.m.opts.Version}, &sdk.ClientOptions{
		ToolListChangedHandler: func(context.Context, *sdk.ToolListChangedRequest) {
			select {
			case s.relist <- struct{}{}:
			default:
			}
		},
	})
	cctx, cancel := context.WithTimeout(s.ctx, s.m.opts.ConnectTimeout)
	cs, err := client.Connect(cctx, transport, nil)
	cancel()
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer cs.Close()
	if err := s.publish(cs); err != nil {
		return err
	}
	s.mu.Lock()
	s.cs = cs
	s.lastErr = ""
	select {
	case <-s.broken: // about the session before
	default:
	}
	s.mu.Unlock()
	s.log.Info("mcp server connected", "tools", s.tools)
	defer func() {
		s.mu.Lock()
		s.cs = nil
		s.mu.Unlock()
	}()
	ended := make(chan error, 1)
	go func() { ended <- cs.Wait() }()
	for {
		select {
		case <-s.ctx.Done():
			_ = cs.Close()
			<-ended
			return nil
		case err := <-ended:
			if err == nil {
				err = errors.New("the session ended")
			}
			return err
		case <-s.broken:
			// An HTTP server that lost our session, say: a new session
			// (a stdio server's end shows in ended first).
			_ = cs.Close()
			<-ended
			return errors.New("a call failed on the transport")
		case <-s.relist:
			if err := s.publish(cs); err != nil {
				s.log.Warn("mcp tools/list after list_changed failed", "error", err)
			}
		}
	}
}

// publish lists the server's tools and publishes them in the broker.
func (s *server) publish(cs *sdk.ClientSession) error {
	ctx, cancel := context.WithTimeout(s.ctx, s.m.opts.ConnectTimeout)
	defer cancel()
	var specs []*dispatchv1.ToolSpec
	for t, err := range cs.Tools(ctx, nil) {
		if err != nil {
			return fmt.Errorf("tools/list: %w", err)
		}
		spec, err := s.spec(t)
		if err != nil {
			s.log.Warn("mcp tool left out", "tool", t.Name, "error", err)
			continue
		}
		specs = append(specs, spec)
	}
	names, err := s.m.opts.Registry.SetLocalTools(s.id, specs, s.call)
	if err != nil {
		s.log.Warn("mcp tools left out", "error", err)
	}
	s.mu.Lock()
	s.tools = names
	s.mu.Unlock()
	return nil
}

// spec is the broker's ToolSpec of an MCP tool.
func (s *server) spec(t *sdk.Tool) (*dispatchv1.ToolSpec, error) {
	schema, err := json.Marshal(t.InputSchema)
	if err != nil {
		return nil, fmt.Errorf("input schema: %w", err)
	}
	if string(schema) == "null" {
		schema = []byte(`{"type":"object"}`)
	}
	desc := t.Description
	if desc == "" && t.Title != "" {
		desc = t.Title
	}
	return &dispatchv1.ToolSpec{
		Name:                 s.id + "." + t.Name,
		Description:          desc,
		ParametersJsonSchema: string(schema),
		TimeoutMs:            s.cfg.Timeout.Milliseconds(),
	}, nil
}

// call runs one broker call on the server's current session.
func (s *server) call(ctx context.Context, c broker.Call) (string, error) {
	s.mu.Lock()
	cs := s.cs
	s.mu.Unlock()
	if cs == nil {
		return "", broker.Failure(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE,
			fmt.Sprintf("mcp server %q is not connected (starting again)", s.name))
	}
	args := strings.TrimSpace(c.ArgumentsJSON)
	if args == "" {
		args = "{}"
	}
	// The SDK returns when ctx ends, except while a write to a server
	// that stopped reading blocks: the caller must not wait for that.
	type answer struct {
		res *sdk.CallToolResult
		err error
	}
	ch := make(chan answer, 1)
	go func() {
		res, err := cs.CallTool(ctx, &sdk.CallToolParams{
			Name:      strings.TrimPrefix(c.ToolName, s.id+"."),
			Arguments: json.RawMessage(args),
		})
		ch <- answer{res, err}
	}()
	var res *sdk.CallToolResult
	var err error
	select {
	case a := <-ch:
		res, err = a.res, a.err
	case <-ctx.Done():
		return "", ctx.Err()
	}
	if err != nil {
		var werr *jsonrpc.Error
		switch {
		case ctx.Err() != nil:
			// The SDK sent notifications/cancelled (or closed the
			// request's stream); the broker reports CANCELLED or TIMEOUT.
			return "", ctx.Err()
		case errors.As(err, &werr) && werr.Code == jsonrpc.CodeInvalidParams:
			return "", broker.Failure(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS, werr.Message)
		case errors.As(err, &werr):
			return "", fmt.Errorf("mcp server %q: %s", s.name, werr.Message)
		}
		// Not an answer of the server: its process or connection is gone
		// (the session ends and the server is started again).
		s.mu.Lock()
		if s.cs == cs {
			select {
			case s.broken <- struct{}{}:
			default:
			}
		}
		s.mu.Unlock()
		return "", broker.Failure(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE,
			fmt.Sprintf("mcp server %q went away: %v", s.name, err))
	}
	if res.IsError {
		return "", broker.Failure(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED, contentText(res.Content))
	}
	// The structured result when there is one (the text content then
	// repeats it, per the specification), else the content parts.
	var v any = res.StructuredContent
	if v == nil {
		v = map[string]any{"content": res.Content}
	}
	out, err := json.Marshal(v)
	if err != nil {
		return "", fmt.Errorf("encode the result of mcp server %q: %w", s.name, err)
	}
	return string(out), nil
}

// contentText joins the text parts of an MCP result.
func contentText(cs []sdk.Content) string {
	var parts []string
	for _, c := range cs {
		if t, ok := c.(*sdk.TextContent); ok {
			parts = append(parts, t.Text)
		}
	}
	if len(parts) == 0 {
		return "the mcp tool reported an error"
	}
	return strings.Join(parts, "\n")
}

// transport is a new transport to the server: a command started for the
// session, or the HTTP endpoint.
func (s *server) transport() (sdk.Transport, error) {
	if s.cfg.URL != "" {
		hc := &http.Client{Transport: headerTransport{headers: s.cfg.Headers, next: http.DefaultTransport}}
		return &sdk.StreamableClientTransport{Endpoint: s.cfg.URL, HTTPClient: hc}, nil
	}
	cmd := exec.Command(s.cfg.Command, s.cfg.Args...)
	cmd.Dir = s.cfg.Cwd
	for _, k := range childEnv {
		if v, ok := os.LookupEnv(k); ok {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(s.cfg.Env)) {
		cmd.Env = append(cmd.Env, k+"="+s.cfg.Env[k])
	}
	cmd.Stderr = &lineLogger{log: s.log}
	setDeathSignal(cmd)
	return &sdk.CommandTransport{Command: cmd, TerminateDuration: 2 * time.Second}, nil
}

// headerTransport adds the configured headers (e.g. a bearer token) to
// every request to an HTTP server.
type headerTransport struct {
	headers map[string]string
	next    http.RoundTripper
}

// RoundTrip sends r with the headers.
func (t headerTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if len(t.headers) > 0 {
		r = r.Clone(r.Context())
		for k, v := range t.headers {
			r.Header.Set(k, v)
		}
	}
	return t.next.RoundTrip(r)
}

// lineLogger logs a stdio server's stderr line by line.
type lineLogger struct {
	log *slog.Logger
	mu  sync.Mutex
	buf []byte
}

// Write logs the complete lines of p (each cut to maxStderrLine bytes).
func (l *lineLogger) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf = append(l.buf, p...)
	for {
		i := bytes.IndexByte(l.buf, '\n')
		if i < 0 {
			break
		}
		l.emit(l.buf[:i])
		l.buf = l.buf[i+1:]
	}
	if len(l.buf) > maxStderrLine {
		l.emit(l.buf)
		l.buf = l.buf[:0]
	}
	return len(p), nil
}

func (l *lineLogger) emit(line []byte) {
	if len(line) > maxStderrLine {
		line = line[:maxStderrLine]
	}
	l.log.Info("mcp server stderr", "line", strings.ToValidUTF8(string(line), "\uFFFD"))
}

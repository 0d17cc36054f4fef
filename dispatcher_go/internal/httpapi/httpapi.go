// Package httpapi serves the dispatcher's HTTP API beside gRPC: the seed-001
// REST/SSE endpoints (/api/agent/run, /api/agent/task/submit, ...), native
// endpoints over the same task API (/api/tasks/...; events as protojson,
// the SSE id of an event is its seq, Last-Event-ID resumes), and the web
// page at /.
//
// Every handler calls the in-process native API (api.Local), so validation
// and error mapping are those of gRPC; the gRPC code of an error becomes an
// HTTP status in one table (httpStatus). A bad request is always a 4xx with
// a JSON body {"success": false, "code": "...", "error": "..."}; a 500 means
// a real internal error.
//
// The client token says which tenant a request acts for (Options.Auth); the
// caller goes to the backend in the request's context, which answers only
// that tenant's tasks (another tenant's task is a 404, as a missing one).
//
// Only this server's own origin may use it (guard.go): a request whose Host
// is not one of its names gets 421, a browser request from a page of
// another origin 403, before any handler runs. Request bodies are bounded
// in size here and in time by the http.Server's ReadTimeout (the caller's).
//
// It adapts HTTP only: it must not build components, start goroutines
// other than per-request ones, or own drain and close (internal/dispatcher
// does; cmd/dispatcher wires this handler to api.Local).
package httpapi

import (
	"context"
	"embed"
	"errors"
	"io/fs"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/lybicsandbox"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Backend is the native client API the handlers call (api.Local). Its
// errors are gRPC statuses.
type Backend interface {
	SubmitTask(context.Context, *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error)
	GetTask(context.Context, *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error)
	ListTasks(context.Context, *dispatchv1.ListTasksRequest) (*dispatchv1.ListTasksResponse, error)
	CancelTask(context.Context, *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error)
	Interject(context.Context, *dispatchv1.InterjectRequest) (*dispatchv1.InterjectResponse, error)
	ApproveToolCall(context.Context, *dispatchv1.ApproveToolCallRequest) (*dispatchv1.ApproveToolCallResponse, error)
	// Watch calls fn for each event with seq > afterSeq until the task's end.
	Watch(ctx context.Context, taskID string, afterSeq uint64, fn func(*dispatchv1.TaskEvent) error) error
	// Serving is false while the dispatcher drains.
	Serving(ctx context.Context) bool
}

// Options configure the handler. Zero values are the defaults.
type Options struct {
	// ClientToken, when set, is required as "Authorization: Bearer <token>"
	// on every /api/ endpoint except /api/health (as on the gRPC client
	// services). GET requests may carry it in the cookie TokenCookie
	// instead, because a browser's EventSource cannot set headers; requests
	// that change anything always need the header (no CSRF through the cookie).
	ClientToken string
	// Auth, when set, replaces ClientToken: it says which tenant a token
	// acts for (the dispatcher's tenant.Auth, with the tenants file). Every
	// handler then answers only what that caller sees (the caller goes to
	// the backend in the request's context, tenant.WithCaller).
	Auth Authenticator
	// MaxBodyBytes bounds a request body (default 1 MiB); larger → 413.
	MaxBodyBytes int64
	// Heartbeat is the interval of SSE comment lines that keep idle
	// streams open through proxies (default 15 s).
	Heartbeat time.Duration
	// AllowedHosts are the host names (besides the loopback names and the
	// server's own address, on the port a request arrived on) that
	// requests may name in Host and browsers in Origin: "host",
	// "host:port", "*.domain" (any name below domain) or "*.domain:port";
	// without a port, any port. Other hosts get 421, other origins 403
	// (see guard.go). Check entries with ValidateAllowedHosts; an invalid
	// one is logged and ignored.
	AllowedHosts []string
	// MCP, when set, serves /mcp (internal/mcp), behind the client token.
	MCP http.Handler
	// Logger receives request errors; nil discards.
	Logger *slog.Logger
	// A2A, when set, serves /a2a and /.well-known/agent-card.json
	// (internal/a2a; it checks the client token itself).
	A2A http.Handler
	// Sandboxes serves seed 001's POST /api/sandbox/create (the configured
	// Lybic endpoint); nil: that endpoint answers 501.
	Sandboxes Sandboxes
}

// Authenticator says who a client token is (tenant.Auth implements it).
type Authenticator interface {
	// ClientAuth reports whether clients must present a token.
	ClientAuth() bool
	// Client is the caller a token acts for; false for an unknown token.
	Client(token string) (tenant.Caller, bool)
}

// Sandboxes creates sandboxes on the configured Lybic sandbox API
// (*lybicsandbox.Client).
type Sandboxes interface {
	Create(ctx context.Context, r lybicsandbox.Request) (*lybicsandbox.Created, error)
	// Endpoint is the API's URL: the only api_endpoint a request may name.
	Endpoint() string
}

// TokenCookie is the cookie a browser may use for the client token on GET
// requests (the web page sets it), URL-encoded (%XX) as encodeURIComponent
// does.
const TokenCookie = "dispatcher_token"

//go:embed web
var webFiles embed.FS

type handler struct {
	b     Backend
	opts  Options
	log   *slog.Logger
	hosts []hostRule // opts.AllowedHosts
}

// New returns the HTTP handler: the API under /api/ and the web page at /.
func New(b Backend, opts Options) http.Handler {
	if opts.MaxBodyBytes <= 0 {
		opts.MaxBodyBytes = 1 << 20
	}
	if opts.Heartbeat <= 0 {
		opts.Heartbeat = 15 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Auth == nil {
		// One token, or none: the one-tenant case. tenant.New fails only
		// for tokens that must differ, and there is one.
		a, err := tenant.New(tenant.Options{ClientToken: opts.ClientToken})
		if err != nil {
			panic(err)
		}
		opts.Auth = a
	}
	h := &handler{b: b, opts: opts, log: opts.Logger}
	for _, e := range opts.AllowedHosts {
		r, err := parseHostRule(e)
		if err != nil {
			h.log.Warn("http api: ignoring an allowed host", "error", err)
			continue
		}
		h.hosts = append(h.hosts, r)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/health", h.health)

	// Seed 001.
	mux.Handle("POST /api/agent/run", h.auth(h.seedRun))
	mux.Handle("POST /api/agent/task/submit", h.auth(h.seedSubmit))
	mux.Handle("GET /api/agent/task/status/{id}", h.auth(h.seedStatus))
	mux.Handle("POST /api/agent/cancel", h.auth(h.seedCancel))
	mux.Handle("POST /api/sandbox/create", h.auth(h.seedSandboxCreate))

	// Native.
	mux.Handle("GET /api/tasks", h.auth(h.listTasks))
	mux.Handle("POST /api/tasks", h.auth(h.submitTask))
	mux.Handle("GET /api/tasks/{id}", h.auth(h.getTask))
	mux.Handle("GET /api/tasks/{id}/events", h.auth(h.events))
	mux.Handle("POST /api/tasks/{id}/cancel", h.auth(h.cancelTask))
	mux.Handle("POST /api/tasks/{id}/interject", h.auth(h.interject))
	mux.Handle("POST /api/tasks/{id}/tool-calls/{call_id}/approve", h.auth(h.approve(true)))
	mux.Handle("POST /api/tasks/{id}/tool-calls/{call_id}/reject", h.auth(h.approve(false)))
	if opts.MCP != nil {
		mux.Handle("/mcp", h.auth(opts.MCP.ServeHTTP))
	}
	// Nothing else matched, under /api/ or anywhere else: a JSON error like
	// every other (a known path with another method is a 405), not
	// net/http's text/plain "404 page not found".
	unmatched := func(w http.ResponseWriter, r *http.Request) {
		var allow []string
		for _, m := range []string{http.MethodGet, http.MethodPost} {
			probe := r.Clone(r.Context())
			probe.Method = m
			if _, p := mux.Handler(probe); p != "/api/" && p != "/" && p != "" {
				allow = append(allow, m)
			}
		}
		if len(allow) > 0 {
			w.Header().Set("Allow", strings.Join(allow, ", "))
			writeError(w, http.StatusMethodNotAllowed, "METHOD_NOT_ALLOWED", "method "+r.Method+" not allowed on "+r.URL.Path)
			return
		}
		writeError(w, http.StatusNotFound, "NOT_FOUND", "no such endpoint: "+r.Method+" "+r.URL.Path)
	}
	mux.HandleFunc("/api/", unmatched)
	mux.HandleFunc("/", unmatched)

	if opts.A2A != nil {
		mux.Handle("/a2a", opts.A2A)
		mux.Handle("GET /.well-known/agent-card.json", opts.A2A)
	}

	// The web page: static files, no data in them (no token needed).
	sub, _ := fs.Sub(webFiles, "web")
	files := http.FileServerFS(sub)
	page := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// frame-ancestors (and X-Frame-Options for older browsers): no
		// other page may frame this one and click its buttons.
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		files.ServeHTTP(w, r)
	})
	mux.Handle("GET /{$}", page)
	mux.Handle("GET /app.js", page)
	mux.Handle("GET /style.css", page)
	return h.guard(mux)
}

// healthTexter is a Backend that says why it does not accept work.
type healthTexter interface {
	HealthText(ctx context.Context) string
}

// health is seed 001's {"status": "ok"}; 503 {"status": "draining"} while
// the dispatcher drains, 503 {"status": "degraded: …"} while what new
// work needs is down (the store, a fleet's database or bus: see
// dispatcher.HealthText). No token needed (probes). A HealthText of ""
// (serving again by the time it was asked) is 200 ok.
func (h *handler) health(w http.ResponseWriter, r *http.Request) {
	if !h.b.Serving(r.Context()) {
		status := "draining"
		if ht, ok := h.b.(healthTexter); ok {
			status = ht.HealthText(r.Context())
		}
		if status != "" {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": status})
			return
		}
	}
	writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
}

// auth checks the client token (see Options.ClientToken and Auth) and
// hands the request on with its caller in the context.
func (h *handler) auth(next http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, _ := requestToken(r)
		reload, _ := h.opts.Auth.(reloadable)
		var changed <-chan struct{}
		if reload != nil {
			changed = reload.Changed()
		}
		// The token is compared in constant time (internal/tenant).
		if c, ok := h.opts.Auth.Client(tok); ok {
			// r.URL.Query() drops what it cannot decode: ?page_token=%%%
			// listed the first page as if no token had been given.
			if _, err := url.ParseQuery(r.URL.RawQuery); err != nil {
				writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "malformed query string: "+err.Error())
				return
			}
			ctx := tenant.WithCaller(r.Context(), c)
			if reload != nil && reload.HasTenants() {
				// A request (an event stream) outlives a reload of the
				// tenants file: it ends when its token stops meaning what
				// it meant, as its next request would be refused.
				var cancel context.CancelFunc
				ctx, cancel = context.WithCancel(ctx)
				defer cancel()
				go h.endIfRevoked(ctx, cancel, reload, tok, c, changed)
			}
			next(w, r.WithContext(ctx))
			return
		}
		w.Header().Set("WWW-Authenticate", `Bearer realm="dispatcher"`)
		writeError(w, http.StatusUnauthorized, "UNAUTHENTICATED", "missing or invalid bearer token")
	})
}

// reloadable is an Authenticator whose tokens can change under a request
// (tenant.Auth with a tenants file).
type reloadable interface {
	HasTenants() bool
	Changed() <-chan struct{}
}

// endIfRevoked cancels ctx, a request's, once a reload makes tok mean
// something other than c; it returns when ctx ends.
func (h *handler) endIfRevoked(ctx context.Context, cancel context.CancelFunc, reload reloadable, tok string, c tenant.Caller, changed <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		changed = reload.Changed()
		if now, ok := h.opts.Auth.Client(tok); !ok || now != c {
			cancel()
			return
		}
	}
}

// requestToken is the request's bearer token: the Authorization header, or
// on a GET the cookie TokenCookie.
func requestToken(r *http.Request) (string, bool) {
	if scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
		return strings.TrimSpace(tok), true
	}
	if r.Method == http.MethodGet {
		if c, err := r.Cookie(TokenCookie); err == nil {
			// The page URL-encodes the token (encodeURIComponent): a cookie
			// value cannot hold every character a token may have.
			v, err := url.PathUnescape(c.Value)
			if err != nil {
				v = c.Value
			}
			return v, true
		}
	}
	return "", false
}

// errClientGone ends a stream whose client went away; it wraps
// context.Canceled so that the API layer does not log it as internal.
var errClientGone = errors.Join(errors.New("client went away"), context.Canceled)

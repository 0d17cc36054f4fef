// Package a2a serves the A2A protocol (Agent2Agent, v1.0) over the
// dispatcher's native task API: the agent card at
// /.well-known/agent-card.json, the JSON-RPC binding with SSE streaming at
// /a2a on the HTTP port, and the gRPC binding (lf.a2a.v1.A2AService)
// registered on the dispatcher's grpc.Server. The transports are the
// official a2a-go SDK's (a2asrv, a2agrpc); this package is the
// a2asrv.RequestHandler behind them.
//
// It owns the mapping only: a message's text parts → a SubmitTask
// instruction (contextId → previousTaskId), our events → A2A task states,
// artifact updates and status messages (project.go), a follow-up message
// to an INPUT_REQUIRED task → Interject (call_user) or ApproveToolCall (a
// held tool call), CancelTask → our CancelTask (which waits for the end),
// gRPC status → A2A errors (errors.go). Every event it streams carries our
// seq in its metadata; SubscribeToTask resumes after a seq given in the
// Dispatcher-Resume-After service parameter (the resume extension,
// docs/a2a.md).
//
// It must not hold task state of its own beyond a request (the task log is
// the truth: every snapshot is a replay of it), start goroutines other
// than per-request ones, or bypass the native API (Backend) that the other
// transports use. Push notifications are not supported (not declared;
// their operations answer PushNotificationNotSupportedError).
package a2a

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"log/slog"
	"net"
	"net/http"
	"sort"
	"strings"

	"github.com/a2aproject/a2a-go/v2/a2a"
	"github.com/a2aproject/a2a-go/v2/a2acompat/a2av0"
	a2agrpc "github.com/a2aproject/a2a-go/v2/a2agrpc/v1"
	a2apb "github.com/a2aproject/a2a-go/v2/a2apb/v1"
	"github.com/a2aproject/a2a-go/v2/a2asrv"
	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Backend is the native client API (api.Local). Its errors are gRPC statuses.
type Backend interface {
	SubmitTask(context.Context, *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error)
	GetTask(context.Context, *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error)
	ListTasks(context.Context, *dispatchv1.ListTasksRequest) (*dispatchv1.ListTasksResponse, error)
	CancelTask(context.Context, *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error)
	Interject(context.Context, *dispatchv1.InterjectRequest) (*dispatchv1.InterjectResponse, error)
	ApproveToolCall(context.Context, *dispatchv1.ApproveToolCallRequest) (*dispatchv1.ApproveToolCallResponse, error)
	Watch(ctx context.Context, taskID string, afterSeq uint64, fn func(*dispatchv1.TaskEvent) error) error
}

// Options configure the server. Zero values are the defaults.
type Options struct {
	// ClientToken, when set, is required as "Authorization: Bearer <token>"
	// on /a2a (the card is public); the card then declares a bearer
	// scheme. The gRPC binding is guarded by api's interceptors with the
	// same token.
	ClientToken string
	// Auth, when set, replaces ClientToken: it says which tenant a bearer
	// token acts for (the dispatcher's tenant.Auth, with the tenants
	// file), and the request runs as that caller (tenant.WithCaller), so
	// a tenant sees only its own tasks here as on every other API.
	Auth Authenticator
	// Version is the dispatcher's version, the card's version.
	Version string
	// GRPCAddr is the address the gRPC port listens on (host:port); the
	// card's gRPC interface names the request's host on its port. Empty:
	// no gRPC interface is declared.
	GRPCAddr string
	// Planners lists the planner capabilities ("planner:chat", ...) of the
	// connected commanders: the card's skills. Nil: none.
	Planners func() []string
	// DefaultPlanner is the planner a task without one runs ("chat").
	DefaultPlanner string
	// Logger receives request errors; nil discards.
	Logger *slog.Logger
}

// Server is the A2A front end of a dispatcher.
type Server struct {
	b    Backend
	opts Options
	log  *slog.Logger
	h    *handler
	rpc  http.Handler // A2A 1.x
	rpc0 http.Handler // A2A 0.3 (a2a-go's compat binding)
}

// ResumeExtension is the URI of our resume-from-seq extension.
const ResumeExtension = "urn:agentdispatch:a2a:stream-resume:v1"

// ResumeParam is the service parameter (HTTP header, gRPC metadata) that
// names the seq after which SubscribeToTask resumes.
const ResumeParam = "Dispatcher-Resume-After"

// contextLabel is the task label that keeps an A2A task's contextId.
const contextLabel = "a2a.context_id"

// New returns the A2A server over b.
func New(b Backend, opts Options) *Server {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.DefaultPlanner == "" {
		opts.DefaultPlanner = "chat"
	}
	s := &Server{b: b, opts: opts, log: opts.Logger}
	s.h = &handler{b: b, log: opts.Logger}
	s.rpc = a2asrv.NewJSONRPCHandler(s.h)
	s.rpc0 = a2av0.NewJSONRPCHandler(s.h)
	return s
}

// RegisterGRPC registers lf.a2a.v1.A2AService on gs.
func (s *Server) RegisterGRPC(gs *grpc.Server) {
	a2apb.RegisterA2AServiceServer(gs, grpcService{a2agrpc.NewHandler(s.h)})
}

// GRPCServiceName is the gRPC service the binding serves (for auth).
const GRPCServiceName = "lf.a2a.v1.A2AService"

// ServeHTTP serves GET /.well-known/agent-card.json and POST /a2a.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/.well-known/agent-card.json" {
		s.serveCard(w, r)
		return
	}
	ctx, ok := s.authenticate(r)
	if !ok {
		w.Header().Set("WWW-Authenticate", `Bearer realm="dispatcher"`)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"jsonrpc":"2.0","id":null,"error":{"code":-31401,"message":"missing or invalid bearer token"}}`))
		return
	}
	// Bodies are bounded as on the HTTP API (an instruction is text).
	r = r.WithContext(ctx)
	r.Body = http.MaxBytesReader(w, r.Body, maxBodyBytes)
	// The spec reads an absent A2A-Version as 0.3: such requests (and 0.3
	// ones) get a2a-go's 0.3 JSON-RPC binding over the same handler.
	// A client may name the version as a request parameter instead of
	// the header (spec §3.6.1); the header wins.
	if r.Header.Get(a2a.SvcParamVersion) == "" {
		if q := r.URL.Query().Get(a2a.SvcParamVersion); q != "" {
			r.Header.Set(a2a.SvcParamVersion, q)
		}
	}
	legacy := false
	if v := strings.TrimSpace(r.Header.Get(a2a.SvcParamVersion)); v == "" || v == "0.3" {
		legacy = true
	}
	if r.Method == http.MethodPost && checkEnvelope(w, r) {
		return
	}
	if legacy {
		s.rpc0.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), legacyKey{}, true)))
		return
	}
	if checkParams(w, r) {
		return
	}
	s.rpc.ServeHTTP(w, r)
}

// maxBodyBytes bounds a JSON-RPC request body (the HTTP API's default).
const maxBodyBytes = 1 << 20

// Authenticator says who a client token is (tenant.Auth implements it).
type Authenticator interface {
	// ClientAuth reports whether clients must present a token.
	ClientAuth() bool
	// Client is the caller a token acts for; false for an unknown token.
	Client(token string) (tenant.Caller, bool)
}

// legacyKey marks a request served by the 0.3 binding.
type legacyKey struct{}

// authenticate checks the request's bearer token and returns the context
// the request runs in (with its caller when Auth is set).
func (s *Server) authenticate(r *http.Request) (context.Context, bool) {
	ctx := r.Context()
	if s.opts.Auth == nil {
		want := s.opts.ClientToken
		return ctx, want == "" || bearerOK(r.Header.Get("Authorization"), want)
	}
	tok := ""
	if scheme, t, ok := strings.Cut(r.Header.Get("Authorization"), " "); ok && strings.EqualFold(scheme, "Bearer") {
		tok = strings.TrimSpace(t)
	}
	c, ok := s.opts.Auth.Client(tok)
	if !ok {
		return ctx, false
	}
	return tenant.WithCaller(ctx, c), true
}

// tokens reports whether clients must present a bearer token.
func (s *Server) tokens() bool {
	if s.opts.Auth != nil {
		return s.opts.Auth.ClientAuth()
	}
	return s.opts.ClientToken != ""
}

func bearerOK(header, want string) bool {
	scheme, tok, ok := strings.Cut(header, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return false
	}
	// Constant time: the comparison must not tell how much of a guess was right.
	return subtle.ConstantTimeCompare([]byte(strings.TrimSpace(tok)), []byte(want)) == 1
}

// Card is the agent card as served to a request for host (the request's
// Host header) over scheme ("http" or "https").
func (s *Server) Card(scheme, host string) *a2a.AgentCard {
	ifaces := []*a2a.AgentInterface{{
		URL: scheme + "://" + host + "/a2a", ProtocolBinding: a2a.TransportProtocolJSONRPC, ProtocolVersion: "1.0",
	}}
	if s.opts.GRPCAddr != "" {
		if _, port, err := net.SplitHostPort(s.opts.GRPCAddr); err == nil {
			h := host
			if hh, _, err := net.SplitHostPort(host); err == nil {
				h = hh
			}
			ifaces = append(ifaces, &a2a.AgentInterface{
				URL: net.JoinHostPort(strings.Trim(h, "[]"), port), ProtocolBinding: a2a.TransportProtocolGRPC, ProtocolVersion: "1.0",
			})
		}
	}
	card := &a2a.AgentCard{
		Name:                "agentdispatch dispatcher",
		Description:         "Runs instructions on the dispatcher's agents (commander planners), streamed, policed by its policies and budgets, and stoppable.",
		Version:             s.opts.Version,
		SupportedInterfaces: ifaces,
		Capabilities: a2a.AgentCapabilities{
			Streaming: true,
			Extensions: []a2a.AgentExtension{{
				URI:         ResumeExtension,
				Description: "Every streamed event and Task snapshot carries metadata \"" + SeqKey + "\" (the dispatcher's event seq). SubscribeToTask with service parameter " + ResumeParam + ": N sends the snapshot, then the events with seq > N.",
				Params:      map[string]any{"metadataKey": SeqKey, "serviceParameter": ResumeParam},
			}},
		},
		DefaultInputModes:  []string{"text/plain"},
		DefaultOutputModes: []string{"text/plain", "image/png"},
		Skills:             s.skills(),
	}
	if s.tokens() {
		card.SecuritySchemes = a2a.NamedSecuritySchemes{
			"bearer": a2a.HTTPAuthSecurityScheme{Scheme: "Bearer", Description: "a client token of the dispatcher (--client-token, or a tenant's token)"},
		}
		card.SecurityRequirements = a2a.SecurityRequirementsOptions{{"bearer": a2a.SecuritySchemeScopes{}}}
	}
	return card
}

// skillText describes the planners we know; others get a generic line.
var skillText = map[string]string{
	"chat": "Chat: answers an instruction with a language model, using the dispatcher's tools.",
	"gui":  "GUI agent: operates a sandboxed desktop (screenshots as file parts); may ask the user (INPUT_REQUIRED).",
}

func (s *Server) skills() []a2a.AgentSkill {
	names := map[string]bool{}
	if s.opts.Planners != nil {
		for _, c := range s.opts.Planners() {
			if p, ok := strings.CutPrefix(c, "planner:"); ok && p != "" {
				names[p] = true
			}
		}
	}
	if len(names) == 0 {
		// The card needs a skill; tasks queue until a commander connects.
		names[s.opts.DefaultPlanner] = true
	}
	out := make([]a2a.AgentSkill, 0, len(names))
	for n := range names {
		d := skillText[n]
		if d == "" {
			d = "Runs an instruction with the " + n + " planner."
		}
		out = append(out, a2a.AgentSkill{
			ID: n, Name: n, Description: d, Tags: []string{"planner", n},
			InputModes: []string{"text/plain"}, OutputModes: []string{"text/plain", "image/png"},
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

func (s *Server) serveCard(w http.ResponseWriter, r *http.Request) {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	b, err := json.Marshal(s.Card(scheme, r.Host))
	if err != nil {
		http.Error(w, "card", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store") // skills follow the connected commanders
	_, _ = w.Write(b)
}

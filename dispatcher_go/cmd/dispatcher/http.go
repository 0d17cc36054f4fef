package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"time"

	"github.com/agentdispatch/dispatcher/internal/a2a"
	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/httpapi"
	"github.com/agentdispatch/dispatcher/internal/lybicsandbox"
	"github.com/agentdispatch/dispatcher/internal/mcp"
	"github.com/agentdispatch/dispatcher/internal/metrics"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

// httpServers are the HTTP listeners beside gRPC: the HTTP API with the
// web page (--http-listen) and /metrics (--metrics-listen).
type httpServers struct {
	log     *slog.Logger
	servers []*http.Server
}

// newMetrics returns the metrics when they are enabled, else nil.
func newMetrics(cfg *config) *metrics.Metrics {
	if cfg.metricsListen == "" {
		return nil
	}
	return metrics.New()
}

// startHTTP starts the HTTP listeners that cfg enables. The gRPC services
// must be registered (metrics pre-create their per-method series).
// a2aSrv (optional) serves A2A on the HTTP API's port.
func startHTTP(cfg *config, d *dispatcher.Dispatcher, local *api.Local, m *metrics.Metrics, tracing *telemetry.Tracing, log *slog.Logger, a2aSrv ...*a2a.Server) (*httpServers, error) {
	hs := &httpServers{log: log}
	if cfg.httpListen != "" {
		sandboxes, err := lybicsandbox.New(lybicsandbox.Config{Endpoint: cfg.sandboxEndpoint, OrgID: cfg.sandboxOrg, APIKey: cfg.sandboxKey, Shape: cfg.sandboxShape})
		if err != nil {
			return nil, err
		}
		mcpServer := mcp.NewServer(mcp.ServerOptions{Backend: local, Tools: d.Broker(), Policy: d.Policy(), Version: version, Logger: log.With("component", "mcp")})
		opts := httpapi.Options{Auth: d.Auth(), AllowedHosts: cfg.allowedHosts(), MCP: mcpServer, Sandboxes: sandboxes, Logger: log.With("component", "http")}
		if len(a2aSrv) > 0 && a2aSrv[0] != nil {
			opts.A2A = a2aSrv[0]
		}
		h := httpapi.New(local, opts)
		err = hs.start("http api", cfg.httpListen, tracing.HTTPHandler(h), httpReadTimeout)
		switch {
		case err != nil && cfg.httpDefault:
			// Nobody asked for this address (e.g. several dispatchers on
			// one host, as in tests): run without the HTTP API.
			log.Warn("http api disabled: cannot listen on the default address; set --http-listen", "addr", cfg.httpListen, "error", err)
		case err != nil:
			return nil, err
		}
	}
	if m != nil {
		m.Watch(metrics.Sources{Tasks: d.Tasks(), Scheduler: d.Scheduler(), Sessions: d.Sessions(), Policy: d.Policy()})
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", m.Handler())
		if err := hs.start("metrics", cfg.metricsListen, mux, 0); err != nil {
			hs.close()
			return nil, err
		}
	}
	if cfg.pprofListen != "" {
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		if err := hs.start("pprof", cfg.pprofListen, mux, 0); err != nil {
			hs.close()
			return nil, err
		}
	}
	return hs, nil
}

// newA2A is the A2A front end over the native API (internal/a2a); grpcAddr
// is the gRPC listener's address, which its card names.
func newA2A(cfg *config, d *dispatcher.Dispatcher, local *api.Local, grpcAddr string, log *slog.Logger) *a2a.Server {
	return a2a.New(local, a2a.Options{
		ClientToken: cfg.clientToken, Auth: d.Auth(), Version: version, GRPCAddr: grpcAddr,
		Planners: d.Scheduler().Planners, DefaultPlanner: cfg.defaultPlanner, Logger: log.With("component", "a2a"),
	})
}

// httpReadTimeout bounds the time a request's headers and body take to
// arrive on the HTTP API (its bodies are at most 1 MiB): a client that
// stalls gets 408 instead of holding a connection. It does not cut event
// streams: net/http clears the read deadline once the body is read, and
// there is no WriteTimeout.
const httpReadTimeout = 30 * time.Second

// start serves h on addr. readTimeout (0: none) bounds headers and body;
// headers alone always have 10 s.
func (hs *httpServers) start(name, addr string, h http.Handler, readTimeout time.Duration) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	// No WriteTimeout: it would cut event streams (SSE) and long profiles.
	s := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: readTimeout, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(hs.log.Handler(), slog.LevelWarn)}
	hs.servers = append(hs.servers, s)
	go func() {
		if err := s.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			hs.log.Error(name+" server failed", "error", err)
		}
	}()
	hs.log.Info(name+" serving", "addr", lis.Addr().String())
	return nil
}

// shutdown lets requests in flight finish for up to d (event streams have
// ended with the drain), then closes what is left.
func (hs *httpServers) shutdown(d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	for _, s := range hs.servers {
		if s.Shutdown(ctx) != nil {
			s.Close()
		}
	}
}

func (hs *httpServers) close() {
	for _, s := range hs.servers {
		s.Close()
	}
}

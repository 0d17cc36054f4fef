// Command dispatcher is the dispatcher server: it schedules tasks on
// commander slots, brokers tool calls and serves the client APIs, all on one
// gRPC port. See docs/protocol.md and docs/operations.md.
//
// SIGTERM (or SIGINT) drains: health goes NOT_SERVING, new tasks are
// refused, running tasks get --drain-timeout to finish, the rest are stopped,
// then the server stops. A second signal stops at once.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/agentdispatch/dispatcher/internal/addrfile"
	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/benchkit"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

// version is set at build time: -ldflags "-X main.version=1.2.3".
var version = dispatcher.DefaultVersion

// gracefulStopWait bounds GracefulStop after the drain; Drain has ended
// every stream, so only in-flight unary calls remain.
const gracefulStopWait = time.Second

func main() {
	os.Exit(run(os.Args[1:], os.Getenv, os.Stderr))
}

func run(args []string, getenv func(string) string, stderr io.Writer) int {
	cfg, err := parseConfig(args, getenv, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "dispatcher:", err)
		return 2
	}
	log := newLogger(cfg, stderr)
	for _, w := range cfg.warnings() {
		log.Warn(w)
	}
	tracing, err := telemetry.Setup(context.Background(), "dispatcher", version, getenv)
	if err != nil {
		fmt.Fprintln(stderr, "dispatcher:", err)
		return 2
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := tracing.Shutdown(ctx); err != nil {
			log.Warn("trace export at shutdown failed", "error", err)
		}
	}()
	if err := serve(cfg, log, tracing); err != nil {
		log.Error("dispatcher failed", "error", err)
		return 1
	}
	return 0
}

// openStore opens the configured store (nil for "memory").
func openStore(cfg *config) (store.Store, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	switch cfg.storage {
	case "sqlite":
		return sqlite.Open(ctx, cfg.dataDir)
	case "postgres":
		return postgres.Open(ctx, cfg.postgresDSN)
	}
	return nil, nil
}

func serve(cfg *config, log *slog.Logger, tracing *telemetry.Tracing) error {
	st, err := openStore(cfg)
	if err != nil {
		return fmt.Errorf("open %s store: %w", cfg.storage, err)
	}
	if st != nil {
		defer st.Close()
	}
	m := newMetrics(cfg)
	var onEvent func(*dispatchv1.TaskEvent)
	if m != nil {
		onEvent = m.ObserveEvent
	}
	d, err := dispatcher.New(cfg.dispatcherConfig(st, log, onEvent))
	if err != nil {
		return err
	}
	// On a return before the drain the dispatcher is closed, so that what
	// is pending reaches the store before it closes; after the drain this
	// is a no-op, and a second signal skips it to stop at once.
	stopNow := false
	defer func() {
		if !stopNow {
			d.Close()
		}
	}()
	srv := api.New(d)
	opts := srv.ServerOptions()
	if m != nil {
		opts = append(m.ServerOptions(), opts...) // count refused calls too
	}
	opts = append(tracing.ServerOptions(), opts...) // trace refused calls too
	if cfg.tlsCert != "" {
		creds, err := credentials.NewServerTLSFromFile(cfg.tlsCert, cfg.tlsKey)
		if err != nil {
			return fmt.Errorf("load TLS certificate: %w", err)
		}
		opts = append(opts, grpc.Creds(creds))
	}
	gs := grpc.NewServer(opts...)
	srv.Register(gs)
	if m != nil {
		m.InitializeGRPC(gs)
	}

	lis, err := net.Listen("tcp", cfg.listen)
	if err != nil {
		return err
	}
	// Benchmarks only: DISPATCHER_CONN_TRACE follows marked tool calls
	// through the sockets (benchkit.ConnTrace; off, lis is unchanged).
	lis = benchkit.OpenConnTrace("DISPATCHER_CONN_TRACE").Listener(lis)
	// A2A: its gRPC binding on this server, its card naming this port.
	a2aSrv := newA2A(cfg, d, srv.Local(), lis.Addr().String(), log)
	a2aSrv.RegisterGRPC(gs)
	// Signals are caught from here on, before the address is published, so
	// a test that signals right after reading the address is handled.
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, os.Interrupt)
	defer signal.Stop(sigs)

	serveErr := make(chan error, 1)
	go func() { serveErr <- gs.Serve(lis) }()
	hs, err := startHTTP(cfg, d, srv.Local(), m, tracing, log, a2aSrv)
	if err != nil {
		gs.Stop()
		return err
	}
	addr := lis.Addr().String()
	if cfg.addrFile != "" {
		if err := addrfile.Write(cfg.addrFile, addr); err != nil {
			gs.Stop()
			return fmt.Errorf("write --addr-file: %w", err)
		}
		defer os.Remove(cfg.addrFile)
	}
	log.Info("dispatcher serving", "addr", addr, "version", version, "tls", cfg.tlsCert != "", "tracing", tracing.Enabled(),
		"commander_auth", cfg.commanderAuth(), "client_auth", cfg.clientAuth(), "tenants_file", cfg.tenantsFile)

	select {
	case err := <-serveErr:
		return err
	case sig := <-sigs:
		log.Info("shutdown requested; draining", "signal", sig.String(), "drain_timeout", cfg.drainTimeout)
	}

	drained := make(chan struct{})
	go func() {
		defer close(drained)
		ctx, cancel := context.WithTimeout(context.Background(), cfg.drainTimeout)
		defer cancel()
		d.Drain(ctx)
		hs.shutdown(gracefulStopWait)
		stopped := make(chan struct{})
		go func() {
			gs.GracefulStop()
			close(stopped)
		}()
		t := time.NewTimer(gracefulStopWait)
		defer t.Stop()
		select {
		case <-stopped:
		case <-t.C:
			gs.Stop()
			<-stopped
		}
	}()
	select {
	case <-drained:
		log.Info("dispatcher stopped")
	case sig := <-sigs:
		log.Warn("second signal; stopping now", "signal", sig.String())
		stopNow = true
		gs.Stop()
		hs.close()
	}
	return nil
}

// Package api serves the dispatcher's gRPC services on one server:
// lybic.agent.Agent (seed-000 client API), dispatch.v1.TaskService (native
// client API), dispatch.v1.AgentInteraction (commanders' ChatStream),
// dispatch.v1.ToolProviderService (tool providers), grpc.health.v1.Health and
// server reflection.
//
// It is the only place that knows gRPC codes: domain packages return wrapped
// sentinel errors and toStatus (errors.go) maps them, never passing internal
// text or secrets to a caller. Auth (auth.go) is a pair of interceptors.
package api

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/session"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Keepalive holds the server's HTTP/2 keepalive settings (see
// docs/operations.md for the numbers and what they imply).
type Keepalive struct {
	// Time: the server pings a connection silent for this long.
	Time time.Duration
	// Timeout: no ping ack within this → the connection is closed, which
	// fails the tasks of the commander on it.
	Timeout time.Duration
	// MinTime: clients may ping at most this often (must be <= the
	// commanders' keepalive_time_ms, or grpc-go answers with GOAWAY
	// too_many_pings).
	MinTime time.Duration
}

// DefaultStreamWindow is the default fixed HTTP/2 receive window of a
// stream; the connection's is 8 times it. grpc-go ignores values under
// 64 KiB.
const DefaultStreamWindow = 128 << 10

// DefaultKeepalive are the documented defaults: a dead peer is noticed
// within Time+Timeout = 7 s of silence.
var DefaultKeepalive = Keepalive{Time: 5 * time.Second, Timeout: 2 * time.Second, MinTime: 5 * time.Second}

// Config configures a dispatcher.
type Config struct {
	// Version is reported by GetAgentInfo.
	Version string
	// LogLevel is reported by GetAgentInfo.
	LogLevel string
	// CommanderToken, when set, is required (Bearer) by AgentInteraction
	// and ToolProviderService.
	CommanderToken string
	// ClientToken, when set, is required (Bearer) by Agent and TaskService.
	ClientToken string
	// QueueSize bounds the pending-task queue.
	QueueSize int
	// StopGrace is how long a stopped session may take to ack.
	StopGrace time.Duration
	// ToolTimeout is the default per-call tool timeout.
	ToolTimeout time.Duration
	// MaxRecvMsgBytes is grpc's MaxRecvMsgSize.
	MaxRecvMsgBytes int
	// StreamWindowBytes fixes each stream's HTTP/2 receive window (0: the
	// default, DefaultStreamWindow; negative: grpc-go's dynamic BDP window).
	// It bounds how much of a commander's own output can queue ahead of its
	// stopped (docs/benchmarks.md, stop-flood).
	StreamWindowBytes int
	// Keepalive settings.
	Keepalive Keepalive
	// DefaultPlanner runs tasks that name none.
	DefaultPlanner string
	// MaxTasksKept bounds finished tasks kept in memory.
	MaxTasksKept int
	// EventLimits bound each task's event log.
	EventLimits eventlog.Limits
	// GlobalConfig is the initial global CommonConfig (nil: empty).
	GlobalConfig *agentpb.CommonConfig
	// PolicyFile is the YAML policy file (docs/policies.md); empty means
	// no global policy. It must load at start; later changes are reloaded
	// (a bad version is rejected and the one in force stays).
	PolicyFile string
	// PolicyPoll is how often PolicyFile is checked for changes (default 1 s).
	PolicyPoll time.Duration
	// Store, when set, makes tasks, events and the global config durable
	// (the caller opens it and closes it after Drain or Close); New then
	// restores the previous run's state (task.Manager.Restore). Nil keeps
	// everything in memory.
	Store store.Store
	// SecretKey encrypts stored secrets (see task.Persistence); empty:
	// secrets are not stored.
	SecretKey []byte
	// Retention removes tasks (and their events) that ended longer ago
	// than this; 0 keeps them forever.
	Retention time.Duration
	// EventFlushInterval is the store writer's batching interval (0: 1 ms).
	EventFlushInterval time.Duration
	// Logger receives all logs; nil discards.
	Logger *slog.Logger
	// OnEvent, when set, is called with every event recorded on a task of
	// this run (after its seq is set; it must not modify it, and must be
	// quick: it runs on the recording path). Metrics use it.
	OnEvent func(*dispatchv1.TaskEvent)
}

func (c *Config) applyDefaults() {
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.QueueSize <= 0 {
		c.QueueSize = 1024
	}
	if c.StopGrace <= 0 {
		c.StopGrace = 2 * time.Second
	}
	if c.ToolTimeout <= 0 {
		c.ToolTimeout = 30 * time.Second
	}
	if c.StreamWindowBytes == 0 {
		c.StreamWindowBytes = DefaultStreamWindow
	}
	if c.MaxRecvMsgBytes <= 0 {
		c.MaxRecvMsgBytes = 4 << 20
	}
	if c.Keepalive == (Keepalive{}) {
		c.Keepalive = DefaultKeepalive
	}
	if c.DefaultPlanner == "" {
		c.DefaultPlanner = "chat"
	}
	if c.EventLimits == (eventlog.Limits{}) {
		c.EventLimits = eventlog.DefaultLimits
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Server is a wired dispatcher: its components and the gRPC services.
type Server struct {
	cfg      Config
	log      *slog.Logger
	tasks    *task.Manager
	sched    *scheduler.Scheduler
	broker   *broker.Broker
	sessions *session.Server
	health   *health.Server
	policy   *policy.Engine
	writer   *store.Writer // nil without a Store
	healthMu sync.Mutex    // see syncHealth

	// base ends every client stream (watchers, providers) at shutdown.
	base       context.Context
	cancelBase context.CancelFunc
	// follows counts the watchers reading a task log (Drain lets them
	// read their tasks' ends before it cuts the streams).
	follows atomic.Int64
}

// New builds the dispatcher's components from cfg.
func New(cfg Config) (*Server, error) {
	cfg.applyDefaults()
	log := cfg.Logger
	b, err := broker.New(broker.Options{DefaultTimeout: cfg.ToolTimeout, Logger: log.With("component", "broker")})
	if err != nil {
		return nil, err
	}
	sched := scheduler.New(cfg.QueueSize)
	pol := policy.NewEngine(log.With("component", "policy"))
	if cfg.PolicyFile != "" {
		if _, err := pol.LoadFile(cfg.PolicyFile); err != nil {
			return nil, err
		}
	}
	var logs eventlog.Store = eventlog.NewMemory(cfg.EventLimits)
	var persist *task.Persistence
	var writer *store.Writer
	if cfg.Store != nil {
		writer = store.NewWriter(cfg.Store, store.WriterOptions{Interval: cfg.EventFlushInterval, Logger: log.With("component", "store")})
		durable := eventlog.NewDurable(cfg.EventLimits, writer)
		logs = durable
		persist = &task.Persistence{Store: cfg.Store, Writer: writer, Logs: durable, SecretKey: cfg.SecretKey}
	}
	if cfg.OnEvent != nil {
		logs = observedStore{Store: logs, fn: cfg.OnEvent}
	}
	mgr := task.NewManager(logs, task.NewConfigStore(cfg.GlobalConfig), task.ManagerOptions{
		DefaultPlanner: cfg.DefaultPlanner,
		StopGrace:      cfg.StopGrace,
		MaxTasksKept:   cfg.MaxTasksKept,
		Persistence:    persist,
		Logger:         log.With("component", "task"),
	})
	mgr.SetQueue(sched)
	if persist != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_, err := mgr.Restore(ctx)
		cancel()
		if err != nil {
			writer.Close()
			return nil, err
		}
	}
	sessions := session.NewServer(sched, b, session.Options{
		StopGrace: cfg.StopGrace,
		Policy:    pol,
		Logger:    log.With("component", "session"),
	})
	base, cancel := context.WithCancel(context.Background())
	if cfg.PolicyFile != "" {
		go pol.Watch(base, cfg.PolicyFile, cfg.PolicyPoll)
	}
	if cfg.Store != nil && cfg.Retention > 0 {
		go task.RunRetention(base, cfg.Store, cfg.Retention, 0, log.With("component", "retention"))
	}
	s := &Server{
		cfg:        cfg,
		log:        log,
		tasks:      mgr,
		sched:      sched,
		broker:     b,
		sessions:   sessions,
		health:     health.NewServer(),
		policy:     pol,
		writer:     writer,
		base:       base,
		cancelBase: cancel,
	}
	if writer != nil {
		go s.watchStoreHealth(base)
	}
	return s, nil
}

// Tasks is the task manager (for tests and wiring).
func (s *Server) Tasks() *task.Manager { return s.tasks }

// Policy is the policy engine (decision counters, the policy in force).
func (s *Server) Policy() *policy.Engine { return s.policy }

// Sessions is the session server (stop statistics).
func (s *Server) Sessions() *session.Server { return s.sessions }

// Scheduler is the scheduler.
func (s *Server) Scheduler() *scheduler.Scheduler { return s.sched }

// ServerOptions are the grpc.Server options the dispatcher needs: message
// size limit, keepalive, auth. Callers add transport credentials.
func (s *Server) ServerOptions() []grpc.ServerOption {
	ka := s.cfg.Keepalive
	var window []grpc.ServerOption
	if w := s.cfg.StreamWindowBytes; w > 0 {
		// A fixed HTTP/2 receive window (grpc-go then turns BDP estimation
		// off). With the dynamic one a flooding commander had up to 35 000
		// packets of its own content ahead of its stopped (stop-flood in
		// docs/benchmarks.md); 128 KiB a stream bounds that queue and is
		// still ~2.6 MB/s per stream at a 50 ms round trip.
		window = []grpc.ServerOption{grpc.InitialWindowSize(int32(min(w, 1<<30))), grpc.InitialConnWindowSize(int32(min(8*w, 1<<30)))}
	}
	return append(window,
		grpc.MaxRecvMsgSize(s.cfg.MaxRecvMsgBytes),
		// No MaxConnectionIdle/MaxConnectionAge: idle-closing never helps
		// a long-lived commander, and an age limit would cut its streams.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: ka.Time, Timeout: ka.Timeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: ka.MinTime, PermitWithoutStream: true}),
		grpc.ChainUnaryInterceptor(s.unaryAuth),
		grpc.ChainStreamInterceptor(s.streamAuth),
	)
}

// Register registers all services on gs.
func (s *Server) Register(gs *grpc.Server) {
	agentpb.RegisterAgentServer(gs, &agentService{s: s})
	dispatchv1.RegisterTaskServiceServer(gs, &taskService{s: s})
	dispatchv1.RegisterAgentInteractionServer(gs, &interactionService{s: s})
	dispatchv1.RegisterToolProviderServiceServer(gs, &toolProviderService{s: s})
	healthpb.RegisterHealthServer(gs, s.health)
	reflection.Register(gs)
	s.syncHealth()
}

// healthNames are the names grpc health answers for ("" is the server).
var healthNames = []string{
	"",
	agentpb.Agent_ServiceDesc.ServiceName,
	dispatchv1.TaskService_ServiceDesc.ServiceName,
	dispatchv1.AgentInteraction_ServiceDesc.ServiceName,
	dispatchv1.ToolProviderService_ServiceDesc.ServiceName,
}

// syncHealth sets every health status from the store writer: SERVING, or
// NOT_SERVING while the writer is unhealthy (its last write failed, or a
// write is stuck: store.Writer.Health). After Drain's health.Shutdown the
// statuses stay NOT_SERVING. healthMu orders the readings of the writer's
// health with the updates, so the last update shows the last state.
func (s *Server) syncHealth() {
	s.healthMu.Lock()
	defer s.healthMu.Unlock()
	st := healthpb.HealthCheckResponse_SERVING
	if s.writer != nil {
		if err := s.writer.Health(); err != nil {
			st = healthpb.HealthCheckResponse_NOT_SERVING
		}
	}
	for _, name := range healthNames {
		s.health.SetServingStatus(name, st)
	}
}

// watchStoreHealth keeps health in step with the store writer until ctx
// ends: NOT_SERVING while the store does not keep up, SERVING again once it
// does.
func (s *Server) watchStoreHealth(ctx context.Context) {
	for {
		changed := s.writer.HealthChanged()
		s.syncHealth()
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// Drain prepares a shutdown: health goes NOT_SERVING, no new task is
// accepted, queued and running tasks may finish until ctx ends, then the
// rest are stopped (STOP_CODE_SHUTDOWN, up to the stop grace) and every
// stream is ended so that GracefulStop can complete.
func (s *Server) Drain(ctx context.Context) {
	s.health.Shutdown()
	s.log.Info("draining", "active_tasks", len(s.tasks.Registry().Active()))
	s.tasks.Shutdown(ctx)
	s.sessions.Shutdown()
	s.awaitWatchers(watcherDrainWait)
	s.cancelBase()
	if s.writer != nil {
		s.writer.Close() // writes what is pending
	}
	st := s.sessions.Stats().StopLatency.Snapshot()
	s.log.Info("drained", "stops_acked", st.Count, "stop_latency_p50", st.Quantile(0.5), "stop_latency_p99", st.Quantile(0.99))
}

// watcherDrainWait bounds how long Drain lets watchers read to their
// tasks' terminal events (with a durable store an event becomes readable
// one flush after it is recorded).
const watcherDrainWait = time.Second

// awaitWatchers makes what the tasks recorded durable and readable, then
// waits up to d for the watchers to read to their tasks' ends (after
// tasks.Shutdown every task has ended, so each watcher ends by itself).
func (s *Server) awaitWatchers(d time.Duration) {
	deadline := time.Now().Add(d)
	if s.writer != nil {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		_ = s.writer.Flush(ctx)
		cancel()
	}
	for s.follows.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// Close releases resources without draining (tests).
func (s *Server) Close() {
	s.sessions.Shutdown()
	s.cancelBase()
	if s.writer != nil {
		s.writer.Close()
	}
}

// streamContext is ctx ended also by the server's shutdown.
func (s *Server) streamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(s.base, func() { cancel(errShuttingDown) })
	return ctx, func() {
		stop()
		cancel(nil)
	}
}

// Package dispatcher is the composition root: it builds the dispatcher's
// components from one Config (broker, scheduler, policy engine, event log
// store, store writer, task manager, session server, health state), starts
// their background goroutines (policy reload, retention, the MCP servers of
// --mcp-servers as tool providers), restores the
// previous run from the store, and owns the order of drain and close.
//
// It exposes what the transports need (internal/api for gRPC,
// internal/httpapi for HTTP through api.Local): the task manager, the
// session server, the broker, the scheduler, the policy engine, the health
// state, stream contexts that end at shutdown, and Drain.
//
// It must not know any transport: no gRPC service registration, server
// options, status codes or HTTP handlers (those are api's and httpapi's),
// and no domain logic (that stays in task, session, scheduler, broker,
// policy, eventlog and store). The health state is kept in grpc-go's
// health.Server only because that is a plain status map the gRPC transport
// can serve as is. Every default lives in config.go.
package dispatcher

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/fleet"
	"github.com/agentdispatch/dispatcher/internal/mcp"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/session"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// ErrShuttingDown is the cause of a stream context (StreamContext) ended
// by the dispatcher's drain or close.
var ErrShuttingDown = errors.New("dispatcher shutting down")

// Dispatcher is a wired, running dispatcher.
type Dispatcher struct {
	cfg      Config
	log      *slog.Logger
	tasks    *task.Manager
	sched    *scheduler.Scheduler
	broker   *broker.Broker
	sessions *session.Server
	health   *health.Server
	// healthMu orders status updates; healthNames are the names that
	// follow the dispatcher's health (TrackHealth).
	healthMu    sync.Mutex
	healthNames []string
	// draining is set by Drain (HealthText).
	draining atomic.Bool
	policy   *policy.Engine
	auth     *tenant.Auth
	writer   *store.Writer // nil without a store
	fleet    *fleet.Fleet  // nil: single node

	// base ends every client stream (watchers, providers) and the
	// background goroutines (bg) at shutdown.
	base       context.Context
	cancelBase context.CancelFunc
	bg         sync.WaitGroup
	watchers   Watchers
}

// Watchers counts the client streams reading a task's log. A transport
// adds 1 when such a stream starts and -1 when it ends; Drain lets them
// read their tasks' ends before it cuts the streams.
type Watchers struct{ n atomic.Int64 }

// Add adds delta to the count.
func (w *Watchers) Add(delta int64) { w.n.Add(delta) }

// New builds the dispatcher's components from cfg (zero fields take their
// defaults, see config.go), restores the previous run when cfg.Store has a
// backend, and starts the background goroutines. The caller must end it
// with Drain or Close.
func New(cfg Config) (*Dispatcher, error) {
	cfg = cfg.withDefaults()
	if err := cfg.Auth.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	auth, err := tenant.New(tenant.Options{
		ClientToken: cfg.Auth.ClientToken, CommanderToken: cfg.Auth.CommanderToken, AdminToken: cfg.Auth.AdminToken,
		File: cfg.Auth.TenantsFile, Poll: cfg.Auth.TenantsPoll, Logger: log.With("component", "tenants"),
	})
	if err != nil {
		return nil, fmt.Errorf("dispatcher: %w", err)
	}
	b, err := broker.New(broker.Options{
		DefaultTimeout: cfg.Tasks.ToolTimeout,
		MaxResultBytes: cfg.GRPC.MaxRecvMsgBytes - broker.ResultEnvelopeBytes,
		// The commanders' hello timeout: a provider connects with a
		// commander token, and says hello as soon as it connects.
		HelloTimeout: max(cfg.Tasks.HelloTimeout, 0),
		Logger:       log.With("component", "broker")})
	if err != nil {
		return nil, err
	}
	sched := scheduler.New(cfg.Limits.QueueSize)
	pol := policy.NewEngine(log.With("component", "policy"))
	if cfg.Policy.File != "" {
		if _, err := pol.LoadFile(cfg.Policy.File); err != nil {
			return nil, err
		}
	}
	var logs eventlog.Store = eventlog.NewMemory(cfg.Limits.Events)
	var persist task.Persistence
	// Sessions survive a restart only when their tasks do (a store).
	handOver := cfg.Store.Backend != nil && cfg.Tasks.HandOverWindow > 0
	var window time.Duration
	claimer := cfg.Tasks.Claimer
	var writer *store.Writer
	// The task manager, once built: the store writer fails a task whose
	// record the store refused (a record is never retried for ever).
	var tasks atomic.Pointer[task.Manager]
	var fl *fleet.Fleet
	if cfg.Fleet.RedisURL != "" {
		pg, ok := cfg.Store.Backend.(*postgres.Store)
		if !ok {
			return nil, errors.New("dispatcher: a fleet (--fleet-redis) needs the postgres store backend")
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		fl, err = fleet.New(ctx, pg, fleet.Options{
			RedisURL: cfg.Fleet.RedisURL, ReplicaID: cfg.Fleet.ReplicaID, Lease: cfg.Fleet.Lease,
			Grace: cfg.Fleet.Grace, ReclaimIdle: cfg.Fleet.ReclaimIdle, MaxReadFailures: cfg.Fleet.MaxReadFailures, StopGrace: cfg.Tasks.StopGrace,
			Logger: log.With("component", "fleet"),
		})
		cancel()
		if err != nil {
			return nil, err
		}
		// Every write goes through the fence.
		cfg.Store.Backend = fl.Store()
	}
	if st := cfg.Store.Backend; st != nil {
		writer = store.NewWriter(st, store.WriterOptions{
			Interval: cfg.Store.FlushInterval,
			PaceFrom: DefaultPaceFrom,
			Logger:   log.With("component", "store"),
			OnRejected: func(taskID, reason string) {
				if m := tasks.Load(); m != nil {
					m.Fail(taskID, "the dispatcher could not store the task: "+reason)
				}
			},
		})
		logs = eventlog.NewDurable(cfg.Limits.Events, writer)
		ts, err := taskstore.New(taskstore.Options{Store: st, Writer: writer, SecretKey: cfg.Store.SecretKey,
			KeepRunning: handOver, Logger: log.With("component", "taskstore")})
		if err != nil {
			writer.Close()
			return nil, err
		}
		persist = ts
		if handOver {
			window = cfg.Tasks.HandOverWindow
			if claimer == nil {
				claimer = ts
			}
		}
	}
	if cfg.OnEvent != nil {
		// The same (observed) store serves new and restored tasks.
		logs = observe(logs, cfg.OnEvent)
	}
	mgr := task.NewManager(logs, task.NewConfigStore(cfg.Tasks.GlobalConfig), task.ManagerOptions{
		DefaultPlanner: cfg.Tasks.DefaultPlanner,
		Planners:       cfg.Tasks.Planners,
		StopGrace:      cfg.Tasks.StopGrace,
		MaxTasksKept:   cfg.Limits.MaxTasksKept,
		Persistence:    persist,
		HandOverWindow: window,
		Claimer:        claimer,
		Logger:         log.With("component", "task"),
	})
	mgr.SetQueue(sched)
	tasks.Store(mgr)
	if fl != nil {
		// No restore: the other replicas' tasks are theirs; a dead
		// replica's are taken over by the fleet (lease expiry).
		mgr.SetFleet(fl)
		fl.Start(mgr, sched, persist.(*taskstore.Store), writer)
	} else if persist != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		_, err := mgr.Restore(ctx)
		cancel()
		if err != nil {
			writer.Close()
			return nil, err
		}
	}
	var flush func(context.Context) error
	if writer != nil {
		flush = writer.Flush
	}
	sessions := session.NewServer(sched, b, session.Options{
		StopGrace: cfg.Tasks.StopGrace,
		// Negative (never) is 0 for the session server.
		HelloTimeout: max(cfg.Tasks.HelloTimeout, 0),
		Policy:       pol,
		HandOver:     handOver,
		Reattacher:   mgr,
		// Only with hand-over: a store keeps the waiting task's events.
		LinkLossWindow: linkLossWindow(handOver, cfg.Tasks.LinkLossWindow),
		Flush:          flush,
		// Room for the event envelope: an event made of a packet still
		// fits a client's message limit.
		MaxMessageBytes: cfg.GRPC.MaxRecvMsgBytes - broker.ResultEnvelopeBytes,
		Logger:          log.With("component", "session"),
	})
	base, cancel := context.WithCancel(context.Background())
	d := &Dispatcher{
		cfg:         cfg,
		log:         log,
		tasks:       mgr,
		sched:       sched,
		broker:      b,
		sessions:    sessions,
		health:      health.NewServer(),
		healthNames: []string{""},
		policy:      pol,
		auth:        auth,
		writer:      writer,
		fleet:       fl,
		base:        base,
		cancelBase:  cancel,
	}
	if writer != nil {
		d.bg.Go(func() { d.watchStoreHealth(base) })
	}
	if fl != nil {
		d.bg.Go(func() { d.watchFleetHealth(base) })
	}
	if cfg.Policy.File != "" {
		d.bg.Go(func() { pol.Watch(base, cfg.Policy.File, cfg.Policy.Poll) })
	}
	if cfg.Auth.TenantsFile != "" {
		d.bg.Go(func() { auth.Watch(base) })
	}
	if f := cfg.MCP.ServersFile; f != "" {
		if _, err := mcp.LoadConfig(f); err != nil {
			d.Close()
			return nil, err
		}
		m := mcp.NewManager(mcp.Options{Registry: b, Version: cfg.Version, Logger: log.With("component", "mcp")})
		d.bg.Go(func() { m.Run(base, f, cmp.Or(cfg.MCP.Poll, DefaultPolicyPoll)) })
	}
	if cfg.Tasks.QueueTimeout > 0 {
		d.bg.Go(func() { d.failUnserved(base, cfg.Tasks.QueueTimeout) })
	}
	if cfg.Store.Backend != nil && cfg.Store.Retention > 0 {
		d.bg.Go(func() {
			taskstore.RunRetention(base, cfg.Store.Backend, cfg.Store.Retention, 0, log.With("component", "retention"))
		})
	}
	return d, nil
}

// failUnserved ends FAILURE, with the reason, the pending tasks that no
// connected commander could run for wait (the queue timeout): a task is
// never pending forever for a planner or capability nobody serves.
func (d *Dispatcher) failUnserved(ctx context.Context, wait time.Duration) {
	tick := min(max(wait/4, 10*time.Millisecond), 5*time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			for _, tk := range d.sched.TakeUnserved(now, wait) {
				need := scheduler.PlannerCapability(tk.Planner())
				if caps := tk.RequiredCapabilities(); len(caps) > 0 {
					need += " with " + strings.Join(caps, ", ")
				}
				reason := fmt.Sprintf("no connected commander serves %s: pending for %s (the queue timeout, --queue-timeout)", need, wait)
				d.log.Warn("pending task failed: no commander serves it", "task_id", tk.ID(), "need", need, "waited", wait)
				d.tasks.Fail(tk.ID(), reason)
			}
		}
	}
}

// Config is the configuration in force (defaults applied).
func (d *Dispatcher) Config() Config { return d.cfg }

// Auth says who a bearer token is: a client's tenant, a commander's
// (internal/tenant). Both transports ask it.
func (d *Dispatcher) Auth() *tenant.Auth { return d.auth }

// Logger is the dispatcher's logger.
func (d *Dispatcher) Logger() *slog.Logger { return d.log }

// Tasks is the task manager.
func (d *Dispatcher) Tasks() *task.Manager { return d.tasks }

// Sessions is the session server (commanders' ChatStreams, stop statistics).
func (d *Dispatcher) Sessions() *session.Server { return d.sessions }

// Broker is the tool broker (tool providers, the tool catalogue).
func (d *Dispatcher) Broker() *broker.Broker { return d.broker }

// Scheduler is the scheduler.
func (d *Dispatcher) Scheduler() *scheduler.Scheduler { return d.sched }

// StoreWriter is the store's batching writer (its health, backlog and
// flush), nil without a store.
func (d *Dispatcher) StoreWriter() *store.Writer { return d.writer }

// Fleet is the replica's part of the fleet, nil for a single node.
func (d *Dispatcher) Fleet() *fleet.Fleet { return d.fleet }

// SlotsServing is the number of slots (of the whole fleet, in a fleet)
// that may run a task of tenant; all counts every slot (an admin's view).
func (d *Dispatcher) SlotsServing(tenant string, all bool) int {
	if d.fleet != nil {
		return d.fleet.SlotsServing(tenant, all)
	}
	return d.sched.SlotsServing(tenant, all)
}

// SlotCount is the number of commander slots: of the whole fleet for a
// replica, else of this dispatcher.
func (d *Dispatcher) SlotCount() int {
	if d.fleet != nil {
		return d.fleet.SlotCount()
	}
	return d.sched.SlotCount()
}

// Policy is the policy engine (decision counters, the policy in force).
func (d *Dispatcher) Policy() *policy.Engine { return d.policy }

// Health is the health state: SERVING, NOT_SERVING while the store writer
// is unhealthy, and NOT_SERVING for good from Drain on. The
// gRPC transport serves it as grpc.health.v1.Health (and sets the status
// of each of its services); others read it through Serving.
func (d *Dispatcher) Health() *health.Server { return d.health }

// Serving reports whether the dispatcher accepts work (false while its
// store is unavailable, and once it drains).
func (d *Dispatcher) Serving(ctx context.Context) bool {
	r, err := d.health.Check(ctx, &healthpb.HealthCheckRequest{})
	return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING
}

// HealthText says why the dispatcher does not accept work, for the HTTP
// health probe ("" when it does): "draining" from Drain on, else
// "degraded: …" naming what is down (the store's writes, the fleet's
// database or bus). Running tasks go on while it is degraded.
func (d *Dispatcher) HealthText(ctx context.Context) string {
	if d.draining.Load() {
		return "draining"
	}
	var why []string
	if d.writer != nil && d.writer.Health() != nil {
		why = append(why, "store writes failing")
	}
	if d.fleet != nil {
		why = append(why, d.fleet.Degraded()...)
	}
	if len(why) == 0 {
		if d.Serving(ctx) {
			return ""
		}
		return "unavailable"
	}
	return "degraded: " + strings.Join(why, ", ")
}

// Watchers is the count of client streams reading task logs (see Watchers).
func (d *Dispatcher) Watchers() *Watchers { return &d.watchers }

// StreamContext is ctx ended also by the dispatcher's shutdown (Drain or
// Close), with cause ErrShuttingDown. Transports run every long-lived
// client stream (watchers, tool providers) in one.
func (d *Dispatcher) StreamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(d.base, func() { cancel(ErrShuttingDown) })
	return ctx, func() {
		stop()
		cancel(nil)
	}
}

// TrackHealth makes the health statuses of names (a transport's services;
// "" is the whole server) follow the dispatcher's: SERVING, or NOT_SERVING
// while the store writer is unhealthy (see store.Writer.Health) and for good
// once Drain began.
func (d *Dispatcher) TrackHealth(names ...string) {
	d.healthMu.Lock()
	d.healthNames = append(d.healthNames, names...)
	d.healthMu.Unlock()
	d.syncHealth()
}

// syncHealth sets every tracked status from the store writer. After Drain's
// health.Shutdown the health server ignores updates, so a drain wins.
func (d *Dispatcher) syncHealth() {
	d.healthMu.Lock()
	defer d.healthMu.Unlock()
	st := healthpb.HealthCheckResponse_SERVING
	if d.writer != nil && d.writer.Health() != nil {
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	if d.fleet != nil && d.fleet.Health() != nil {
		// New work needs the bus; running tasks go on.
		st = healthpb.HealthCheckResponse_NOT_SERVING
	}
	for _, name := range d.healthNames {
		d.health.SetServingStatus(name, st)
	}
}

// watchStoreHealth keeps health in step with the store writer until ctx
// ends.
func (d *Dispatcher) watchStoreHealth(ctx context.Context) {
	for {
		changed := d.writer.HealthChanged()
		d.syncHealth()
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// watchFleetHealth keeps health in step with the fleet's bus until ctx
// ends (the bus is checked every 500 ms; this looks as often).
func (d *Dispatcher) watchFleetHealth(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			d.syncHealth()
		}
	}
}

// Drain prepares a shutdown: health goes NOT_SERVING, no new task is
// accepted, queued and running tasks may finish until ctx ends, then the
// rest are stopped (STOP_CODE_SHUTDOWN, up to the stop grace) and every
// stream is ended so that the transports can stop gracefully. What is
// pending for the store is written before Drain returns; the caller closes
// the store afterwards.
//
// With hand-over (a store and Tasks.HandOverWindow), Drain hands the work
// to the next run instead: commanders are told to move (their sessions
// detach, their tasks stay RUNNING), queued tasks stay PENDING; only
// sessions that did not move by ctx's end are stopped.
func (d *Dispatcher) Drain(ctx context.Context) {
	// New work is refused before health says NOT_SERVING, so a client
	// that saw NOT_SERVING is never handed a task that drain then fails.
	d.tasks.Close()
	d.draining.Store(true)
	d.health.Shutdown()
	if d.fleet != nil {
		gctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		d.fleet.Drain(gctx)
		cancel()
	}
	d.log.Info("draining", "active_tasks", len(d.tasks.Registry().Active()), "hand_over", d.tasks.HandsOver())
	if d.tasks.HandsOver() {
		d.sessions.Drain(ctx, "dispatcher draining: reconnect and re-attach")
	}
	d.tasks.Shutdown(ctx)
	d.sessions.Shutdown()
	if d.tasks.HandsOver() {
		// The tasks handed over do not end here: their watchers follow
		// them on the next run (resuming by seq); there is nothing to wait
		// for once what was recorded is durable.
		if d.writer != nil {
			ctx, cancel := context.WithTimeout(context.Background(), watcherDrainWait)
			_ = d.writer.Flush(ctx)
			cancel()
		}
	} else {
		d.awaitWatchers(watcherDrainWait)
	}
	d.stop()
	st := d.sessions.Stats().StopLatency.Snapshot()
	d.log.Info("drained", "stops_acked", st.Count, "stop_latency_p50", st.Quantile(0.5), "stop_latency_p99", st.Quantile(0.99))
}

// watcherDrainWait bounds how long Drain lets watchers read to their
// tasks' terminal events (with a durable store an event becomes readable
// one flush after it is recorded).
const watcherDrainWait = time.Second

// awaitWatchers makes what the tasks recorded durable and readable, then
// waits up to d for the watchers to read to their tasks' ends (after
// tasks.Shutdown every task has ended, so each watcher ends by itself).
func (d *Dispatcher) awaitWatchers(wait time.Duration) {
	deadline := time.Now().Add(wait)
	if d.writer != nil {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		_ = d.writer.Flush(ctx)
		cancel()
	}
	for d.watchers.n.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
}

// Close releases everything without draining (tests, failed starts):
// streams end, background goroutines stop, pending store writes are
// written. Calling it after Drain is harmless.
func (d *Dispatcher) Close() {
	d.sessions.Shutdown()
	d.stop()
}

// stop ends the stream contexts and the background goroutines, waits for
// the goroutines, and closes the store writer (which writes what is
// pending).
func (d *Dispatcher) stop() {
	d.cancelBase()
	d.bg.Wait()
	if d.fleet != nil {
		d.fleet.Close()
	}
	if d.writer != nil {
		d.writer.Close()
	}
}

// linkLossWindow is how long a session whose stream broke waits to be
// re-attached: Tasks.LinkLossWindow with hand-over, else 0 (none).
func linkLossWindow(handOver bool, w time.Duration) time.Duration {
	if !handOver || w < 0 {
		return 0
	}
	return w
}

// Package fleet makes a dispatcher one replica of a fleet: many replicas,
// all equal (no leader, no election, no gossip), sharing PostgreSQL as the
// truth and Redis Streams as the bus.
//
// What lives where:
//   - PostgreSQL (the store's tables plus fleet_*): tasks, events, configs;
//     who runs a task (fleet_leases: owner replica, lease expiry, attempt
//     number = the fencing token); the tasks nobody runs yet (fleet_queue);
//     the commands (cancel, interject, approve) for a task's owner
//     (fleet_commands); client request ids (fleet_requests).
//   - Redis: a stream per capability set carrying the pending tasks, read
//     by a consumer group (a replica reads only while it has an idle slot
//     that matches); a stream per running task carrying its durable events
//     for watchers on other replicas (each replica reads them with one
//     blocking XREAD, its tail hub, woken by a wake stream of its own); a
//     channel that carries each command to the task's owner; each
//     replica's slot summary, with a TTL.
//     Redis may lose everything: the bus is rebuilt from PostgreSQL.
//
// Every write of a task goes through the fenced store (fencedStore): a
// replica writes a task only while it holds its lease with the attempt it
// claimed; a replica that lost the lease (paused, cut off) is refused and
// drops the session. Leases are renewed in the background; a lease expired
// for longer than the grace (while the taker could reach PostgreSQL: see
// sweepLoop) is taken over by another replica, which ends
// the task FAILURE (or puts a task that had not started back on the bus).
// A session re-attaching to any replica takes its task over at once
// (TakeSession: the lease with the next attempt, whoever held it).
//
// The package must not know any transport, must not run a session itself
// (the session and task packages do), and must never make Redis the only
// copy of anything: an event, a task or a command is in PostgreSQL first.
package fleet

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/redis/go-redis/v9"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Defaults (cmd/dispatcher's flags show them; docs/operations.md explains
// them).
const (
	// DefaultLease is how long a lease lasts without renewal (renewed every
	// third of it).
	DefaultLease = 10 * time.Second
	// DefaultGrace is how long past its expiry a lease is left alone
	// before another replica takes the task over (room for a session
	// hand-over). A dead replica's running tasks end FAILURE within
	// DefaultLease + DefaultGrace + one sweep (1 s), or DefaultGrace +
	// ReattachWindow + one sweep after the sweeper's replica started or
	// regained PostgreSQL, if that is later (sweepLoop).
	DefaultGrace = 5 * time.Second
	// ReattachWindow is what the sweeper adds to the grace before it takes
	// a lease over after its replica started or regained PostgreSQL: the
	// commander's re-attach retry step (at most 4 s + 0.5 s of jitter)
	// plus a claim. An absolute margin, not a multiple of the grace: the
	// commander's retry does not shrink with a shorter grace.
	ReattachWindow = 5 * time.Second
	// DefaultReclaimIdle is how long a bus entry read by a replica may stay
	// unacknowledged before another replica reclaims it (XAUTOCLAIM).
	DefaultReclaimIdle = 10 * time.Second
	// DefaultRequeueAfter is how long a task may wait in the queue table
	// before its bus entry is written again (in case it was lost).
	DefaultRequeueAfter = 30 * time.Second
	// DefaultMaxReadFailures is how many claims of a task in a row (by
	// any replica: takeovers, adoptions from the bus) may find its stored
	// body undecodable before the next one ends it FAILURE
	// (UnreadableMessage) without reading it: each failed takeover leaves
	// the lease to expire and the next sweep retries, so a task whose
	// record cannot be read at all was claimed every lease + grace for
	// good, RUNNING for good. Other read failures are not counted (see
	// failUnreadable).
	DefaultMaxReadFailures = 5
)

// UnreadableMessage begins the message of a task ended FAILURE because
// the replicas that claimed it could not read it (DefaultMaxReadFailures).
const UnreadableMessage = "the dispatcher replicas that took the task over could not read it"

// Options configure a Fleet.
type Options struct {
	// RedisURL is the bus (redis://host:port/db).
	RedisURL string
	// ReplicaID names this replica (default: hostname-random).
	ReplicaID string
	// Lease, Grace, ReclaimIdle, RequeueAfter: see the defaults.
	Lease        time.Duration
	Grace        time.Duration
	ReclaimIdle  time.Duration
	RequeueAfter time.Duration
	// MaxReadFailures: see DefaultMaxReadFailures.
	MaxReadFailures int
	// StopGrace is how long a cancel sent to another replica waits for the
	// task's end.
	StopGrace time.Duration
	// Logger receives the fleet's logs; nil discards.
	Logger *slog.Logger
}

// NewReplicaID is a replica id: the host name and 6 random hex digits.
func NewReplicaID() string {
	h, _ := os.Hostname()
	if h == "" {
		h = "dispatcher"
	}
	var b [3]byte
	_, _ = rand.Read(b[:])
	return h + "-" + hex.EncodeToString(b[:])
}

// Fleet is one replica's part of the fleet. It implements task.Fleet.
type Fleet struct {
	opts   Options
	id     string
	log    *slog.Logger
	pg     *postgres.Store
	leases *Leases
	fenced *fencedStore
	rdb    *redis.Client
	// tails is the tail hub's client (its one blocking read): kept apart
	// from rdb so that it never takes a connection the bus, the health
	// ping or the publisher needs.
	tails *redis.Client
	hub   *tailHub
	busOK atomic.Bool
	// pingFails counts consecutive failed health pings (pingLoop).
	pingFails int
	// dbOK is whether PostgreSQL answers dbPingLoop's pings (on dbConn, a
	// connection of its own: a pool busy with writes is not a database
	// down); dbFails counts its consecutive failures.
	dbOK    atomic.Bool
	dbFails int
	dbConn  *pgx.Conn
	// dbSince is when (UnixNano) this replica last started or found
	// PostgreSQL reachable again after an outage (dbOK false: pingDownAfter
	// failed pings in a row); 0 while it is down. A lone failed ping, a
	// timed-out sweep or renewal do not count: the sweeper's wait
	// (sweepLoop) restarts only with a real outage.
	dbSince atomic.Int64
	// reattachWindow is ReattachWindow (tests shorten it).
	reattachWindow time.Duration
	// renewNow wakes renewLoop (PostgreSQL answers again).
	renewNow chan struct{}

	// Set by Start.
	mgr    *task.Manager
	sched  *scheduler.Scheduler
	ts     *taskstore.Store
	writer *store.Writer

	idle     chan struct{}
	pub      chan pubBatch
	legs     *legStats // nil unless DISPATCHER_FLEET_LEG_STATS=1
	draining atomic.Bool
	dropped  sync.Map // task id → struct{}: sessions dropped after a fence
	ends     endWaiters
	fencedN  atomic.Int64
	// hooks are tests' look into takeOver's requeue (nil in production;
	// set before Start).
	hooks requeueHooks
	// reconcileEvery is the reconcile's period (0: reconcileInterval);
	// tests set it before Start.
	reconcileEvery time.Duration

	epochMu sync.Mutex
	epoch   string

	// globalDoc is the stored global config document last taken (only
	// the reconcile goroutine and Start touch it).
	globalDoc []byte

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// bgMu orders the goroutines started from outside the fleet's loops
	// (goBackground: KeepCancel's writes, watchOwned's watches, added to
	// wg) with Close (closing: Close is waiting for wg, nothing more is
	// added).
	bgMu    sync.Mutex
	closing bool
	// drops are lost's drops of copies (Manager.DropCopy) under way,
	// which Close waits for after wg; closed (under bgMu): Close waits
	// for them now, nothing more is added.
	drops  sync.WaitGroup
	closed bool
	// watchMu guards watches: task id → the watch of its local copy
	// (watchOwned), while it runs.
	watchMu sync.Mutex
	watches map[string]*ownedWatch
	// keepSem bounds KeepCancel's row writes in flight (they share the
	// store's pool with the writer that stores the tasks' ends).
	keepSem chan struct{}
	// ann publishes the command channel's messages (announce), batched.
	ann *announcer
	// holders and cmdRows read tasks and write command rows for the
	// concurrent cancels (and commands) of this replica, batched.
	holders *batcher[string, holderResult]
	cmdRows *batcher[newCommand, int64]
}

var _ task.Fleet = (*Fleet)(nil)

// New joins the fleet over pg (the replica's PostgreSQL store) and the
// Redis at opts.RedisURL. Redis may be down: the replica then starts
// unhealthy for new work. Call Start once the task manager exists, and
// Close after the dispatcher stopped.
func New(ctx context.Context, pg *postgres.Store, opts Options) (*Fleet, error) {
	if opts.ReplicaID == "" {
		opts.ReplicaID = NewReplicaID()
	}
	if opts.Lease <= 0 {
		opts.Lease = DefaultLease
	}
	if opts.Grace <= 0 {
		opts.Grace = DefaultGrace
	}
	if opts.ReclaimIdle <= 0 {
		opts.ReclaimIdle = DefaultReclaimIdle
	}
	if opts.RequeueAfter <= 0 {
		opts.RequeueAfter = DefaultRequeueAfter
	}
	if opts.MaxReadFailures <= 0 {
		opts.MaxReadFailures = DefaultMaxReadFailures
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	leases, err := NewLeases(ctx, pg.Pool(), opts.Lease)
	if err != nil {
		return nil, err
	}
	redis.SetLogger(redisLogger{opts.Logger.With("component", "fleet")})
	rdb, err := newRedis(opts.RedisURL, 0)
	if err != nil {
		return nil, err
	}
	tails, err := newRedis(opts.RedisURL, tailPool)
	if err != nil {
		return nil, err
	}
	f := &Fleet{
		opts: opts, id: opts.ReplicaID, log: opts.Logger.With("replica", opts.ReplicaID),
		pg: pg, leases: leases, rdb: rdb, tails: tails,
		idle:     make(chan struct{}, 1),
		renewNow: make(chan struct{}, 1),
		pub:      make(chan pubBatch, 4096),
		legs:     newLegStats(),
		keepSem:  make(chan struct{}, keepCancelWrites),

		reattachWindow: ReattachWindow,
	}
	f.ann = &announcer{rdb: rdb, channel: cmdChannel, log: f.log}
	f.holders, f.cmdRows = newHolders(leases), newCommandWriter(leases)
	f.hub = newTailHub(f, tails)
	if f.legs != nil {
		rdb.AddHook(dialTimer{f.legs, "bus"})
		tails.AddHook(dialTimer{f.legs, "tails"})
	}
	f.fenced = &fencedStore{Store: pg, pool: pg.Pool(), replica: f.id, owned: map[string]int64{},
		onFenced: f.onFenced, onWritten: f.onWritten, legs: f.legs}
	pctx, cancel := context.WithTimeout(ctx, opTimeout)
	f.busOK.Store(rdb.Ping(pctx).Err() == nil)
	cancel()
	f.dbOK.Store(true) // NewLeases just used it
	f.dbSince.Store(time.Now().UnixNano())
	f.ctx, f.cancel = context.WithCancel(context.Background())
	return f, nil
}

// Store is the fenced store every write of this replica must go through.
func (f *Fleet) Store() store.Store { return f.fenced }

// ReplicaID is this replica's id.
func (f *Fleet) ReplicaID() string { return f.id }

// Leases is the lease table (Claim, Release) for the session hand-over.
func (f *Fleet) Leases() *Leases { return f.leases }

// Fenced is how many times a write of this replica was refused by the
// fence (a lease it had lost).
func (f *Fleet) Fenced() int64 { return f.fencedN.Load() }

// Claim takes taskID's lease for this replica (see Leases.Claim) and makes
// the fenced store accept its writes with the new attempt.
func (f *Fleet) Claim(ctx context.Context, taskID string) (int64, error) {
	a, err := f.leases.Claim(ctx, taskID, f.id)
	if err == nil {
		f.dropped.Delete(taskID)
		f.fenced.own(taskID, a)
	}
	return a, err
}

// Start runs the replica's background work: the bus reader, lease renewal
// and takeover, reconcile, the command listener, the events publisher and
// the Redis health check.
func (f *Fleet) Start(mgr *task.Manager, sched *scheduler.Scheduler, ts *taskstore.Store, w *store.Writer) {
	f.mgr, f.sched, f.ts, f.writer = mgr, sched, ts, w
	sched.SetOnIdle(f.kick)
	ctx, cancel := context.WithTimeout(f.ctx, 10*time.Second)
	f.syncGlobal(ctx)
	cancel()
	// The sweeper's wait counts from here, not from New: syncGlobal above
	// may have taken most of it on a slow database after a restart.
	f.dbSince.Store(time.Now().UnixNano())
	for _, loop := range []func(context.Context){f.pingLoop, f.dbPingLoop, f.publishLoop, f.pullLoop, f.reclaimLoop, f.renewLoop, f.sweepLoop, f.reconcileLoop, f.listenLoop, f.hub.run} {
		f.wg.Go(func() { loop(f.ctx) })
	}
	if f.legs != nil {
		f.wg.Go(func() {
			f.legs.run(f.ctx, f.log, f.id, map[string]*pgxpool.Pool{"store": f.pg.Pool()})
		})
	}
	f.log.Info("joined the fleet", "lease", f.opts.Lease, "grace", f.opts.Grace, "bus_up", f.busUp())
}

// Drain stops taking tasks from the bus (the replica is going away) and
// puts the tasks it took but has not started back on the bus, for the
// other replicas.
func (f *Fleet) Drain(ctx context.Context) {
	f.draining.Store(true)
	n := 0
	for id, a := range f.fenced.ownedTasks() {
		t := f.mgr.Registry().Get(id)
		if t == nil || t.Status() != agentpb.TaskStatus_PENDING || !f.sched.Remove(t) {
			continue
		}
		f.giveBack(ctx, t, id, a, queueName(t.Planner(), t.RequiredCapabilities()))
		n++
	}
	if n > 0 {
		f.log.Info("draining: queued tasks handed back to the fleet", "tasks", n)
	}
}

// Close stops the background work and closes the Redis client.
func (f *Fleet) Close() {
	f.bgMu.Lock()
	f.closing = true
	f.bgMu.Unlock()
	f.cancel()
	f.wg.Wait()
	// The drops lost started, the renewals' among them: none is added
	// from here (lost starts none once closed).
	f.bgMu.Lock()
	f.closed = true
	f.bgMu.Unlock()
	f.drops.Wait()
	_ = f.rdb.Close()
	_ = f.tails.Close()
}

// kick wakes the bus reader (a slot turned idle, or a task was placed).
func (f *Fleet) kick() {
	select {
	case f.idle <- struct{}{}:
	default:
	}
}

func (f *Fleet) busUp() bool { return f.busOK.Load() }

// Health implements task.Fleet: new work needs the bus and PostgreSQL.
// A replica with nothing to write learns PostgreSQL is down from its own
// ping, not only from a failed write, so every replica says so.
func (f *Fleet) Health() error {
	if !f.busUp() {
		return errBusDown(errors.New("no answer to PING"))
	}
	if !f.dbOK.Load() {
		return fmt.Errorf("%w: the fleet's database (PostgreSQL) is unreachable, so no new task is accepted until it is back", store.ErrUnavailable)
	}
	return nil
}

// Degraded names what of the fleet is down for new work (Health), for
// the health probe's text: nil when nothing is.
func (f *Fleet) Degraded() []string {
	var out []string
	if !f.dbOK.Load() {
		out = append(out, "fleet database unreachable")
	}
	if !f.busUp() {
		out = append(out, "bus unreachable")
	}
	return out
}

// SlotsServing is SlotCount for a caller: the slots of the whole fleet
// that may run a task of tenant (all: every slot, an admin's view).
func (f *Fleet) SlotsServing(tenant string, all bool) int {
	if all {
		return f.SlotCount()
	}
	return f.sched.SlotsServing(tenant, false) + f.remoteSlots(func(s summary) int { return s.serving(tenant) })
}

// SlotCount is the number of slots of the whole fleet (each replica's
// summary in Redis), or this replica's alone while Redis is down.
func (f *Fleet) SlotCount() int {
	return f.sched.SlotCount() + f.remoteSlots(func(s summary) int { return s.Slots })
}

// remoteSlots sums count over the other replicas' summaries in Redis (0
// while Redis is down or does not answer within 300 ms).
func (f *Fleet) remoteSlots(count func(summary) int) int {
	if !f.busUp() {
		return 0
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	sums, err := summaries(ctx, f.rdb)
	if err != nil {
		return 0
	}
	n := 0
	for id, s := range sums {
		if id != f.id {
			n += count(s)
		}
	}
	return n
}

// ---------------------------------------------------------------- loops

// pingLoop keeps busOK: a PING to Redis every 500 ms, bounded.
func (f *Fleet) pingLoop(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		err := f.rdb.Ping(pctx).Err()
		cancel()
		if ctx.Err() != nil {
			return
		}
		// Down only after pingDownAfter failures in a row: one ping lost
		// on a loaded machine must not refuse new work.
		if err != nil {
			f.pingFails++
		} else {
			f.pingFails = 0
		}
		up := err == nil || f.pingFails < pingDownAfter
		if was := f.busOK.Swap(up); was != up {
			if up {
				f.log.Info("fleet bus (Redis) reachable again")
				f.kick()
			} else {
				f.log.Warn("fleet bus (Redis) unreachable: new tasks are refused, running ones go on", "error", err)
			}
		}
	}
}

// dbPingLoop keeps dbOK: a ping to PostgreSQL every 500 ms on a
// connection of its own (a pool busy with writes is not a database down),
// apart from pingLoop so that a slow database does not slow Redis's check.
func (f *Fleet) dbPingLoop(ctx context.Context) {
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	defer func() {
		if f.dbConn != nil {
			cctx, cancel := context.WithTimeout(context.Background(), opTimeout)
			_ = f.dbConn.Close(cctx)
			cancel()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		f.pingDB(ctx)
	}
}

// pingDB pings PostgreSQL on dbPingLoop's connection (opened again after a
// failure, within opTimeout; the ping itself within 500 ms): down after
// pingDownAfter failures in a row, up at the first answer. A server that
// answers but refuses the connection (too many clients) is up: the pool's
// connections work.
func (f *Fleet) pingDB(ctx context.Context) {
	var err error
	if f.dbConn == nil {
		cctx, cancel := context.WithTimeout(ctx, opTimeout)
		f.dbConn, err = pgx.ConnectConfig(cctx, f.pg.Pool().Config().ConnConfig.Copy())
		cancel()
		var pgErr *pgconn.PgError
		if errors.As(err, &pgErr) && pgErr.Code == "53300" { // too_many_connections
			err = nil
		}
	}
	if err == nil && f.dbConn != nil {
		pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		err = f.dbConn.Ping(pctx)
		cancel()
	}
	if ctx.Err() != nil {
		return
	}
	if err != nil {
		if f.dbConn != nil {
			cctx, cancel := context.WithTimeout(ctx, opTimeout)
			_ = f.dbConn.Close(cctx)
			cancel()
			f.dbConn = nil
		}
		f.dbFails++
	} else {
		if f.dbFails > 0 {
			f.renewSoon() // a renewal may have failed meanwhile
		}
		f.dbFails = 0
	}
	up := err == nil || f.dbFails < pingDownAfter
	if was := f.dbOK.Swap(up); was != up {
		if up {
			f.dbSince.Store(time.Now().UnixNano())
			f.log.Info("fleet database (PostgreSQL) reachable again")
		} else {
			f.dbSince.Store(0)
			f.log.Warn("fleet database (PostgreSQL) unreachable: new tasks are refused", "error", err)
		}
	}
}

// renewSoon wakes renewLoop: PostgreSQL answers again, the leases a
// failed renewal left are renewed at once.
func (f *Fleet) renewSoon() {
	select {
	case f.renewNow <- struct{}{}:
	default:
	}
}

// dbReachableFor is how long PostgreSQL has been up for this replica
// (since its start or the end of its last outage; 0: down).
func (f *Fleet) dbReachableFor() time.Duration {
	since := f.dbSince.Load()
	if since == 0 {
		return 0
	}
	return time.Since(time.Unix(0, since))
}

// pubBatch is a batch of stored events for the publisher.
type pubBatch struct {
	evs []store.Event
	at  time.Time // when it was handed over (for the leg timings)
}

// onWritten hands events just stored to the publisher (dropped when it is
// behind: watchers fill gaps from PostgreSQL). The channel holds up to 4 096
// batches, each one store write's events.
func (f *Fleet) onWritten(evs []store.Event) {
	select {
	case f.pub <- pubBatch{evs: evs, at: time.Now()}:
	default:
	}
}

// publishLoop appends stored events to their tasks' streams.
func (f *Fleet) publishLoop(ctx context.Context) {
	for {
		var evs []store.Event
		var at time.Time
		select {
		case <-ctx.Done():
			return
		case b := <-f.pub:
			evs, at = b.evs, b.at
		}
	more:
		for len(evs) < 4096 {
			select {
			case more := <-f.pub:
				evs = append(evs, more.evs...)
			default:
				break more
			}
		}
		if !f.busUp() {
			continue
		}
		pctx, cancel := context.WithTimeout(ctx, opTimeout)
		// MULTI/EXEC: Redis serves a blocked XREAD after the command that
		// made its key ready, so in a plain pipeline the tail hubs would be
		// answered after the first XADD and read the rest of the batch one
		// round trip later; inside a transaction they get the whole batch
		// in one answer. (An XADD refused in it, an id already there from a
		// retried write, does not undo the others.)
		p := f.rdb.TxPipeline()
		tasks := map[string]bool{}
		var sent string
		if f.legs != nil {
			sent = strconv.FormatInt(time.Now().UnixMicro(), 10)
		}
		for _, e := range evs {
			key := eventsPrefix + e.TaskID
			vals := []any{"e", e.Data}
			if sent != "" {
				vals = append(vals, "t", sent)
			}
			p.XAdd(pctx, &redis.XAddArgs{Stream: key, MaxLen: eventsMaxLen, Approx: true, ID: eventID(e.Seq), Values: vals})
			tasks[key] = true
		}
		for key := range tasks {
			p.Expire(pctx, key, eventsTTL)
		}
		_, _ = p.Exec(pctx) // an id already there (a write retried) is refused: fine
		cancel()
		f.legs.add(legPublish, time.Since(at))
	}
}

// pullLoop reads the queue streams this replica has an idle slot for and
// takes their tasks.
func (f *Fleet) pullLoop(ctx context.Context) {
	groups := map[string]bool{}
	var names []string
	var namesAt time.Time
	for ctx.Err() == nil {
		if f.draining.Load() || !f.busUp() {
			f.waitKick(ctx, 250*time.Millisecond)
			continue
		}
		if time.Since(namesAt) > time.Second {
			cctx, cancel := context.WithTimeout(ctx, opTimeout)
			n, err := f.rdb.SMembers(cctx, queuesKey).Result()
			cancel()
			if err == nil {
				names, namesAt = n, time.Now()
			}
		}
		var keys []string
		for _, name := range names {
			if p, req, ok := parseQueue(name); ok && f.sched.CanRun(p, req) {
				keys = append(keys, queuePrefix+name)
			}
		}
		if len(keys) == 0 {
			f.waitKick(ctx, 250*time.Millisecond)
			namesAt = time.Time{} // a new queue may have appeared
			continue
		}
		streams := make([]string, 0, 2*len(keys))
		for _, k := range keys {
			if !groups[k] {
				cctx, cancel := context.WithTimeout(ctx, opTimeout)
				if err := ensureGroup(cctx, f.rdb, k); err == nil {
					groups[k] = true
				}
				cancel()
			}
			streams = append(streams, k)
		}
		for range keys {
			streams = append(streams, ">")
		}
		cctx, cancel := context.WithTimeout(ctx, tailBlock+opTimeout)
		res, err := f.rdb.XReadGroup(cctx, &redis.XReadGroupArgs{Group: group, Consumer: f.id, Streams: streams, Count: 1, Block: tailBlock}).Result()
		cancel()
		switch {
		case errors.Is(err, redis.Nil):
			continue
		case err != nil:
			if isNoGroup(err) {
				clear(groups)
			} else if ctx.Err() == nil {
				f.log.Debug("bus read failed", "error", err)
				sleepCtx(ctx, 250*time.Millisecond)
			}
			continue
		}
		for _, st := range res {
			for _, m := range st.Messages {
				f.take(ctx, st.Stream, m)
			}
		}
	}
}

// waitKick waits for a kick, d, or ctx's end.
func (f *Fleet) waitKick(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-f.idle:
	case <-t.C:
	}
}

// ack acknowledges a bus entry.
func (f *Fleet) ack(ctx context.Context, key, id string) {
	cctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if err := f.rdb.XAck(cctx, key, group, id).Err(); err != nil {
		f.log.Debug("bus ack failed (the entry will be reclaimed and found taken)", "stream", key, "id", id, "error", err)
	}
}

// take handles one bus entry: claim the task in PostgreSQL, adopt it (the
// local scheduler starts it on the idle slot), then acknowledge. An entry
// that cannot be decoded or names no task is poison: acknowledged and
// logged, never delivered again. One whose task another replica already
// took, or that ended, is a duplicate: acknowledged. One that could not be
// claimed because PostgreSQL failed stays pending and is reclaimed later.
func (f *Fleet) take(ctx context.Context, key string, m redis.XMessage) {
	id, _ := m.Values["task"].(string)
	_, _, ok := parseQueue(strings.TrimPrefix(key, queuePrefix))
	if id == "" || !ok || len(id) > 256 || !isText(id) {
		// Not text (a NUL byte, invalid UTF-8): PostgreSQL refuses it in
		// every query, so its claim failed for good and the entry was
		// reclaimed every --fleet-reclaim-idle forever.
		f.log.Warn("poison bus entry acknowledged and dropped: not a task entry", "stream", key, "id", m.ID, "values", fmt.Sprint(m.Values))
		f.ack(ctx, key, m.ID)
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	attempt, cmd, err := f.leases.ClaimQueued(cctx, id, f.id)
	switch {
	case errors.Is(err, task.ErrNotFound):
		f.log.Warn("poison bus entry acknowledged and dropped: no such task", "stream", key, "id", m.ID, "task_id", id)
		f.ack(ctx, key, m.ID)
		return
	case errors.Is(err, ErrTaskEnded):
		// Its queue row, if one is left (a task ended while it was being
		// handed back), would put the entry on the bus again for good.
		_ = f.leases.Dequeue(cctx, id)
		f.log.Debug("bus entry of a task that ended", "task_id", id)
		f.ack(ctx, key, m.ID)
		return
	case errors.Is(err, ErrLeaseHeld), errors.Is(err, ErrNotPending):
		f.log.Debug("bus entry of a task already taken", "task_id", id, "reason", err)
		f.ack(ctx, key, m.ID)
		return
	case err != nil:
		f.log.Warn("claim failed; the entry stays pending and is reclaimed later", "task_id", id, "error", err)
		return
	}
	f.dropped.Delete(id)
	f.fenced.own(id, attempt)
	if cmd != nil {
		f.cancelQueued(cctx, id, attempt, *cmd, strings.TrimPrefix(key, queuePrefix))
	} else if err := f.adopt(cctx, id, attempt, true); err != nil {
		f.adoptFailed(cctx, id, attempt, strings.TrimPrefix(key, queuePrefix), err)
	}
	f.ack(ctx, key, m.ID)
}

// adoptFailed deals with a task claimed from the bus that could not be
// adopted to run (err): one found not PENDING (it runs or ran elsewhere)
// is disowned and its lease left to expire — the sweep takes it over —
// never handed back, which would queue it and release its lease (a
// RUNNING task with a released lease is never swept: RUNNING for good).
// Another failure hands it back to the queue.
func (f *Fleet) adoptFailed(ctx context.Context, id string, attempt int64, queue string, err error) {
	if errors.Is(err, task.ErrNewerCopy) {
		// A session re-attaching here took the task (a newer attempt,
		// held here) while it was loaded: that copy stays, and disown
		// leaves its attempt alone.
		f.fenced.disown(id, attempt)
		f.log.Info("a task claimed from the bus was taken meanwhile by a session re-attaching here", "task_id", id, "attempt", attempt)
		return
	}
	if errors.Is(err, ErrNotPending) || errors.Is(err, task.ErrLeaseLost) {
		f.fenced.disown(id, attempt)
		f.log.Warn("a task claimed from the bus is not pending or its lease was lost; its lease is left to expire", "task_id", id, "error", err)
		return
	}
	if f.failUnreadable(ctx, id, attempt, "load the task", err) {
		f.fenced.disown(id, attempt)
		return
	}
	f.log.Warn("adopting a claimed task failed; it goes back to the queue", "task_id", id, "error", err)
	f.giveBack(ctx, nil, id, attempt, queue)
}

// failUnreadable counts a claim of task id (this replica's, with attempt)
// after which the task could not be read (what, err), and once
// MaxReadFailures such claims failed, by any replica, ends the task
// FAILURE without reading it (Leases.failUnread) and releases its lease.
// It reports whether it ended it; false leaves the caller's way (the
// lease to expire and the next sweep to retry, or the queue).
//
// Only a stored body that does not decode counts (taskstore.ErrUnreadable):
// it fails the same way at every read. A failed read of the store (a
// connection reset, PostgreSQL restarting or overloaded, a timeout) or a
// local error says nothing of the task; counted, a short outage ended
// readable tasks FAILURE (on the bus path in milliseconds). A read that
// succeeds resets the count (Leases.readOK).
func (f *Fleet) failUnreadable(ctx context.Context, id string, attempt int64, what string, err error) bool {
	if !errors.Is(err, taskstore.ErrUnreadable) {
		return false
	}
	n, cerr := f.leases.readFailed(ctx, id, f.id, attempt)
	if cerr != nil || n < f.opts.MaxReadFailures {
		return false
	}
	msg := fmt.Sprintf("%s (%d times; the last could not %s: %v)", UnreadableMessage, n, what, err)
	ev, ferr := f.leases.failUnread(ctx, id, f.id, attempt, msg)
	if ferr != nil {
		f.log.Warn("ending an unreadable task failed; the next sweep retries", "task_id", id, "failures", n, "error", ferr)
		return false
	}
	f.log.Warn("task ended FAILURE: it could not be read", "task_id", id, "failures", n, "step", what, "error", err)
	if ev != nil {
		f.onWritten([]store.Event{*ev})
		f.announce(ctx, cmdMessage{TaskID: id, Kind: kindEnded, Status: int32(agentpb.TaskStatus_FAILURE)})
	}
	return true
}

// readOK resets the count of failed reads of task id, which this
// replica's claim (attempt) has just read (Leases.readOK); a reset that
// fails leaves the count, which the next failure in a row adds to.
func (f *Fleet) readOK(ctx context.Context, id string, attempt int64) {
	if err := f.leases.readOK(ctx, id, f.id, attempt); err != nil {
		f.log.Debug("resetting a task's failed reads failed", "task_id", id, "error", err)
	}
}

// cancelQueued ends CANCELLED a task claimed from the bus for which a
// cancel is asked and not done (cmd): a cancel that came while the task
// was being handed back to the queue, whose owner could no longer carry
// it out. The task is not run.
//
// The cancel's row is not taken first: it is closed once the task's end
// is stored (closeCancel). Until then this replica holds the lease, so no
// other replica acts on the row (no claim, no sweep), and a failure
// leaves the row open for the task's next owner: a task that cannot be
// adopted goes back to the queue with it, whose next claim finds it; if
// this replica dies, or the end is not stored, the lease expires and the
// sweep queues the PENDING task again. (Taken first, a row whose taker
// failed afterwards stayed done with no result, and the next claim,
// finding no cancel, ran the task.)
func (f *Fleet) cancelQueued(ctx context.Context, id string, attempt int64, cmd command, queue string) {
	reason := cmd.Args.Reason
	if reason == "" {
		reason = task.DefaultCancelReason
	}
	if err := f.adopt(ctx, id, attempt, false); err != nil {
		if errors.Is(err, taskstore.ErrUnreadable) && f.cancelUnread(ctx, id, attempt, cmd.ID, reason) {
			return
		}
		if errors.Is(err, task.ErrNewerCopy) || errors.Is(err, task.ErrLeaseLost) {
			// Not this claim's any more: its cancel row stays open for
			// the task's holder.
			f.fenced.disown(id, attempt)
			return
		}
		f.log.Warn("adopting a claimed task to cancel it failed; it goes back to the queue with its cancel", "task_id", id, "error", err)
		f.giveBack(ctx, nil, id, attempt, queue)
		return
	}
	t := f.mgr.Registry().Get(id)
	if t != nil {
		t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
	}
	f.log.Info("queued task cancelled: a cancel was asked while it was handed back to the queue", "task_id", id)
	f.closeCancel(ctx, id, cmd.ID)
}

// cancelUnread ends CANCELLED, without reading it (Leases.endUnread), a
// PENDING task claimed from the bus to carry out its cancel (command cid)
// whose stored body does not decode: handed back, it was claimed again at
// once, for good, at the bus's speed. It reports whether it ended it.
func (f *Fleet) cancelUnread(ctx context.Context, id string, attempt, cid int64, reason string) bool {
	ev, err := f.leases.endUnread(ctx, id, f.id, attempt, agentpb.TaskStatus_CANCELLED, reason)
	if err != nil {
		return false
	}
	f.fenced.disown(id, attempt)
	f.log.Warn("queued task cancelled without reading it: its stored record does not decode", "task_id", id)
	if ev != nil {
		f.onWritten([]store.Event{*ev})
		f.announce(ctx, cmdMessage{TaskID: id, Kind: kindEnded, Status: int32(agentpb.TaskStatus_CANCELLED)})
	}
	if err := f.leases.closeIfEnded(ctx, cid, cmdResult{}); err != nil {
		f.log.Debug("closing a carried out cancel failed; the reconcile closes it", "task_id", id, "command", cid, "error", err)
	}
	return true
}

// closeCancel marks done the cancel (command cid) that ended task id here,
// with its result, once the task's end is stored: never before (a row
// closed while the task is still stored PENDING is a cancel lost if this
// replica dies then). If the end is not stored yet (the writer's flush
// fails; watchOwned goes on storing it) or the close fails, the reconcile
// closes the row once the task is stored ended (Leases.CloseEnded).
func (f *Fleet) closeCancel(ctx context.Context, id string, cid int64) {
	if err := f.writer.Flush(ctx); err != nil {
		f.log.Debug("a cancelled task's end is not stored yet; the reconcile closes its cancel", "task_id", id, "command", cid, "error", err)
		return
	}
	if err := f.leases.closeIfEnded(ctx, cid, cmdResult{}); err != nil {
		f.log.Debug("closing a carried out cancel failed; the reconcile closes it", "task_id", id, "command", cid, "error", err)
	}
}

// adopt loads a task this replica claimed and makes it local: queued on
// its scheduler (run) or left for the caller to end.
func (f *Fleet) adopt(ctx context.Context, id string, attempt int64, run bool) error {
	if f.hooks.adopt != nil {
		if err := f.hooks.adopt(id); err != nil {
			return err
		}
	}
	snap, err := f.ts.Load(ctx, id)
	if err != nil {
		return err
	}
	f.readOK(ctx, id, attempt)
	last, err := f.pg.LastSeq(ctx, id)
	if err != nil {
		return err
	}
	if run && snap.Status != agentpb.TaskStatus_PENDING {
		return fmt.Errorf("%w: it is %s", ErrNotPending, snap.Status)
	}
	t, err := f.adoptHeld(snap, last, attempt, run)
	if err != nil {
		return err
	}
	f.watchOwned(t, attempt)
	return nil
}

// adoptHeld is Manager.Adopt of a task this replica claimed with attempt,
// only while that is still the attempt it holds (task.ErrNewerCopy if
// another claim of this replica's overtook it: a session re-attaching
// here; nothing is adopted then, the newer claim's copy stays). A copy
// held with a newer attempt is never replaced (Manager.Adopt checks that
// under its own lock). Its copy carries attempt (the fencing token).
func (f *Fleet) adoptHeld(snap task.Snapshot, last uint64, attempt int64, run bool) (*task.Task, error) {
	if a := f.fenced.attempt(snap.ID); a != attempt {
		if a > attempt {
			return nil, task.ErrNewerCopy
		}
		return nil, fmt.Errorf("%w: the claim's attempt %d is not held here (holds %d)", task.ErrLeaseLost, attempt, a)
	}
	return f.mgr.Adopt(snap, last, attempt, run)
}

// giveBack puts a claimed PENDING task back in the queue and releases it:
// the queue row first, then the release, then the bus entry (the
// reconcile writes the entry again if this one is lost, from the row). A
// row that cannot be written leaves the lease unreleased, to expire: the
// sweep then finds the task PENDING and gives it back again (a released
// lease without a row would leave it PENDING for good).
//
// t is the local copy the caller holds of the task (nil: none, or one
// that is not the task's current state). A cancel that reaches it is not
// lost: the copy's cancel and its hand-back are decided under its lock
// (Task.HandBack). A cancel asked before keeps the task here, ended
// CANCELLED while the lease is still held; one asked after is not
// recorded on the copy but goes through the fleet (Manager.Cancel): a
// durable command that the task's next owner carries out (ClaimQueued
// finds it), or the end of the task if nobody holds it.
func (f *Fleet) giveBack(ctx context.Context, t *task.Task, id string, attempt int64, queue string) {
	if t != nil && f.keepCancelled(ctx, t, attempt) {
		return
	}
	if t != nil && f.hooks.handBack != nil {
		f.hooks.handBack(id)
	}
	// Disowned before it is forgotten: a command announced meanwhile
	// finds the task not held here, or its copy handed back. Not held
	// with attempt any more (lost, or a session re-attached here took a
	// newer one meanwhile): not this replica's to give back — forgetting
	// by id would drop the newer copy and queue a RUNNING task.
	if !f.fenced.disown(id, attempt) {
		if t != nil {
			f.mgr.ForgetCopy(t)
		}
		return
	}
	if t != nil {
		f.mgr.ForgetCopy(t) // not a newer copy taken since
	} else {
		f.mgr.Forget(id)
	}
	if err := f.leases.Enqueue(ctx, id, queue); err != nil {
		f.log.Warn("queue row not written; the task's lease is left to expire and the task queued again then", "task_id", id, "error", err)
		return
	}
	if err := f.leases.Release(ctx, id, attempt); err != nil {
		f.log.Debug("lease release failed; it expires", "task_id", id, "error", err)
	}
	if err := f.xadd(ctx, id, queue); err != nil {
		f.log.Debug("bus entry not written; the reconcile will", "task_id", id, "error", err)
	}
}

// cancelForgotten sends through the fleet a cancel that reached t, a copy
// this replica just forgot (its records are refused now), if one did:
// the caller's Manager.Cancel may still be ending the copy, so this waits
// a little for that end and for the writer (whose records of the copy
// are refused), that nothing of the copy is written once this replica
// holds the task again (as takeFree does for the cancel).
func (f *Fleet) cancelForgotten(ctx context.Context, t *task.Task) {
	reason, ok := t.CancelRequested()
	if !ok {
		return
	}
	select {
	case <-t.Done():
	case <-time.After(time.Second): // the cancel went through the fleet itself
	case <-ctx.Done():
	}
	_ = f.writer.Flush(ctx)
	f.log.Info("a cancel reached a task handed back to the queue; sent through the fleet", "task_id", t.ID())
	if _, err := f.Cancel(ctx, nil, t.ID(), reason, false); err != nil {
		f.log.Warn("cancel of a task handed back to the queue not sent", "task_id", t.ID(), "error", err)
	}
}

// keepCancelled ends t CANCELLED here, and keeps its lease until its end
// is stored, when a cancel was asked for it before its hand-back (it then
// goes back to no queue); false if none was, and t is marked handed back
// (Task.HandBack: a cancel from now on goes through the fleet).
//
// The cancel is written as a durable command too (left open: the
// reconcile closes it once the task's end is stored, Leases.CloseEnded):
// if this replica stops before the end is stored (a drain closes its
// store writer, PostgreSQL refusing the write meanwhile; a kill), its
// lease expires and the task's next owner carries the cancel out
// (ClaimQueued, requeueUnstarted) instead of queueing and running a task
// stored PENDING.
func (f *Fleet) keepCancelled(ctx context.Context, t *task.Task, attempt int64) bool {
	reason, cancelled := t.HandBack()
	if !cancelled {
		return false
	}
	f.watchOwned(t, attempt)
	// Not bounded by ctx's cancel: a drain stopping the fleet meanwhile
	// (Close waits for this) is when the row matters.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	_, err := f.leases.AddCommand(cctx, t.ID(), "cancel", cmdArgs{Reason: reason})
	cancel()
	if err != nil {
		f.log.Warn("the cancel of a task kept here is not written as a command; its end must be stored before this replica stops", "task_id", t.ID(), "error", err)
	}
	// The cancel's Manager.Cancel ends the copy itself (the copy is still
	// registered, so it does not go through the fleet): its caller is
	// told "cancelled". Ended here only if that does not come.
	timer := time.NewTimer(time.Second)
	defer timer.Stop()
	select {
	case <-t.Done():
	case <-timer.C:
	case <-ctx.Done():
	}
	t.Finish(agentpb.TaskStatus_CANCELLED, reason, "") // a no-op if it ended
	f.log.Info("task not handed back to the queue: cancelled", "task_id", t.ID())
	return true
}

// xadd writes task id's entry on queue's stream.
func (f *Fleet) xadd(ctx context.Context, id, queue string) error {
	cctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	_, err := f.rdb.TxPipelined(cctx, func(p redis.Pipeliner) error {
		p.XAdd(cctx, &redis.XAddArgs{Stream: queuePrefix + queue, MaxLen: queueMaxLen, Approx: true, Values: []any{"task", id}})
		p.SAdd(cctx, queuesKey, queue)
		return nil
	})
	return err
}

// goBackground runs fn in a goroutine Close waits for, unless Close has
// begun: then it starts nothing and reports false. The fleet's own work
// that a caller outside its loops may start (an API call: a cancel's
// takeFree, a re-attach's TakeSession or ClaimSession, KeepCancel) goes
// through it: a WaitGroup must not be added to from zero while Close
// waits on it, and none of it may run past Close.
//
// lost's f.mgr.DropCopy, the task manager's stop of its copy (its session
// told to stop, the copy ended or abandoned), runs in a goroutine of its
// own (lost runs inside the store writer's callback, onFenced, and
// DropCopy's end of the copy is recorded through that writer), counted in
// drops, which Close waits for after wg: a renewal's loss while the fleet
// stops is dropped before Close returns. One that the store writer reports
// after Close (its last writes, fenced) only disowns the copy.
func (f *Fleet) goBackground(fn func()) bool {
	f.bgMu.Lock()
	defer f.bgMu.Unlock()
	if f.closing {
		return false
	}
	f.wg.Go(fn)
	return true
}

// ownedWatch is the watch (watchOwned) of t, a local copy of a task this
// replica holds: the attempt it releases the lease with, which a session
// re-attaching to t here moves on (ClaimSession claims the lease again,
// with the next attempt).
type ownedWatch struct {
	t *task.Task
	// attempt and done are guarded by Fleet.watchMu; done: the watch
	// ended (released, or gave up as the fleet stopped).
	attempt int64
	done    bool
	// lost is closed when this replica lost the task's lease (Fleet.lost):
	// a copy dropped without ending (its session went to another
	// replica: Manager.Drop's abandon) would be waited for until Close.
	lost chan struct{}
}

// watchOwned releases t's lease once it ended and its end is stored. Once
// the fleet closes (then or later) it keeps t's cancel, if any, as a
// command for the task's next owner (keepCancelOpen); asked for while the
// fleet closes, it does only that, at once.
//
// A copy has one watch: asked again for a copy it watches (a re-attach of
// its session here, ClaimSession; a drain's keepCancelled), it starts no
// second one, the watch releases with attempt instead (the latest claim
// of this replica's, which must already be held: fenced.own first). A
// watch that ended (the task ended, its lease released or not held with
// the attempt it had) is followed by a new one, which releases attempt at
// once if t ended.
func (f *Fleet) watchOwned(t *task.Task, attempt int64) {
	f.watchMu.Lock()
	w := f.watchLocked(t, attempt)
	f.watchMu.Unlock()
	f.startWatch(w)
}

// watchLocked is watchOwned's entry for t (f.watchMu held): the new watch
// to start (startWatch) once f.watchMu is released, nil if t's watch goes
// on with attempt. Registered under the lock that holds the attempt
// (ClaimSession), a loss of that attempt (Fleet.lost) ends the watch.
func (f *Fleet) watchLocked(t *task.Task, attempt int64) *ownedWatch {
	id := t.ID()
	if w := f.watches[id]; w != nil && w.t == t && !w.done {
		w.attempt = attempt
		return nil
	}
	w := &ownedWatch{t: t, attempt: attempt, lost: make(chan struct{})}
	if f.watches == nil {
		f.watches = map[string]*ownedWatch{}
	}
	f.watches[id] = w
	return w
}

// startWatch runs watch w (watchLocked; nil: nothing to start).
func (f *Fleet) startWatch(w *ownedWatch) {
	if w == nil {
		return
	}
	t, id := w.t, w.t.ID()
	started := f.goBackground(func() {
		select {
		case <-t.Done():
		case <-w.lost:
			return // not held here: nothing to release or keep
		case <-f.ctx.Done():
			f.keepCancelOpen(t, f.endWatch(w, false))
			return
		}
		// Its end must be stored before the lease goes: the writer retries
		// a store that is down, and this waits for it as long as it takes
		// (the lease is renewed meanwhile, so nobody ends the task again).
		for {
			fctx, cancel := context.WithTimeout(f.ctx, 30*time.Second)
			err := f.writer.Flush(fctx)
			cancel()
			if err == nil {
				break
			}
			if errors.Is(err, store.ErrWriterClosed) {
				f.keepCancelOpen(t, f.endWatch(w, false))
				return // shutting down: the lease expires
			}
			select {
			case <-f.ctx.Done():
				f.keepCancelOpen(t, f.endWatch(w, false))
				return
			case <-time.After(time.Second):
			}
		}
		ctx, cancel := context.WithTimeout(f.ctx, 30*time.Second)
		defer cancel()
		if a := f.endWatch(w, true); a != 0 {
			// Its end is stored (and this replica held the lease until
			// then): a cancel waiting for it on any replica returns now.
			f.announce(ctx, cmdMessage{TaskID: id, Kind: kindEnded, Status: int32(t.Status())})
			if err := f.leases.Release(ctx, id, a); err != nil {
				f.log.Debug("lease release failed; it expires", "task_id", id, "error", err)
			}
		}
	})
	if !started {
		// Shutting down: the lease expires (as the watch does once the
		// fleet stops).
		f.keepCancelOpen(t, f.endWatch(w, false))
	}
}

// endWatch ends watch w and returns the attempt it holds now. disown: only
// if this replica still holds the task's lease with it, which it forgets
// (0 if not: released meanwhile, or lost to another replica).
func (f *Fleet) endWatch(w *ownedWatch, disown bool) int64 {
	id := w.t.ID()
	f.watchMu.Lock()
	defer f.watchMu.Unlock()
	w.done = true
	if f.watches[id] == w {
		delete(f.watches, id)
	}
	if disown && !f.fenced.disown(id, w.attempt) {
		return 0
	}
	return w.attempt
}

// keepCancelOpen writes a cancel asked of t (a task this replica holds
// with attempt, cancelled here or ended CANCELLED here) as a durable
// command when this replica stops before t's end is known to be stored (a
// drain: its fleet stops, then its store writer closes, and PostgreSQL may
// refuse the end meanwhile): the lease expires and the task's next owner
// ends it CANCELLED (ClaimQueued, takeOver's cancelAsked, a re-attached
// session's commands) instead of queueing a task stored PENDING again or
// ending it FAILURE. The row stays open until the end is stored
// (CloseEnded). Nothing for a task without a cancel, or no longer held.
func (f *Fleet) keepCancelOpen(t *task.Task, attempt int64) {
	if f.fenced.attempt(t.ID()) != attempt {
		return
	}
	reason, ok := t.CancelRequested()
	if !ok {
		info := t.Info()
		if info.Status != agentpb.TaskStatus_CANCELLED {
			return
		}
		reason = info.Message
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := f.leases.AddCommand(ctx, t.ID(), "cancel", cmdArgs{Reason: reason}); err != nil {
		f.log.Warn("a cancel asked here is not written as a command before this replica stops", "task_id", t.ID(), "error", err)
	}
}

// KeepCancel implements task.Fleet: a client's cancel that this replica's
// own API decided on a task it holds (Manager.CancelAs) is written as a
// cancel command row, as one sent from another replica is, left open
// until the task's end is stored (the reconcile closes it then,
// Leases.CloseEnded). If this replica is killed before that end is stored,
// the task's next owner ends it CANCELLED with the cancel's reason
// (takeOver's cancelAsked, ClaimQueued) or stops its re-attaching session
// with it (TakeSession), instead of ending it FAILURE or letting the
// session run on. The write is off the stop's path: in the background,
// for at most 5 s (Close waits for it; a stopping fleet is when the row
// matters, so the fleet's stop does not cut it short). This replica
// carries out no cancel twice: the copy has the cancel recorded
// (runCommands skips it). Nothing for a task this replica does not hold.
func (f *Fleet) KeepCancel(id, reason string) {
	if f.fenced.attempt(id) == 0 {
		return
	}
	write := func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(f.ctx), 5*time.Second)
		defer cancel()
		if f.keepSem != nil {
			select {
			case f.keepSem <- struct{}{}:
				defer func() { <-f.keepSem }()
			case <-ctx.Done():
				f.log.Warn("a cancel asked here is not written as a command (too many waiting); if this replica dies before the task's stop or end is stored, the cancel is lost", "task_id", id)
				return
			}
		}
		if _, err := f.leases.AddCommand(ctx, id, "cancel", cmdArgs{Reason: reason}); err != nil {
			f.log.Warn("a cancel asked here is not written as a command; if this replica dies before the task's stop or end is stored, the cancel is lost", "task_id", id, "error", err)
		}
	}
	if !f.goBackground(write) {
		// Close waits for wg already: nothing may be added to it. The
		// dispatcher is stopping; the caller may wait for this.
		write()
	}
}

// keepCancelWrites is how many KeepCancel rows are written at once; a
// burst of cancels waits its turn (at most 5 s) rather than take the
// store's connections from the writes of the tasks' ends.
const keepCancelWrites = 2

// reclaimLoop takes over bus entries another replica read but never
// acknowledged (it died between the read and the claim).
func (f *Fleet) reclaimLoop(ctx context.Context) {
	t := time.NewTicker(max(f.opts.ReclaimIdle/4, 500*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if f.draining.Load() || !f.busUp() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, opTimeout)
		names, err := f.rdb.SMembers(cctx, queuesKey).Result()
		cancel()
		if err != nil {
			continue
		}
		for _, name := range names {
			p, req, ok := parseQueue(name)
			if !ok || !f.sched.CanRun(p, req) {
				continue
			}
			cctx, cancel := context.WithTimeout(ctx, opTimeout)
			msgs, _, err := f.rdb.XAutoClaim(cctx, &redis.XAutoClaimArgs{Stream: queuePrefix + name, Group: group, Consumer: f.id,
				MinIdle: f.opts.ReclaimIdle, Start: "0-0", Count: 8}).Result()
			cancel()
			if err != nil {
				continue
			}
			for _, m := range msgs {
				f.log.Info("reclaimed a bus entry left unacknowledged", "stream", name, "id", m.ID)
				f.take(ctx, queuePrefix+name, m)
			}
		}
	}
}

// renewLoop renews this replica's leases every third of the lease (and
// at once when PostgreSQL answers again), and drops the sessions of those
// it lost.
//
// When renewals fail, the copies are dropped when the lease runs out (a
// timer at the start of the last successful renewal + the lease, not at
// the next failing tick): a replica cut off from PostgreSQL alone must
// leave its sessions to the others before their sweepers end the tasks,
// one grace later; the commanders re-attach there meanwhile.
func (f *Fleet) renewLoop(ctx context.Context) {
	lease := f.opts.Lease
	t := time.NewTicker(lease / 3)
	defer t.Stop()
	lastOK := time.Now()
	drop := time.NewTimer(lease)
	defer drop.Stop()
	dropAll := func() {
		for id, a := range f.fenced.ownedTasks() {
			f.lost(id, a, "this dispatcher replica could not renew the task's lease within the lease")
		}
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-drop.C:
			if ctx.Err() != nil {
				return // shutting down: its sessions are handed over, not dropped
			}
			dropAll()
			continue
		case <-t.C:
		case <-f.renewNow:
		}
		if !time.Now().Before(lastOK.Add(lease)) {
			// The tick and the drop came together and the tick won: drop
			// first, not after a renewal that may hang for a third of
			// the lease.
			dropAll()
		}
		held := f.fenced.ownedTasks()
		sent := time.Now()
		// Within the lease still held: a renewal hanging past it must not
		// delay the drop.
		timeout := lease / 3
		if left := time.Until(lastOK.Add(lease)); left > 0 && left < timeout {
			timeout = left
		}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		got, err := f.leases.Renew(cctx, f.id, slices.Collect(maps.Keys(held)))
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			f.log.Warn("lease renewal failed", "error", err)
			if !time.Now().Before(lastOK.Add(lease)) {
				dropAll() // past the lease (what was claimed since, too)
			}
			continue
		}
		// The database set the expiry after sent: counting from sent
		// drops early rather than late.
		lastOK = sent
		drop.Reset(time.Until(lastOK.Add(lease)))
		for id, a := range held {
			if got[id] != a {
				f.lost(id, a, "this dispatcher replica lost the task's lease; another replica took the task over")
			}
		}
	}
}

// onFenced is the fenced store's report of a refused write, written with
// attempt: the lease of that attempt is lost. A later attempt this replica
// claimed meanwhile (a session re-attaching here, ClaimSession) is not.
//
// A write with no attempt (0: this replica held no lease of the task when
// it was written) tells nothing of a lease held now, claimed after it.
func (f *Fleet) onFenced(id string, attempt int64) {
	f.fencedN.Add(1)
	if attempt == 0 {
		return
	}
	f.lost(id, attempt, "this dispatcher replica lost the task's lease (fenced write); another replica took the task over")
}

// lost drops the local session of task id whose lease (attempt; 0: any)
// this replica no longer holds. Whatever it records now is refused.
func (f *Fleet) lost(id string, attempt int64, reason string) {
	// The copy's watch ends with the lease (under watchMu, as it
	// releases: it never follows an attempt this replica no longer holds).
	f.watchMu.Lock()
	if !f.fenced.disown(id, attempt) {
		f.watchMu.Unlock()
		return // released meanwhile (the task ended), or dropped already
	}
	if w := f.watches[id]; w != nil && !w.done {
		w.done = true
		delete(f.watches, id)
		close(w.lost)
	}
	if _, already := f.dropped.LoadOrStore(id, struct{}{}); already {
		f.watchMu.Unlock()
		return
	}
	// Disowned now, before the refused records are reported done to the
	// copy's log (onFenced runs inside the store write): its watchers here
	// never see them; they follow the fleet's view from here on. Under
	// watchMu, with the lease: a session re-attaching to this copy
	// (ClaimSession) either holds its new attempt before this (then the
	// lease of attempt is not this replica's any more and nothing is
	// dropped) or finds the copy disowned and takes the task afresh.
	t := f.mgr.Disown(id)
	f.watchMu.Unlock()
	f.log.Warn("task fenced: its session on this replica is dropped", "task_id", id, "reason", reason)
	if t == nil {
		return
	}
	// Not inline: it could deadlock in the writer's callback. Counted in
	// drops (see goBackground), which Close waits for. The copy disowned,
	// not whatever copy the registry holds by then.
	f.bgMu.Lock()
	if f.closed {
		f.bgMu.Unlock()
		f.log.Debug("fleet closed: the fenced copy is disowned, not dropped", "task_id", id)
		return
	}
	f.drops.Add(1)
	f.bgMu.Unlock()
	go func() {
		defer f.drops.Done()
		if f.hooks.beforeDrop != nil {
			f.hooks.beforeDrop(id)
		}
		f.mgr.DropCopy(t, reason)
	}()
}

// sweepLoop takes over the tasks whose owner stopped renewing their lease
// for longer than the grace: a running one ends FAILURE, one that had not
// started goes back to the queue.
//
// A lease counts as expired for longer than the grace only while this
// replica could see it so: it takes nothing over before PostgreSQL has
// been up for it (since its start or the end of an outage: dbSince) for
// the grace + reattachWindow. A replica that just started, or that just
// regained the database, finds leases that expired long ago (the whole
// fleet was down, or PostgreSQL was) whose sessions are re-attaching at
// that very moment: the commanders retry at most every 4 s (+ up to 0.5 s
// of jitter), and a claim takes up to a few seconds more, so within the
// wait their re-attach claims the lease first.
//
// Only a real outage (dbOK false) restarts the wait, not a failed sweep
// or a lone lost ping; and a wait restarted again and again (a flapping
// database) defers the rows it keeps finding for at most
// 2 × (lease + grace) in all: a dead replica's tasks do not stay RUNNING.
func (f *Fleet) sweepLoop(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	var deferredSince, warned time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if f.draining.Load() {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		held := slices.Collect(maps.Keys(f.fenced.ownedTasks()))
		rows, err := f.leases.Expired(cctx, f.id, held, f.opts.Grace, 32)
		if err == nil {
			now := time.Now()
			wait := f.opts.Grace + f.reattachWindow
			up := f.dbReachableFor()
			switch {
			case len(rows) == 0 || up > wait:
				deferredSince = time.Time{}
			case deferredSince.IsZero():
				deferredSince = now
			}
			capped := !deferredSince.IsZero() && now.Sub(deferredSince) > 2*(f.opts.Lease+f.opts.Grace)
			if len(rows) > 0 && up <= wait && !capped {
				if now.Sub(warned) >= 5*time.Second {
					warned = now
					f.log.Warn("expired leases left to their sessions' re-attach: the fleet database has been up for this replica only for a while",
						"leases", len(rows), "up_for", up.Round(time.Millisecond), "wait", wait,
						"deferred_for", now.Sub(deferredSince).Round(time.Millisecond))
				}
			} else {
				for _, r := range rows {
					f.takeOver(cctx, r)
				}
			}
		}
		cancel()
	}
}

// takeOver ends or requeues the task of an expired lease (see sweepLoop).
func (f *Fleet) takeOver(ctx context.Context, r lease) {
	if r.Owner == f.id {
		// A row of this replica's own: a session it dropped (or one of an
		// earlier process with its id). The fence no longer needs the
		// wait (a record carries the attempt its copy was given, so the
		// dropped copy's last records are refused whatever this replica
		// holds when they are written), but the sweep still takes the
		// task only once that copy is gone and its records written: the
		// claim's copy then replaces an ended one, never one still being
		// dropped, and the end it loads is the one stored.
		if t := f.mgr.Registry().Get(r.TaskID); t != nil && !t.IsView() {
			select {
			case <-t.Done():
				// Ended (its end stored or refused): nothing more of it
				// comes once the writer is flushed. A kept ended copy
				// must not hold the row: the claim finds the task ended.
			default:
				return // still being dropped: the next sweep
			}
		}
		if err := f.writer.Flush(ctx); err != nil {
			return
		}
	}
	attempt, err := f.leases.claim(ctx, r.TaskID, f.id, f.opts.Grace)
	if errors.Is(err, ErrTaskEnded) {
		_ = f.leases.markReleased(ctx, r.TaskID)
		return
	}
	if err != nil {
		return
	}
	f.dropped.Delete(r.TaskID)
	f.fenced.own(r.TaskID, attempt)
	if f.hooks.claimed != nil {
		f.hooks.claimed(r.TaskID)
	}
	// From here a failure leaves the lease to expire, never released: a
	// released lease is never swept again, and the task may be RUNNING
	// (it would stay so for good) or PENDING without a queue row (the
	// claim removed it). The next sweep retries.
	leave := func(what string, err error) {
		f.fenced.disown(r.TaskID, attempt)
		if f.failUnreadable(ctx, r.TaskID, attempt, what, err) {
			return
		}
		f.log.Warn("takeover of a task failed; its lease is left to expire and the next sweep retries", "task_id", r.TaskID, "step", what, "error", err)
	}
	snap, err := f.ts.Load(ctx, r.TaskID)
	if err != nil {
		leave("read the task", err)
		return
	}
	f.readOK(ctx, r.TaskID, attempt)
	if snap.Status == agentpb.TaskStatus_PENDING {
		f.log.Info("task of a replica that stopped renewing its lease goes back to the queue", "task_id", r.TaskID, "owner", r.Owner)
		f.giveBack(ctx, nil, r.TaskID, attempt, queueName(snap.Planner, snap.Required))
		return
	}
	last, err := f.pg.LastSeq(ctx, r.TaskID)
	if err != nil {
		leave("read the task's last event", err)
		return
	}
	// Nothing of the session recorded: no event carries an upstream seq
	// (the commander's packets are numbered from 1) and no sandbox was
	// reported. The commander may never have received the start.
	unstarted := false
	if snap.Status == agentpb.TaskStatus_RUNNING && snap.UsedSandbox == nil {
		up, err := f.upstreamSeq(ctx, r.TaskID, last)
		if err != nil {
			leave("read the task's events", err)
			return
		}
		unstarted = up == 0
	}
	t, err := f.adoptHeld(snap, last, attempt, false)
	if errors.Is(err, task.ErrNewerCopy) {
		// A session re-attaching here took the task (a newer attempt)
		// while this takeover loaded it: that copy stays, and this
		// claim's attempt is no longer the lease's.
		f.log.Info("takeover of a task given up: a session re-attaching here took it meanwhile", "task_id", r.TaskID, "attempt", attempt)
		return
	}
	if err != nil {
		leave("adopt the task", err)
		return
	}
	if f.cancelAsked(ctx, r, t, attempt) {
		return
	}
	msg := fmt.Sprintf("its dispatcher replica %s stopped renewing the task's lease (crashed, cut off, or gave it up after a failed take) and nobody took the session over within %s",
		r.Owner, f.opts.Lease+f.opts.Grace)
	if unstarted {
		done, why := f.requeueUnstarted(ctx, r, t, attempt, queueName(snap.Planner, snap.Required))
		if done {
			return
		}
		msg += why
	}
	f.watchOwned(t, attempt)
	f.log.Warn("task of a dead replica ended", "task_id", r.TaskID, "owner", r.Owner, "attempt", attempt)
	t.Finish(agentpb.TaskStatus_FAILURE, msg, "")
}

// cancelAsked ends t, the RUNNING task of an expired lease taken over with
// attempt, CANCELLED when a cancel not done is open for it (asked of its
// dead owner, or kept by a replica that stopped before the task's end was
// stored: see keepCancelled, keepCancelOpen, KeepCancel), or when its
// stored stop is a client's cancel (its dead owner stopped the session for
// a cancel and stored the stop, not the end), and reports whether it did.
// The row is not taken first (as cancelQueued): it stays open until the
// task's end is stored, for the next sweep if this replica dies before.
func (f *Fleet) cancelAsked(ctx context.Context, r lease, t *task.Task, attempt int64) bool {
	// A failed read of the rows still leaves the stored stop's cancel
	// (below) to honour: it needs no database.
	cmds, _ := f.leases.OpenCommands(ctx, []string{r.TaskID})
	for _, c := range cmds {
		if c.Kind != "cancel" {
			continue
		}
		reason := c.Args.Reason
		if reason == "" {
			reason = task.DefaultCancelReason
		}
		f.watchOwned(t, attempt)
		f.log.Warn("task of a dead replica cancelled: a cancel was asked before it was taken over", "task_id", r.TaskID, "owner", r.Owner)
		t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
		f.closeCancel(ctx, r.TaskID, c.ID)
		return true
	}
	// The copy has a cancel recorded when its stored stop is a client's
	// cancel (task.Manager.Adopt).
	if reason, ok := t.CancelRequested(); ok {
		f.watchOwned(t, attempt)
		f.log.Warn("task of a dead replica cancelled: its session was stopped for a client's cancel before it was taken over", "task_id", r.TaskID, "owner", r.Owner)
		t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
		return true
	}
	return false
}

// requeueHooks, when set, are called with the task's id: claimed by
// takeOver once it claimed an expired lease (before it reads the task);
// by requeueUnstarted, beforeWrite before the PENDING record is written,
// stored once it is stored under this replica's attempt (before the task
// is queued).
type requeueHooks struct {
	claimed, beforeWrite, stored func(id string)
	// handBack is called by giveBack once it decided to hand a local
	// copy back to the queue (no cancel was asked), before it forgets it.
	handBack func(id string)
	// adopt is called by adopt before it loads a task claimed from the
	// bus: an error it returns fails the adoption.
	adopt func(id string) error
	// sessionClaimed is called by ClaimSession once the lease row of a
	// session re-attaching to this replica's copy moved to the new
	// attempt (committed), before this replica holds that attempt.
	sessionClaimed func(id string)
	// beforeSessionClaim is called by ClaimSession before it claims the
	// lease row (the records before the claim are stored).
	beforeSessionClaim func(id string)
	// sessionHeld is called by ClaimSession once this replica holds the
	// attempt it claimed for the copy (and watches it), before it returns.
	sessionHeld func(id string)
	// beforeDrop is called by lost's goroutine before it drops the copy
	// it disowned (Manager.DropCopy).
	beforeDrop func(id string)
	// sessionTaken is called by TakeSession once its claim succeeded,
	// before it loads the task: an error it returns fails the take.
	sessionTaken func(id string) error
	// taken is called by Take once its claim succeeded with attempt,
	// before it loads the task.
	taken func(id string, attempt int64)
}

// RequeueTakenOverMessage is the state message of a RUNNING task put back
// in the fleet's queue by takeOver (see requeueUnstarted).
const RequeueTakenOverMessage = "requeued: its dispatcher replica stopped before the commander sent anything, and no session re-attached"

// requeueUnstarted puts t, the RUNNING task of an expired lease taken over
// with attempt whose session recorded nothing upstream and that nobody
// re-attached, back in the fleet's queue as PENDING, as a single node
// requeues a task whose start never reached its commander (Task.Requeue:
// a state event tells watchers, the requeue counts against
// task.MaxRequeues). It reports whether t was dealt with: requeued, ended
// CANCELLED for a cancel asked meanwhile, or dropped because a re-attach
// won the lease; false leaves t to end FAILURE (why is added to its
// message): requeued too often, or this replica drains or shuts down.
//
// A late re-attach (Leases.ClaimForSession) and this requeue are decided
// by the lease row: the claim locks it FOR UPDATE and needs the task
// RUNNING; the requeue's write locks it FOR SHARE and needs attempt. If the
// PENDING record commits first, the claim reads PENDING and is refused
// (ErrNotSession); if the claim commits first, the write is fenced (the
// attempt moved) and nothing of it is stored: the session goes on there and
// this replica drops its copy without queueing it.
func (f *Fleet) requeueUnstarted(ctx context.Context, r lease, t *task.Task, attempt int64, queue string) (done bool, why string) {
	id := r.TaskID
	if f.draining.Load() {
		// As a single node shutting down does not requeue.
		return false, " (not requeued: this dispatcher replica is draining)"
	}
	if f.hooks.beforeWrite != nil {
		f.hooks.beforeWrite(id)
	}
	switch err := t.Requeue(nil, RequeueTakenOverMessage); {
	case errors.Is(err, task.ErrCancelRequested):
		reason, _ := t.CancelRequested()
		f.watchOwned(t, attempt)
		t.Finish(agentpb.TaskStatus_CANCELLED, reason, "")
		return true, ""
	case errors.Is(err, task.ErrRequeueLimit):
		f.log.Warn("task of a dead replica not requeued: requeued too often", "task_id", id, "requeues", t.Requeues())
		return false, fmt.Sprintf(" (not requeued again: requeued %d times already)", task.MaxRequeues)
	case errors.Is(err, task.ErrClosed):
		return false, " (not requeued: the dispatcher is shutting down)"
	case err != nil && t.Status() != agentpb.TaskStatus_PENDING:
		return false, ""
	}
	// The PENDING record must be stored under this attempt before the task
	// is queued: another replica loads it from PostgreSQL.
	if err := f.writer.Flush(ctx); err != nil {
		// Unknown whether it was stored: drop the copy and let the lease
		// expire; the next sweep finds the task PENDING (and queues it) or
		// still RUNNING (and requeues it).
		f.fenced.disown(id, attempt)
		f.mgr.ForgetCopy(t)
		f.log.Warn("requeue of a dead replica's task not stored; left for the next sweep", "task_id", id, "error", err)
		// A cancel that reached the copy (whose end is refused now) is
		// left for the task's next owner.
		f.cancelForgotten(ctx, t)
		return true, ""
	}
	if f.fenced.attempt(id) != attempt {
		// Fenced: a re-attaching session claimed the task first.
		f.log.Info("task of a dead replica was re-attached before its requeue", "task_id", id)
		return true, ""
	}
	if f.hooks.stored != nil {
		f.hooks.stored(id)
	}
	f.log.Warn("task of a dead replica requeued: its commander sent nothing and no session re-attached",
		"task_id", id, "owner", r.Owner, "attempt", attempt, "requeues", t.Requeues())
	f.giveBack(ctx, t, id, attempt, queue)
	return true, ""
}

// reconcileInterval is how often a replica reconciles (reconcileLoop).
const reconcileInterval = time.Second

// reconcileLoop, every second (reconcileInterval): publishes the slot summary, rebuilds the
// bus if Redis lost its data, writes again the bus entries of tasks
// waiting too long, closes the commands of ended tasks and carries out the
// commands of this replica's tasks that a lost message did not announce.
func (f *Fleet) reconcileLoop(ctx context.Context) {
	every := f.reconcileEvery
	if every <= 0 {
		every = reconcileInterval
	}
	t := time.NewTicker(every)
	defer t.Stop()
	lastGC := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		f.reconcile(cctx)
		if time.Since(lastGC) > time.Minute {
			lastGC = time.Now()
			if err := f.leases.GC(cctx); err != nil {
				f.log.Debug("fleet gc failed", "error", err)
			}
		}
		cancel()
	}
}

func (f *Fleet) reconcile(ctx context.Context) {
	if f.busUp() {
		st := f.sched.Stats()
		open, per := f.sched.TenantSlots()
		_ = publishSummary(ctx, f.rdb, f.id, summary{Slots: st.Slots, Idle: st.Idle, Queued: st.Queued, Owned: len(f.fenced.ownedTasks()),
			Open: &open, Tenants: per}, 3*time.Second)
		f.checkEpoch(ctx)
		if qs, err := f.leases.Queued(ctx, f.opts.RequeueAfter, 256); err == nil {
			for _, q := range qs {
				_ = f.xadd(ctx, q.TaskID, q.Queue)
			}
		}
	}
	_ = f.leases.CloseEnded(ctx)
	f.syncGlobal(ctx)
	held := f.fenced.ownedTasks()
	if len(held) > 0 {
		ids := make([]string, 0, len(held))
		for id := range held {
			ids = append(ids, id)
		}
		f.runCommands(ctx, ids)
	}
}

// syncGlobal takes the global config another replica stored, when the
// stored document changed since last taken.
func (f *Fleet) syncGlobal(ctx context.Context) {
	c, doc, err := f.ts.Global(ctx)
	if err != nil || c == nil || bytes.Equal(doc, f.globalDoc) {
		return
	}
	f.globalDoc = doc
	f.mgr.Configs().Replace(c)
}

// checkEpoch rebuilds the bus from PostgreSQL when Redis lost its data
// (the epoch key is gone): every queued task's entry is written again.
func (f *Fleet) checkEpoch(ctx context.Context) {
	v, err := f.rdb.Get(ctx, epochKey).Result()
	if err == nil {
		f.epochMu.Lock()
		f.epoch = v
		f.epochMu.Unlock()
		return
	}
	if !errors.Is(err, redis.Nil) {
		return
	}
	nv := NewReplicaID()
	set, err := f.rdb.SetNX(ctx, epochKey, nv, 0).Result()
	if err != nil || !set {
		return
	}
	f.epochMu.Lock()
	first := f.epoch == ""
	f.epoch = nv
	f.epochMu.Unlock()
	qs, err := f.leases.Queued(ctx, 0, 100_000)
	if err != nil {
		return
	}
	for _, q := range qs {
		_ = f.xadd(ctx, q.TaskID, q.Queue)
	}
	if !first || len(qs) > 0 {
		f.log.Warn("fleet bus rebuilt from PostgreSQL (Redis had lost its data)", "requeued", len(qs))
	}
}

// listenLoop carries out a command as soon as the channel announces it
// for a task of this replica (the reconcile catches any lost message), and
// wakes the cancels waiting here for a task's end (kindEnded).
func (f *Fleet) listenLoop(ctx context.Context) {
	ps := f.rdb.Subscribe(ctx, cmdChannel)
	defer ps.Close()
	ch := ps.Channel(redis.WithChannelHealthCheckInterval(5 * time.Second))
	book := make(chan cmdMessage, cmdBookQueue)
	f.wg.Go(func() { f.cmdBookLoop(ctx, book) })
	for {
		select {
		case <-ctx.Done():
			return
		case m, ok := <-ch:
			if !ok {
				return
			}
			f.onMessage(ctx, m.Payload, book)
		}
	}
}

// onMessage handles one message of the command channel. A cancel is
// carried out at once, before its row is taken, even before the row is
// written (Fleet.Cancel announces it first; a second stop of a task is a
// no-op, so the row's announcement or the reconcile running it again is
// harmless); the row's bookkeeping then goes to book (cmdBookLoop). A
// cancel announced before its caller was checked (kindCancelFor) stops
// the task only if the caller sees it; else it is dropped, and no row
// follows (the sender writes one only for a caller it checked). Other
// commands are taken first (at most once), by their id, without listing
// the open ones.
func (f *Fleet) onMessage(ctx context.Context, payload string, book chan<- cmdMessage) {
	var c cmdMessage
	if !strings.HasPrefix(payload, "{") || json.Unmarshal([]byte(payload), &c) != nil ||
		(c.ID == 0 && c.Kind != "cancel" && c.Kind != kindCancelFor && c.Kind != kindEnded) {
		// A bare task id (an older replica's announcement).
		if f.fenced.attempt(payload) == 0 {
			return
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		f.runCommands(cctx, []string{payload})
		cancel()
		return
	}
	if c.Kind == kindEnded {
		f.ends.notify(c.TaskID, agentpb.TaskStatus(c.Status))
		return
	}
	if f.fenced.attempt(c.TaskID) == 0 {
		return
	}
	if t := f.mgr.Registry().Get(c.TaskID); t != nil && t.HandedBack() {
		// Being handed back to the queue: the command's row waits for the
		// task's next owner (a cancel carried out on this copy would be
		// sent through the fleet again, to this replica while it holds
		// the lease).
		return
	}
	if c.Kind == kindCancelFor {
		if c.ID != 0 || c.Caller == nil || !f.sees(c.Caller.caller(), c.TaskID) {
			return
		}
		c.Kind = "cancel"
	}
	if c.Kind == "cancel" {
		got := time.Now()
		if c.Sent != 0 {
			f.legs.addID(legCmdWire, c.TaskID, got.Sub(time.UnixMicro(c.Sent)))
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		res := f.exec(cctx, command{ID: c.ID, TaskID: c.TaskID, Kind: c.Kind, Args: c.Args})
		cancel()
		f.legs.addID(legCommand, c.TaskID, time.Since(got))
		f.legs.stopHanded(c.TaskID)
		if c.ID == 0 {
			return // announced before its row: the row's own message follows
		}
		c.Result = &res
	}
	select {
	case book <- c:
	default:
		// Full: the reconcile takes the row within a second.
	}
}

// sees reports whether caller sees task id, which this replica runs (its
// tenant, in memory; false if it is not here).
func (f *Fleet) sees(caller tenant.Caller, id string) bool {
	t := f.mgr.Registry().Get(id)
	return t != nil && !t.IsView() && caller.Sees(t.Tenant())
}

// cmdBookQueue bounds the commands waiting for cmdBookLoop.
const cmdBookQueue = 256

// cmdBookLoop takes the rows of announced commands: a cancel already
// carried out gets its result stored, its row left open until the task's
// end is stored (Leases.CloseEnded): if this replica stops before (killed,
// its store refusing the end), the task's next owner finds the cancel and
// carries it out (ClaimQueued, takeOver's cancelAsked, TakeSession).
// Another command is taken (at most once), carried out and its result
// stored. The commands queued meanwhile are booked together: the results
// of their cancels in one statement (a storm of cancels took one commit
// each, in a row, beside the writes of the tasks being stopped).
func (f *Fleet) cmdBookLoop(ctx context.Context, book <-chan cmdMessage) {
	var batch []cmdMessage
	var ids []int64
	var rs []cmdResult
	for {
		batch, ids, rs = batch[:0], ids[:0], rs[:0]
		select {
		case <-ctx.Done():
			return
		case c := <-book:
			batch = append(batch, c)
		}
	more:
		for len(batch) < cmdBookQueue {
			select {
			case c := <-book:
				batch = append(batch, c)
			default:
				break more
			}
		}
		for _, c := range batch {
			if c.Kind == "cancel" {
				if c.Result != nil {
					ids, rs = append(ids, c.ID), append(rs, *c.Result)
				}
			} else {
				f.bookOne(ctx, c)
			}
		}
		if len(ids) > 0 {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_ = f.leases.SetResults(cctx, ids, rs)
			cancel()
		}
	}
}

// bookOne takes a command other than a cancel (at most once), carries it
// out here if the task is still here, and stores its result (10 s for all
// of it, as each command had before).
func (f *Fleet) bookOne(ctx context.Context, c cmdMessage) {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if ok, err := f.leases.TakeCommand(cctx, c.ID); err == nil && ok {
		res := c.Result
		if res == nil && f.fenced.attempt(c.TaskID) != 0 {
			r := f.exec(cctx, command{ID: c.ID, TaskID: c.TaskID, Kind: c.Kind, Args: c.Args})
			res = &r
		}
		if res != nil {
			_ = f.leases.SetResult(cctx, c.ID, *res)
		}
	}
}

// runCommands carries out the open commands of the given tasks that this
// replica holds: interject and approve at most once (taken first); a
// cancel until the task is being stopped here, its row left open until
// the task's end is stored (see cmdBookLoop).
func (f *Fleet) runCommands(ctx context.Context, ids []string) {
	cmds, err := f.leases.OpenCommands(ctx, ids)
	if err != nil {
		return
	}
	for _, c := range cmds {
		if f.fenced.attempt(c.TaskID) == 0 {
			continue
		}
		t := f.mgr.Registry().Get(c.TaskID)
		if t == nil || t.IsView() || t.HandedBack() {
			// Owned but not here yet (a takeover between its claim and
			// its adoption), or being handed back to the queue: the
			// command waits for the next round or the next owner, else a
			// cancel would be answered "not found" and lost while the
			// takeover requeues the task (or sent through the fleet again
			// by the handed-back copy, for ever while it is owned here).
			continue
		}
		if c.Kind == "cancel" {
			// Never taken: the row stays open until the task's end is
			// stored (CloseEnded), for the task's next owner if this
			// replica stops first. Carried out unless the task ended here
			// (its end maybe not stored yet) or a cancel is under way.
			if _, asked := t.CancelRequested(); !asked && !task.Terminal(t.Status()) {
				_ = f.leases.SetResult(ctx, c.ID, f.exec(ctx, c))
			}
			continue
		}
		if ok, err := f.leases.TakeCommand(ctx, c.ID); err != nil || !ok {
			continue
		}
		res := f.exec(ctx, c)
		_ = f.leases.SetResult(ctx, c.ID, res)
	}
}

// exec carries out one command on the local task.
func (f *Fleet) exec(ctx context.Context, c command) cmdResult {
	var res cmdResult
	var err error
	switch c.Kind {
	case "cancel":
		_, err = f.mgr.Cancel(ctx, c.TaskID, c.Args.Reason, false)
	case "interject":
		res.MessageID, res.Seq, err = f.mgr.Interject(ctx, c.TaskID, c.Args.Text)
	case "approve":
		var oc dispatchv1.HoldOutcome
		oc, res.Seq, err = f.mgr.ApproveToolCall(c.TaskID, c.Args.CallID, c.Args.Approve, c.Args.Reason)
		res.Outcome = int32(oc)
	default:
		err = fmt.Errorf("%w: unknown command %q", task.ErrInvalidArgument, c.Kind)
	}
	if err != nil {
		res.Err, res.ErrKind = err.Error(), errKind(err)
	}
	return res
}

// errKind names err's class for the replica that sent the command.
func errKind(err error) string {
	switch {
	case errors.Is(err, task.ErrNotRunning):
		return "not_running"
	case errors.Is(err, task.ErrNotFound):
		return "not_found"
	case errors.Is(err, task.ErrInvalidArgument):
		return "invalid"
	case errors.Is(err, store.ErrUnavailable):
		return "unavailable"
	}
	return "internal"
}

// kindErr is the inverse of errKind: the error the other replica
// returned, its text as it was (it already says what its class is: a
// prefix here would repeat it, or name the task not found when only its
// held call was), and its class for errors.Is.
func kindErr(kind, msg string) error {
	switch kind {
	case "not_running":
		return remoteErr{msg, task.ErrNotRunning}
	case "not_found":
		return remoteErr{msg, task.ErrNotFound}
	case "invalid":
		return remoteErr{msg, task.ErrInvalidArgument}
	case "unavailable":
		return remoteErr{msg, store.ErrUnavailable}
	}
	return errors.New(msg)
}

// remoteErr is an error another replica returned for a command.
type remoteErr struct {
	msg   string
	class error
}

func (e remoteErr) Error() string { return e.msg }
func (e remoteErr) Unwrap() error { return e.class }

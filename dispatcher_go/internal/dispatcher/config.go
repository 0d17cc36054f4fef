package dispatcher

import (
	"errors"
	"log/slog"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Defaults. Every default of the dispatcher is written here and nowhere
// else: New puts them in the zero fields of a Config, and the flags of
// cmd/dispatcher show them. The components (task.Manager, session.Server)
// get every value passed explicitly and apply none of these themselves.
const (
	// DefaultVersion is the version reported when none is set.
	DefaultVersion = "dev"
	// DefaultQueueSize bounds the pending-task queue.
	DefaultQueueSize = 1024
	// DefaultMaxTasksKept bounds the finished tasks kept in memory (the
	// task registry's own bound).
	DefaultMaxTasksKept = task.DefaultMaxTasksKept
	// DefaultPlanner runs the tasks that name no planner.
	DefaultPlanner = "chat"
	// DefaultStopGrace is how long a stopped session may take to ack
	// before its stream is aborted (and a cancel gives up waiting).
	DefaultStopGrace = 2 * time.Second
	// DefaultQueueTimeout is how long a pending task may wait while no
	// connected commander can run it (its planner or capabilities) before
	// it ends FAILURE with that reason.
	DefaultQueueTimeout = 5 * time.Minute
	// DefaultToolTimeout is the timeout of a tool call that sets none.
	DefaultToolTimeout = 30 * time.Second
	// DefaultHelloTimeout is how long a commander's ChatStream, or a tool
	// provider's Connect stream, may stay open without its hello before it
	// is ended (DEADLINE_EXCEEDED). Both send their hello as soon as the
	// stream opens; the margin is for a process starting under load.
	DefaultHelloTimeout = 30 * time.Second
	// DefaultMaxRecvMsgBytes is the largest message accepted.
	DefaultMaxRecvMsgBytes = 4 << 20
	// DefaultStreamWindow is the fixed HTTP/2 receive window of a stream;
	// the connection's is 8 times it. grpc-go ignores values under 64 KiB.
	DefaultStreamWindow = 128 << 10
	// DefaultPolicyPoll is how often the policy file is checked for changes.
	DefaultPolicyPoll = time.Second
	// DefaultFlushInterval paces the store writes
	// (store.WriterOptions.Interval): up to store's burst of writes back to
	// back, then one per interval on average; an idle writer writes an
	// event at once. 0 (a write as soon as the previous one ended) cost
	// 35-95 % more dispatcher CPU per event at 200 sessions × 20 events/s,
	// each write having a fixed cost (with one write at a time, SQLite,
	// DefaultPaceFrom now writes such a rate unpaced: see there). With the write journal (a write of
	// short runs ~25 µs of CPU), 1 ms against 2 ms in interleaved runs:
	// one streaming session's relay p50 0.48-0.54 vs 1.63 ms (byclaw-peer),
	// relay-64 p99 3.8-4.2 vs 4.9-6.3 ms, the stop scenario's decision →
	// stopped p99 1.8-1.9 vs 1.4-1.5 ms (docs/benchmarks.md, issue 16).
	DefaultFlushInterval = time.Millisecond
	// DefaultPaceFrom applies the flush interval only under load
	// (store.WriterOptions.PaceFrom): from 6 records per interval (6 000
	// a second at 1 ms) on average, and only with one write at a time
	// (SQLite; PostgreSQL's writes in flight keep the interval always, or
	// an unpaced writer starts a write for nearly every event). Below, a
	// write starts as soon as the previous one ended: a sub-millisecond
	// pacing wait lasted about a millisecond (Go's timers), and relay-64
	// (3 200 events/s) waited for it at p50 and p99; a flood (the
	// throughput scenario) is still written once per interval. The trade
	// is the CPU cost of interval 0 above, below 6 per interval: relay-64's
	// dispatcher CPU per packet about 1.19x with it, the throughput row
	// unchanged. 6 lies between relay-200's 4 000 events/s and the live
	// row's 9 000 (one stream, rest-vs-grpc pinned): at 8, near that rate,
	// the live row's CPU per event was 1.16 and 1.43x in two pairs; at 6
	// its writes are paced as before.
	DefaultPaceFrom = 6

	// The two below are not applied by New, where zero means something
	// else; they are cmd/dispatcher's defaults for the matching flags.

	// DefaultRetention is the --retention default (in Config, 0 keeps
	// finished tasks forever).
	DefaultRetention = 7 * 24 * time.Hour
	// DefaultHandOverWindow is how long, after a restart, a task that was
	// RUNNING waits for its session to re-attach before it ends FAILURE
	// (with a store only; docs/protocol.md, "Session hand-over").
	DefaultHandOverWindow = 15 * time.Second
	// DefaultLinkLossWindow is how long a running session whose
	// commander's stream broke (network cut, reset, keepalive, a dead
	// commander) waits for the commander to re-attach it before its task
	// ends FAILURE (with hand-over only). Shorter than the restart window:
	// it is also how much later a task of a commander that died fails.
	DefaultLinkLossWindow = 10 * time.Second

	// DefaultDrainTimeout is the --drain-timeout default: how long running
	// tasks may finish on SIGTERM before Drain stops them (Drain itself
	// takes a context).
	DefaultDrainTimeout = 15 * time.Second
)

// DefaultKeepalive are the documented keepalive defaults: a dead peer is
// noticed within Time+Timeout = 7 s of silence (docs/operations.md).
// MinTime is 3 s, well under the commander's 6 s pings: a ping that comes
// early (a loaded commander, timer slack) is not counted as too many.
var DefaultKeepalive = Keepalive{Time: 5 * time.Second, Timeout: 2 * time.Second, MinTime: 3 * time.Second}

// DefaultEventLimits bound each task's event log (eventlog's figures).
var DefaultEventLimits = eventlog.DefaultLimits

// Config configures a dispatcher. The zero value is a working in-memory
// dispatcher with the defaults above; a zero field means its default.
type Config struct {
	// Version is reported by GetAgentInfo (DefaultVersion).
	Version string
	// LogLevel is reported by GetAgentInfo.
	LogLevel string
	// Auth holds the bearer tokens the transports require.
	Auth Auth
	// GRPC holds the gRPC transport's settings (internal/api turns them
	// into grpc.ServerOptions).
	GRPC GRPC
	// Limits bound the queue and what is kept in memory.
	Limits Limits
	// Tasks says how tasks run.
	Tasks Tasks
	// Policy is the global policy file.
	Policy Policy
	// Store makes the dispatcher durable.
	Store Store
	// MCP lists the MCP servers whose tools the broker serves.
	MCP MCP
	// Fleet, with a RedisURL, makes the dispatcher one replica of a fleet
	// (package fleet); it needs the PostgreSQL store.
	Fleet Fleet
	// Logger receives all logs; nil discards.
	Logger *slog.Logger
	// OnEvent, when set, is called with every event recorded on a task of
	// this run (after its seq is set; it must not modify it, and must be
	// quick: it runs on the recording path). Metrics use it.
	OnEvent func(*dispatchv1.TaskEvent)
}

// Auth holds the bearer tokens; an empty one means no auth for its side.
type Auth struct {
	// CommanderToken, when set, is required (Bearer) by commanders and
	// tool providers (AgentInteraction, ToolProviderService).
	CommanderToken string
	// ClientToken, when set, is required (Bearer) by clients (Agent,
	// TaskService, the HTTP API). It is the default tenant's token: the
	// one-tenant case.
	ClientToken string
	// AdminToken, when set, is a client token that sees and acts on every
	// tenant's tasks.
	AdminToken string
	// TenantsFile maps tenants to the SHA-256 hashes of their client (and
	// optionally commander) tokens (internal/tenant has the format); it is
	// reloaded when it changes. "" none.
	TenantsFile string
	// TenantsPoll is how often TenantsFile is checked for changes
	// (DefaultPolicyPoll).
	TenantsPoll time.Duration
}

// validate refuses one token for both sides: every client could then also
// serve as a commander and receive every task's config.
func (a Auth) validate() error {
	if a.ClientToken != "" && a.ClientToken == a.CommanderToken {
		return errors.New("dispatcher: the client and commander tokens must differ")
	}
	if a.AdminToken != "" && (a.AdminToken == a.CommanderToken || a.AdminToken == a.ClientToken) {
		return errors.New("dispatcher: the admin token must differ from the client and commander tokens")
	}
	return nil
}

// GRPC holds the gRPC server's transport settings.
type GRPC struct {
	// MaxRecvMsgBytes is grpc's MaxRecvMsgSize (DefaultMaxRecvMsgBytes).
	MaxRecvMsgBytes int
	// StreamWindowBytes fixes each stream's HTTP/2 receive window (0:
	// DefaultStreamWindow; negative: grpc-go's dynamic BDP window). It
	// bounds how much of a commander's own output can queue ahead of its
	// stopped (docs/benchmarks.md, stop-flood).
	StreamWindowBytes int
	// Keepalive settings (all zero: DefaultKeepalive).
	Keepalive Keepalive
}

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

// Limits bound the queue and memory.
type Limits struct {
	// QueueSize bounds the pending-task queue (DefaultQueueSize).
	QueueSize int
	// MaxTasksKept bounds finished tasks kept in memory
	// (DefaultMaxTasksKept).
	MaxTasksKept int
	// Events bound each task's event log (all zero: DefaultEventLimits).
	Events eventlog.Limits
}

// Tasks says how tasks run.
type Tasks struct {
	// DefaultPlanner runs tasks that name none (DefaultPlanner).
	DefaultPlanner string
	// Planners, when set, are the only planner names tasks may use; others
	// are refused at submit (INVALID_ARGUMENT). Empty: any name.
	Planners []string
	// QueueTimeout ends FAILURE a pending task that no connected commander
	// could run for this long (DefaultQueueTimeout; negative: never).
	QueueTimeout time.Duration
	// StopGrace is how long a stopped session may take to ack
	// (DefaultStopGrace).
	StopGrace time.Duration
	// ToolTimeout is the default per-call tool timeout (DefaultToolTimeout).
	ToolTimeout time.Duration
	// HelloTimeout ends a ChatStream, and a tool provider's Connect
	// stream, that sent no hello this long after it opened
	// (DefaultHelloTimeout; negative: never).
	HelloTimeout time.Duration
	// GlobalConfig is the initial global CommonConfig (nil: empty).
	GlobalConfig *agentpb.CommonConfig
	// HandOverWindow (with a store) is how long after a restart a task
	// that was RUNNING waits for its session to re-attach
	// (DefaultHandOverWindow; negative: no hand-over — such tasks are
	// FAILURE at the restart, and a drain stops running tasks instead of
	// telling their commanders to move).
	HandOverWindow time.Duration
	// LinkLossWindow (with hand-over) is how long a running session whose
	// commander's stream broke waits for the commander to re-attach it
	// (DefaultLinkLossWindow; negative: none — the task ends FAILURE with
	// the stream, "commander connection lost: …").
	LinkLossWindow time.Duration
	// Claimer takes a task when its session re-attaches (nil: the store's
	// single-node claim, see taskstore.Store.Claim).
	Claimer task.Claimer
}

// Policy is the global policy.
type Policy struct {
	// File is the YAML policy file (docs/policies.md); empty means no
	// global policy. It must load at start; later changes are reloaded (a
	// bad version is rejected and the one in force stays).
	File string
	// Poll is how often File is checked for changes (DefaultPolicyPoll).
	Poll time.Duration
}

// MCP configures the MCP servers that are tool providers (internal/mcp).
type MCP struct {
	// ServersFile is the MCP servers file (internal/mcp.Config); empty:
	// none. It must load at start; later changes are reloaded (a bad
	// version is logged and the servers in force stay).
	ServersFile string
	// Poll is how often ServersFile is checked (DefaultPolicyPoll).
	Poll time.Duration
}

// Store makes tasks, events and the global config durable.
type Store struct {
	// Backend, when set, is the store (the caller opens it and closes it
	// after Drain or Close); New then restores the previous run's state.
	// Nil keeps everything in memory, and the fields below are unused.
	Backend store.Store
	// SecretKey encrypts stored secrets (see task.Persistence); empty:
	// secrets are not stored.
	SecretKey []byte
	// Retention removes tasks (and their events) that ended longer ago
	// than this; 0 keeps them forever.
	Retention time.Duration
	// FlushInterval paces the store writer (DefaultFlushInterval;
	// negative: no pacing, a write starts as soon as the previous one
	// ended — the --event-flush-interval flag's 0).
	FlushInterval time.Duration
}

// Fleet joins the dispatcher to a fleet of replicas sharing PostgreSQL (the
// store) and Redis (the bus). Zero durations take fleet's defaults.
type Fleet struct {
	// RedisURL is the bus; empty: single node (the default).
	RedisURL string
	// ReplicaID names this replica (default: hostname plus random digits).
	ReplicaID string
	// Lease is a task lease's length (fleet.DefaultLease); Grace how long
	// past its expiry it is left for a hand-over before another replica
	// takes the task over (fleet.DefaultGrace); ReclaimIdle how long a bus
	// entry may stay unacknowledged (fleet.DefaultReclaimIdle);
	// MaxReadFailures how many claims of a task may fail to read it before
	// the next ends it FAILURE (fleet.DefaultMaxReadFailures).
	Lease           time.Duration
	Grace           time.Duration
	ReclaimIdle     time.Duration
	MaxReadFailures int
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	if c.Version == "" {
		c.Version = DefaultVersion
	}
	if c.GRPC.MaxRecvMsgBytes <= 0 {
		c.GRPC.MaxRecvMsgBytes = DefaultMaxRecvMsgBytes
	}
	if c.GRPC.StreamWindowBytes == 0 {
		c.GRPC.StreamWindowBytes = DefaultStreamWindow
	}
	if c.GRPC.Keepalive == (Keepalive{}) {
		c.GRPC.Keepalive = DefaultKeepalive
	}
	if c.Limits.QueueSize <= 0 {
		c.Limits.QueueSize = DefaultQueueSize
	}
	if c.Limits.MaxTasksKept <= 0 {
		c.Limits.MaxTasksKept = DefaultMaxTasksKept
	}
	if c.Limits.Events == (eventlog.Limits{}) {
		c.Limits.Events = DefaultEventLimits
	}
	if c.Tasks.DefaultPlanner == "" {
		c.Tasks.DefaultPlanner = DefaultPlanner
	}
	if c.Tasks.QueueTimeout == 0 {
		c.Tasks.QueueTimeout = DefaultQueueTimeout
	}
	if c.Tasks.StopGrace <= 0 {
		c.Tasks.StopGrace = DefaultStopGrace
	}
	if c.Tasks.HandOverWindow == 0 {
		c.Tasks.HandOverWindow = DefaultHandOverWindow
	}
	if c.Tasks.LinkLossWindow == 0 {
		c.Tasks.LinkLossWindow = DefaultLinkLossWindow
	}
	if c.Tasks.ToolTimeout <= 0 {
		c.Tasks.ToolTimeout = DefaultToolTimeout
	}
	if c.Tasks.HelloTimeout == 0 {
		c.Tasks.HelloTimeout = DefaultHelloTimeout
	}
	if c.Policy.Poll <= 0 {
		c.Policy.Poll = DefaultPolicyPoll
	}
	if c.Auth.TenantsPoll <= 0 {
		c.Auth.TenantsPoll = DefaultPolicyPoll
	}
	if c.Store.FlushInterval == 0 {
		c.Store.FlushInterval = DefaultFlushInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

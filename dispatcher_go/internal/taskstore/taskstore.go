// Package taskstore keeps tasks across restarts: it owns the one codec of a
// stored task (a task.Snapshot to and from a store.TaskRecord, with its
// config's secrets stripped and, while the task may still run, sealed), the
// stored global config, the reading back of the previous run after a
// restart (Recover: which tasks are queued again, which failed, which had
// ended), the paging over finished tasks in the store for List, and the
// retention that deletes old tasks (RunRetention).
//
// Dependency direction: taskstore imports task, never the reverse. The
// task model declares what it needs from storage (task.Persistence) and
// hands over plain snapshots; Store implements that interface. So the state
// machine can be read and tested without any storage, and the storage code
// sees tasks only as task.Snapshot values, never their locks or logs.
//
// It must not hold tasks in memory, open or wrap event logs (the Manager
// reopens them through its own event-log store, so that restored tasks are
// observed like new ones), schedule tasks, or decide what clients see of a
// secret (package secret masks; here secrets are only stripped or sealed).
package taskstore

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Options configure a Store.
type Options struct {
	// Store is where tasks, events and configs are kept.
	Store store.Store
	// Writer batches writes to Store (the same Writer the event logs
	// persist through); the caller closes it after the Manager's Shutdown.
	Writer *store.Writer
	// SecretKey, when set, encrypts (AES-256-GCM, key = SHA-256 of it) the
	// secrets that pending and running tasks and the global config need
	// after a restart; without it they are not stored at all.
	SecretKey []byte
	// KeepRunning makes Recover hand back the tasks that were RUNNING
	// (task.Recovered.Running), for their sessions to re-attach, instead of
	// ending them FAILURE (RestartFailureMessage).
	KeepRunning bool
	// Logger receives what could not be read or written; nil discards.
	Logger *slog.Logger
}

// Store is a task.Persistence over a store.Store. Secrets never reach the
// store in plain text: a stored config has every secret field emptied and,
// while its task may still run (it needs them), a copy sealed with the
// secret key, if one is configured.
type Store struct {
	st     store.Store
	w      *store.Writer
	sealer *secret.Sealer // nil: secrets are dropped, not kept
	log    *slog.Logger
	keep   bool // Options.KeepRunning
	// evicted counts finished tasks dropped from memory; listFlushed is
	// its value when ListFinished last made the store catch up.
	evicted, listFlushed atomic.Uint64
}

var _ task.Persistence = (*Store)(nil)

// New returns a Store on opts.Store, writing through opts.Writer.
func New(opts Options) (*Store, error) {
	sealer, err := secret.NewSealer(opts.SecretKey)
	if err != nil {
		return nil, err
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Store{st: opts.Store, w: opts.Writer, sealer: sealer, log: opts.Logger, keep: opts.KeepRunning}, nil
}

// Save implements task.Persistence: the record is queued on the Writer.
func (s *Store) Save(snap *task.Snapshot) {
	s.w.SaveTask(s.encode(snap))
}

// Flush implements task.Persistence.
func (s *Store) Flush(ctx context.Context) error {
	return s.w.Flush(ctx)
}

// FlushWhileHealthy implements task.Persistence.
func (s *Store) FlushWhileHealthy(ctx context.Context) error {
	return s.w.FlushWhileHealthy(ctx)
}

// Health implements task.Persistence.
func (s *Store) Health() error { return s.w.Health() }

// Evicted implements task.Persistence.
func (s *Store) Evicted() {
	s.evicted.Add(1)
}

// SaveConfig implements task.Persistence: the global config is written at
// once (its changes are rare and each is acknowledged to the client).
func (s *Store) SaveConfig(c *agentpb.CommonConfig) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.st.PutConfig(ctx, task.GlobalConfigID, s.encodeConfig(c)); err != nil {
		s.log.Error("global config not stored", "error", err)
	}
}

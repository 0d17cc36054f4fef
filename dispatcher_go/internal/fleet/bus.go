package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/store"
)

// Redis keys. Everything in Redis can be lost: PostgreSQL is the truth and
// the bus is rebuilt from it (see Fleet.reconcile).
const (
	// queuesKey is the set of queue streams (one per capability set).
	queuesKey = "fleet:queues"
	// queuePrefix + a queue name is a queue stream: one entry per task
	// waiting for a slot with those capabilities.
	queuePrefix = "fleet:q:"
	// eventsPrefix + a task id is the task's event stream: entry id
	// "<seq>-0", field "e" the serialized TaskEvent, trimmed to
	// eventsMaxLen (watchers fill a gap from PostgreSQL).
	eventsPrefix = "fleet:ev:"
	// group is the consumer group of every queue stream; each replica is a
	// consumer named by its id.
	group = "dispatchers"
	// cmdChannel carries task ids that have a new command (the command
	// itself is a row in PostgreSQL).
	cmdChannel = "fleet:cmd"
	// replicasKey is the set of replica ids; replicaPrefix + id is a
	// replica's slot summary, with a TTL.
	replicasKey   = "fleet:replicas"
	replicaPrefix = "fleet:replica:"
	// epochKey marks this Redis's contents: when it is gone, Redis lost
	// its data and the bus is rebuilt.
	epochKey = "fleet:epoch"
)

// Bounds of the streams (approximate trimming, MAXLEN ~).
const (
	queueMaxLen  = 100_000
	eventsMaxLen = 4096
	// eventsTTL is how long a task's event stream lives after its last
	// event.
	eventsTTL = time.Hour
)

// queueName is the name of the queue of tasks of planner that require
// required: "planner:<p>" then each required capability, sorted, joined
// by "|".
func queueName(planner string, required []string) string {
	caps := slices.Clone(required)
	slices.Sort(caps)
	caps = slices.Compact(caps)
	return strings.Join(append([]string{scheduler.PlannerCapability(planner)}, caps...), "|")
}

// parseQueue is the inverse of queueName; ok false for a name that is not
// one.
func parseQueue(name string) (planner string, required []string, ok bool) {
	parts := strings.Split(name, "|")
	p, found := strings.CutPrefix(parts[0], "planner:")
	if !found || p == "" {
		return "", nil, false
	}
	return p, parts[1:], true
}

// eventID is the stream entry id of event seq.
func eventID(seq uint64) string { return strconv.FormatUint(seq, 10) + "-0" }

// seqOf is the event seq of a stream entry id.
func seqOf(id string) (uint64, bool) {
	ms, _, ok := strings.Cut(id, "-")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseUint(ms, 10, 64)
	return n, err == nil
}

// errBusDown is the error of new work while Redis is unreachable.
func errBusDown(cause error) error {
	return fmt.Errorf("%w: the fleet's bus (Redis) is unreachable, so no new task is accepted until it is back (running tasks go on): %v", store.ErrUnavailable, cause)
}

// summary is a replica's slot summary in Redis.
type summary struct {
	Slots  int `json:"slots"`
	Idle   int `json:"idle"`
	Queued int `json:"queued"`
	Owned  int `json:"owned"`
	// Open counts the slots serving every tenant, Tenants the others by
	// tenant (scheduler.TenantSlots); absent in an older replica's
	// summary, whose slots then all count as open.
	Open    *int           `json:"open,omitempty"`
	Tenants map[string]int `json:"tenants,omitempty"`
}

// serving is how many of the summary's slots may run a task of tenant.
func (s summary) serving(tenant string) int {
	if s.Open == nil {
		return s.Slots
	}
	return *s.Open + s.Tenants[tenant]
}

// opTimeout bounds every Redis call (besides the blocking reads, which
// block for their own bound plus this).
const opTimeout = time.Second

// newRedis is a client whose every call is bounded; poolSize > 0 sets its
// connection pool's size (0: go-redis's default, 10 per CPU).
func newRedis(url string, poolSize int) (*redis.Client, error) {
	o, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("fleet: --fleet-redis: %w", err)
	}
	o.DialTimeout = 500 * time.Millisecond
	o.ReadTimeout = opTimeout
	o.WriteTimeout = opTimeout
	o.PoolTimeout = opTimeout
	o.MaxRetries = 1
	o.ContextTimeoutEnabled = true
	if poolSize > 0 {
		o.PoolSize = poolSize
	}
	return redis.NewClient(o), nil
}

// isNoGroup reports a read from a stream whose group is gone (Redis lost
// its data).
func isNoGroup(err error) bool { return err != nil && strings.HasPrefix(err.Error(), "NOGROUP") }

// ensureGroup creates the consumer group of a queue stream (and the
// stream), reading from its first entry.
func ensureGroup(ctx context.Context, rdb *redis.Client, key string) error {
	err := rdb.XGroupCreateMkStream(ctx, key, group, "0").Err()
	if err != nil && !strings.HasPrefix(err.Error(), "BUSYGROUP") {
		return err
	}
	return nil
}

// publishSummary stores this replica's slot summary for ttl.
func publishSummary(ctx context.Context, rdb *redis.Client, id string, s summary, ttl time.Duration) error {
	b, _ := json.Marshal(s)
	_, err := rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, replicaPrefix+id, b, ttl)
		p.SAdd(ctx, replicasKey, id)
		return nil
	})
	return err
}

// summaries reads the slot summaries of the live replicas.
func summaries(ctx context.Context, rdb *redis.Client) (map[string]summary, error) {
	ids, err := rdb.SMembers(ctx, replicasKey).Result()
	if err != nil {
		return nil, err
	}
	out := map[string]summary{}
	if len(ids) == 0 {
		return out, nil
	}
	keys := make([]string, len(ids))
	for i, id := range ids {
		keys[i] = replicaPrefix + id
	}
	vals, err := rdb.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, err
	}
	for i, v := range vals {
		s, ok := v.(string)
		if !ok {
			rdb.SRem(ctx, replicasKey, ids[i]) // expired: gone
			continue
		}
		var sm summary
		if json.Unmarshal([]byte(s), &sm) == nil {
			out[ids[i]] = sm
		}
	}
	return out, nil
}

// redisLogger sends go-redis's own messages (dial failures while Redis is
// down, at every retry) to the fleet's logger at debug level instead of
// stderr: the fleet logs the outage once (pingLoop).
type redisLogger struct{ log *slog.Logger }

func (l redisLogger) Printf(_ context.Context, format string, v ...any) {
	l.log.Debug("redis client", "message", fmt.Sprintf(format, v...))
}

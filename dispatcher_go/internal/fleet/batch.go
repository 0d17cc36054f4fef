package fleet

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/jackc/pgx/v5/pgconn"
)

// batcher runs the requests made while one batch of them is under way
// together, as the next batch (one statement for all): the concurrent
// cancels of a storm (64 CancelTask at once on one replica) each read
// their task and wrote their command row in a statement of their own,
// 128 statements (64 commits) queued for the replica's pool. A request
// alone runs at once, as before.
//
// There is no goroutine of its own: the caller that finds no batch under
// way runs the batch (its request and those queued since), then hands
// the next batch, if any, to the first caller queued for it. A batch runs
// under its runner's context without its cancellation, bounded by
// timeout, so one caller going away fails no other's request.
type batcher[Req, Res any] struct {
	run     func(ctx context.Context, reqs []Req) ([]Res, error)
	timeout time.Duration

	mu      sync.Mutex
	busy    bool
	pending []*batchCall[Req, Res]
}

type batchCall[Req, Res any] struct {
	req  Req
	res  Res
	err  error
	done chan struct{} // closed once its batch ran
	lead chan struct{} // told to run the next batch (buffered 1)
}

// do runs req in the next batch and returns its result. Nothing runs for
// a caller whose ctx ends while it is queued: it leaves the queue and is
// told ctx.Err() (so a client retrying after its deadline does not find
// its first request carried out too). A caller already taken into a
// running batch waits for it (its request may have landed).
func (b *batcher[Req, Res]) do(ctx context.Context, req Req) (Res, error) {
	var zero Res
	if err := ctx.Err(); err != nil {
		return zero, err
	}
	c := &batchCall[Req, Res]{req: req, done: make(chan struct{}), lead: make(chan struct{}, 1)}
	b.mu.Lock()
	b.pending = append(b.pending, c)
	lead := !b.busy
	b.busy = true
	b.mu.Unlock()
	if !lead {
		select {
		case <-c.done:
			return c.res, c.err
		case <-c.lead:
		case <-ctx.Done():
			b.mu.Lock()
			select {
			case <-c.lead: // handed the next batch: it runs it (without c)
				b.mu.Unlock()
			default:
				if i := slices.Index(b.pending, c); i >= 0 {
					b.pending = slices.Delete(b.pending, i, i+1)
					b.mu.Unlock()
					return zero, ctx.Err()
				}
				b.mu.Unlock()
				<-c.done // in the running batch
				return c.res, c.err
			}
		}
	}
	b.mu.Lock()
	batch := b.pending
	b.pending = nil
	b.mu.Unlock()
	if ctx.Err() != nil {
		// The leader's own deadline passed while it was queued: the others
		// run, its request does not.
		batch = slices.DeleteFunc(batch, func(m *batchCall[Req, Res]) bool { return m == c })
		c.err = ctx.Err()
	}
	b.runBatch(ctx, batch)
	return c.res, c.err
}

// errBatchPanic answers the requests of a batch whose run panicked.
var errBatchPanic = errors.New("fleet: a batch's run panicked")

// runBatch runs batch, answers its callers and hands the next batch to
// the first caller queued for it, even if run panics (the panic goes on
// up the runner's stack; the others are told errBatchPanic): a wedged
// hand-over would hang every later request of the replica.
func (b *batcher[Req, Res]) runBatch(ctx context.Context, batch []*batchCall[Req, Res]) {
	answered := false
	defer func() {
		if !answered {
			for _, m := range batch {
				m.err = errBatchPanic
				close(m.done)
			}
		}
		b.mu.Lock()
		if len(b.pending) > 0 {
			b.pending[0].lead <- struct{}{}
		} else {
			b.busy = false
		}
		b.mu.Unlock()
	}()
	if len(batch) == 0 {
		answered = true
		return
	}
	reqs := make([]Req, len(batch))
	for i, m := range batch {
		reqs[i] = m.req
	}
	res, err := b.runOnce(ctx, reqs, time.Now().Add(b.timeout))
	if err != nil && len(batch) > 1 && dataException(err) {
		// One bad element (a value PostgreSQL refuses) fails the statement
		// of the whole batch: each runs alone, so only it fails. Never on
		// a connection failure or timeout (each would wait for it again):
		// the first such error is every remaining request's, and all of
		// them together get one batch's time.
		deadline := time.Now().Add(b.timeout)
		var failed error
		for _, m := range batch {
			if failed != nil {
				m.err = failed
				continue
			}
			r, err := b.runOnce(ctx, []Req{m.req}, deadline)
			switch {
			case err == nil:
				m.res = r[0]
			case dataException(err):
				m.err = err
			default:
				m.err, failed = err, err
			}
		}
	} else {
		for i, m := range batch {
			if err != nil {
				m.err = err
			} else {
				m.res = res[i]
			}
		}
	}
	answered = true
	for _, m := range batch {
		close(m.done)
	}
}

// runOnce runs reqs as one batch under ctx without its cancellation,
// until deadline.
func (b *batcher[Req, Res]) runOnce(ctx context.Context, reqs []Req, deadline time.Time) ([]Res, error) {
	bctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), deadline)
	defer cancel()
	res, err := b.run(bctx, reqs)
	if err == nil && len(res) != len(reqs) {
		err = errors.New("fleet: a batch answered for another number of requests")
	}
	return res, err
}

// dataException reports whether err is PostgreSQL refusing a value
// (SQLSTATE class 22: a NUL byte in text or jsonb, invalid UTF-8, ...).
func dataException(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && strings.HasPrefix(pe.Code, "22")
}

// batchTimeout bounds one batch of reads or command rows.
const batchTimeout = 10 * time.Second

// holderResult is what Holder answers for one task.
type holderResult struct {
	h   holder
	err error
}

// newHolders batches Leases.Holder.
func newHolders(l *Leases) *batcher[string, holderResult] {
	return &batcher[string, holderResult]{timeout: batchTimeout,
		run: func(ctx context.Context, ids []string) ([]holderResult, error) {
			if len(ids) == 1 {
				h, err := l.Holder(ctx, ids[0])
				if err != nil && !errors.Is(err, task.ErrNotFound) {
					return nil, err
				}
				return []holderResult{{h, err}}, nil
			}
			found, err := l.Holders(ctx, ids)
			if err != nil {
				return nil, err
			}
			out := make([]holderResult, len(ids))
			for i, id := range ids {
				if h, ok := found[id]; ok {
					out[i].h = h
				} else {
					out[i].err = task.ErrNotFound
				}
			}
			return out, nil
		}}
}

// Holders is Holder for several tasks in one read: the tasks found. (A
// NUL character in a task's body, JSON "\u0000" from an instruction with
// a NUL byte, is read as U+FFFD: PostgreSQL's json refuses to extract a
// field beside it (22P05), and such a task could not be cancelled from
// another replica.)
func (l *Leases) Holders(ctx context.Context, ids []string) (map[string]holder, error) {
	rows, err := l.pool.Query(ctx, `SELECT t.id, t.status, t.ended_at, l.owner, replace(convert_from(t.body, 'UTF8'), '\u0000', '\ufffd')::json ->> 'tenant' FROM tasks t
		LEFT JOIN fleet_leases l ON l.task_id = t.id AND NOT l.released AND l.expires_at >= clock_timestamp()
		WHERE t.id = ANY($1)`, ids)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := make(map[string]holder, len(ids))
	for rows.Next() {
		var id string
		var st int32
		var ended int64
		var owner, tenant *string
		if err := rows.Scan(&id, &st, &ended, &owner, &tenant); err != nil {
			return nil, err
		}
		h := holder{Status: agentpb.TaskStatus(st), Ended: store.FromMicros(ended)}
		if owner != nil {
			h.Owner = *owner
		}
		if tenant != nil {
			h.Tenant = *tenant
		}
		out[id] = h
	}
	return out, rows.Err()
}

// newCommand is a command row to write.
type newCommand struct {
	TaskID, Kind string
	Args         cmdArgs
}

// newCommandWriter batches Leases.AddCommand.
func newCommandWriter(l *Leases) *batcher[newCommand, int64] {
	return &batcher[newCommand, int64]{timeout: batchTimeout,
		run: func(ctx context.Context, cs []newCommand) ([]int64, error) {
			if len(cs) == 1 {
				id, err := l.AddCommand(ctx, cs[0].TaskID, cs[0].Kind, cs[0].Args)
				return []int64{id}, err
			}
			return l.AddCommands(ctx, cs)
		}}
}

// AddCommands is AddCommand for several commands in one statement (one
// commit): their ids, in cs's order.
func (l *Leases) AddCommands(ctx context.Context, cs []newCommand) ([]int64, error) {
	tasks, kinds, args := make([]string, len(cs)), make([]string, len(cs)), make([]string, len(cs))
	for i, c := range cs {
		tasks[i], kinds[i], args[i] = c.TaskID, c.Kind, string(jsonbDoc(c.Args))
	}
	// The ids are drawn in the rows' order before the insert (a CTE with
	// nextval is evaluated once), so each is matched to its command.
	rows, err := l.pool.Query(ctx, `WITH v AS (
			SELECT nextval(pg_get_serial_sequence('fleet_commands', 'id')) AS id, t, k, a, n
			FROM unnest($1::text[], $2::text[], $3::text[]) WITH ORDINALITY AS u(t, k, a, n)),
		ins AS (INSERT INTO fleet_commands (id, task_id, kind, args) SELECT id, t, k, a::jsonb FROM v)
		SELECT id FROM v ORDER BY n`, tasks, kinds, args)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	ids := make([]int64, 0, len(cs))
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// holder is Leases.Holder, batched with the concurrent cancels' reads.
func (f *Fleet) holder(ctx context.Context, id string) (holder, error) {
	if f.holders == nil {
		return f.leases.Holder(ctx, id)
	}
	r, err := f.holders.do(ctx, id)
	if err != nil {
		return holder{}, err
	}
	return r.h, r.err
}

// addCommand is Leases.AddCommand, batched with the concurrent commands'
// rows.
func (f *Fleet) addCommand(ctx context.Context, id, kind string, args cmdArgs) (int64, error) {
	if f.cmdRows == nil {
		return f.leases.AddCommand(ctx, id, kind, args)
	}
	return f.cmdRows.do(ctx, newCommand{TaskID: id, Kind: kind, Args: args})
}

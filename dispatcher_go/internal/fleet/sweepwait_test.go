package fleet

import (
	"context"
	"io"
	"net"
	"net/url"
	"strconv"
	"sync"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// The sweeper takes a lease over only once it has been expired for the
// grace while its replica could reach PostgreSQL (sweepLoop): a replica
// that starts long after a lease expired (the whole fleet was down) gives
// the commanders' re-attach the grace to come first (chaos finding D9).

// lateReplicaGrace is the grace of the replica started late in these
// tests: long enough for a re-attach 1.5 s after its start to come first
// on a loaded machine, short enough for a quick test.
const lateReplicaGrace = 3 * time.Second

// startedLongAfterTheExpiry leaves a dead replica's RUNNING task with a
// lease that expired a minute ago and starts replica "late" then; it
// waits 1.5 s (the sweeper's first runs) and fails the test if the task
// ended meanwhile.
func startedLongAfterTheExpiry(t *testing.T) (*deadTask, *replica) {
	t.Helper()
	d := newDeadTask(t, true)
	d.exec(t, `UPDATE fleet_leases SET expires_at = clock_timestamp() - interval '1 minute' WHERE task_id = '%[1]s'`)
	late := startReplicaLeased(t, d.pg, d.url, "late", &testSlot{}, testLease, lateReplicaGrace, func(*Fleet) {})
	time.Sleep(1500 * time.Millisecond)
	if st, msg := storedStatus(t, late, d.id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("1.5 s after its start the replica had ended the task %s %q: it took the long-expired lease over before its grace, "+
			"before the commanders could re-attach", st, msg)
	}
	return d, late
}

func TestAReplicaStartedLongAfterALeaseExpiredLetsTheSessionReattachFirst(t *testing.T) {
	d, late := startedLongAfterTheExpiry(t)
	info, err := late.mgr.Reattach(d.ctx, d.id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return stopRunner{t: tk}
	})
	if err != nil {
		t.Fatalf("the re-attach 1.5 s after the replica's start was refused: %v", err)
	}
	if info.Attempt != 2 || late.f.fenced.attempt(d.id) != 2 {
		t.Fatalf("re-attached with attempt %d, held with %d; want 2", info.Attempt, late.f.fenced.attempt(d.id))
	}
	// Past the wait, the re-attached task is the replica's own: renewed,
	// never swept.
	time.Sleep(lateReplicaGrace)
	if st, msg := storedStatus(t, late, d.id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the re-attached task ended %s %q", st, msg)
	}
	if a := late.f.fenced.attempt(d.id); a != 2 {
		t.Fatalf("the replica holds attempt %d after the wait, want 2", a)
	}
}

// A session that re-attaches nowhere still ends FAILURE: after the wait.
func TestAReplicaStartedLongAfterALeaseExpiredEndsAnUnclaimedTaskAfterTheGrace(t *testing.T) {
	d, late := startedLongAfterTheExpiry(t)
	st, msg := d.ended(t, late, lateReplicaGrace+5*time.Second)
	if st != agentpb.TaskStatus_FAILURE {
		t.Fatalf("ended %s %q, want FAILURE", st, msg)
	}
}

// pgProxy forwards TCP connections to PostgreSQL until cut: then every
// connection through it is closed and new ones are closed at once (the
// database is down for the replicas behind it) until restore.
type pgProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func newPGProxy(t *testing.T, target string) *pgProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &pgProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.accept)
	t.Cleanup(func() {
		_ = ln.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

func (p *pgProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.down {
			p.mu.Unlock()
			_ = c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			_ = c.Close()
			continue
		}
		p.conns[c], p.conns[up] = struct{}{}, struct{}{}
		p.mu.Unlock()
		pipe := func(dst, src net.Conn) {
			_, _ = io.Copy(dst, src)
			_ = dst.Close()
			_ = src.Close()
		}
		p.wg.Go(func() { pipe(up, c) })
		p.wg.Go(func() { pipe(c, up) })
	}
}

// cut takes the database away; restore gives it back.
func (p *pgProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.down = true
	for c := range p.conns {
		_ = c.Close()
	}
	clear(p.conns)
}

func (p *pgProxy) restore() {
	p.mu.Lock()
	p.down = false
	p.mu.Unlock()
}

// openStoreVia opens a second store on base's schema (the one base's
// store uses) through proxy.
func openStoreVia(t *testing.T, base *postgres.Store, p *pgProxy) *postgres.Store {
	t.Helper()
	cfg := base.Pool().Config().ConnConfig
	u, err := url.Parse(dsn(t))
	if err != nil || u.Host == "" {
		t.Skip("POSTGRES_TEST_DSN is not a URL with a host: the outage test needs one to proxy")
	}
	u.Host = p.ln.Addr().String()
	q := u.Query()
	q.Set("search_path", cfg.RuntimeParams["search_path"])
	u.RawQuery = q.Encode()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	st, err := postgres.Open(ctx, u.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// outage runs a task on replica "owner" beside replica "other", both
// reaching PostgreSQL through a proxy with lease testLease and grace,
// and takes the database away from both for down. It returns the owner,
// the other, the task's id, the attempt the owner held and the test's
// context; the database is back when it returns.
func outage(t *testing.T, grace, down time.Duration) (*replica, *replica, string, int64, context.Context) {
	t.Helper()
	direct, url := openStore(t), redisURL(t)
	host := direct.Pool().Config().ConnConfig
	p := newPGProxy(t, net.JoinHostPort(host.Host, strconv.Itoa(int(host.Port))))
	pg := openStoreVia(t, direct, p)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	owner := startReplicaLeased(t, pg, url, "owner", &testSlot{upstream: true, stops: true}, testLease, grace, func(*Fleet) {})
	other := startReplicaLeased(t, pg, url, "other", &testSlot{}, testLease, grace, func(*Fleet) {})
	id := submitRunning(t, owner)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	first := owner.f.fenced.attempt(id)
	if first == 0 {
		t.Fatal("the owner holds no lease of the running task")
	}
	p.cut()
	cut := time.Now()
	waitFor(t, "both replicas to see the database down", down, func() bool {
		return !owner.f.dbOK.Load() && !other.f.dbOK.Load()
	})
	// What the health probe says (chaos finding D5: it said "draining").
	if got := other.f.Degraded(); len(got) != 1 || got[0] != "fleet database unreachable" {
		t.Errorf("degraded %q during the outage, want the fleet database unreachable", got)
	}
	time.Sleep(time.Until(cut.Add(down)))
	p.restore()
	// The lease expired during the outage, for longer than the grace.
	var expiredFor time.Duration
	waitFor(t, "the database back", 10*time.Second, func() bool {
		var us int64
		err := direct.Pool().QueryRow(ctx, `SELECT (EXTRACT(EPOCH FROM clock_timestamp() - expires_at) * 1e6)::bigint FROM fleet_leases WHERE task_id = $1`, id).Scan(&us)
		expiredFor = time.Duration(us) * time.Microsecond
		return err == nil
	})
	t.Logf("back: the lease expired %s ago (grace %s)", expiredFor, grace)
	return owner, other, id, first, ctx
}

// PostgreSQL down for longer than the lease, shorter than lease + grace,
// every replica and commander alive: the owner keeps its copy, renews the
// lease it still holds (nobody claimed it) once the database is back, and
// the task runs on, no re-attach needed (chaos finding D8: every running
// task ended FAILURE).
func TestADatabaseOutageLongerThanTheLeaseKeepsTheOwnersSession(t *testing.T) {
	// Lease + grace (3.9 s) well past the outage (1.8 s): the owner's
	// renewals resume before it would drop its copy, even on a loaded
	// machine.
	const grace = 3 * time.Second
	owner, _, id, first, _ := outage(t, grace, 2*testLease)
	lt := owner.mgr.Registry().Get(id)
	time.Sleep(grace + 2*time.Second) // past every sweeper's wait
	if st, msg := storedStatus(t, owner, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("after the outage the task ended %s %q", st, msg)
	}
	if a := owner.f.fenced.attempt(id); a != first || lt == nil || lt.Disowned() || owner.mgr.Registry().Get(id) != lt {
		t.Fatalf("the owner holds attempt %d (had %d) or dropped its copy", a, first)
	}
	if n := owner.f.Fenced(); n != 0 {
		t.Fatalf("%d of the owner's writes were fenced", n)
	}
}

// PostgreSQL down for longer than lease + grace: the owner drops its
// copy, the session's commander re-attaches once the database is back
// (here, to the other replica 0.5 s after) and the task runs on there:
// no sweeper took the lease over first.
func TestADatabaseOutageLongerThanLeaseAndGraceLetsTheSessionReattachAfter(t *testing.T) {
	const grace = 1500 * time.Millisecond
	_, other, id, first, ctx := outage(t, grace, testLease+grace+time.Second)
	time.Sleep(500 * time.Millisecond)
	info, err := other.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return stopRunner{t: tk}
	})
	if err != nil {
		st, msg := storedStatus(t, other, id)
		t.Fatalf("the re-attach 0.5 s after the database came back was refused: %v (task %s %q)", err, st, msg)
	}
	if info.Attempt <= first {
		t.Fatalf("re-attached with attempt %d, want more than %d", info.Attempt, first)
	}
	time.Sleep(grace + 2*time.Second)
	if st, msg := storedStatus(t, other, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the re-attached task ended %s %q", st, msg)
	}
	if a := other.f.fenced.attempt(id); a != info.Attempt {
		t.Fatalf("the other replica holds attempt %d, re-attached with %d", a, info.Attempt)
	}
}

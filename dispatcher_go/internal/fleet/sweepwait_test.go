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

// The sweeper takes a lease over only once its replica has reached
// PostgreSQL for the grace + the re-attach window (sweepLoop): a replica
// that starts long after a lease expired (the whole fleet was down) gives
// the commanders' re-attach that wait to come first (chaos finding D9).

// lateReplicaGrace and testWindow make the wait of the replicas in these
// tests (3 s): long enough for a re-attach 1.5 s after its start to come
// first on a loaded machine, short enough for a quick test.
const (
	lateReplicaGrace = 1500 * time.Millisecond
	testWindow       = 1500 * time.Millisecond
	testWait         = lateReplicaGrace + testWindow
)

// shortWindow gives a replica the tests' re-attach window.
func shortWindow(f *Fleet) { f.reattachWindow = testWindow }

// startedLongAfterTheExpiry leaves a dead replica's RUNNING task with a
// lease that expired a minute ago and starts replica "late" then; it
// waits 1.5 s (the sweeper's first runs) and fails the test if the task
// ended meanwhile.
func startedLongAfterTheExpiry(t *testing.T) (*deadTask, *replica) {
	t.Helper()
	d := newDeadTask(t, true)
	d.exec(t, `UPDATE fleet_leases SET expires_at = clock_timestamp() - interval '1 minute' WHERE task_id = '%[1]s'`)
	late := startReplicaLeased(t, d.pg, d.url, "late", &testSlot{}, testLease, lateReplicaGrace, shortWindow)
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
	time.Sleep(testWait)
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
	st, msg := d.ended(t, late, testWait+5*time.Second)
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
	owner := startReplicaLeased(t, pg, url, "owner", &testSlot{upstream: true, stops: true}, testLease, grace, shortWindow)
	other := startReplicaLeased(t, pg, url, "other", &testSlot{}, testLease, grace, shortWindow)
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
	// Room for a loaded machine under -race: two failed pings each.
	waitFor(t, "both replicas to see the database down", down+10*time.Second, func() bool {
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

// PostgreSQL down for longer than lease + grace: the owner drops its
// copy, the session's commander re-attaches once the database is back
// (here, to the other replica 2 s after, 1 s before the end of its wait)
// and the task runs on there: no sweeper took the lease over first.
func TestADatabaseOutageLongerThanLeaseAndGraceLetsTheSessionReattachAfter(t *testing.T) {
	const grace = lateReplicaGrace
	_, other, id, first, ctx := outage(t, grace, testLease+grace+time.Second)
	time.Sleep(2 * time.Second)
	info, err := other.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return stopRunner{t: tk}
	})
	if err != nil {
		st, msg := storedStatus(t, other, id)
		t.Fatalf("the re-attach 2 s after the database came back (wait %s) was refused: %v (task %s %q)", testWait, err, st, msg)
	}
	if info.Attempt <= first {
		t.Fatalf("re-attached with attempt %d, want more than %d", info.Attempt, first)
	}
	time.Sleep(testWait + time.Second)
	if st, msg := storedStatus(t, other, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the re-attached task ended %s %q", st, msg)
	}
	if a := other.f.fenced.attempt(id); a != info.Attempt {
		t.Fatalf("the other replica holds attempt %d, re-attached with %d", a, info.Attempt)
	}
}

// PostgreSQL cut from the owner alone (a partition), the other replica
// healthy: the owner drops its copy when its lease runs out, a grace
// before the other's sweeper may end the task, and the session's
// commander re-attaches to the other meanwhile: the task runs on. Lease
// and grace are the defaults' ratio (10 s : 5 s), shortened.
func TestAReplicaCutFromTheDatabaseAloneLeavesItsSessionsToReattachElsewhere(t *testing.T) {
	const lease, grace = 3 * time.Second, 1500 * time.Millisecond
	direct, url := openStore(t), redisURL(t)
	host := direct.Pool().Config().ConnConfig
	p := newPGProxy(t, net.JoinHostPort(host.Host, strconv.Itoa(int(host.Port))))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	noWindow := func(f *Fleet) { f.reattachWindow = 0 } // the other is long up: no wait
	owner := startReplicaLeased(t, openStoreVia(t, direct, p), url, "owner", &testSlot{upstream: true, stops: true}, lease, grace, noWindow)
	other := startReplicaLeased(t, direct, url, "other", &testSlot{}, lease, grace, noWindow)
	id := submitRunning(t, owner)
	if err := owner.w.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	first := owner.f.fenced.attempt(id)
	if first == 0 {
		t.Fatal("the owner holds no lease of the running task")
	}
	time.Sleep(grace) // past the other's wait since its start
	p.cut()
	cut := time.Now()
	waitFor(t, "the owner to drop its copy", lease+grace+5*time.Second, func() bool {
		return owner.f.fenced.attempt(id) == 0
	})
	dropped := time.Since(cut)
	t.Logf("the owner dropped its copy %s after the cut (lease %s, grace %s)", dropped, lease, grace)
	// The commander finds its stream ended and re-attaches elsewhere.
	time.Sleep(500 * time.Millisecond)
	info, err := other.mgr.Reattach(ctx, id, "session-1", "commander", nil, func(tk *task.Task) task.Runner {
		return stopRunner{t: tk}
	})
	if err != nil {
		st, msg := storedStatus(t, other, id)
		t.Fatalf("the re-attach 0.5 s after the owner dropped its copy (%s after the cut) was refused: %v (task %s %q)", dropped, err, st, msg)
	}
	if info.Attempt <= first {
		t.Fatalf("re-attached with attempt %d, want more than %d", info.Attempt, first)
	}
	time.Sleep(lease + grace)
	if st, msg := storedStatus(t, other, id); st != agentpb.TaskStatus_RUNNING {
		t.Fatalf("the re-attached task ended %s %q", st, msg)
	}
	if a := other.f.fenced.attempt(id); a != info.Attempt {
		t.Fatalf("the other replica holds attempt %d, re-attached with %d", a, info.Attempt)
	}
}

// blip closes every connection through the proxy and refuses new ones
// for d.
func (p *pgProxy) blip(d time.Duration) {
	p.cut()
	time.Sleep(d)
	p.restore()
}

// PostgreSQL's connections closed for 50 ms every 2.5 s (a flapping
// network, a proxy restarting): no real outage (dbOK stays up), so the
// sweeper's wait is not restarted and a dead replica's task still ends
// FAILURE soon after the wait.
func TestAFlappingDatabaseDoesNotKeepADeadReplicasTaskRunning(t *testing.T) {
	d := newDeadTask(t, true)
	d.exec(t, `UPDATE fleet_leases SET expires_at = clock_timestamp() - interval '1 minute' WHERE task_id = '%[1]s'`)
	host := d.pg.Pool().Config().ConnConfig
	p := newPGProxy(t, net.JoinHostPort(host.Host, strconv.Itoa(int(host.Port))))
	pg := openStoreVia(t, d.pg, p)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(2500 * time.Millisecond):
				p.blip(50 * time.Millisecond)
			}
		}
	})
	t.Cleanup(func() { close(stop); wg.Wait() })
	// A grace longer than the blips' period: any failure restarting the
	// wait would starve it.
	const grace = 3 * time.Second
	started := time.Now()
	r := startReplicaLeased(t, pg, d.url, "flapping", &testSlot{}, testLease, grace, shortWindow)
	waitFor(t, "the dead replica's task to end", grace+testWindow+10*time.Second, func() bool {
		snap, err := r.ts.Load(d.ctx, d.id)
		return err == nil && task.Terminal(snap.Status)
	})
	st, msg := storedStatus(t, r, d.id)
	t.Logf("ended %s %q %s after the replica started (wait %s)", st, msg, time.Since(started), grace+testWindow)
	if st != agentpb.TaskStatus_FAILURE {
		t.Fatalf("ended %s %q, want FAILURE", st, msg)
	}
}

// PostgreSQL really down (two failed pings in a row) for 1.5 s every 3 s:
// each outage restarts the sweeper's wait (3 s here), which never ends;
// the cap on the deferment (2 × (lease + grace), 4.8 s here) still ends a
// dead replica's task.
func TestARepeatedDatabaseOutageDefersTheSweeperOnlyUpToTheCap(t *testing.T) {
	d := newDeadTask(t, true)
	d.exec(t, `UPDATE fleet_leases SET expires_at = clock_timestamp() - interval '1 minute' WHERE task_id = '%[1]s'`)
	host := d.pg.Pool().Config().ConnConfig
	p := newPGProxy(t, net.JoinHostPort(host.Host, strconv.Itoa(int(host.Port))))
	pg := openStoreVia(t, d.pg, p)
	r := startReplicaLeased(t, pg, d.url, "flapping", &testSlot{}, testLease, lateReplicaGrace, shortWindow)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var outages, downs int
	wg.Go(func() { // counts the outages the replica saw (dbOK down)
		was := true
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
				if ok := r.f.dbOK.Load(); ok != was {
					was = ok
					if !ok {
						downs++
					}
				}
			}
		}
	})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(1500 * time.Millisecond):
				p.blip(1500 * time.Millisecond)
				outages++
			}
		}
	})
	started := time.Now()
	var st agentpb.TaskStatus
	waitFor(t, "the dead replica's task to end", 30*time.Second, func() bool {
		// Read directly: the replica's own store is cut half the time.
		var n int32
		if err := d.pg.Pool().QueryRow(d.ctx, `SELECT status FROM tasks WHERE id = $1`, d.id).Scan(&n); err != nil {
			t.Fatal(err)
		}
		st = agentpb.TaskStatus(n)
		return task.Terminal(st)
	})
	took := time.Since(started)
	close(stop)
	wg.Wait()
	t.Logf("ended %s %s after the replica started, after %d outages (%d seen down)", st, took, outages, downs)
	if st != agentpb.TaskStatus_FAILURE {
		t.Fatalf("ended %s, want FAILURE", st)
	}
	if downs < 2 {
		t.Fatalf("the replica saw the database down %d times: the test did not restart its wait", downs)
	}
}

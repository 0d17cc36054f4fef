package fleet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"go.uber.org/goleak"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/postgres"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// These tests need a real PostgreSQL: `make test-fleet` starts one
// (scripts/postgres.sh) and sets POSTGRES_TEST_DSN. Without it (a plain
// `go test ./...`) they are skipped; the cross-process fleet tests
// (tests/test_fleet.py) cover Redis.
func dsn(t testing.TB) string {
	d := os.Getenv("POSTGRES_TEST_DSN")
	if d == "" {
		t.Skip("POSTGRES_TEST_DSN is not set: `make test-fleet` starts a server")
	}
	return d
}

var schemaSeq atomic.Int64

// openStore opens the postgres store in a schema of the test's own.
func openStore(t *testing.T) *postgres.Store {
	base := dsn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	schema := fmt.Sprintf("fleettest_%d_%d", os.Getpid(), schemaSeq.Add(1))
	if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE; CREATE SCHEMA `+schema); err != nil {
		t.Fatal(err)
	}
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	st, err := postgres.Open(ctx, base+sep+"search_path="+schema)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		st.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, base); err == nil {
			_, _ = c.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
			c.Close(ctx)
		}
	})
	return st
}

func putTask(t *testing.T, st store.Store, id string, status agentpb.TaskStatus) {
	t.Helper()
	err := st.Apply(context.Background(), store.Batch{Tasks: []store.TaskRecord{{ID: id, Status: int32(status), CreatedAt: time.Now(), Body: []byte("{}")}}})
	if err != nil {
		t.Fatal(err)
	}
}

func TestClaimTakesTheLeaseWithTheNextAttempt(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", agentpb.TaskStatus_PENDING)
	if err := l.Enqueue(ctx, "t1", "planner:chat"); err != nil {
		t.Fatal(err)
	}
	a, err := l.Claim(ctx, "t1", "r1")
	if err != nil || a != 1 {
		t.Fatalf("first claim: attempt %d, %v", a, err)
	}
	if qs, _ := l.Queued(ctx, 0, 10); len(qs) != 0 {
		t.Fatalf("a claimed task is still queued: %v", qs)
	}
	if _, err := l.Claim(ctx, "t1", "r2"); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("claim of a live lease: %v, want ErrLeaseHeld", err)
	}
	if err := l.Release(ctx, "t1", 1); err != nil {
		t.Fatal(err)
	}
	a, err = l.Claim(ctx, "t1", "r2")
	if err != nil || a != 2 {
		t.Fatalf("claim after release: attempt %d, %v", a, err)
	}
	// A stale release (attempt 1) leaves attempt 2's lease alone.
	if err := l.Release(ctx, "t1", 1); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Claim(ctx, "t1", "r3"); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("a stale release freed the lease: %v", err)
	}
	putTask(t, st, "done", agentpb.TaskStatus_SUCCESS)
	if _, err := l.Claim(ctx, "done", "r1"); !errors.Is(err, ErrTaskEnded) {
		t.Fatalf("claim of an ended task: %v", err)
	}
	if _, err := l.Claim(ctx, "nope", "r1"); !errors.Is(err, task.ErrNotFound) {
		t.Fatalf("claim of an unknown task: %v", err)
	}
}

func TestExpiredLeaseIsTakenOverAfterTheGrace(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", agentpb.TaskStatus_RUNNING)
	if _, err := l.Claim(ctx, "t1", "dead"); err != nil {
		t.Fatal(err)
	}
	grace := 300 * time.Millisecond
	if _, err := l.claim(ctx, "t1", "r2", grace); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("taken before expiry: %v", err)
	}
	start := time.Now()
	testutil.WaitFor(t, 5*time.Second, func() bool {
		rows, err := l.Expired(ctx, "r2", nil, grace, 10)
		return err == nil && len(rows) == 1 && rows[0].TaskID == "t1" && rows[0].Owner == "dead"
	}, "the lease shows as expired past the grace")
	if el := time.Since(start); el < 400*time.Millisecond {
		t.Fatalf("expired after %s, before lease+grace", el)
	}
	a, err := l.claim(ctx, "t1", "r2", grace)
	if err != nil || a != 2 {
		t.Fatalf("takeover: attempt %d, %v", a, err)
	}
	// The dead replica renews nothing now.
	got, err := l.Renew(ctx, "dead", []string{"t1"})
	if err != nil || len(got) != 0 {
		t.Fatalf("dead replica renewed %v (%v)", got, err)
	}
}

func TestFencedWritesOfALostLeaseAreRefused(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var fenced []string
	mk := func(replica string) *fencedStore {
		return &fencedStore{Store: st, pool: st.Pool(), replica: replica, owned: map[string]int64{},
			onFenced: func(id string, _ int64) { mu.Lock(); fenced = append(fenced, replica+":"+id); mu.Unlock() }}
	}
	r1, r2 := mk("r1"), mk("r2")
	// A new task (no lease yet) may be written by its submitter.
	if err := r1.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("a")}},
		Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_PENDING), CreatedAt: time.Now(), Body: []byte("{}")}}}); err != nil {
		t.Fatal(err)
	}
	a1, err := l.Claim(ctx, "t1", "r1")
	if err != nil {
		t.Fatal(err)
	}
	r1.own("t1", a1)
	if err := r1.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 2, Data: []byte("b"), Token: a1}}}); err != nil {
		t.Fatal(err)
	}
	// r1 loses the lease (released by a drain, here): r2 takes it.
	if err := l.Release(ctx, "t1", a1); err != nil {
		t.Fatal(err)
	}
	a2, err := l.Claim(ctx, "t1", "r2")
	if err != nil {
		t.Fatal(err)
	}
	r2.own("t1", a2)
	// r1, stale, still holds attempt 1 in memory: its writes are refused.
	if err := r1.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 3, Data: []byte("stale"), Token: a1}},
		Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_FAILURE), CreatedAt: time.Now(), Body: []byte("{}"), Token: a1}}}); err != nil {
		t.Fatal(err)
	}
	if err := r2.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 3, Data: []byte("new"), Token: a2}}}); err != nil {
		t.Fatal(err)
	}
	evs, err := st.ReadEvents(ctx, "t1", 0, 10)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range evs {
		got = append(got, string(e.Data))
	}
	if strings.Join(got, ",") != "a,b,new" {
		t.Fatalf("stored events %v, want a,b,new (the stale owner's write fenced)", got)
	}
	rec, err := st.GetTask(ctx, "t1")
	if err != nil || agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_PENDING {
		t.Fatalf("the stale owner's record reached the store: %v %v", rec.Status, err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(fenced) != 1 || fenced[0] != "r1:t1" {
		t.Fatalf("fenced reports %v, want [r1:t1]", fenced)
	}
}

// The fenced write is one pipelined batch: PostgreSQL must run it as one
// transaction, so a record it refuses leaves nothing of the batch stored
// (the writer then splits the batch and sets the record aside).
func TestFencedBatchIsAllOrNothing(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	if _, err := NewLeases(ctx, st.Pool(), time.Minute); err != nil {
		t.Fatal(err)
	}
	var written []store.Event
	fs := &fencedStore{Store: st, pool: st.Pool(), replica: "r1", owned: map[string]int64{},
		onWritten: func(evs []store.Event) { written = append(written, evs...) }}
	// body NULL violates NOT NULL: the whole batch is refused.
	err := fs.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("a")}},
		Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: nil}}})
	if !errors.Is(err, store.ErrRejected) {
		t.Fatalf("apply of a refused record: %v, want ErrRejected", err)
	}
	if evs, err := st.ReadEvents(ctx, "t1", 0, 10); err != nil || len(evs) != 0 {
		t.Fatalf("the event of a refused batch was stored: %d events, %v", len(evs), err)
	}
	if len(written) != 0 {
		t.Fatalf("a refused batch was published: %v", written)
	}
	// The same batch, valid: stored, and published once; written again
	// (a retried write) it is stored once and not published again.
	b := store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("a")}, {TaskID: "t1", Seq: 2, Data: []byte("b")}},
		Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: []byte("{}")}}}
	for range 2 {
		if err := fs.Apply(ctx, b); err != nil {
			t.Fatal(err)
		}
	}
	if evs, err := st.ReadEvents(ctx, "t1", 0, 10); err != nil || len(evs) != 2 {
		t.Fatalf("stored %d events, %v; want 2", len(evs), err)
	}
	if len(written) != 2 || written[0].Seq != 1 || written[1].Seq != 2 {
		t.Fatalf("published %v, want seqs 1 and 2 once", written)
	}
}

func TestCommandsRunOnceAndRequestIDsDedupe(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", agentpb.TaskStatus_RUNNING)
	id, err := l.AddCommand(ctx, "t1", "cancel", cmdArgs{Reason: "r"})
	if err != nil {
		t.Fatal(err)
	}
	cmds, err := l.OpenCommands(ctx, []string{"t1"})
	if err != nil || len(cmds) != 1 || cmds[0].Args.Reason != "r" {
		t.Fatalf("open commands %v %v", cmds, err)
	}
	if ok, _ := l.TakeCommand(ctx, id); !ok {
		t.Fatal("first take refused")
	}
	if ok, _ := l.TakeCommand(ctx, id); ok {
		t.Fatal("a command was taken twice")
	}
	if err := l.SetResult(ctx, id, cmdResult{Seq: 7}); err != nil {
		t.Fatal(err)
	}
	if r, ok, err := l.Result(ctx, id); err != nil || !ok || r.Seq != 7 {
		t.Fatalf("result %v %v %v", r, ok, err)
	}
	if err := l.GC(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := l.Reserve(ctx, "req-1", "a"); err != nil || got != "" {
		t.Fatalf("first reserve: %q %v", got, err)
	}
	if got, err := l.Reserve(ctx, "req-1", "b"); err != nil || got != "a" {
		t.Fatalf("duplicate reserve: %q %v, want a", got, err)
	}
	// Only the submission holding the id gives it back.
	if err := l.Unreserve(ctx, "req-1", "b"); err != nil {
		t.Fatal(err)
	}
	if got, err := l.Reserve(ctx, "req-1", "d"); err != nil || got != "a" {
		t.Fatalf("after an unreserve by a task it does not map to: %q %v, want a", got, err)
	}
	if err := l.Unreserve(ctx, "req-1", "a"); err != nil {
		t.Fatal(err)
	}
	if got, err := l.Reserve(ctx, "req-1", "d"); err != nil || got != "" {
		t.Fatalf("reserve after the unreserve: %q %v, want it free", got, err)
	}
}

func TestQueueNames(t *testing.T) {
	n := queueName("chat", []string{"gpu", "browser", "gpu"})
	if n != "planner:chat|browser|gpu" {
		t.Fatalf("queue name %q", n)
	}
	p, req, ok := parseQueue(n)
	if !ok || p != "chat" || strings.Join(req, ",") != "browser,gpu" {
		t.Fatalf("parse %q: %q %v %v", n, p, req, ok)
	}
	for _, bad := range []string{"", "chat", "planner:", "gpu|planner:chat"} {
		if _, _, ok := parseQueue(bad); ok {
			t.Fatalf("parsed %q", bad)
		}
	}
	if s, ok := seqOf(eventID(42)); !ok || s != 42 {
		t.Fatalf("seq of %q: %d", eventID(42), s)
	}
}

func TestClaimForSessionTakesALiveLeaseAndFencesTheOldOwner(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"instruction":"x","planner":"chat","sessionId":"ses-1"}`)
	if err := st.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: body}}}); err != nil {
		t.Fatal(err)
	}
	var fenced atomic.Int64
	old := &fencedStore{Store: st, pool: st.Pool(), replica: "r1", owned: map[string]int64{},
		onFenced: func(string, int64) { fenced.Add(1) }}
	a1, err := l.Claim(ctx, "t1", "r1")
	if err != nil {
		t.Fatal(err)
	}
	old.own("t1", a1)
	// A live lease (a minute left): a plain Claim is refused, the session's is not.
	if _, err := l.Claim(ctx, "t1", "r2"); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("plain claim of a live lease: %v", err)
	}
	if _, err := l.ClaimForSession(ctx, "t1", "r2", "ses-other"); !errors.Is(err, ErrNotSession) {
		t.Fatalf("claim for another session: %v, want ErrNotSession", err)
	}
	a2, err := l.ClaimForSession(ctx, "t1", "r2", "ses-1")
	if err != nil || a2 != a1+1 {
		t.Fatalf("claim for the session: attempt %d, %v; want %d", a2, err, a1+1)
	}
	// The old owner's next write is refused; its renewal no longer holds it.
	if err := old.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "t1", Seq: 1, Data: []byte("stale"), Token: a1}}}); err != nil {
		t.Fatal(err)
	}
	if evs, _ := st.ReadEvents(ctx, "t1", 0, 10); len(evs) != 0 || fenced.Load() != 1 {
		t.Fatalf("stale write stored (%d events) or not fenced (%d)", len(evs), fenced.Load())
	}
	if got, err := l.Renew(ctx, "r1", []string{"t1"}); err != nil || len(got) != 0 {
		t.Fatalf("old owner renewed %v (%v)", got, err)
	}
	if got, err := l.Renew(ctx, "r2", []string{"t1"}); err != nil || got["t1"] != a2 {
		t.Fatalf("new owner renewed %v (%v)", got, err)
	}
	// The new lease is live: the sweeper (a claim past the grace) leaves it.
	if _, err := l.claim(ctx, "t1", "r3", time.Second); !errors.Is(err, ErrLeaseHeld) {
		t.Fatalf("sweeper claim of the re-attached task: %v", err)
	}
	// Not running, ended, unknown.
	pend := []byte(`{"sessionId":"ses-p"}`)
	if err := st.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{
		{ID: "p", Status: int32(agentpb.TaskStatus_PENDING), CreatedAt: time.Now(), Body: pend},
		{ID: "d", Status: int32(agentpb.TaskStatus_SUCCESS), CreatedAt: time.Now(), Body: pend},
	}}); err != nil {
		t.Fatal(err)
	}
	if _, err := l.ClaimForSession(ctx, "p", "r2", "ses-p"); !errors.Is(err, ErrNotSession) {
		t.Fatalf("claim of a pending task: %v", err)
	}
	if _, err := l.ClaimForSession(ctx, "d", "r2", "ses-p"); !errors.Is(err, ErrTaskEnded) {
		t.Fatalf("claim of an ended task: %v", err)
	}
	if _, err := l.ClaimForSession(ctx, "nope", "r2", "ses-p"); !errors.Is(err, task.ErrNotFound) {
		t.Fatalf("claim of an unknown task: %v", err)
	}
}

// A renewal does not wait for a write under way before renewing the other
// leases (it skips the row the write holds, then renews that one alone),
// and still renews every lease.
func TestRenewDoesNotHoldLeasesBehindAWriteUnderWay(t *testing.T) {
	st := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := NewLeases(ctx, st.Pool(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	att := map[string]int64{}
	for _, id := range []string{"t1", "t2", "t3"} {
		putTask(t, st, id, agentpb.TaskStatus_RUNNING)
		a, err := l.Claim(ctx, id, "r1")
		if err != nil {
			t.Fatal(err)
		}
		att[id] = a
	}
	expires := func(id string) time.Time {
		var at time.Time
		if err := st.Pool().QueryRow(ctx, `SELECT expires_at FROM fleet_leases WHERE task_id = $1`, id).Scan(&at); err != nil {
			t.Fatal(err)
		}
		return at
	}
	before := expires("t2")
	// A write of t1 under way: its lease row locked as the fenced store does.
	w, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Rollback(context.Background()) }()
	if _, err := w.Exec(ctx, `SELECT task_id FROM fleet_leases WHERE task_id = ANY($1) FOR SHARE`, []string{"t1"}); err != nil {
		t.Fatal(err)
	}
	type renewed struct {
		got map[string]int64
		err error
	}
	done := make(chan renewed, 1)
	go func() {
		got, err := l.Renew(ctx, "r1", []string{"t1", "t2", "t3"})
		done <- renewed{got, err}
	}()
	moved := false
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !moved; {
		moved = expires("t2").After(before) && expires("t3").After(before)
		runtime.Gosched()
	}
	if !moved {
		t.Fatal("the other leases were not renewed while a write of t1 was under way")
	}
	if err := w.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	for id, a := range att {
		if r.got[id] != a {
			t.Fatalf("renewed %v, want every lease %v", r.got, att)
		}
	}
}

// A lease row of this replica's for a task it does not run (a session it
// dropped after PostgreSQL was down for a whole lease; a task of an
// earlier process with the same --replica-id, restarted after a kill -9)
// must expire and be swept: renewing every row the replica id owns kept
// such a task RUNNING forever (the chaos run saw 30 tasks stuck after a
// PostgreSQL restart until their replica was killed).
func TestRenewLeavesLeasesThisReplicaDoesNotRunToExpire(t *testing.T) {
	st := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := NewLeases(ctx, st.Pool(), 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	att := map[string]int64{}
	for _, id := range []string{"runs", "dropped"} {
		putTask(t, st, id, agentpb.TaskStatus_RUNNING)
		a, err := l.Claim(ctx, id, "r1")
		if err != nil {
			t.Fatal(err)
		}
		att[id] = a
	}
	grace := 100 * time.Millisecond
	held := []string{"runs"}
	var swept []lease
	testutil.WaitFor(t, 10*time.Second, func() bool {
		got, err := l.Renew(ctx, "r1", held)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := got["dropped"]; ok || got["runs"] != att["runs"] {
			t.Fatalf("renewed %v, want only the lease of the task r1 runs", got)
		}
		swept, err = l.Expired(ctx, "r1", held, grace, 10)
		return err == nil && len(swept) > 0
	}, "the lease of the task r1 does not run expires")
	if len(swept) != 1 || swept[0].TaskID != "dropped" || swept[0].Owner != "r1" {
		t.Fatalf("expired %+v, want only r1's row of the task it does not run", swept)
	}
	// r1 sweeps it like another replica's (the next attempt fences r1's old copy).
	a, err := l.claim(ctx, "dropped", "r1", grace)
	if err != nil || a != att["dropped"]+1 {
		t.Fatalf("sweep claim: attempt %d, %v", a, err)
	}
	// Another replica sees neither the swept row nor the row r1 renews.
	if rows, err := l.Expired(ctx, "r2", nil, grace, 10); err != nil || len(rows) != 0 {
		t.Fatalf("r2 sees expired %+v (%v)", rows, err)
	}
}

// The bus's claim of a PENDING task (ClaimQueued) and a write of the
// task's owner whose lease expired but that is alive (it starts the task:
// RUNNING) are ordered by the lease row: either the claim wins and the
// owner's write is fenced (the task stays PENDING, the claimer's), or the
// write wins and the claim is refused (ErrNotPending, the owner's lease
// untouched). Never both: the claim read the status before it took the
// lease, without a lock, so a RUNNING record committed between them was
// claimed as a PENDING task (the claimer's adopt then failed, and its
// hand-back released the lease of a RUNNING task: RUNNING for good).
func TestClaimQueuedAndAnExpiredOwnersWriteAreOrdered(t *testing.T) {
	st := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	l, err := NewLeases(ctx, st.Pool(), 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	putTask(t, st, "t1", agentpb.TaskStatus_PENDING)
	a1, err := l.Claim(ctx, "t1", "owner")
	if err != nil {
		t.Fatal(err)
	}
	owner := &fencedStore{Store: st, pool: st.Pool(), replica: "owner", owned: map[string]int64{"t1": a1}, onFenced: func(string, int64) {}}
	waitFor(t, "the owner's lease to expire", 10*time.Second, func() bool {
		ls, ok, err := l.Lease(ctx, "t1")
		return err == nil && ok && ls.Expired
	})
	written := make(chan error, 1)
	var stepped atomic.Bool
	l.claimQueuedStep = func(ctx context.Context, tx pgx.Tx) {
		if stepped.Swap(true) {
			return
		}
		var pid int
		if err := tx.QueryRow(ctx, `SELECT pg_backend_pid()`).Scan(&pid); err != nil {
			t.Error(err)
			return
		}
		// The owner starts the task now: its write goes through unless it
		// waits for this claim (then it is decided once the claim ends).
		go func() {
			written <- owner.Apply(context.Background(), store.Batch{Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: []byte("{}"), Token: a1}}})
		}()
		for {
			var blocked bool
			if err := st.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))`, pid).Scan(&blocked); err != nil {
				t.Error(err)
				return
			}
			if blocked {
				return
			}
			select {
			case err := <-written:
				written <- err
				return
			case <-time.After(5 * time.Millisecond):
			}
		}
	}
	a2, _, claimErr := l.ClaimQueued(ctx, "t1", "claimer")
	if !stepped.Load() {
		t.Fatalf("the claim's step hook did not run (claim: %v)", claimErr)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Fatalf("owner's write: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the owner's write did not end")
	}
	rec, err := st.GetTask(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	ls, _, err := l.Lease(ctx, "t1")
	if err != nil {
		t.Fatal(err)
	}
	status := agentpb.TaskStatus(rec.Status)
	switch {
	case claimErr == nil && status == agentpb.TaskStatus_PENDING && ls.Owner == "claimer" && ls.Attempt == a2:
		// The claim won; the owner's write was fenced.
	case errors.Is(claimErr, ErrNotPending) && status == agentpb.TaskStatus_RUNNING && ls.Owner == "owner" && ls.Attempt == a1:
		// The write won; nothing was claimed.
	default:
		t.Fatalf("claim: attempt %d, %v; task %s; lease %s/%d — a claimed RUNNING task or a lost write", a2, claimErr, status, ls.Owner, ls.Attempt)
	}
}

// repeatableReadLeases is Leases on a pool of st's schema whose sessions
// default to REPEATABLE READ (an operator's default_transaction_isolation).
func repeatableReadLeases(t *testing.T, ctx context.Context, st *postgres.Store) *Leases {
	t.Helper()
	var schema string
	if err := st.Pool().QueryRow(ctx, `SELECT current_schema()`).Scan(&schema); err != nil {
		t.Fatal(err)
	}
	base := dsn(t)
	sep := "?"
	if strings.Contains(base, "?") {
		sep = "&"
	}
	pool, err := pgxpool.New(ctx, base+sep+"search_path="+schema+"&default_transaction_isolation=repeatable%20read")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	var iso string
	if err := pool.QueryRow(ctx, `SHOW default_transaction_isolation`).Scan(&iso); err != nil || iso != "repeatable read" {
		t.Fatalf("default isolation %q (%v), want repeatable read", iso, err)
	}
	l, err := NewLeases(ctx, pool, 50*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// claimAfterOwnersWrite runs claim while the owner's write of task t1's
// status (in the fenced store's order: the lease row FOR SHARE, then the
// task) is under way, commits the write once the claim waits for it, and
// returns the claim's error.
func claimAfterOwnersWrite(t *testing.T, ctx context.Context, st *postgres.Store, status agentpb.TaskStatus, claim func() error) error {
	t.Helper()
	tx, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var pid int
	if err := tx.QueryRow(ctx, `SELECT pg_backend_pid() FROM fleet_leases WHERE task_id = 't1' FOR SHARE`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `UPDATE tasks SET status = $1 WHERE id = 't1'`, int32(status)); err != nil {
		t.Fatal(err)
	}
	claimed := make(chan error, 1)
	go func() { claimed <- claim() }()
	waitFor(t, "the claim to wait for the owner's write", 10*time.Second, func() bool {
		var blocked bool
		err := st.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))`, pid).Scan(&blocked)
		return err == nil && blocked
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	return <-claimed
}

// ownedTask is the set-up of the claim tests under a REPEATABLE READ
// default: a store of the test's own (st), a context that ends with the
// test (ctx), Leases on a pool whose sessions default to REPEATABLE READ
// (l, see repeatableReadLeases) and task t1, stored with status and body
// and claimed by "owner" (with attempt).
type ownedTask struct {
	st      *postgres.Store
	ctx     context.Context
	l       *Leases
	attempt int64
}

// ownedUnderRepeatableRead sets an ownedTask up; with expired it returns
// once the owner's lease expired.
func ownedUnderRepeatableRead(t *testing.T, status agentpb.TaskStatus, body string, expired bool) ownedTask {
	t.Helper()
	o := ownedTask{st: openStore(t)}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	o.ctx = ctx
	o.l = repeatableReadLeases(t, ctx, o.st)
	if err := o.st.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{{ID: "t1", Status: int32(status), CreatedAt: time.Now(), Body: []byte(body)}}}); err != nil {
		t.Fatal(err)
	}
	var err error
	if o.attempt, err = o.l.Claim(ctx, "t1", "owner"); err != nil {
		t.Fatal(err)
	}
	if expired {
		waitFor(t, "the owner's lease to expire", 10*time.Second, func() bool {
			ls, ok, err := o.l.Lease(ctx, "t1")
			return err == nil && ok && ls.Expired
		})
	}
	return o
}

// wantOwnersLease checks that t1's lease is still the owner's.
func (o ownedTask) wantOwnersLease(t *testing.T) {
	t.Helper()
	if ls, _, err := o.l.Lease(o.ctx, "t1"); err != nil || ls.Owner != "owner" {
		t.Fatalf("lease %+v (%v), want the owner's still", ls, err)
	}
}

// The bus's claim reads the task's status after it took the lease and
// needs that read to see the write it waited for (the owner's, which
// holds the lease row FOR SHARE): READ COMMITTED, whatever the server's
// default. Under an operator's default_transaction_isolation = 'repeatable
// read' the read saw the snapshot from before the wait: a RUNNING task
// was claimed as PENDING.
func TestClaimQueuedReadsCommittedUnderARepeatableReadDefault(t *testing.T) {
	o := ownedUnderRepeatableRead(t, agentpb.TaskStatus_PENDING, "{}", true)
	err := claimAfterOwnersWrite(t, o.ctx, o.st, agentpb.TaskStatus_RUNNING, func() error {
		_, _, err := o.l.ClaimQueued(o.ctx, "t1", "claimer")
		return err
	})
	if !errors.Is(err, ErrNotPending) {
		t.Fatalf("claim of a task stored RUNNING before it: %v, want ErrNotPending", err)
	}
	o.wantOwnersLease(t)
}

// The same for a session's claim (it locks the lease row, then reads the
// task): a task its owner stored PENDING (requeued) while the claim
// waited is not claimed for the session it ran.
func TestClaimForSessionReadsCommittedUnderARepeatableReadDefault(t *testing.T) {
	o := ownedUnderRepeatableRead(t, agentpb.TaskStatus_RUNNING, `{"sessionId":"ses-1"}`, false)
	err := claimAfterOwnersWrite(t, o.ctx, o.st, agentpb.TaskStatus_PENDING, func() error {
		_, err := o.l.ClaimForSession(o.ctx, "t1", "r2", "ses-1")
		return err
	})
	if !errors.Is(err, ErrNotSession) {
		t.Fatalf("session claim of a task stored PENDING before it: %v, want ErrNotSession", err)
	}
	o.wantOwnersLease(t)
}

// The fenced store's write is one pipelined implicit transaction (no
// isolation level of its own): under a REPEATABLE READ default a claim it
// waited for either fences it or fails it (a serialization failure, which
// the writer retries); it never lands past the claim.
func TestFencedWriteAfterAClaimUnderARepeatableReadDefaultIsNotStored(t *testing.T) {
	o := ownedUnderRepeatableRead(t, agentpb.TaskStatus_PENDING, "{}", false)
	st, ctx := o.st, o.ctx
	owner := &fencedStore{Store: st, pool: o.l.pool, replica: "owner", owned: map[string]int64{"t1": o.attempt}, onFenced: func(string, int64) {}}
	// The claim, held open until the owner's write waits for it.
	tx, err := st.Pool().Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var pid int
	if err := tx.QueryRow(ctx, `UPDATE fleet_leases SET owner = 'claimer', attempt = attempt + 1 WHERE task_id = 't1' RETURNING pg_backend_pid()`).Scan(&pid); err != nil {
		t.Fatal(err)
	}
	written := make(chan error, 1)
	go func() {
		written <- owner.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{{ID: "t1", Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: []byte("{}"), Token: o.attempt}}})
	}()
	waitFor(t, "the owner's write to wait for the claim", 10*time.Second, func() bool {
		var blocked bool
		err := st.Pool().QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)))`, pid).Scan(&blocked)
		return err == nil && blocked
	})
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	err = <-written
	t.Logf("owner's write: %v", err)
	rec, gerr := st.GetTask(ctx, "t1")
	if gerr != nil {
		t.Fatal(gerr)
	}
	if agentpb.TaskStatus(rec.Status) != agentpb.TaskStatus_PENDING {
		t.Fatalf("the owner's write landed past the claim: %s (write: %v)", agentpb.TaskStatus(rec.Status), err)
	}
}

// The sweep's claim (takeOver) of an expired lease whose owner, alive,
// stores the task's end while the claim waits for its write: the claim
// takes the lease, then reads the status, in one READ COMMITTED
// transaction (here under a REPEATABLE READ default), so it sees the end
// and claims nothing; the owner keeps its lease and releases it. (Read
// before the take, the status was RUNNING: the ended task was claimed and
// the sweep adopted it again.)
func TestSweepClaimAndAnExpiredOwnersWriteAreOrdered(t *testing.T) {
	o := ownedUnderRepeatableRead(t, agentpb.TaskStatus_RUNNING, "{}", true)
	err := claimAfterOwnersWrite(t, o.ctx, o.st, agentpb.TaskStatus_SUCCESS, func() error {
		_, err := o.l.claim(o.ctx, "t1", "sweeper", 0)
		return err
	})
	if !errors.Is(err, ErrTaskEnded) {
		t.Fatalf("sweep claim of a task stored SUCCESS while it waited: %v, want ErrTaskEnded", err)
	}
	o.wantOwnersLease(t)
}

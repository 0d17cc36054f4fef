package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// heldBatcher is a batcher whose first run is held until release is
// closed (held is closed once it is), with every batch it ran recorded.
type heldBatcher struct {
	b             *batcher[int, int]
	held, release chan struct{}
	mu            sync.Mutex
	batches       [][]int
}

func newHeldBatcher(run func(reqs []int) ([]int, error)) *heldBatcher {
	h := &heldBatcher{held: make(chan struct{}), release: make(chan struct{})}
	var first sync.Once
	h.b = &batcher[int, int]{timeout: time.Second, run: func(_ context.Context, reqs []int) ([]int, error) {
		h.mu.Lock()
		h.batches = append(h.batches, slices.Clone(reqs))
		h.mu.Unlock()
		first.Do(func() {
			close(h.held)
			<-h.release
		})
		return run(reqs)
	}}
	return h
}

func (h *heldBatcher) ran() [][]int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.batches)
}

func (h *heldBatcher) queued(t *testing.T, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d requests to be queued", n), 10*time.Second, func() bool {
		h.b.mu.Lock()
		defer h.b.mu.Unlock()
		return len(h.b.pending) == n
	})
}

func times10(reqs []int) ([]int, error) {
	out := make([]int, len(reqs))
	for i, r := range reqs {
		out[i] = r * 10
	}
	return out, nil
}

// A batch that PostgreSQL refuses for one bad value (SQLSTATE class 22)
// is run again request by request: only the bad one fails. (A task id
// with a NUL byte failed the batched read of 64 cancels: 62 good cancels
// were told UNAVAILABLE.) A batch failed otherwise (connection, timeout)
// is not run again.
func TestABatchWithOneBadValueFailsOnlyThatRequest(t *testing.T) {
	const bad = 13
	bad22 := &pgconn.PgError{Code: "22021", Message: "invalid byte sequence"}
	h := newHeldBatcher(func(reqs []int) ([]int, error) {
		if slices.Contains(reqs, bad) {
			return nil, bad22
		}
		return times10(reqs)
	})
	ctx := context.Background()
	res, errs := make([]int, stormSize), make([]error, stormSize)
	var wg sync.WaitGroup
	wg.Go(func() { res[0], errs[0] = h.b.do(ctx, 0) })
	<-h.held
	for i := 1; i < stormSize; i++ {
		wg.Go(func() { res[i], errs[i] = h.b.do(ctx, i) })
	}
	h.queued(t, stormSize-1)
	close(h.release)
	wg.Wait()
	for i := range stormSize {
		if i == bad {
			if !errors.Is(errs[i], bad22) {
				t.Errorf("the bad request got %d %v; want its own error", res[i], errs[i])
			}
		} else if errs[i] != nil || res[i] != i*10 {
			t.Errorf("request %d got %d %v; want %d", i, res[i], errs[i], i*10)
		}
	}

	// A connection failure: every request of the batch told, one run.
	down := &pgconn.ConnectError{}
	h = newHeldBatcher(func([]int) ([]int, error) { return nil, down })
	wg.Go(func() { _, _ = h.b.do(ctx, 0) })
	<-h.held
	for i := 1; i < 4; i++ {
		wg.Go(func() { errs[i] = func() error { _, err := h.b.do(ctx, i); return err }() })
	}
	h.queued(t, 3)
	close(h.release)
	wg.Wait()
	if got := h.ran(); len(got) != 2 || len(got[1]) != 3 {
		t.Fatalf("batches run %v; want [[0] [1 2 3]] (not split on a connection failure)", got)
	}
	for i := 1; i < 4; i++ {
		if !errors.As(errs[i], &down) {
			t.Errorf("request %d: %v", i, errs[i])
		}
	}

	// A bad value, then the database goes away while the batch runs one
	// by one: the first connection failure is every remaining request's,
	// none of them run (each would have waited for its own timeout).
	var gone atomic.Bool
	h = newHeldBatcher(func(reqs []int) ([]int, error) {
		switch {
		case len(reqs) > 1:
			return nil, bad22
		case reqs[0] == 2 || gone.Load():
			gone.Store(true)
			return nil, down
		}
		return times10(reqs)
	})
	wg.Go(func() { _, _ = h.b.do(ctx, 0) })
	<-h.held
	for i := 1; i < 6; i++ {
		wg.Go(func() { res[i], errs[i] = h.b.do(ctx, i) })
	}
	h.queued(t, 5)
	close(h.release)
	wg.Wait()
	got := h.ran()
	batch := got[1]
	at := slices.Index(batch, 2)
	if len(got) != 2+at+1 || !slices.Equal(got[len(got)-1], []int{2}) {
		t.Fatalf("batches run %v; want [0], the batch, then its requests alone up to 2 only", got)
	}
	for k, i := range batch {
		if k < at {
			if errs[i] != nil || res[i] != i*10 {
				t.Errorf("request %d (run alone before the failure) got %d %v", i, res[i], errs[i])
			}
		} else if !errors.As(errs[i], &down) {
			t.Errorf("request %d: %v; want the connection failure", i, errs[i])
		}
	}
}

// A caller whose ctx ends while its request is queued leaves the queue:
// its request never runs and it is told ctx's error. (An interject whose
// deadline passed while queued was inserted later anyway: its client,
// told it failed, retried and the text was delivered twice.)
func TestARequestWhoseCallerLeftWhileQueuedNeverRuns(t *testing.T) {
	h := newHeldBatcher(times10)
	ctx := context.Background()
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = h.b.do(ctx, 0) })
	<-h.held
	gone, leave := context.WithCancel(ctx)
	var goneErr error
	left := make(chan struct{})
	go func() {
		defer close(left)
		_, goneErr = h.b.do(gone, 1)
	}()
	stay := make([]int, 2)
	for i, r := range []int{2, 3} {
		wg.Go(func() { stay[i], _ = h.b.do(ctx, r) })
	}
	h.queued(t, 3)
	leave()
	select {
	case <-left:
	case <-time.After(5 * time.Second):
		t.Fatal("a caller that left while queued is still held")
	}
	if !errors.Is(goneErr, context.Canceled) {
		t.Fatalf("the caller that left got %v", goneErr)
	}
	close(h.release)
	wg.Wait()
	for _, b := range h.ran() {
		if slices.Contains(b, 1) {
			t.Fatalf("batches run %v: the request of the caller that left ran", h.ran())
		}
	}
	if stay[0] != 20 || stay[1] != 30 {
		t.Fatalf("the others got %v", stay)
	}

	// The caller handed the next batch whose ctx ended runs it without
	// its own request.
	h = newHeldBatcher(times10)
	wg.Go(func() { _, _ = h.b.do(ctx, 0) })
	<-h.held
	gone, leave = context.WithCancel(ctx)
	leadDone := make(chan struct{})
	go func() {
		defer close(leadDone)
		_, goneErr = h.b.do(gone, 1)
	}()
	h.queued(t, 1)
	wg.Go(func() { stay[0], _ = h.b.do(ctx, 2) })
	h.queued(t, 2)
	// Handed the lead (as a runner does, under the lock) as its ctx ends:
	// whichever it sees first, it runs the batch, without its request.
	h.b.mu.Lock()
	h.b.pending[0].lead <- struct{}{}
	leave()
	h.b.mu.Unlock()
	close(h.release)
	wg.Wait()
	<-leadDone
	if stay[0] != 20 || !errors.Is(goneErr, context.Canceled) {
		t.Fatalf("after the leader left: %d %v", stay[0], goneErr)
	}
	for _, b := range h.ran() {
		if slices.Contains(b, 1) {
			t.Fatalf("batches run %v: the leader's own request ran after its ctx ended", h.ran())
		}
	}
}

// A run that panics (net/http recovers a handler's panic) answers the
// other callers of its batch with an error and hands the next batch on:
// the batcher is not wedged for every later request.
func TestABatchWhoseRunPanicsWedgesNoLaterRequest(t *testing.T) {
	var panicky atomic.Bool
	panicky.Store(true)
	h := newHeldBatcher(func(reqs []int) ([]int, error) {
		if panicky.Load() && slices.Contains(reqs, 2) {
			panic("boom")
		}
		return times10(reqs)
	})
	ctx := context.Background()
	var wg sync.WaitGroup
	wg.Go(func() { _, _ = h.b.do(ctx, 0) })
	<-h.held
	var recovered atomic.Int32
	errs := make([]error, 4)
	for i := 1; i < 4; i++ {
		wg.Go(func() {
			defer func() {
				if recover() != nil {
					recovered.Add(1)
				}
			}()
			_, errs[i] = h.b.do(ctx, i)
		})
	}
	h.queued(t, 3)
	close(h.release)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("callers still waiting after their batch's run panicked")
	}
	panicked := 0
	for i := 1; i < 4; i++ {
		if errors.Is(errs[i], errBatchPanic) {
			panicked++
		}
	}
	if recovered.Load() != 1 || panicked != 2 {
		t.Fatalf("%d panics reached a caller, %d told errBatchPanic; want 1 and 2", recovered.Load(), panicked)
	}
	panicky.Store(false)
	got := make(chan int, 1)
	go func() { r, _ := h.b.do(ctx, 5); got <- r }()
	select {
	case r := <-got:
		if r != 50 {
			t.Fatalf("after the panic: %d", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the batcher is wedged after a panic")
	}
}

// The batched statements take values PostgreSQL refuses as they were
// sent: a task id with a NUL byte among good ones fails only its own read
// (NOT_FOUND), a NUL in a command's reason or a result's text is stored
// as U+FFFD, in a batch of rows as alone.
func TestBatchedStatementsWithANULByteFailNoOtherRequest(t *testing.T) {
	pg := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	// Reads: a batch with a bad id among good ones.
	putTask(t, pg, "nul-running", agentpb.TaskStatus_RUNNING)
	hs := newHolders(leases)
	ids := []string{"nul-running", "bad\x00id", "nul-missing", "nul-running"}
	var wg sync.WaitGroup
	res := make([]holderResult, len(ids))
	errs := make([]error, len(ids))
	// Hold the batcher busy so that all four run as one batch.
	hs.mu.Lock()
	hs.busy = true
	hs.mu.Unlock()
	for i, id := range ids {
		wg.Go(func() { res[i], errs[i] = hs.do(ctx, id) })
	}
	waitFor(t, "the reads to be queued", 10*time.Second, func() bool {
		hs.mu.Lock()
		defer hs.mu.Unlock()
		return len(hs.pending) == len(ids)
	})
	hs.mu.Lock()
	hs.pending[0].lead <- struct{}{}
	hs.mu.Unlock()
	wg.Wait()
	for _, i := range []int{0, 3} {
		if errs[i] != nil || res[i].err != nil || res[i].h.Status != agentpb.TaskStatus_RUNNING {
			t.Errorf("read %d: %+v %v; want the task RUNNING", i, res[i], errs[i])
		}
	}
	if errs[2] != nil || !errors.Is(res[2].err, task.ErrNotFound) {
		t.Errorf("the missing task: %+v %v", res[2], errs[2])
	}
	if err := unavailable("read", errors.Join(errs[1], res[1].err)); !errors.Is(err, task.ErrNotFound) {
		t.Errorf("the id with a NUL byte: %+v %v → %v; want NOT_FOUND", res[1], errs[1], err)
	}

	// Rows: a NUL in one reason of a batch.
	cs := []newCommand{
		{TaskID: "nul-running", Kind: "cancel", Args: cmdArgs{Reason: "fine"}},
		{TaskID: "nul-running", Kind: "approve", Args: cmdArgs{Reason: "with\x00nul \\u0000 kept", CallID: "c1"}},
		{TaskID: "nul-running", Kind: "cancel", Args: cmdArgs{Reason: "also fine"}},
	}
	cids, err := leases.AddCommands(ctx, cs)
	if err != nil || len(cids) != len(cs) {
		t.Fatalf("rows: %v %v", cids, err)
	}
	want := []string{"fine", "with\ufffdnul \\u0000 kept", "also fine"}
	for i, id := range cids {
		var reason string
		if err := pg.Pool().QueryRow(ctx, `SELECT args ->> 'reason' FROM fleet_commands WHERE id = $1`, id).Scan(&reason); err != nil || reason != want[i] {
			t.Errorf("row %d: %q %v; want %q", i, reason, err, want[i])
		}
	}
	one, err := leases.AddCommand(ctx, "nul-running", "cancel", cmdArgs{Reason: "\x00"})
	if err != nil {
		t.Fatalf("a row alone with a NUL reason: %v", err)
	}
	// Results: a NUL in one result's text.
	if err := leases.SetResults(ctx, []int64{cids[0], cids[2]}, []cmdResult{{Err: "ok"}, {Err: "bad\x00result"}}); err != nil {
		t.Fatalf("results: %v", err)
	}
	if err := leases.SetResult(ctx, one, cmdResult{Err: "\x00"}); err != nil {
		t.Fatalf("a result alone: %v", err)
	}
	for id, w := range map[int64]string{cids[0]: "ok", cids[2]: "bad\ufffdresult", one: "\ufffd"} {
		r, ok, err := leases.Result(ctx, id)
		if err != nil || !ok || r.Err != w {
			t.Errorf("result of %d: %+v %v %v; want %q", id, r, ok, err, w)
		}
	}
}

// Holders reads the tasks of several tenants in one batch, each with its
// own tenant (the cancel checks the caller against it), a task whose body
// holds a NUL character too (its instruction had a NUL byte).
func TestHoldersReadsEachTasksOwnTenant(t *testing.T) {
	pg := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	tenants := map[string]string{"ten-a1": "alpha", "ten-b1": "beta", "ten-a2": "alpha", "ten-none": "", "ten-nul": "gamma"}
	for id, ten := range tenants {
		body := []byte("{}")
		if ten != "" {
			body = fmt.Appendf(nil, `{"tenant":%q}`, ten)
		}
		if id == "ten-nul" { // an instruction with a NUL byte, as stored
			body = []byte(`{"instruction":"a\u0000b","tenant":"gamma"}`)
		}
		err := pg.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{{ID: id, Status: int32(agentpb.TaskStatus_RUNNING), CreatedAt: time.Now(), Body: body}}})
		if err != nil {
			t.Fatal(err)
		}
	}
	got, err := leases.Holders(ctx, []string{"ten-a1", "ten-b1", "ten-a2", "ten-none", "ten-nul", "ten-missing"})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(tenants) {
		t.Fatalf("%d tasks found: %+v", len(got), got)
	}
	for id, ten := range tenants {
		if got[id].Tenant != ten {
			t.Errorf("task %s: tenant %q; want %q", id, got[id].Tenant, ten)
		}
	}
	if h, err := leases.Holder(ctx, "ten-nul"); err != nil || h.Tenant != "gamma" {
		t.Errorf("Holder of a task with a NUL in its body: %+v %v", h, err)
	}
}

package fleet

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// The requests made while a batch runs run together as the next batch,
// each caller getting its own result; a request alone runs at once.
func TestRequestsMadeWhileABatchRunsRunAsTheNextBatch(t *testing.T) {
	held, release := make(chan struct{}), make(chan struct{})
	var mu sync.Mutex
	var sizes []int
	b := &batcher[int, int]{timeout: time.Second, run: func(_ context.Context, reqs []int) ([]int, error) {
		mu.Lock()
		sizes = append(sizes, len(reqs))
		first := len(sizes) == 1
		mu.Unlock()
		if first {
			close(held)
			<-release
		}
		out := make([]int, len(reqs))
		for i, r := range reqs {
			out[i] = r * 10
		}
		return out, nil
	}}
	ctx := context.Background()
	res := make([]int, stormSize)
	var wg sync.WaitGroup
	wg.Go(func() { res[0], _ = b.do(ctx, 0) })
	<-held
	for i := 1; i < stormSize; i++ {
		wg.Go(func() { res[i], _ = b.do(ctx, i) })
	}
	waitFor(t, "every request to be queued", 10*time.Second, func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.pending) == stormSize-1
	})
	close(release)
	wg.Wait()
	for i, r := range res {
		if r != i*10 {
			t.Fatalf("request %d got %d", i, r)
		}
	}
	if len(sizes) != 2 || sizes[0] != 1 || sizes[1] != stormSize-1 {
		t.Fatalf("batches %v; want [1 %d]", sizes, stormSize-1)
	}
	if r, err := b.do(ctx, 7); r != 70 || err != nil || len(sizes) != 3 || sizes[2] != 1 {
		t.Fatalf("alone: %d %v, batches %v", r, err, sizes)
	}
	boom := errors.New("boom")
	b.run = func(context.Context, []int) ([]int, error) { return nil, boom }
	if _, err := b.do(ctx, 1); !errors.Is(err, boom) {
		t.Fatalf("a failed batch answered %v", err)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := b.do(cctx, 1); !errors.Is(err, context.Canceled) {
		t.Fatalf("an ended caller got %v", err)
	}
}

// The batched statements: each command row gets the id its caller is
// answered with, and each task read is answered for its own task (one not
// stored: not found).
func TestBatchedCommandRowsAndReadsMatchTheirRequests(t *testing.T) {
	pg := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	leases, err := NewLeases(ctx, pg.Pool(), testLease)
	if err != nil {
		t.Fatal(err)
	}
	cs := make([]newCommand, stormSize)
	for i := range cs {
		cs[i] = newCommand{TaskID: fmt.Sprintf("rows-%d", i), Kind: "cancel", Args: cmdArgs{Reason: fmt.Sprintf("reason %d", i)}}
	}
	ids, err := leases.AddCommands(ctx, cs)
	if err != nil || len(ids) != len(cs) {
		t.Fatalf("%d ids, %v", len(ids), err)
	}
	for i, id := range ids {
		var tid, reason string
		if err := pg.Pool().QueryRow(ctx, `SELECT task_id, args ->> 'reason' FROM fleet_commands WHERE id = $1 AND NOT done`, id).Scan(&tid, &reason); err != nil ||
			tid != cs[i].TaskID || reason != cs[i].Args.Reason {
			t.Fatalf("row %d (id %d): %q %q %v; want %q %q", i, id, tid, reason, err, cs[i].TaskID, cs[i].Args.Reason)
		}
	}
	putTask(t, pg, "holders-running", agentpb.TaskStatus_RUNNING)
	putTask(t, pg, "holders-done", agentpb.TaskStatus_CANCELLED)
	hs := newHolders(leases)
	got, err := hs.run(ctx, []string{"holders-done", "holders-missing", "holders-running"})
	if err != nil || len(got) != 3 {
		t.Fatalf("%v %v", got, err)
	}
	if got[0].err != nil || got[0].h.Status != agentpb.TaskStatus_CANCELLED ||
		!errors.Is(got[1].err, task.ErrNotFound) ||
		got[2].err != nil || got[2].h.Status != agentpb.TaskStatus_RUNNING {
		t.Fatalf("read %+v", got)
	}
}

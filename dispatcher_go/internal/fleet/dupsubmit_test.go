package fleet

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/task"
)

// Concurrent submissions of one client request id on three replicas get
// one task: every one is answered its id, and one task is stored. The
// losers were answered NOT_FOUND (the first submission's task not stored
// yet), and a duplicate that waited past DuplicateWait took the id over
// and ran a second task.
func TestConcurrentSubmitsOfOneRequestIDOnThreeReplicasStoreOneTask(t *testing.T) {
	pg := openStore(t)
	url := redisURL(t)
	var reps []*replica
	for i := range 3 {
		reps = append(reps, startReplica(t, pg, url, fmt.Sprintf("dup-%d", i), &testSlot{}))
	}
	const rounds, submits = 5, 21
	for round := range rounds {
		rid := fmt.Sprintf("job-%d", round)
		ids := make([]string, submits)
		errs := make([]error, submits)
		start := make(chan struct{})
		var wg sync.WaitGroup
		for i := range submits {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				tk, err := reps[i%3].mgr.Submit(task.Spec{Instruction: "once", Labels: map[string]string{task.RequestIDLabel: rid}})
				errs[i] = err
				if err == nil {
					ids[i] = tk.ID()
				}
			}()
		}
		close(start)
		wg.Wait()
		for i := range submits {
			if errs[i] != nil || ids[i] != ids[0] {
				t.Fatalf("round %d: submission %d answered %q %v, the first %q %v", round, i, ids[i], errs[i], ids[0], errs[0])
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		var n int
		err := pg.Pool().QueryRow(ctx, `SELECT count(*) FROM tasks`).Scan(&n)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if n != round+1 {
			t.Fatalf("round %d: %d tasks stored, want %d", round, n, round+1)
		}
	}
}

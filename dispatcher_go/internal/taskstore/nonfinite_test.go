package taskstore_test

import (
	"context"
	"math"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// TestNonFiniteCostIsNeverStored: JSON has no NaN or Inf, so a task whose
// cost was one could not be encoded (a nil body, refused by the store's NOT
// NULL, retried for ever with every other task's writes). Such a cost
// cannot reach a task since the session checks usage at ingest; should it
// anyway, the record is stored with the cost unknown (0) rather than not at
// all.
func TestNonFiniteCostIsNeverStored(t *testing.T) {
	st := openSQLite(t)
	w := store.NewWriter(st, store.WriterOptions{})
	defer w.Close()
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for i, c := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		id := "00000000-0000-4000-8000-00000000000" + string(rune('0'+i))
		now := time.Now()
		ts.Save(&task.Snapshot{Summary: task.Summary{ID: id, Instruction: "x", Status: agentpb.TaskStatus_SUCCESS,
			CreatedAt: now, EndedAt: now, Stats: task.Stats{Cost: c, InputTokens: 3}}})
		if err := ts.Flush(ctx); err != nil {
			t.Fatalf("cost %v: flush: %v", c, err)
		}
		got, err := ts.Finished(ctx, id)
		if err != nil {
			t.Fatalf("cost %v: %v", c, err)
		}
		if got.Stats.Cost != 0 || got.Stats.InputTokens != 3 {
			t.Fatalf("cost %v stored as %+v", c, got.Stats)
		}
	}
}

package taskstore_test

import (
	"context"
	"database/sql"
	"path/filepath"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// TestRestoreWithACorruptLastEvent: a restart judges a task that was
// running by its last stored event; garbage in that row used to fail the
// whole restore (the dispatcher did not start). Now the event reads as an
// error event that says it cannot be decoded, the task is judged as
// running (FAILURE, its session was lost) and its log reads through.
func TestRestoreWithACorruptLastEvent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := sqlite.Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })

	m1, q1, w1 := durableManager(t, st)
	tk, err := m1.Submit(task.Spec{Instruction: "running"})
	if err != nil {
		t.Fatal(err)
	}
	startOn(t, q1, tk)
	// The last event is written alone, a run of its own in the database
	// (sqlite/runs.go) that can be spoiled alone.
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := st.Fold(ctx); err != nil { // out of the journal (sqlite/journal.go) before the last
		t.Fatal(err)
	}
	if _, err := tk.Record(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "half"}}}, eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	w1.Close() // the process ends here, without draining
	last := tk.Log().LastSeq()
	if err := st.Fold(ctx); err != nil { // the last event out of the journal
		t.Fatal(err)
	}

	db, err := sql.Open("sqlite", filepath.Join(dir, sqlite.FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if res, err := db.ExecContext(ctx, `UPDATE event_runs SET data = x'ffffffff' WHERE task_id = ?1 AND first_seq = ?2 AND last_seq = ?2`, tk.ID(), int64(last)); err != nil {
		t.Fatal(err)
	} else if n, _ := res.RowsAffected(); n != 1 {
		t.Fatalf("spoiled %d rows", n)
	}

	m2, _, _ := durableManager(t, st)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatalf("restore: %v", err)
	}
	back, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	if i := back.Info(); i.Status != agentpb.TaskStatus_FAILURE || i.Message != taskstore.RestartFailureMessage {
		t.Fatalf("restored task: %+v", i)
	}
	evs := readAll(t, back.Log())
	if len(evs) != int(last+1) || evs[last-1].GetError().GetCode() != store.EventUndecodable ||
		evs[last].GetState().GetStatus() != agentpb.TaskStatus_FAILURE {
		t.Fatalf("restored task's log: %v", evs)
	}
}

package taskstore_test

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeQueue keeps tasks in a slice, as the scheduler's queue would.
type fakeQueue struct {
	mu    sync.Mutex
	tasks []*task.Task
}

func (q *fakeQueue) Enqueue(t *task.Task) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.tasks = append(q.tasks, t)
	return nil
}

func (q *fakeQueue) Remove(t *task.Task) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	i := slices.Index(q.tasks, t)
	if i < 0 {
		return false
	}
	q.tasks = slices.Delete(q.tasks, i, i+1)
	return true
}

func (q *fakeQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.tasks)
}

// runner is a commander session that does nothing.
type runner struct{}

func (runner) Stop(string, dispatchv1.StopCode) bool { return true }
func (runner) Interject(context.Context, string) (string, uint64, error) {
	return "", 0, errors.New("not supported")
}

// startOn takes tk off the queue and starts it, as the scheduler does.
func startOn(t *testing.T, q *fakeQueue, tk *task.Task) {
	t.Helper()
	q.Remove(tk)
	if err := tk.Start(runner{}, "cmd", "ses"); err != nil {
		t.Fatal(err)
	}
}

// openSQLite is a store in a temporary directory.
func openSQLite(t *testing.T) store.Store {
	t.Helper()
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return st
}

// managerOn is a Manager on st with a secret key, as the dispatcher wires
// it; its writer is closed at cleanup (or by the caller, to simulate the
// process ending).
func managerOn(t *testing.T, st store.Store, opts task.ManagerOptions, wopts store.WriterOptions) (*task.Manager, *fakeQueue, *store.Writer) {
	t.Helper()
	if wopts.Interval == 0 {
		wopts.Interval = time.Millisecond
	}
	w := store.NewWriter(st, wopts)
	t.Cleanup(w.Close)
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w, SecretKey: []byte("k")})
	if err != nil {
		t.Fatal(err)
	}
	if opts.StopGrace == 0 {
		opts.StopGrace = 200 * time.Millisecond
	}
	opts.Persistence = ts
	q := &fakeQueue{}
	m := task.NewManager(eventlog.NewDurable(eventlog.Limits{}, w), task.NewConfigStore(nil), opts)
	m.SetQueue(q)
	return m, q, w
}

// durableManager is managerOn with the default options.
func durableManager(t *testing.T, st store.Store) (*task.Manager, *fakeQueue, *store.Writer) {
	t.Helper()
	return managerOn(t, st, task.ManagerOptions{}, store.WriterOptions{})
}

package store_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
)

// flightStore wraps a store and checks the Writer's writes under way: no
// task in two of them at once, each task's events applied in seq order
// with no gap, a task record only after the events queued before it
// (its body is the seq of the task's last event then). hold makes the
// writes holding a task wait until released.
type flightStore struct {
	store.Store
	jitter bool

	mu      sync.Mutex
	active  map[string]int // task id → writes under way holding it
	maxSeq  map[string]uint64
	most    int // most writes under way at once
	under   int
	errs    []string
	hold    map[string]chan struct{}
	entered chan string     // told of each held write's task when it waits
	fail    map[string]bool // writes holding these tasks fail
}

func newFlightStore(t *testing.T, jitter bool) *flightStore {
	t.Helper()
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	return &flightStore{Store: st, jitter: jitter, active: map[string]int{}, maxSeq: map[string]uint64{},
		hold: map[string]chan struct{}{}, entered: make(chan string, 16)}
}

func (s *flightStore) errorf(format string, args ...any) {
	s.errs = append(s.errs, fmt.Sprintf(format, args...))
}

func (s *flightStore) Apply(ctx context.Context, b store.Batch) error {
	ids := map[string]bool{}
	for _, e := range b.Events {
		ids[e.TaskID] = true
	}
	for _, t := range b.Tasks {
		ids[t.ID] = true
	}
	s.mu.Lock()
	var wait chan struct{}
	var held string
	for id := range ids {
		if s.active[id] > 0 {
			s.errorf("task %s in two writes under way", id)
		}
		s.active[id]++
		if h := s.hold[id]; h != nil && wait == nil {
			wait, held = h, id
		}
	}
	s.under++
	s.most = max(s.most, s.under)
	s.mu.Unlock()
	if wait != nil {
		s.entered <- held
		<-wait
	}
	if s.jitter {
		time.Sleep(time.Duration(rand.IntN(300)) * time.Microsecond)
	}
	s.mu.Lock()
	var err error
	for id := range ids {
		if s.fail[id] {
			err = errors.New("flightStore: the disk is gone")
		}
	}
	s.mu.Unlock()
	if err == nil {
		err = s.Store.Apply(ctx, b)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err == nil {
		for _, e := range b.Events {
			if e.Seq != s.maxSeq[e.TaskID]+1 {
				s.errorf("task %s: event %d applied after %d", e.TaskID, e.Seq, s.maxSeq[e.TaskID])
			}
			s.maxSeq[e.TaskID] = e.Seq
		}
		for _, t := range b.Tasks {
			if n, _ := strconv.ParseUint(string(t.Body), 10, 64); s.maxSeq[t.ID] < n {
				s.errorf("task %s: record queued after event %d written with %d", t.ID, n, s.maxSeq[t.ID])
			}
		}
	}
	for id := range ids {
		s.active[id]--
	}
	s.under--
	return err
}

func (s *flightStore) check(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.errs {
		t.Error(e)
	}
}

// readWithin reads log l after seq until it has want events or the
// deadline passes.
func readWithin(t *testing.T, l eventlog.Log, after uint64, want int, d time.Duration) []uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var got []uint64
	for len(got) < want {
		evs, err := l.Read(ctx, after, nil)
		for _, ev := range evs {
			got = append(got, ev.GetSeq())
			after = ev.GetSeq()
		}
		if err != nil {
			break
		}
	}
	return got
}

// TestWriterInFlightOtherTasksPassAHeldWrite: with two writes in flight,
// a write that hangs holds up only its own task: another task's event is
// written and seen by its reader meanwhile, while the held task's next
// event waits (never in a second write of that task) and is read after the
// first, in order, once the store answers.
func TestWriterInFlightOtherTasksPassAHeldWrite(t *testing.T) {
	st := newFlightStore(t, false)
	release := make(chan struct{})
	st.hold["a"] = release
	w := store.NewWriter(st, store.WriterOptions{InFlight: 2})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	a, err := logs.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := logs.Create("b")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Append(content("a1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	select {
	case <-st.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("the write of a1 did not reach the store")
	}
	if _, err := a.Append(content("a2"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Append(content("b1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if got := readWithin(t, b, 0, 1, 5*time.Second); len(got) != 1 || got[0] != 1 {
		t.Fatalf("b's reader got %v while a's write hung, want [1]", got)
	}
	if n, err := st.Store.LastSeq(context.Background(), "a"); err != nil || n != 0 {
		t.Fatalf("a's last stored seq %d (%v) while its first write hangs, want 0", n, err)
	}
	if w.Pending() != 1 {
		t.Fatalf("pending %d, want a2 waiting for a's write", w.Pending())
	}
	close(release)
	if got := readWithin(t, a, 0, 2, 5*time.Second); len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Fatalf("a's reader got %v, want [1 2]", got)
	}
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	w.Close()
	st.check(t)
	if st.most != 2 {
		t.Fatalf("at most %d writes under way, want 2", st.most)
	}
}

// TestWriterInFlightKeepsEachTaskInOrder: many tasks appending at once,
// events and task records mixed, a store of uneven speed, three writes in
// flight, flushes meanwhile: no task is ever in two writes under way, each
// task's events reach the store and its readers once, in seq order, each
// record after the events queued before it, and Flush returns only when
// everything queued before it is stored.
func TestWriterInFlightKeepsEachTaskInOrder(t *testing.T) {
	st := newFlightStore(t, true)
	w := store.NewWriter(st, store.WriterOptions{InFlight: 3, Interval: 100 * time.Microsecond})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	const tasks, perTask = 12, 150
	var wg sync.WaitGroup
	errs := make(chan error, 2*tasks)
	for i := range tasks {
		id := fmt.Sprintf("t%d", i)
		l, err := logs.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(2)
		go func() {
			defer wg.Done()
			for j := range perTask {
				seq, err := l.Append(content("x"), eventlog.Capped)
				if err != nil {
					errs <- err
					return
				}
				if j%25 == 0 {
					w.SaveTask(store.TaskRecord{ID: id, Status: 1, CreatedAt: time.Now(), Body: []byte(strconv.FormatUint(seq, 10))})
				}
				if j%50 == 49 {
					if err := w.Flush(context.Background()); err != nil {
						errs <- err
						return
					}
					if n, err := st.Store.LastSeq(context.Background(), id); err != nil || n < seq {
						errs <- fmt.Errorf("%s: flushed after %d, stored %d (%v)", id, seq, n, err)
						return
					}
				}
			}
		}()
		go func() {
			defer wg.Done()
			got := readWithin(t, l, 0, perTask, 20*time.Second)
			for k, s := range got {
				if s != uint64(k+1) {
					errs <- fmt.Errorf("%s: reader got seq %d at %d", id, s, k)
					return
				}
			}
			if len(got) != perTask {
				errs <- fmt.Errorf("%s: reader got %d events, want %d", id, len(got), perTask)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	w.Close()
	st.check(t)
	for i := range tasks {
		id := fmt.Sprintf("t%d", i)
		if n, err := st.Store.LastSeq(context.Background(), id); err != nil || n != perTask {
			t.Errorf("%s: stored up to %d (%v), want %d", id, n, err, perTask)
		}
	}
	if st.most < 2 {
		t.Logf("at most %d writes under way (the machine ran them one by one)", st.most)
	}
}

// TestWriterInFlightHealthFollowsTheOldestWrite: with two writes in
// flight, a write stuck past StuckAfter makes the Writer unhealthy, and
// another write that succeeds meanwhile does not make it healthy again;
// the stuck write's end does.
func TestWriterInFlightHealthFollowsTheOldestWrite(t *testing.T) {
	st := newFlightStore(t, false)
	release := make(chan struct{})
	st.hold["a"] = release
	w := store.NewWriter(st, store.WriterOptions{InFlight: 2, StuckAfter: 50 * time.Millisecond})
	defer w.Close()
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	a, err := logs.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := logs.Create("b")
	if err != nil {
		t.Fatal(err)
	}
	changed := w.HealthChanged()
	if _, err := a.Append(content("a1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	changedWithin(t, changed, "to unhealthy")
	if _, err := b.Append(content("b1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if got := readWithin(t, b, 0, 1, 5*time.Second); len(got) != 1 {
		t.Fatalf("b's reader got %v while a's write hung", got)
	}
	if err := w.Health(); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("Health with a write stuck after another one succeeded: %v", err)
	}
	changed = w.HealthChanged()
	close(release)
	changedWithin(t, changed, "back to healthy")
	if err := w.Health(); err != nil {
		t.Fatalf("Health after the stuck write ended: %v", err)
	}
	if got := readWithin(t, a, 0, 1, 5*time.Second); len(got) != 1 {
		t.Fatalf("a's reader got %v", got)
	}
	st.check(t)
}

func (s *flightStore) setFail(id string, fail bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail == nil {
		s.fail = map[string]bool{}
	}
	s.fail[id] = fail
}

// TestWriterInFlightHealthStaysFailingWhileAWriteRetries: one write under
// way keeps failing (and retrying) while another task's write succeeds
// beside it: Health stays failing until the failing write itself succeeds
// (a success of another write used to clear the error).
func TestWriterInFlightHealthStaysFailingWhileAWriteRetries(t *testing.T) {
	st := newFlightStore(t, false)
	st.setFail("a", true)
	w := store.NewWriter(st, store.WriterOptions{InFlight: 2, StuckAfter: time.Hour})
	defer w.Close()
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	a, err := logs.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := logs.Create("b")
	if err != nil {
		t.Fatal(err)
	}
	changed := w.HealthChanged()
	if _, err := a.Append(content("a1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	changedWithin(t, changed, "to unhealthy")
	if _, err := b.Append(content("b1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	if got := readWithin(t, b, 0, 1, 5*time.Second); len(got) != 1 {
		t.Fatalf("b's reader got %v while a's write failed", got)
	}
	if err := w.Health(); err == nil {
		t.Fatal("Health nil while a's write still fails and retries")
	}
	changed = w.HealthChanged()
	st.setFail("a", false)
	changedWithin(t, changed, "back to healthy")
	if got := readWithin(t, a, 0, 1, 5*time.Second); len(got) != 1 {
		t.Fatalf("a's reader got %v", got)
	}
	if err := w.Health(); err != nil {
		t.Fatalf("Health after a's write succeeded: %v", err)
	}
	st.check(t)
}

// TestWriterInFlightFlushFailsWhenAWriteIsLostAtClose: the write a Flush
// waits for fails for good (the Writer closes while its store is down):
// the Flush gets an error, never nil for events that were not stored. (The
// long Interval holds a1 until the Flush, so the write under way carries
// the Flush's waiter.)
func TestWriterInFlightFlushFailsWhenAWriteIsLostAtClose(t *testing.T) {
	st := newFlightStore(t, false)
	st.setFail("a", true)
	w := store.NewWriter(st, store.WriterOptions{InFlight: 2, StuckAfter: time.Hour, Interval: time.Hour})
	logs := eventlog.NewDurable(eventlog.Limits{}, w)
	a, err := logs.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	changed := w.HealthChanged()
	if _, err := a.Append(content("a1"), eventlog.Capped); err != nil {
		t.Fatal(err)
	}
	flushed := make(chan error, 1)
	go func() { flushed <- w.Flush(context.Background()) }()
	changedWithin(t, changed, "to unhealthy") // a1's write, the Flush's, fails and retries
	w.Close()
	select {
	case err := <-flushed:
		if err == nil {
			t.Fatal("Flush returned nil though a1's write was lost at Close")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Flush did not return after Close")
	}
	if n, err := st.Store.LastSeq(context.Background(), "a"); err != nil || n != 0 {
		t.Fatalf("a's last stored seq %d (%v), want 0 (the store was down)", n, err)
	}
}

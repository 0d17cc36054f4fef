// Package storetest is the conformance suite every store.Store must pass.
// A backend's test calls Run with a function that opens a fresh, empty
// store for each subtest. Faulty wraps a store for tests of what happens
// when it hangs or fails. It is test support: nothing in the dispatcher
// may import it.
package storetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// Open returns a fresh, empty store; the suite closes it.
type Open func(t *testing.T) store.Store

// Run runs the suite against stores made by open.
func Run(t *testing.T, open Open) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"TaskRoundTripAndUpsert", testTaskRoundTrip},
		{"GetMissing", testGetMissing},
		{"ListByStatusNewestFirst", testList},
		{"ListBeforePagesTheSameOrder", testListBefore},
		{"EventsInOrderPagedIdempotent", testEvents},
		{"BatchIsAtomicPerCall", testBatchMixed},
		{"RefusedRecordIsRejectedNotAFailure", testRejected},
		{"ConcurrentAppliesKeepEveryEvent", testConcurrent},
		{"Configs", testConfigs},
		{"RetentionRemovesOldFinishedTasksAndEvents", testRetention},
		{"TimesKeepMicroseconds", testTimes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t)
			t.Cleanup(func() { _ = s.Close() })
			tc.fn(t, s)
		})
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return c
}

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)

func rec(id string, status int32, created time.Time, ended time.Time, body string) store.TaskRecord {
	return store.TaskRecord{ID: id, Status: status, CreatedAt: created, EndedAt: ended, Body: []byte(body)}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func testTaskRoundTrip(t *testing.T, s store.Store) {
	c := ctx(t)
	r := rec("a", 1, t0, time.Time{}, `{"x":1}`)
	must(t, s.Apply(c, store.Batch{Tasks: []store.TaskRecord{r}}))
	got, err := s.GetTask(c, "a")
	must(t, err)
	if got.ID != "a" || got.Status != 1 || !got.CreatedAt.Equal(t0) || !got.EndedAt.IsZero() || string(got.Body) != `{"x":1}` {
		t.Fatalf("round trip: %+v", got)
	}
	r.Status, r.EndedAt, r.Body = 3, t0.Add(time.Minute), []byte(`{"x":2}`)
	must(t, s.Apply(c, store.Batch{Tasks: []store.TaskRecord{r}}))
	got, err = s.GetTask(c, "a")
	must(t, err)
	if got.Status != 3 || !got.EndedAt.Equal(t0.Add(time.Minute)) || string(got.Body) != `{"x":2}` {
		t.Fatalf("after upsert: %+v", got)
	}
	all, err := s.ListTasks(c, nil, 0)
	must(t, err)
	if len(all) != 1 {
		t.Fatalf("upsert made %d rows", len(all))
	}
}

func testGetMissing(t *testing.T, s store.Store) {
	c := ctx(t)
	if _, err := s.GetTask(c, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetTask missing: %v", err)
	}
	if _, err := s.GetConfig(c, "nope"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("GetConfig missing: %v", err)
	}
	n, err := s.LastSeq(c, "nope")
	if err != nil || n != 0 {
		t.Fatalf("LastSeq missing: %d %v", n, err)
	}
	evs, err := s.ReadEvents(c, "nope", 0, 10)
	if err != nil || len(evs) != 0 {
		t.Fatalf("ReadEvents missing: %v %v", evs, err)
	}
}

func testList(t *testing.T, s store.Store) {
	c := ctx(t)
	var b store.Batch
	for i := range 6 {
		b.Tasks = append(b.Tasks, rec(fmt.Sprintf("t%d", i), int32(i%3), t0.Add(time.Duration(i)*time.Second), time.Time{}, "{}"))
	}
	must(t, s.Apply(c, b))
	all, err := s.ListTasks(c, nil, 0)
	must(t, err)
	if len(all) != 6 || all[0].ID != "t5" || all[5].ID != "t0" {
		t.Fatalf("list all: %v", ids(all))
	}
	some, err := s.ListTasks(c, []int32{0, 2}, 0)
	must(t, err)
	if got := fmt.Sprint(ids(some)); got != "[t5 t3 t2 t0]" {
		t.Fatalf("list by status: %s", got)
	}
	lim, err := s.ListTasks(c, []int32{1}, 1)
	must(t, err)
	if got := fmt.Sprint(ids(lim)); got != "[t4]" {
		t.Fatalf("list limit: %s", got)
	}
}

// testListBefore pages through tasks with ListTasksBefore: the pages join
// up to exactly the newest-first order, ties in created_at broken by id
// (byte order, "B" < "a"), with and without a status filter.
func testListBefore(t *testing.T, s store.Store) {
	c := ctx(t)
	var b store.Batch
	// Three tasks share each creation time; their ids are not in creation
	// order. Sub-microsecond differences are not stored.
	names := []string{"a", "B", "c0", "b", "A", "c"}
	for i, n := range names {
		created := t0.Add(time.Duration(i/3) * time.Second).Add(time.Duration(i%3) * 100 * time.Nanosecond)
		b.Tasks = append(b.Tasks, rec(n, int32(i%2), created, time.Time{}, "{}"))
	}
	must(t, s.Apply(c, b))
	all, err := s.ListTasks(c, nil, 0)
	must(t, err)
	if got := fmt.Sprint(ids(all)); got != "[c b A c0 a B]" {
		t.Fatalf("order: %s", got)
	}
	for _, tc := range []struct {
		statuses []int32
		want     string
	}{
		{nil, "[c b A c0 a B]"},
		{[]int32{1}, "[c b B]"},
		{[]int32{0, 1}, "[c b A c0 a B]"},
	} {
		for _, size := range []int{1, 2, 4} {
			var got []string
			var before *store.TaskKey
			for range 10 {
				page, err := s.ListTasksBefore(c, tc.statuses, before, size)
				must(t, err)
				got = append(got, ids(page)...)
				if len(page) < size {
					break
				}
				k := store.KeyOf(page[len(page)-1])
				before = &k
			}
			if fmt.Sprint(got) != tc.want {
				t.Fatalf("statuses %v, pages of %d: %v, want %s", tc.statuses, size, got, tc.want)
			}
		}
	}
	// A key of a task that is not stored works as well; all: no limit.
	rest, err := s.ListTasksBefore(c, nil, &store.TaskKey{CreatedAt: t0.Add(time.Second), ID: "bb"}, 0)
	must(t, err)
	if got := fmt.Sprint(ids(rest)); got != "[b A c0 a B]" {
		t.Fatalf("before a foreign key: %s", got)
	}
	if !(store.TaskKey{CreatedAt: t0, ID: "z"}).Before(store.TaskKey{CreatedAt: t0.Add(time.Microsecond), ID: "a"}) ||
		!(store.TaskKey{CreatedAt: t0, ID: "B"}).Before(store.TaskKey{CreatedAt: t0.Add(time.Nanosecond), ID: "a"}) {
		t.Fatal("TaskKey.Before disagrees with the stored order")
	}
}

func ids(rs []store.TaskRecord) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.ID
	}
	return out
}

func evs(task string, from, to uint64) []store.Event {
	var out []store.Event
	for s := from; s <= to; s++ {
		out = append(out, store.Event{TaskID: task, Seq: s, Data: []byte(fmt.Sprintf("%s-%d", task, s))})
	}
	return out
}

func testEvents(t *testing.T, s store.Store) {
	c := ctx(t)
	must(t, s.Apply(c, store.Batch{Events: evs("a", 1, 100)}))
	must(t, s.Apply(c, store.Batch{Events: evs("b", 1, 3)}))
	// Writing an event again (a retried batch) is a no-op, not an error.
	must(t, s.Apply(c, store.Batch{Events: evs("a", 95, 105)}))
	last, err := s.LastSeq(c, "a")
	must(t, err)
	if last != 105 {
		t.Fatalf("LastSeq = %d, want 105", last)
	}
	var after uint64
	var n int
	for {
		page, err := s.ReadEvents(c, "a", after, 7)
		must(t, err)
		if len(page) == 0 {
			break
		}
		if len(page) > 7 {
			t.Fatalf("page of %d > limit", len(page))
		}
		for _, e := range page {
			if e.Seq != after+1 || e.TaskID != "a" || !bytes.Equal(e.Data, []byte(fmt.Sprintf("a-%d", e.Seq))) {
				t.Fatalf("after %d got %+v", after, e)
			}
			after = e.Seq
			n++
		}
	}
	if n != 105 {
		t.Fatalf("read %d events, want 105", n)
	}
	b, err := s.ReadEvents(c, "b", 1, 100)
	must(t, err)
	if len(b) != 2 || b[0].Seq != 2 {
		t.Fatalf("events of b after 1: %+v", b)
	}
}

func testBatchMixed(t *testing.T, s store.Store) {
	c := ctx(t)
	// A batch holding events and a task that references them.
	must(t, s.Apply(c, store.Batch{Events: evs("m", 1, 3), Tasks: []store.TaskRecord{rec("m", 1, t0, time.Time{}, "{}")}}))
	if _, err := s.GetTask(c, "m"); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.LastSeq(c, "m"); n != 3 {
		t.Fatalf("LastSeq %d", n)
	}
	// An empty batch is fine.
	must(t, s.Apply(c, store.Batch{}))
	// A large batch (bigger than any single statement limit) goes through.
	must(t, s.Apply(c, store.Batch{Events: evs("big", 1, 5000)}))
	if n, _ := s.LastSeq(c, "big"); n != 5000 {
		t.Fatalf("big batch LastSeq %d", n)
	}
}

// testRejected: a record the database refuses (NOT NULL: a body or event
// data that could not be encoded) fails the batch with an error wrapping
// store.ErrRejected, so that the Writer sets the record aside instead of
// retrying for ever; nothing of the batch is written; the store goes on.
func testRejected(t *testing.T, s store.Store) {
	c := ctx(t)
	for name, b := range map[string]store.Batch{
		"task without body": {Events: evs("r1", 1, 2), Tasks: []store.TaskRecord{{ID: "r1", Status: 1, CreatedAt: t0}}},
		"event without data": {Events: append(evs("r2", 1, 1), store.Event{TaskID: "r2", Seq: 2}),
			Tasks: []store.TaskRecord{rec("r2", 1, t0, time.Time{}, "{}")}},
	} {
		err := s.Apply(c, b)
		if !errors.Is(err, store.ErrRejected) {
			t.Fatalf("%s: Apply = %v, want an error wrapping ErrRejected", name, err)
		}
		id := b.Tasks[0].ID
		if n, _ := s.LastSeq(c, id); n != 0 {
			t.Fatalf("%s: %d events of the refused batch were written", name, n)
		}
		if _, err := s.GetTask(c, id); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("%s: the refused batch's task: %v", name, err)
		}
	}
	must(t, s.Apply(c, store.Batch{Events: evs("r3", 1, 2), Tasks: []store.TaskRecord{rec("r3", 1, t0, time.Time{}, "{}")}}))
}

func testConcurrent(t *testing.T, s store.Store) {
	c := ctx(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			task := fmt.Sprintf("c%d", w)
			for i := uint64(0); i < 10; i++ {
				if err := s.Apply(c, store.Batch{
					Events: evs(task, i*20+1, i*20+20),
					Tasks:  []store.TaskRecord{rec(task, 1, t0, time.Time{}, "{}")},
				}); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for w := range 8 {
		if n, _ := s.LastSeq(c, fmt.Sprintf("c%d", w)); n != 200 {
			t.Fatalf("c%d LastSeq %d", w, n)
		}
	}
}

func testConfigs(t *testing.T, s store.Store) {
	c := ctx(t)
	must(t, s.PutConfig(c, "global", []byte("v1")))
	must(t, s.PutConfig(c, "global", []byte("v2")))
	got, err := s.GetConfig(c, "global")
	must(t, err)
	if string(got) != "v2" {
		t.Fatalf("config %q", got)
	}
}

func testRetention(t *testing.T, s store.Store) {
	c := ctx(t)
	cutoff := t0.Add(time.Hour)
	must(t, s.Apply(c, store.Batch{
		Events: append(append(evs("old", 1, 5), evs("new", 1, 5)...), evs("run", 1, 5)...),
		Tasks: []store.TaskRecord{
			rec("old", 3, t0, t0.Add(time.Minute), "{}"),            // ended before the cutoff
			rec("new", 3, t0, cutoff.Add(time.Minute), "{}"),        // ended after
			rec("run", 2, t0.Add(-24*time.Hour), time.Time{}, "{}"), // old but not ended
		},
	}))
	n, err := s.DeleteEndedBefore(c, cutoff)
	must(t, err)
	if n != 1 {
		t.Fatalf("deleted %d tasks, want 1", n)
	}
	if _, err := s.GetTask(c, "old"); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("old task still there: %v", err)
	}
	if last, _ := s.LastSeq(c, "old"); last != 0 {
		t.Fatalf("old events still there: %d", last)
	}
	for _, id := range []string{"new", "run"} {
		if _, err := s.GetTask(c, id); err != nil {
			t.Fatalf("%s removed: %v", id, err)
		}
		if last, _ := s.LastSeq(c, id); last != 5 {
			t.Fatalf("%s events: %d", id, last)
		}
	}
}

func testTimes(t *testing.T, s store.Store) {
	c := ctx(t)
	created := time.Now().Truncate(time.Microsecond)
	must(t, s.Apply(c, store.Batch{Tasks: []store.TaskRecord{rec("tm", 1, created, created.Add(1500*time.Microsecond), "{}")}}))
	got, err := s.GetTask(c, "tm")
	must(t, err)
	if !got.CreatedAt.Equal(created) || got.EndedAt.Sub(got.CreatedAt) != 1500*time.Microsecond {
		t.Fatalf("times: %v %v", got.CreatedAt, got.EndedAt)
	}
}

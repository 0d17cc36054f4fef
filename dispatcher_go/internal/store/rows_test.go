package store_test

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/store"
)

// fakeRows is a result set of rows of values, failing at row failAt (-1:
// never) and with err at the end.
type fakeRows struct {
	rows   [][]any
	i      int
	failAt int
	err    error
}

func (f *fakeRows) Next() bool {
	f.i++
	return f.i <= len(f.rows)
}

func (f *fakeRows) Scan(dest ...any) error {
	if f.i-1 == f.failAt {
		return errors.New("bad row")
	}
	for k, v := range f.rows[f.i-1] {
		reflect.ValueOf(dest[k]).Elem().Set(reflect.ValueOf(v))
	}
	return nil
}

func (f *fakeRows) Err() error { return f.err }

func TestCollect(t *testing.T) {
	created := time.UnixMicro(1700000000000001)
	rows := func(failAt int, err error) *fakeRows {
		return &fakeRows{rows: [][]any{
			{"a", int32(1), store.Micros(created), int64(0), []byte("x")},
			{"b", int32(2), int64(0), store.Micros(created), []byte("y")},
		}, failAt: failAt, err: err}
	}
	got, err := store.Collect(rows(-1, nil), store.ScanTask, "test: list")
	want := []store.TaskRecord{
		{ID: "a", Status: 1, CreatedAt: created, Body: []byte("x")},
		{ID: "b", Status: 2, EndedAt: created, Body: []byte("y")},
	}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("Collect = %+v, %v; want %+v", got, err, want)
	}
	got, err = store.Collect(rows(1, nil), store.ScanTask, "test: list")
	if len(got) != 1 || err == nil || err.Error() != "test: list: bad row" {
		t.Fatalf("failing scan: %+v, %v", got, err)
	}
	end := errors.New("connection lost")
	got, err = store.Collect(rows(-1, end), store.ScanTask, "test: list")
	if len(got) != 2 || !errors.Is(err, end) || !strings.HasPrefix(err.Error(), "test: list: ") {
		t.Fatalf("failing result set: %+v, %v", got, err)
	}

	evs, err := store.Collect(&fakeRows{rows: [][]any{{int64(7), []byte("e")}}, failAt: -1}, store.EventScanner("t1"), "test: read")
	if err != nil || !reflect.DeepEqual(evs, []store.Event{{TaskID: "t1", Seq: 7, Data: []byte("e")}}) {
		t.Fatalf("events: %+v, %v", evs, err)
	}
}

func TestReadError(t *testing.T) {
	noRows := errors.New("no rows")
	other := errors.New("boom")
	if err := store.ReadError(nil, noRows, "x"); err != nil {
		t.Errorf("nil: %v", err)
	}
	if err := store.ReadError(noRows, noRows, "x"); err != store.ErrNotFound {
		t.Errorf("no rows: %v", err)
	}
	if err := store.ReadError(other, noRows, "db: get"); !errors.Is(err, other) || err.Error() != "db: get: boom" {
		t.Errorf("other: %v", err)
	}
}

func TestEventLimit(t *testing.T) {
	for in, want := range map[int]int{-1: 64, 0: 64, 1: 1, 500: 500} {
		if got := store.EventLimit(in); got != want {
			t.Errorf("EventLimit(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestMigrate(t *testing.T) {
	migrations := []string{"m1", "m2", "m3"}
	var applied []string
	var recorded []int
	apply := func(stmt string) error { applied = append(applied, stmt); return nil }
	record := func(v int, at int64) error {
		if at <= 0 {
			t.Errorf("applied at %d", at)
		}
		recorded = append(recorded, v)
		return nil
	}
	if err := store.Migrate("db", migrations, 1, apply, record); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(applied, []string{"m2", "m3"}) || !reflect.DeepEqual(recorded, []int{2, 3}) {
		t.Fatalf("from version 1: applied %v, recorded %v", applied, recorded)
	}

	applied, recorded = nil, nil
	if err := store.Migrate("db", migrations, 3, apply, record); err != nil || applied != nil || recorded != nil {
		t.Fatalf("up to date: %v %v %v", err, applied, recorded)
	}

	err := store.Migrate("db", migrations, 4, apply, record)
	if err == nil || err.Error() != "db: database schema version 4 is newer than this dispatcher (3)" || applied != nil {
		t.Fatalf("newer schema: %v, applied %v", err, applied)
	}

	boom := errors.New("boom")
	err = store.Migrate("db", migrations, 0, func(string) error { return boom }, record)
	if !errors.Is(err, boom) || err.Error() != "db: migration 1: boom" {
		t.Fatalf("failing migration: %v", err)
	}
	err = store.Migrate("db", migrations, 0, apply, func(int, int64) error { return boom })
	if !errors.Is(err, boom) || err.Error() != "db: migration 1: boom" {
		t.Fatalf("failing record: %v", err)
	}
}

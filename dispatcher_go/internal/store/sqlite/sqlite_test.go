package sqlite

import (
	"context"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := Open(context.Background(), t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestReopenKeepsDataAndSkipsDoneMigrations(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Apply(ctx, store.Batch{Events: []store.Event{{TaskID: "a", Seq: 1, Data: []byte("x")}}}); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = OpenFile(ctx, filepath.Join(dir, FileName))
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if n, _ := s.LastSeq(ctx, "a"); n != 1 {
		t.Fatalf("after reopen LastSeq = %d", n)
	}
	var v int
	if err := s.db.QueryRow(`SELECT MAX(version) FROM schema_migrations`).Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("schema version %d %v", v, err)
	}
}

func TestDataDirIsExclusive(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s, err := Open(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, dir); err == nil || !strings.Contains(err.Error(), "in use by another dispatcher") {
		t.Fatalf("second Open: %v", err)
	}
	s.Close()
	s, err = Open(ctx, dir)
	if err != nil {
		t.Fatalf("after Close: %v", err)
	}
	s.Close()
}

// TestCloseTwice: a second Close (a test's cleanup after the owner's)
// returns instead of panicking.
func TestCloseTwice(t *testing.T) {
	s, err := Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	_ = s.Close()
	_ = s.Close()
}

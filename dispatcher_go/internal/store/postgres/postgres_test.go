package postgres

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/storetest"
)

// dsn is the server the tests use; scripts/postgres.sh starts one.
func dsn(t testing.TB) string {
	d := os.Getenv("POSTGRES_TEST_DSN")
	if d == "" {
		t.Skip("POSTGRES_TEST_DSN is not set: start a server with scripts/postgres.sh start and export the DSN it prints")
	}
	return d
}

var schemaSeq atomic.Int64

// freshDSN creates an empty schema for one test and returns a DSN whose
// search_path points at it, so tests never see each other's rows.
func freshDSN(t testing.TB) string {
	base := dsn(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	schema := fmt.Sprintf("storetest_%d_%d", os.Getpid(), schemaSeq.Add(1))
	if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE; CREATE SCHEMA `+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if c, err := pgx.Connect(ctx, base); err == nil {
			_, _ = c.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
			c.Close(ctx)
		}
	})
	if !strings.Contains(base, "://") {
		return base + " search_path=" + schema // keyword/value form
	}
	if strings.Contains(base, "?") {
		return base + "&search_path=" + schema
	}
	return base + "?search_path=" + schema
}

func TestConformance(t *testing.T) {
	dsn(t)
	storetest.Run(t, func(t *testing.T) store.Store {
		s, err := Open(context.Background(), freshDSN(t))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestMigrationsRunOnceAcrossOpens(t *testing.T) {
	d := freshDSN(t)
	ctx := context.Background()
	for range 2 {
		s, err := Open(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		var v int
		if err := s.pool.QueryRow(ctx, `SELECT MAX(version) FROM schema_migrations`).Scan(&v); err != nil || v != len(migrations) {
			t.Fatalf("schema version %d %v", v, err)
		}
		s.Close()
	}
}

package addrfile_test

import (
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/addrfile"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestWrite(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "addr")
	for _, addr := range []string{"127.0.0.1:4242", "[::1]:5"} { // the second replaces the first
		if err := addrfile.Write(path, addr); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(path)
		if err != nil || string(b) != addr+"\n" {
			t.Fatalf("read back %q, %v; want %q", b, err, addr+"\n")
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("left in the directory: %v %v", entries, err)
	}
	if err := addrfile.Write(filepath.Join(dir, "missing", "addr"), "x:1"); err == nil {
		t.Fatal("writing into a missing directory succeeded")
	}
}

package testutil

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/agentdispatch/dispatcher"

// TestTestOnlyImportedByTests: no non-test file of the module imports
// testutil, and testutil imports no dispatcher package but the generated
// protos (so that any package's tests can use it without a cycle).
func TestTestOnlyImportedByTests(t *testing.T) {
	t.Parallel()
	root := filepath.Join("..", "..")
	self := module + "/internal/testutil"
	checked := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		checked++
		inTestutil := filepath.Dir(path) == "."
		for _, imp := range f.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			switch {
			case p == self:
				t.Errorf("%s imports testutil; only _test.go files may", path)
			case inTestutil && strings.HasPrefix(p, module+"/") && !strings.HasPrefix(p, module+"/internal/gen/"):
				t.Errorf("%s imports %s; testutil may import only the generated protos", path, p)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 20 {
		t.Fatalf("checked only %d files: is the module root %s?", checked, root)
	}
}

package benchkit

import (
	"bufio"
	"fmt"
	"os"
	"sync"
	"time"
)

// TraceFile is a benchmark trace: lines appended to the file named by an
// environment variable and flushed every second. OpenTrace returns nil
// when the variable is unset (or the file cannot be opened, which it
// reports on stderr); a nil *TraceFile's Printf does nothing, so tracing
// off costs a nil test.
type TraceFile struct {
	mu sync.Mutex
	w  *bufio.Writer
}

// OpenTrace opens the trace named by the environment variable env.
func OpenTrace(env string) *TraceFile {
	path := os.Getenv(env)
	if path == "" {
		return nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", env, err)
		return nil
	}
	t := &TraceFile{w: bufio.NewWriter(f)}
	go func() { // for the process's life: a trace is for benchmark runs only
		for range time.Tick(time.Second) {
			t.mu.Lock()
			_ = t.w.Flush()
			t.mu.Unlock()
		}
	}()
	return t
}

// Printf appends a line (format should end with a newline).
func (t *TraceFile) Printf(format string, args ...any) {
	if t == nil {
		return
	}
	t.mu.Lock()
	fmt.Fprintf(t.w, format, args...)
	t.mu.Unlock()
}

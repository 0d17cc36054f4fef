package testutil

import (
	"runtime"
	"strings"
)

// Blocked reports whether some goroutine is parked (on a channel, a select,
// a lock, a sleep) with fn as its innermost function outside the runtime and
// package sync: "blocked in fn". fn is a function name as stack traces print
// it, with or without its package path: "eventlog.(*memLog).Read".
//
// It is a condition for WaitFor, to wait until a goroutine has reached the
// wait a test wants to interrupt (a reader that waits for the next event),
// instead of sleeping and hoping it has.
func Blocked(fn string) bool {
	for _, g := range goroutines() {
		if g.parked && g.innermost != "" && (g.innermost == fn || strings.HasSuffix(g.innermost, "/"+fn)) {
			return true
		}
	}
	return false
}

// goroutine is what Blocked needs of one goroutine of a stack dump.
type goroutine struct {
	parked    bool
	innermost string // innermost function outside the runtime and sync
}

// goroutines parses the stacks of all goroutines.
func goroutines() []goroutine {
	buf := make([]byte, 64<<10)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []goroutine
	for _, block := range strings.Split(string(buf), "\n\n") {
		lines := strings.Split(block, "\n")
		header := lines[0]
		open, end := strings.IndexByte(header, '['), strings.IndexByte(header, ']')
		if !strings.HasPrefix(header, "goroutine ") || open < 0 || end < open {
			continue
		}
		state, _, _ := strings.Cut(header[open+1:end], ",")
		g := goroutine{parked: !strings.HasPrefix(state, "running") && !strings.HasPrefix(state, "runnable") && !strings.HasPrefix(state, "syscall")}
		for _, line := range lines[1:] {
			if line == "" || strings.HasPrefix(line, "\t") {
				continue
			}
			if strings.HasPrefix(line, "created by ") {
				break
			}
			name := line
			if i := strings.LastIndexByte(line, '('); i > 0 {
				name = line[:i]
			}
			if strings.HasPrefix(name, "runtime.") || strings.HasPrefix(name, "sync.") || strings.HasPrefix(name, "internal/") {
				continue
			}
			g.innermost = name
			break
		}
		out = append(out, g)
	}
	return out
}

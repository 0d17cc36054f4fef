package policy

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Stats counts decisions; safe for concurrent use. internal/metrics exports
// it to Prometheus at scrape time.
type Stats struct {
	// Evaluations counts packets evaluated.
	Evaluations atomic.Int64
	// Stops, Denies and Holds count non-allow decisions.
	Stops  atomic.Int64
	Denies atomic.Int64
	Holds  atomic.Int64
	// HoldsApproved, HoldsRejected, HoldsTimedOut count hold resolutions.
	HoldsApproved atomic.Int64
	HoldsRejected atomic.Int64
	HoldsTimedOut atomic.Int64
	// Errors counts rule evaluations that failed (cost limit, type error).
	Errors atomic.Int64
	// Reloads and ReloadFailures count policy loads after the first.
	Reloads        atomic.Int64
	ReloadFailures atomic.Int64

	rules sync.Map // rule id → *atomic.Int64
}

func (s *Stats) count(d Decision) {
	switch d.Action {
	case Stop:
		s.Stops.Add(1)
	case Deny:
		s.Denies.Add(1)
	case Hold:
		s.Holds.Add(1)
	}
	c, ok := s.rules.Load(d.RuleID)
	if !ok {
		c, _ = s.rules.LoadOrStore(d.RuleID, new(atomic.Int64))
	}
	c.(*atomic.Int64).Add(1)
}

// RuleCount is the number of non-allow decisions rule id made.
func (s *Stats) RuleCount(id string) int64 {
	if c, ok := s.rules.Load(id); ok {
		return c.(*atomic.Int64).Load()
	}
	return 0
}

// Engine holds the global policy in force. Safe for concurrent use; the
// policy is swapped atomically, so sessions pick up a reload on their next
// packet and no stream is disturbed.
type Engine struct {
	cur   atomic.Pointer[Policy]
	log   *slog.Logger
	stats Stats

	mu      sync.Mutex // serializes loads
	lastSrc []byte
}

// NewEngine returns an engine with an empty policy (allow everything).
// log may be nil.
func NewEngine(log *slog.Logger) *Engine {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	e := &Engine{log: log}
	e.cur.Store(&Policy{Version: "empty", window: DefaultTextWindow, keep: DefaultTextWindow, holdTimeout: DefaultHoldTimeout})
	return e
}

// Current is the policy in force.
func (e *Engine) Current() *Policy { return e.cur.Load() }

// Stats are the engine's counters.
func (e *Engine) Stats() *Stats { return &e.stats }

// Load compiles and tests src and, if it passes, puts it in force. On
// failure the previous policy stays and the error (wrapping ErrInvalid)
// says why.
func (e *Engine) Load(src []byte) (*Policy, error) {
	p, err := Compile(src)
	if err != nil {
		return nil, err
	}
	e.cur.Store(p)
	return p, nil
}

// LoadFile loads the policy file at path (see Load).
func (e *Engine) LoadFile(path string) (*Policy, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read policy file: %w", err)
	}
	p, err := e.Load(src)
	if err != nil {
		return nil, err
	}
	e.lastSrc = src
	e.log.Info("policy loaded", "file", path, "version", p.Version, "rules", p.NumRules())
	return p, nil
}

// Watch reloads path when its content changes, polling every interval (a
// polling watcher works on every file system and with editors that replace
// files by rename). A change is read once the file has held still for one
// interval, so a reload takes one to two intervals. A file that fails to
// load is logged with the reason and the policy in force stays. Watch
// returns when ctx ends.
func (e *Engine) Watch(ctx context.Context, path string, interval time.Duration) {
	if interval <= 0 {
		interval = time.Second
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	// The first tick reads the file and compares it with what LoadFile
	// loaded, so a change between LoadFile and Watch is not missed.
	var lastMod, seenMod time.Time
	var lastSize, seenSize int64 = -1, -1
	var failedSrc []byte
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(path)
		if err != nil {
			continue // being replaced, or gone: keep the policy in force
		}
		if fi.ModTime().Equal(lastMod) && fi.Size() == lastSize {
			continue
		}
		// Read a change only once it has held still for one interval: a
		// file being written in place (truncated, then filled) must not be
		// loaded half written — an empty policy would drop every rule.
		if !fi.ModTime().Equal(seenMod) || fi.Size() != seenSize {
			seenMod, seenSize = fi.ModTime(), fi.Size()
			continue
		}
		if fi.Size() == 0 {
			// Truncated and not yet refilled (a writer stalled for longer
			// than an interval): an empty file would drop every rule. To
			// drop them on purpose, write "rules: []".
			continue
		}
		lastMod, lastSize = fi.ModTime(), fi.Size()
		src, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		if bytes.Equal(src, failedSrc) {
			continue
		}
		e.mu.Lock()
		if bytes.Equal(src, e.lastSrc) {
			e.mu.Unlock()
			continue
		}
		p, err := e.Load(src)
		if err == nil {
			e.lastSrc = src
		}
		e.mu.Unlock()
		if err != nil {
			failedSrc = src
			e.stats.ReloadFailures.Add(1)
			e.log.Error("policy reload rejected; the previous policy stays in force",
				"file", path, "version_in_force", e.Current().Version, "error", err)
			continue
		}
		failedSrc = nil
		e.stats.Reloads.Add(1)
		e.log.Info("policy reloaded", "file", path, "version", p.Version, "rules", p.NumRules())
	}
}

package session

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
	"golang.org/x/time/rate"
)

// refusingReattacher refuses every re-attach with err.
type refusingReattacher struct{ err error }

func (r refusingReattacher) Reattach(context.Context, string, string, string, func(string) bool, func(*task.Task) task.Runner) (task.Reattached, error) {
	return task.Reattached{}, r.err
}

// TestReattachRefusalFinalOrForNow: a refusal for good (the task ended, is
// unknown, waits for another session) is the hello's ack without a session
// id, and the stream goes on as an idle slot; a refusal the dispatcher
// could not decide (the store or the fleet's database did not answer, the
// manager closes, a deadline, any other error) sends nothing and ends the
// stream with ErrReattachLater, which the API answers UNAVAILABLE: the
// commander reconnects and re-attaches again. A driver's own words stay
// in the dispatcher's log.
func TestReattachRefusalFinalOrForNow(t *testing.T) {
	cases := []struct {
		name  string
		err   error
		final bool
		says  string // in the ack's detail, or the stream's error
	}{
		{"unknown task", task.ErrNotFound, true, "task not found"},
		{"task ended", fmt.Errorf("%w: the task ended FAILURE: boom", task.ErrNotRunning), true, "ended FAILURE"},
		{"requeued", fmt.Errorf("%w: %s", task.ErrNotRunning, task.RequeuedRefusal(1, "ses-x", true)), true, "requeued"},
		{"fleet database", fmt.Errorf("claim the task: %w", fmt.Errorf("%w: claim the task: the fleet's database did not answer", store.ErrUnavailable)), false, "the fleet's database did not answer"},
		{"store stalled", fmt.Errorf("%w: a write has been under way for more than 5s", store.ErrUnavailable), false, "under way"},
		{"closing", task.ErrClosed, false, "shutting down"},
		{"another claim under way", task.ErrClaimUnderWay, false, "claiming the task"},
		{"deadline", fmt.Errorf("claim the task: claim task t-1: %w", context.DeadlineExceeded), false, "in time"},
		{"driver error", errors.New("claim task t-1: open /secret/path/tasks.db: disk I/O error"), false, "could not be claimed"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := handOverEnv(t)
			e.srv.opts.Reattacher = refusingReattacher{tc.err}
			c := e.open(t, 64)
			hello := testutil.Hello("cmd-1", "planner:chat")
			hello.GetHello().Reattach = &dispatchv1.Reattach{TaskId: "t-1", SessionId: "ses-x", Attempt: 1}
			c.send(hello)
			if tc.final {
				p := c.recv()
				a := p.GetAck()
				if a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != "" ||
					!strings.Contains(a.GetDetail(), "re-attach refused") || !strings.Contains(a.GetDetail(), tc.says) {
					t.Fatalf("final refusal: %v", p)
				}
				c.noPacket(50 * time.Millisecond)
				select {
				case <-c.served:
					t.Fatalf("a final refusal ended the stream: %v", c.err)
				default:
				}
				return
			}
			err := c.ended()
			if !errors.Is(err, ErrReattachLater) || !strings.Contains(err.Error(), tc.says) {
				t.Fatalf("refusal for now ended the stream with %v", err)
			}
			if strings.Contains(err.Error(), "/secret/path") {
				t.Fatalf("a driver's error reaches the commander: %v", err)
			}
			select {
			case p := <-c.Out:
				t.Fatalf("a refusal for now sent %v", p)
			default:
			}
			if n := e.srv.stats.Slots.Load(); n != 0 {
				t.Fatalf("%d slots registered after the refusal", n)
			}
		})
	}
	// Refusals the session makes itself are final.
	for _, err := range []error{errNoHandOver, errBadReattach} {
		if !refusedForGood(err) {
			t.Fatalf("%v is not final", err)
		}
	}
}

// failingClaimer fails its first fails claims with store.ErrUnavailable,
// then gives the next attempt.
type failingClaimer struct {
	fails  atomic.Int32
	claims atomic.Int32
}

func (c *failingClaimer) Claim(context.Context, string) (int64, error) {
	c.claims.Add(1)
	if c.fails.Add(-1) >= 0 {
		return 0, fmt.Errorf("claim task: %w: writes are failing (retrying)", store.ErrUnavailable)
	}
	return 2, nil
}

// claimerEnv is linkLossEnv whose manager claims re-attached tasks with c.
func claimerEnv(t *testing.T, window time.Duration, c task.Claimer) *env {
	t.Helper()
	b, err := broker.New(broker.Options{DefaultTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sched := scheduler.New(16)
	mgr := task.NewManager(eventlog.NewMemory(eventlog.Limits{}), task.NewConfigStore(nil),
		task.ManagerOptions{DefaultPlanner: "chat", StopGrace: time.Second, Claimer: c})
	mgr.SetQueue(sched)
	srv := NewServer(sched, b, Options{HandOver: true, LinkLossWindow: window, AckInterval: 20 * time.Millisecond, StopGrace: time.Second, Reattacher: mgr})
	t.Cleanup(srv.Shutdown)
	return &env{srv: srv, sched: sched, mgr: mgr}
}

// detachedSession runs a session on a stream of e that then breaks: the
// task waits for its session to re-attach.
func detachedSession(t *testing.T, e *env) (*task.Task, string) {
	t.Helper()
	c := e.connect(t, "planner:chat")
	tk := e.submit(t, task.Spec{})
	sid, _ := c.start()
	c.send(upSeq(sid, 1, &dispatchv1.ContentChunk{Text: "a"}))
	c.recvRecorded(sid, 1)
	c.cancel() // the link breaks
	if err := c.ended(); err == nil {
		t.Fatal("Serve of a broken stream returned nil")
	}
	if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
		t.Fatalf("after the link loss: %v, handing over %v", tk.Status(), tk.HandingOver())
	}
	return tk, sid
}

// TestReattachRefusedForNowWaitsForTheNextTry: the store fails the claim of
// a re-attach: the stream ends ErrReattachLater, the task still waits for
// its session, and the commander's next re-attach takes it over and ends
// it SUCCESS.
func TestReattachRefusedForNowWaitsForTheNextTry(t *testing.T) {
	claimer := &failingClaimer{}
	claimer.fails.Store(2)
	e := claimerEnv(t, time.Minute, claimer)
	tk, sid := detachedSession(t, e)

	for i := 0; i < 2; i++ {
		c := e.open(t, 64)
		c.send(reattachHello(tk, sid, 1))
		if err := c.ended(); !errors.Is(err, ErrReattachLater) || !strings.Contains(err.Error(), "task store unavailable") {
			t.Fatalf("re-attach %d while the store fails: %v", i+1, err)
		}
		if tk.Status() != agentpb.TaskStatus_RUNNING || !tk.HandingOver() {
			t.Fatalf("after a refusal for now: %v %q, handing over %v", tk.Status(), tk.Info().Message, tk.HandingOver())
		}
	}

	c := e.open(t, 64)
	c.send(reattachHello(tk, sid, 1))
	p := c.recv()
	if a := p.GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO || p.GetSessionId() != sid || a.GetAttempt() != 2 || a.GetUpstreamSeq() != 1 {
		t.Fatalf("re-attach once the store is back: %v", p)
	}
	c.send(upSeq(sid, 2, &dispatchv1.ContentChunk{Text: "b"}))
	c.send(upSeq(sid, 3, testutil.Success("ab")))
	if info := waitDone(t, tk); info.Status != agentpb.TaskStatus_SUCCESS || tk.Attempt() != 2 {
		t.Fatalf("after the re-attach: %v %q attempt %d", info.Status, info.Message, tk.Attempt())
	}
	if got := contentOf(t, tk); got != "ab" {
		t.Fatalf("content %q", got)
	}
	if n := claimer.claims.Load(); n != 3 {
		t.Fatalf("%d claims, want 3", n)
	}
}

// TestReattachRefusedForNowStillEndsWithTheWindow: the claim keeps failing:
// the task is not left RUNNING but ends FAILURE when its window runs out,
// as when nobody re-attaches; a re-attach after that is refused for good.
func TestReattachRefusedForNowStillEndsWithTheWindow(t *testing.T) {
	claimer := &failingClaimer{}
	claimer.fails.Store(1 << 20)
	// Long enough that a stall under -race on a loaded machine does not
	// let the window pass before the first re-attach is refused.
	const window = 2 * time.Second
	e := claimerEnv(t, window, claimer)
	tk, sid := detachedSession(t, e)

	c := e.open(t, 64)
	c.send(reattachHello(tk, sid, 1))
	if err := c.ended(); !errors.Is(err, ErrReattachLater) {
		t.Fatalf("re-attach while the store fails: %v", err)
	}
	info := waitDone(t, tk)
	if info.Status != agentpb.TaskStatus_FAILURE || !strings.Contains(info.Message, "did not re-attach") {
		t.Fatalf("after the window: %v %q", info.Status, info.Message)
	}
	c2 := e.open(t, 64)
	c2.send(reattachHello(tk, sid, 1))
	p := c2.recv()
	if a := p.GetAck(); p.GetSessionId() != "" || !strings.Contains(a.GetDetail(), "ended FAILURE") {
		t.Fatalf("re-attach after the window: %v", p)
	}
}

// levelCounter counts the records of one message per level.
type levelCounter struct {
	msg string
	mu  sync.Mutex
	n   map[slog.Level]int
	// quiet: the more_at_debug attribute of each counted Warn record.
	quiet []int64
}

func (h *levelCounter) Enabled(context.Context, slog.Level) bool { return true }
func (h *levelCounter) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *levelCounter) WithGroup(string) slog.Handler            { return h }
func (h *levelCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Message != h.msg {
		return nil
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.n[r.Level]++
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "more_at_debug" {
			h.quiet = append(h.quiet, a.Value.Int64())
		}
		return true
	})
	return nil
}

// TestReattachRefusedForNowLogsOneWarn: while re-attaches are refused for
// now (about one per waiting session and second during an outage), one is
// logged at Warn and the others at Debug until laterLogEvery has passed;
// the next Warn says how many went to Debug.
func TestReattachRefusedForNowLogsOneWarn(t *testing.T) {
	e := handOverEnv(t)
	logs := &levelCounter{msg: "re-attach refused for now: the commander will try again", n: map[slog.Level]int{}}
	e.srv.log = slog.New(logs)
	e.srv.opts.Reattacher = refusingReattacher{fmt.Errorf("%w: writes are failing (retrying)", store.ErrUnavailable)}
	refuse := func(n int) {
		for i := 0; i < n; i++ {
			c := e.open(t, 64)
			hello := testutil.Hello("cmd-1", "planner:chat")
			hello.GetHello().Reattach = &dispatchv1.Reattach{TaskId: fmt.Sprintf("t-%d", i%2), SessionId: "ses-x", Attempt: 1}
			c.send(hello)
			if err := c.ended(); !errors.Is(err, ErrReattachLater) {
				t.Fatalf("re-attach %d: %v", i, err)
			}
		}
	}
	refuse(5)
	logs.mu.Lock()
	warn, debug := logs.n[slog.LevelWarn], logs.n[slog.LevelDebug]
	logs.mu.Unlock()
	if warn != 1 || debug != 4 {
		t.Fatalf("5 refusals in a row: %d at Warn, %d at Debug; want 1 and 4", warn, debug)
	}
	// The interval has passed: the next refusal is a Warn again, with the count.
	e.srv.laterWarn = rate.Sometimes{Interval: time.Nanosecond}
	time.Sleep(time.Millisecond)
	refuse(1)
	logs.mu.Lock()
	defer logs.mu.Unlock()
	if logs.n[slog.LevelWarn] != 2 || len(logs.quiet) != 2 || logs.quiet[0] != 0 || logs.quiet[1] != 4 {
		t.Fatalf("after the interval: %d at Warn, more_at_debug %v; want 2 and [0 4]", logs.n[slog.LevelWarn], logs.quiet)
	}
}

package api

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testTimeout bounds a whole test's calls (testutil.Context).
const testTimeout = 20 * time.Second

// heavyTimeout bounds the calls of a test that moves much more than most
// (megabytes through gRPC, thousands of packets), all of it under -race: at
// load ~30 on 2 cores such a test took more than testTimeout with nothing
// wrong but the machine. It is a hang guard, not a speed limit.
const heavyTimeout = 3 * testTimeout

// harness is a dispatcher served in memory (testutil.ServeGRPC) with
// clients of every service on one connection. Commanders are
// testutil.Commanders on conn.
type harness struct {
	d      *dispatcher.Dispatcher
	g      *testutil.GRPC
	conn   *grpc.ClientConn
	agent  agentpb.AgentClient
	tasks  dispatchv1.TaskServiceClient
	tools  dispatchv1.ToolProviderServiceClient
	health healthpb.HealthClient
	store  store.Store // of a storeHarness
}

// newHarness serves a dispatcher with cfg; ctx, for the test's calls, ends
// with the test (or after testTimeout).
func newHarness(t testing.TB, cfg dispatcher.Config) (h *harness, ctx context.Context) {
	t.Helper()
	return newHarnessWith(t, cfg)
}

// newHarnessWith is newHarness with extra server options (first).
func newHarnessWith(t testing.TB, cfg dispatcher.Config, extra ...grpc.ServerOption) (*harness, context.Context) {
	t.Helper()
	if cfg.Tasks.StopGrace == 0 {
		cfg.Tasks.StopGrace = 500 * time.Millisecond
	}
	d, err := dispatcher.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := New(d)
	g := testutil.ServeGRPC(t, s.Register, append(extra, s.ServerOptions()...)...)
	g.OnStop(d.Close)
	return &harness{
		d: d, g: g, conn: g.Conn,
		agent:  agentpb.NewAgentClient(g.Conn),
		tasks:  dispatchv1.NewTaskServiceClient(g.Conn),
		tools:  dispatchv1.NewToolProviderServiceClient(g.Conn),
		health: healthpb.NewHealthClient(g.Conn),
	}, testutil.Context(t, testTimeout)
}

func bearer(ctx context.Context, token string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("error %v, want code %v", err, code)
	}
}

// chatScript is a typical chat session: a thought, a calculator call, the
// answer, usage, and a SUCCESS result.
func chatScript(answer string) []any {
	return []any{
		&dispatchv1.ThoughtChain{StepName: "Planning", Delta: "I should add"},
		&dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"1 + 1"}`},
		&dispatchv1.ContentChunk{Text: answer},
		&dispatchv1.Usage{InputTokens: 100, OutputTokens: 20, Cost: 0.002, Currency: "USD", Steps: 1},
		testutil.Success(answer),
	}
}

// chat plays chatScript(answer) on c's next session and waits for the
// session's closing ack. It may run on any goroutine.
func chat(ctx context.Context, c *testutil.Commander, answer string) error {
	s, err := c.NextSession(ctx)
	if err != nil {
		return err
	}
	if err := s.Play(ctx, chatScript(answer)...); err != nil {
		return fmt.Errorf("session %s: %w", s.ID, err)
	}
	if err := s.Closed(ctx); err != nil {
		return fmt.Errorf("session %s not closed: %w", s.ID, err)
	}
	return nil
}

// playChat is chat on the test's goroutine, within testutil.Wait.
func playChat(t *testing.T, c *testutil.Commander, answer string) {
	t.Helper()
	if err := chat(testutil.Context(t, testutil.Wait), c, answer); err != nil {
		t.Fatal(err)
	}
}

// watchEvents follows the events of task id after seq after to the task's
// end, in the background; awaitEvents waits for them.
func watchEvents(t *testing.T, h *harness, id string, after uint64) <-chan testutil.Result[[]*dispatchv1.TaskEvent] {
	t.Helper()
	return watchEventsWithin(t, h, id, after, testTimeout)
}

// watchEventsWithin is watchEvents whose watch ends after timeout.
func watchEventsWithin(t *testing.T, h *harness, id string, after uint64, timeout time.Duration) <-chan testutil.Result[[]*dispatchv1.TaskEvent] {
	t.Helper()
	s, err := h.tasks.WatchTask(testutil.Context(t, timeout), &dispatchv1.WatchTaskRequest{TaskId: id, AfterSeq: after})
	if err != nil {
		t.Fatal(err)
	}
	return testutil.Async(func() ([]*dispatchv1.TaskEvent, error) {
		rs, err := testutil.RecvAll(s, nil)
		evs := make([]*dispatchv1.TaskEvent, len(rs))
		for i, r := range rs {
			evs[i] = r.GetEvent()
		}
		return evs, err
	})
}

// awaitEvents waits for the events a watchEvents saw; the watch must end
// with the task.
func awaitEvents(t *testing.T, watched <-chan testutil.Result[[]*dispatchv1.TaskEvent]) []*dispatchv1.TaskEvent {
	t.Helper()
	return awaitEventsWithin(t, watched, 2*testutil.Wait)
}

// awaitEventsWithin is awaitEvents waiting at most timeout.
func awaitEventsWithin(t *testing.T, watched <-chan testutil.Result[[]*dispatchv1.TaskEvent], timeout time.Duration) []*dispatchv1.TaskEvent {
	t.Helper()
	r := testutil.Recv(t, watched, timeout, "the watch to end with the task")
	if r.Err != nil {
		t.Fatalf("watch ended with %v after %d events", r.Err, len(r.V))
	}
	return r.V
}

// watchAll is every event of task id after seq after, to the task's end.
func watchAll(t *testing.T, h *harness, id string, after uint64) []*dispatchv1.TaskEvent {
	t.Helper()
	return awaitEvents(t, watchEvents(t, h, id, after))
}

// isClosed is a RecvUntil condition: the dispatcher's SESSION_CLOSED ack.
func isClosed(p *dispatchv1.DownstreamPacket) bool {
	return p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED
}

// isStop is a RecvUntil condition: a stop.
func isStop(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil }

// isToolResult is a RecvUntil condition: a tool call's result.
func isToolResult(p *dispatchv1.DownstreamPacket) bool { return p.GetToolResult() != nil }

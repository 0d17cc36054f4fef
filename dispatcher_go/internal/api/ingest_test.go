package api_test

// Values a peer sends that cannot be stored must not poison a task, the
// stream or the store (issue 12, class 1). A dispatcher with a SQLite store
// served over bufconn, stub commanders and a stub tool provider over real
// gRPC; self-contained (package api_test) so that it needs none of the
// package's own test harness.

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/store/sqlite"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// ingestEnv is a dispatcher on a SQLite store, served in memory.
type ingestEnv struct {
	d     *dispatcher.Dispatcher
	g     *testutil.GRPC
	tasks dispatchv1.TaskServiceClient
}

func newIngestEnv(t *testing.T) *ingestEnv {
	t.Helper()
	return newIngestEnvWith(t, func(st store.Store) store.Store { return st })
}

// newIngestEnvWith is newIngestEnv with the SQLite store wrapped by wrap.
func newIngestEnvWith(t *testing.T, wrap func(store.Store) store.Store) *ingestEnv {
	t.Helper()
	st, err := sqlite.Open(context.Background(), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	d, err := dispatcher.New(dispatcher.Config{
		Store: dispatcher.Store{Backend: wrap(st)},
		Tasks: dispatcher.Tasks{StopGrace: 2 * time.Second},
	})
	if err != nil {
		_ = st.Close()
		t.Fatal(err)
	}
	s := api.New(d)
	g := testutil.ServeGRPC(t, s.Register, s.ServerOptions()...)
	g.OnStop(func() {
		d.Close()
		_ = st.Close()
	})
	return &ingestEnv{d: d, g: g, tasks: dispatchv1.NewTaskServiceClient(g.Conn)}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func (e *ingestEnv) submit(t *testing.T, ctx context.Context, instruction string) string {
	t.Helper()
	r, err := e.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: instruction})
	if err != nil {
		t.Fatalf("submit: %v", err)
	}
	return r.GetTaskId()
}

// ended waits for task id to end and returns it.
func (e *ingestEnv) ended(t *testing.T, ctx context.Context, id string) *dispatchv1.Task {
	t.Helper()
	var last *dispatchv1.Task
	testutil.WaitFor(t, 10*time.Second, func() bool {
		r, err := e.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
		if err != nil {
			return false
		}
		last = r.GetTask()
		s := last.GetStatus()
		return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
	}, "task %s to end", id)
	return last
}

// history reads task id's events from the start to the end of the log.
func (e *ingestEnv) history(t *testing.T, ctx context.Context, id string) []*dispatchv1.TaskEvent {
	t.Helper()
	w, err := e.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: id})
	if err != nil {
		t.Fatal(err)
	}
	var out []*dispatchv1.TaskEvent
	for {
		r, err := w.Recv()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatalf("watch %s after %d events: %v", id, len(out), err)
		}
		out = append(out, r.GetEvent())
	}
}

// runsToSuccess checks that the dispatcher still runs tasks to the end and
// stores them: a task served by c (or a new slot) succeeds, and a flush of
// the store writer returns.
func (e *ingestEnv) runsToSuccess(t *testing.T, ctx context.Context, c *testutil.Commander) {
	t.Helper()
	id := e.submit(t, ctx, "still working?")
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Play(ctx, &dispatchv1.ContentChunk{Text: "yes"}, testutil.Success("yes")); err != nil {
		t.Fatal(err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	if got := e.ended(t, ctx, id); got.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("next task: %v", got)
	}
	if err := e.d.StoreWriter().FlushWhileHealthy(ctx); err != nil {
		t.Fatalf("store writer after the bad value: %v", err)
	}
}

// TestUsageFromCommanderIsChecked: a usage of NaN, ±Inf or negative (a
// buggy commander, a price file with "inf") is refused at ingest with ack
// REJECTED, and the session is stopped: the task ends FAILURE saying why,
// its statistics hold no such value, and the store keeps working for every
// task (a NaN in a task record used to make the store writer retry its
// batch for ever: no event of any task became readable, Submit hung).
func TestUsageFromCommanderIsChecked(t *testing.T) {
	for name, u := range map[string]*dispatchv1.Usage{
		"cost NaN":              {Cost: math.NaN(), InputTokens: 1},
		"cost +Inf":             {Cost: math.Inf(1)},
		"cost -Inf":             {Cost: math.Inf(-1)},
		"cost negative":         {Cost: -1},
		"input tokens negative": {InputTokens: -1},
		"steps negative":        {Steps: -1},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := testCtx(t)
			e := newIngestEnv(t)
			c := testutil.Connect(t, ctx, e.g.Conn, "planner:chat")
			id := e.submit(t, ctx, "spend")
			s, err := c.NextSession(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if err := s.Send(u); err != nil {
				t.Fatal(err)
			}
			// The refusal and the stop, in either order (the stop has its
			// own lane).
			var rejected, stopped bool
			for !rejected || !stopped {
				p, err := s.Next(ctx)
				switch {
				case errors.Is(err, testutil.ErrStopped):
					stopped = true
					if !strings.Contains(p.GetStop().GetReason(), "usage") {
						t.Errorf("stop reason %q does not say it is the usage", p.GetStop().GetReason())
					}
				case err != nil:
					t.Fatal(err)
				case p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_REJECTED:
					rejected = true
					if !strings.Contains(p.GetAck().GetDetail(), "usage") {
						t.Errorf("ack detail %q does not say it is the usage", p.GetAck().GetDetail())
					}
				}
			}
			if err := s.Closed(ctx); err != nil {
				t.Fatal(err)
			}
			got := e.ended(t, ctx, id)
			if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(got.GetMessage(), "usage") {
				t.Fatalf("task: %v %q, want FAILURE saying the usage was invalid", got.GetStatus(), got.GetMessage())
			}
			st := got.GetStatistics()
			if c := st.GetCost(); math.IsNaN(c) || math.IsInf(c, 0) || c < 0 || st.GetInputTokens() < 0 || st.GetSteps() < 0 {
				t.Fatalf("statistics kept the bad value: %v", st)
			}
			for _, ev := range e.history(t, ctx, id) {
				if ev.GetUsage() != nil {
					t.Fatalf("the refused usage was recorded: %v", ev)
				}
			}
			e.runsToSuccess(t, ctx, c)
		})
	}
}

// TestFinalUsageFromCommanderIsChecked: the usage riding on stopped (the
// terminal packet, which cannot be refused) is not counted or recorded
// when it is not a number the dispatcher can store; the task ends as the
// stop decided, saying the usage was refused.
func TestFinalUsageFromCommanderIsChecked(t *testing.T) {
	ctx := testCtx(t)
	e := newIngestEnv(t)
	c := testutil.Connect(t, ctx, e.g.Conn, "planner:chat")
	id := e.submit(t, ctx, "spend")
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cancelled := make(chan error, 1)
	go func() { // CancelTask waits for the outcome
		_, err := e.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: id})
		cancelled <- err
	}()
	p := c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil })
	if err := s.Send(&dispatchv1.Stopped{Reason: p.GetStop().GetReason(), FinalUsage: &dispatchv1.Usage{Cost: math.NaN(), OutputTokens: 5}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	if err := testutil.Recv(t, cancelled, testutil.Wait, "CancelTask to answer"); err != nil {
		t.Fatal(err)
	}
	got := e.ended(t, ctx, id)
	if got.GetStatus() != agentpb.TaskStatus_CANCELLED || !strings.Contains(got.GetMessage(), "final usage was refused") {
		t.Fatalf("task: %v %q, want CANCELLED saying the final usage was refused", got.GetStatus(), got.GetMessage())
	}
	if st := got.GetStatistics(); math.IsNaN(st.GetCost()) || st.GetOutputTokens() != 0 {
		t.Fatalf("statistics counted the refused usage: %v", st)
	}
	for _, ev := range e.history(t, ctx, id) {
		if ev.GetStopped().GetFinalUsage() != nil {
			t.Fatalf("the refused usage was recorded: %v", ev)
		}
	}
	e.runsToSuccess(t, ctx, c)
}

// TestLongChineseToolErrorReachesTheCommander: a provider's tool error of
// 900 bytes of Chinese (a file name) was cut at 512 bytes in the middle of
// a character; protobuf refused to send it, the commander's stream was torn
// down and the task ended FAILURE ("commander connection lost"), and the
// event stored could not be read back. Now the commander gets the error,
// cut on a character boundary, and the task and its history are fine.
func TestLongChineseToolErrorReachesTheCommander(t *testing.T) {
	ctx := testCtx(t)
	e := newIngestEnv(t)
	prov, err := dispatchv1.NewToolProviderServiceClient(e.g.Conn).Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "files", Tools: []*dispatchv1.ToolSpec{{Name: "read_file"}},
	}}}); err != nil {
		t.Fatal(err)
	}
	if m, err := prov.Recv(); err != nil || m.GetWelcome() == nil {
		t.Fatalf("welcome: %v %v", m, err)
	}
	// 15 ASCII bytes first: the 512-byte cut falls inside a character.
	longErr := "no such file: x" + strings.Repeat("中文文件名", 60)
	go func() {
		for {
			m, err := prov.Recv()
			if err != nil {
				return
			}
			if inv := m.GetInvoke(); inv != nil {
				_ = prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Result{Result: &dispatchv1.InvocationResult{
					InvocationId: inv.GetInvocationId(),
					Error:        &dispatchv1.ToolError{Code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED, Message: longErr},
				}}})
			}
		}
	}()

	c := testutil.Connect(t, ctx, e.g.Conn, "planner:chat")
	id := e.submit(t, ctx, "read it")
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&dispatchv1.ToolCallRequest{ToolName: "read_file", ArgumentsJson: `{}`, CallId: "c1"}); err != nil {
		t.Fatal(err)
	}
	res, err := s.ToolResult(ctx, "c1")
	if err != nil {
		t.Fatalf("the tool result did not reach the commander: %v", err)
	}
	msg := res.GetError().GetMessage()
	if !utf8.ValidString(msg) || !strings.HasPrefix(longErr, strings.TrimSuffix(msg, "…")) || len(msg) < 400 {
		t.Fatalf("tool error %q: want a valid UTF-8 prefix of the provider's", msg)
	}
	if err := s.Play(ctx, testutil.Success("done")); err != nil {
		t.Fatal(err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	if got := e.ended(t, ctx, id); got.GetStatus() != agentpb.TaskStatus_SUCCESS {
		t.Fatalf("task: %v %q", got.GetStatus(), got.GetMessage())
	}
	var found bool
	for _, ev := range e.history(t, ctx, id) {
		if r := ev.GetToolResult().GetResult(); r != nil {
			found = r.GetError().GetMessage() == msg
		}
	}
	if !found {
		t.Fatal("the tool result is not in the task's history as the commander got it")
	}
	e.runsToSuccess(t, ctx, c)
}

// rawCodec sends pre-encoded bytes as they are (to play a peer that sends
// what protobuf-go would refuse to encode) and decodes replies as protobuf.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) {
	if b, ok := v.([]byte); ok {
		return b, nil
	}
	return proto.Marshal(v.(proto.Message))
}

func (rawCodec) Unmarshal(data []byte, v any) error { return proto.Unmarshal(data, v.(proto.Message)) }

// Name is "proto", so that the server decodes with its own codec.
func (rawCodec) Name() string { return "proto" }

var _ encoding.Codec = rawCodec{}

// TestInvalidUTF8FromCommanderEndsOnlyItsSession: protobuf-go refuses a
// packet whose string is not UTF-8, so the dispatcher cannot read the
// stream on: that stream's session ends FAILURE saying so clearly, and
// another commander's stream, the dispatcher and its store go on.
func TestInvalidUTF8FromCommanderEndsOnlyItsSession(t *testing.T) {
	ctx := testCtx(t)
	e := newIngestEnv(t)
	stream, err := e.g.Conn.NewStream(ctx, &dispatchv1.AgentInteraction_ServiceDesc.Streams[0],
		"/dispatch.v1.AgentInteraction/ChatStream", grpc.ForceCodec(rawCodec{}))
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.SendMsg(testutil.Hello("bad-commander", "planner:chat")); err != nil {
		t.Fatal(err)
	}
	recv := func() *dispatchv1.DownstreamPacket {
		p := &dispatchv1.DownstreamPacket{}
		if err := stream.RecvMsg(p); err != nil {
			t.Fatalf("bad commander's stream: %v", err)
		}
		return p
	}
	if recv().GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		t.Fatal("no hello ack")
	}
	id := e.submit(t, ctx, "say something")
	start := recv()
	if start.GetStart() == nil {
		t.Fatalf("want a start, got %v", start)
	}
	// proto.Marshal reports the invalid UTF-8 but encodes it all the same.
	raw, _ := proto.Marshal(testutil.Up(start.GetSessionId(), &dispatchv1.ContentChunk{Text: "half a character: \xe4\xb8"}))
	if err := stream.SendMsg(raw); err != nil {
		t.Fatal(err)
	}
	got := e.ended(t, ctx, id)
	if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(got.GetMessage(), "UTF-8") {
		t.Fatalf("task: %v %q, want FAILURE saying the commander sent invalid UTF-8", got.GetStatus(), got.GetMessage())
	}
	// The commander's mistake: its stream ends INVALID_ARGUMENT (grpc-go's
	// INTERNAL before decodeerr.go).
	for {
		if err := stream.RecvMsg(&dispatchv1.DownstreamPacket{}); err != nil {
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "invalid UTF-8") {
				t.Fatalf("the bad stream ended with %v", err)
			}
			break
		}
	}
	// The bad stream is over; a good commander still gets and runs tasks.
	good := testutil.Connect(t, ctx, e.g.Conn, "planner:chat")
	e.runsToSuccess(t, ctx, good)
}

// refusingBackend refuses, as a database refuses a row, every batch with an
// event that holds refuseMe.
type refusingBackend struct{ store.Store }

const refuseMe = "REFUSE-ME"

func (s refusingBackend) Apply(ctx context.Context, b store.Batch) error {
	for _, e := range b.Events {
		if bytes.Contains(e.Data, []byte(refuseMe)) {
			return store.Rejected(errors.New("CHECK constraint failed: events"))
		}
	}
	return s.Store.Apply(ctx, b)
}

// TestRefusedRecordFailsOnlyItsTask: an event the store refuses used to be
// retried with its whole batch for ever (no event of any task readable,
// Submit hanging). Now the task it belongs to is stopped and ends FAILURE
// saying the dispatcher could not store it, its history holds an error
// event at that seq instead, and every other task runs and is stored.
func TestRefusedRecordFailsOnlyItsTask(t *testing.T) {
	ctx := testCtx(t)
	e := newIngestEnvWith(t, func(st store.Store) store.Store { return refusingBackend{st} })
	c := testutil.Connect(t, ctx, e.g.Conn, "planner:chat")
	id := e.submit(t, ctx, "say the word")
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = s.Play(ctx, &dispatchv1.ContentChunk{Text: "fine"}, &dispatchv1.ContentChunk{Text: refuseMe}, testutil.Pause(time.Minute))
	if !errors.Is(err, testutil.ErrStopped) {
		t.Fatalf("the session was not stopped: %v", err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	got := e.ended(t, ctx, id)
	if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(got.GetMessage(), "could not store") {
		t.Fatalf("task: %v %q, want FAILURE saying it could not be stored", got.GetStatus(), got.GetMessage())
	}
	var placeholders int
	for _, ev := range e.history(t, ctx, id) {
		if strings.Contains(ev.GetContent().GetText(), refuseMe) {
			t.Fatalf("the refused event is served: %v", ev)
		}
		if ev.GetError().GetCode() == store.EventNotStored {
			placeholders++
		}
	}
	if placeholders != 1 {
		t.Fatalf("%d placeholders in the history, want 1", placeholders)
	}
	e.runsToSuccess(t, ctx, c)
}

package testutil

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoregistry"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// recorder is a testing.TB whose Fatal ends the helper's goroutine, as the
// real one does, and records the message instead of failing the test.
type recorder struct {
	testing.TB
	mu     sync.Mutex
	failed []string
}

func (r *recorder) Helper() {}

func (r *recorder) Fatalf(format string, args ...any) {
	r.mu.Lock()
	r.failed = append(r.failed, fmt.Sprintf(format, args...))
	r.mu.Unlock()
	runtime.Goexit()
}

func (r *recorder) Fatal(args ...any) { r.Fatalf("%s", fmt.Sprint(args...)) }

// run runs fn with a recorder on a goroutine of its own (Fatal ends it) and
// returns the failure messages.
func run(t *testing.T, fn func(tb testing.TB)) []string {
	t.Helper()
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(r)
	}()
	select {
	case <-done:
	case <-time.After(Wait):
		t.Fatal("helper neither returned nor failed")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.failed
}

func wantFailure(t *testing.T, failed []string, want string) {
	t.Helper()
	if len(failed) != 1 || !strings.Contains(failed[0], want) {
		t.Fatalf("failures %q, want one containing %q", failed, want)
	}
}

func TestWaitFor(t *testing.T) {
	t.Parallel()
	t.Run("true at last", func(t *testing.T) {
		t.Parallel()
		calls := 0
		failed := run(t, func(tb testing.TB) {
			WaitFor(tb, Wait, func() bool { calls++; return calls == 4 }, "the fourth call")
		})
		if len(failed) != 0 || calls != 4 {
			t.Fatalf("failed %q after %d calls", failed, calls)
		}
	})
	t.Run("never", func(t *testing.T) {
		t.Parallel()
		start := time.Now()
		failed := run(t, func(tb testing.TB) {
			WaitFor(tb, 30*time.Millisecond, func() bool { return false }, "reader %d to wait", 7)
		})
		wantFailure(t, failed, "timed out after 30ms waiting for reader 7 to wait")
		if el := time.Since(start); el < 30*time.Millisecond {
			t.Fatalf("gave up after %s, before its deadline", el)
		}
	})
	t.Run("no message", func(t *testing.T) {
		t.Parallel()
		wantFailure(t, run(t, func(tb testing.TB) { WaitFor(tb, time.Millisecond, func() bool { return false }) }), "waiting for a condition")
	})
}

func TestChannelHelpers(t *testing.T) {
	t.Parallel()
	t.Run("Recv gets a value", func(t *testing.T) {
		t.Parallel()
		ch := make(chan int, 1)
		ch <- 3
		if v := Recv(t, ch, Wait); v != 3 {
			t.Fatalf("got %d", v)
		}
	})
	t.Run("Recv times out", func(t *testing.T) {
		t.Parallel()
		wantFailure(t, run(t, func(tb testing.TB) { Recv(tb, make(chan int), 10*time.Millisecond, "the %s", "result") }),
			"nothing received within 10ms: the result")
	})
	t.Run("Recv fails on close", func(t *testing.T) {
		t.Parallel()
		ch := make(chan int)
		close(ch)
		wantFailure(t, run(t, func(tb testing.TB) { Recv(tb, ch, Wait, "done") }), "channel closed while waiting for done")
	})
	t.Run("RecvOK sees close", func(t *testing.T) {
		t.Parallel()
		ch := make(chan struct{})
		close(ch)
		if _, ok := RecvOK(t, ch, Wait); ok {
			t.Fatal("ok on a closed channel")
		}
	})
	t.Run("Done on close or value", func(t *testing.T) {
		t.Parallel()
		closed := make(chan struct{})
		close(closed)
		Done(t, closed, Wait)
		value := make(chan error, 1)
		value <- nil
		Done(t, value, Wait)
		wantFailure(t, run(t, func(tb testing.TB) { Done(tb, make(chan struct{}), 10*time.Millisecond, "the server") }),
			"nothing received within 10ms: the server")
	})
	t.Run("Send delivers", func(t *testing.T) {
		t.Parallel()
		ch := make(chan string, 1)
		Send(t, ch, "x", Wait)
		if v := <-ch; v != "x" {
			t.Fatalf("got %q", v)
		}
	})
	t.Run("Send times out", func(t *testing.T) {
		t.Parallel()
		wantFailure(t, run(t, func(tb testing.TB) { Send(tb, make(chan int), 1, 10*time.Millisecond, "reader") }),
			"nobody received within 10ms: reader")
	})
	t.Run("NoRecv quiet", func(t *testing.T) {
		t.Parallel()
		NoRecv(t, make(chan int), 5*time.Millisecond)
	})
	t.Run("NoRecv sees a value", func(t *testing.T) {
		t.Parallel()
		ch := make(chan int, 1)
		ch <- 9
		wantFailure(t, run(t, func(tb testing.TB) { NoRecv(tb, ch, Wait, "no stop") }), "unexpected 9")
	})
	t.Run("Context ends", func(t *testing.T) {
		t.Parallel()
		ctx := Context(t, time.Millisecond)
		if _, ok := RecvOK(t, ctx.Done(), Wait); ok || !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			t.Fatalf("context %v", ctx.Err())
		}
	})
}

//go:noinline
func parkedHere(release <-chan struct{}) { <-release }

//go:noinline
func callsParkedHere(release <-chan struct{}) { parkedHere(release) }

func TestBlocked(t *testing.T) {
	t.Parallel()
	const here = "testutil.parkedHere"
	release := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		callsParkedHere(release)
	}()
	WaitFor(t, Wait, func() bool { return Blocked(here) }, "a goroutine parked in %s", here)
	if !Blocked("github.com/agentdispatch/dispatcher/internal/testutil.parkedHere") {
		t.Fatal("not found by its full name")
	}
	if Blocked("testutil.callsParkedHere") {
		t.Fatal("blocked in a caller of the function that waits")
	}
	if Blocked("ParkedHere") || Blocked("testutil.parked") {
		t.Fatal("matched part of a name")
	}
	close(release)
	Done(t, done, Wait)
	WaitFor(t, Wait, func() bool { return !Blocked(here) }, "the goroutine to leave %s", here)
}

// TestUpCoversEveryPayload builds a packet for every field of
// UpstreamPacket's payload oneof, so a new payload kind fails here until Up
// knows it.
func TestUpCoversEveryPayload(t *testing.T) {
	t.Parallel()
	oneof := (&dispatchv1.UpstreamPacket{}).ProtoReflect().Descriptor().Oneofs().ByName("payload")
	if oneof == nil || oneof.Fields().Len() == 0 {
		t.Fatal("UpstreamPacket has no payload oneof")
	}
	for i := range oneof.Fields().Len() {
		fd := oneof.Fields().Get(i)
		t.Run(string(fd.Name()), func(t *testing.T) {
			t.Parallel()
			mt, err := protoregistry.GlobalTypes.FindMessageByName(fd.Message().FullName())
			if err != nil {
				t.Fatal(err)
			}
			before := time.Now().UnixMicro()
			p := Up("s1", mt.New().Interface())
			if got := p.ProtoReflect().WhichOneof(oneof); got != fd {
				t.Fatalf("payload set %v, want %v", got, fd.Name())
			}
			if p.GetSessionId() != "s1" || p.GetTimestamp() < before {
				t.Fatalf("session %q timestamp %d", p.GetSessionId(), p.GetTimestamp())
			}
		})
	}
	t.Run("nil", func(t *testing.T) {
		t.Parallel()
		if p := Up("s", nil); p.GetPayload() != nil {
			t.Fatalf("payload %v", p.GetPayload())
		}
	})
	t.Run("not a payload", func(t *testing.T) {
		t.Parallel()
		defer func() {
			if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "*dispatchv1.StopSignal") {
				t.Fatalf("recovered %v", r)
			}
		}()
		Up("s", &dispatchv1.StopSignal{})
	})
	if h := Hello("c", "planner:chat").GetHello(); h.GetCommanderId() != "c" || h.GetCapabilities()[0] != "planner:chat" {
		t.Fatalf("hello %v", h)
	}
}

// fakeDispatcher is the dispatcher's end of ChatStream, just enough to
// drive the stub commander: it acks the hello, starts sessions one after
// another, answers tool calls (but those of tool "unanswered"), stops a session on stopOn, and closes a
// session on its result or stopped.
type fakeDispatcher struct {
	dispatchv1.UnimplementedAgentInteractionServer
	sessions int
	stopOn   string
	endWith  error // status once the sessions are done; nil: wait for the client
	got      chan *dispatchv1.UpstreamPacket
}

func newFakeDispatcher(sessions int) *fakeDispatcher {
	return &fakeDispatcher{sessions: sessions, got: make(chan *dispatchv1.UpstreamPacket, 256)}
}

func down(sid string, p *dispatchv1.DownstreamPacket) *dispatchv1.DownstreamPacket {
	p.SessionId = sid
	return p
}

func (f *fakeDispatcher) ChatStream(s grpc.BidiStreamingServer[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]) error {
	hello, err := s.Recv()
	if err != nil {
		return err
	}
	f.got <- hello
	if hello.GetHello() == nil {
		return status.Error(codes.InvalidArgument, "hello first")
	}
	if err := s.Send(&dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_HELLO, SlotId: "slot-1"}}}); err != nil {
		return err
	}
	for i := range f.sessions {
		sid := fmt.Sprintf("s%d", i+1)
		if err := s.Send(down(sid, &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Start{Start: &dispatchv1.StartSession{TaskId: fmt.Sprintf("t%d", i+1)}}})); err != nil {
			return err
		}
	session:
		for {
			p, err := s.Recv()
			if err != nil {
				return err
			}
			f.got <- p
			var reply *dispatchv1.DownstreamPacket
			switch {
			case p.GetToolCall() != nil && p.GetToolCall().GetToolName() != "unanswered":
				c := p.GetToolCall()
				reply = &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_ToolResult{ToolResult: &dispatchv1.ToolCallResult{CallId: c.GetCallId(), ToolName: c.GetToolName(), ResultJson: `{"ok":true}`}}}
			case f.stopOn != "" && p.GetContent().GetText() == f.stopOn:
				reply = &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Stop{Stop: &dispatchv1.StopSignal{Reason: "policy says no"}}}
			case p.GetResult() != nil || p.GetStopped() != nil:
				if err := s.Send(down(sid, &dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{Kind: dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED}}})); err != nil {
					return err
				}
				break session
			}
			if reply != nil {
				if err := s.Send(down(sid, reply)); err != nil {
					return err
				}
			}
		}
	}
	if f.endWith != nil {
		return f.endWith
	}
	for {
		if _, err := s.Recv(); err != nil {
			return nil
		}
	}
}

func serveFake(t *testing.T, f *fakeDispatcher) *GRPC {
	t.Helper()
	return ServeGRPC(t, func(s *grpc.Server) { dispatchv1.RegisterAgentInteractionServer(s, f) })
}

// kinds names the payloads f received after the hello, in order.
func (f *fakeDispatcher) kinds(t *testing.T, n int) string {
	t.Helper()
	var names []string
	for range n {
		p := Recv(t, f.got, Wait, "an upstream packet at the fake dispatcher")
		names = append(names, string(p.ProtoReflect().WhichOneof(p.ProtoReflect().Descriptor().Oneofs().ByName("payload")).Name()))
	}
	return strings.Join(names, ",")
}

func TestCommanderPlaysAScript(t *testing.T) {
	t.Parallel()
	f := newFakeDispatcher(1)
	g := serveFake(t, f)
	ctx := Context(t, 20*time.Second)
	c := Connect(t, ctx, g.Conn, "planner:chat")
	if h := Recv(t, f.got, Wait).GetHello(); h.GetCapabilities()[0] != "planner:chat" {
		t.Fatalf("hello %v", h)
	}
	sid, start := c.Start()
	if sid != "s1" || start.GetTaskId() != "t1" {
		t.Fatalf("start %q %v", sid, start)
	}
	s := &Session{ID: sid, Start: start, c: c}
	err := s.Play(ctx,
		&dispatchv1.ThoughtChain{Delta: "hm"},
		&dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator"},
		Pause(time.Millisecond),
		&dispatchv1.ContentChunk{Text: "2"},
		Success("2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.kinds(t, 4); got != "thought,tool_call,content,result" {
		t.Fatalf("dispatcher got %s", got)
	}
}

// TestPlayWaitsForToolResults: after a tool call Play sends nothing until
// the call's result is in.
func TestPlayWaitsForToolResults(t *testing.T) {
	t.Parallel()
	f := newFakeDispatcher(1)
	g := serveFake(t, f)
	c := Connect(t, Context(t, 20*time.Second), g.Conn)
	s, err := c.NextSession(Context(t, Wait))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err = s.Play(ctx, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "unanswered"}, &dispatchv1.ContentChunk{Text: "too early"})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Play = %v, want it to wait for the result until ctx ends", err)
	}
	if got := f.kinds(t, 2); got != "hello,tool_call" {
		t.Fatalf("dispatcher got %s", got)
	}
	NoRecv(t, f.got, 20*time.Millisecond, "nothing after the unanswered call")
}

func TestCommanderAnswersAStop(t *testing.T) {
	t.Parallel()
	f := newFakeDispatcher(1)
	f.stopOn = "bad"
	g := serveFake(t, f)
	ctx := Context(t, 20*time.Second)
	c := Connect(t, ctx, g.Conn, "planner:chat")
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The long pause ends at the stop, not after a minute.
	err = s.Play(ctx, &dispatchv1.ContentChunk{Text: "bad"}, Pause(time.Minute), &dispatchv1.ContentChunk{Text: "never sent"})
	if !errors.Is(err, ErrStopped) {
		t.Fatalf("Play = %v, want ErrStopped", err)
	}
	if err := s.Closed(ctx); err != nil {
		t.Fatal(err)
	}
	Recv(t, f.got, Wait) // hello
	Recv(t, f.got, Wait) // content
	if st := Recv(t, f.got, Wait).GetStopped(); st.GetReason() != "policy says no" {
		t.Fatalf("stopped %v, want the stop's reason echoed", st)
	}
	NoRecv(t, f.got, 20*time.Millisecond, "nothing after stopped")
}

func TestCommanderServesSessionsAndSeesTheEnd(t *testing.T) {
	t.Parallel()
	f := newFakeDispatcher(3)
	f.endWith = status.Error(codes.Unavailable, "draining")
	g := serveFake(t, f)
	ctx, cancel := context.WithCancel(Context(t, 20*time.Second))
	defer cancel()
	c := Connect(t, ctx, g.Conn, "planner:chat")
	served := make(chan error, 1)
	go func() {
		served <- c.Serve(ctx, func(start *dispatchv1.StartSession) []any {
			return []any{&dispatchv1.ContentChunk{Text: start.GetTaskId()}, Success("ok")}
		})
	}()
	err := Recv(t, served, Wait, "Serve to return when the stream ends")
	if status.Code(errors.Unwrap(err)) != codes.Unavailable {
		t.Fatalf("Serve = %v, want the stream's Unavailable", err)
	}
	if got := f.kinds(t, 7); got != "hello,content,result,content,result,content,result" {
		t.Fatalf("dispatcher got %s", got)
	}
	if err := c.Ended(); status.Code(err) != codes.Unavailable {
		t.Fatalf("Ended = %v", err)
	}
}

func TestServeReturnsNilWhenCtxEnds(t *testing.T) {
	t.Parallel()
	f := newFakeDispatcher(0)
	g := serveFake(t, f)
	ctx, cancel := context.WithCancel(Context(t, 20*time.Second))
	c := Connect(t, ctx, g.Conn)
	served := make(chan error, 1)
	go func() { served <- c.Serve(ctx, func(*dispatchv1.StartSession) []any { return nil }) }()
	cancel()
	if err := Recv(t, served, Wait, "Serve to return"); err != nil {
		t.Fatalf("Serve = %v, want nil", err)
	}
}

func TestHelloRefused(t *testing.T) {
	t.Parallel()
	g := serveFake(t, newFakeDispatcher(0))
	c := OpenChat(t, Context(t, 20*time.Second), g.Conn)
	c.Send(Up("", &dispatchv1.ContentChunk{Text: "no hello"}))
	if err := c.Ended(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("Ended = %v", err)
	}
}

// TestGRPCTeardownOrder: OnStop runs after the client connection closed and
// before the server stops.
func TestGRPCTeardownOrder(t *testing.T) {
	t.Parallel()
	var connState connectivity.State
	var serving bool
	var g *GRPC
	t.Run("serve", func(t *testing.T) {
		g = serveFake(t, newFakeDispatcher(0))
		extra := g.Dial()
		if err := Connect(t, Context(t, 20*time.Second), extra).Stream().CloseSend(); err != nil {
			t.Fatal(err)
		}
		g.OnStop(func() {
			connState = g.Conn.GetState()
			serving = g.Server.GetServiceInfo() != nil
			// The server still accepts connections: not stopped yet.
			conn, err := g.Listener().Dial()
			if err == nil {
				conn.Close()
			}
			serving = serving && err == nil
		})
	})
	if connState != connectivity.Shutdown || !serving {
		t.Fatalf("at OnStop: client %v, server serving %v", connState, serving)
	}
	if _, err := g.Listener().Dial(); err == nil {
		t.Fatal("server still listening after the test")
	}
}

func TestAsync(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	errBoom := errors.New("boom")
	r := Async(func() (int, error) {
		<-release
		return 7, errBoom
	})
	NoRecv(t, r, 10*time.Millisecond, "no result before the call returns")
	close(release)
	if got := Recv(t, r, Wait, "the result"); got.V != 7 || !errors.Is(got.Err, errBoom) {
		t.Fatalf("result %+v", got)
	}
}

func TestWaited(t *testing.T) {
	t.Parallel()
	var wg sync.WaitGroup
	wg.Add(2)
	waited := Waited(&wg)
	wg.Done()
	NoRecv(t, waited, 10*time.Millisecond, "not closed while one is left")
	wg.Done()
	Done(t, waited, Wait, "Waited to close")
}

// fakeWatch is a TaskService whose WatchTask sends n events, then ends
// with end (nil: OK, the client's io.EOF).
type fakeWatch struct {
	dispatchv1.UnimplementedTaskServiceServer
	n   int
	end error
}

func (f fakeWatch) WatchTask(_ *dispatchv1.WatchTaskRequest, s grpc.ServerStreamingServer[dispatchv1.WatchTaskResponse]) error {
	for i := range f.n {
		if err := s.Send(&dispatchv1.WatchTaskResponse{Event: &dispatchv1.TaskEvent{Seq: uint64(i + 1)}}); err != nil {
			return err
		}
	}
	return f.end
}

func TestRecvAll(t *testing.T) {
	t.Parallel()
	for name, tc := range map[string]struct {
		end  error
		code codes.Code
	}{
		"EOF":   {nil, codes.OK},
		"error": {status.Error(codes.Unavailable, "cut"), codes.Unavailable},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			g := ServeGRPC(t, func(s *grpc.Server) { dispatchv1.RegisterTaskServiceServer(s, fakeWatch{n: 3, end: tc.end}) })
			s, err := dispatchv1.NewTaskServiceClient(g.Conn).WatchTask(Context(t, Wait), &dispatchv1.WatchTaskRequest{})
			if err != nil {
				t.Fatal(err)
			}
			var each []uint64
			got, err := RecvAll(s, func(r *dispatchv1.WatchTaskResponse) { each = append(each, r.GetEvent().GetSeq()) })
			if status.Code(err) != tc.code || (tc.end == nil && err != nil) {
				t.Fatalf("RecvAll error %v, want %v", err, tc.code)
			}
			if len(got) != 3 || got[2].GetEvent().GetSeq() != 3 || fmt.Sprint(each) != "[1 2 3]" {
				t.Fatalf("received %v, each saw %v", got, each)
			}
		})
	}
}

func stateEvent(s agentpb.TaskStatus) *dispatchv1.TaskEvent {
	return &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: s}}}
}

func TestFeed(t *testing.T) {
	t.Parallel()
	t.Run("follows to the end", func(t *testing.T) {
		t.Parallel()
		var f Feed
		f.Append(stateEvent(agentpb.TaskStatus_PENDING), stateEvent(agentpb.TaskStatus_RUNNING))
		sent := make(chan uint64, 8)
		followed := Async(func() (struct{}, error) {
			return struct{}{}, f.Follow(Context(t, Wait), 1, func(ev *dispatchv1.TaskEvent) error {
				sent <- ev.GetSeq()
				return nil
			})
		})
		if seq := Recv(t, sent, Wait, "seq 2"); seq != 2 {
			t.Fatalf("first sent %d, want 2 (after 1)", seq)
		}
		NoRecv(t, followed, 10*time.Millisecond, "Follow waits for more")
		f.Append(&dispatchv1.TaskEvent{}, stateEvent(agentpb.TaskStatus_SUCCESS), &dispatchv1.TaskEvent{})
		if r := Recv(t, followed, Wait, "Follow to end at the terminal state"); r.Err != nil {
			t.Fatal(r.Err)
		}
		if a, b := Recv(t, sent, Wait), Recv(t, sent, Wait); a != 3 || b != 4 || len(sent) != 0 || f.Len() != 5 {
			t.Fatalf("sent %d %d (+%d), len %d", a, b, len(sent), f.Len())
		}
		// From past the end: at once.
		if err := f.Follow(Context(t, Wait), 5, func(*dispatchv1.TaskEvent) error { return errors.New("sent") }); err != nil {
			t.Fatalf("follow past the end: %v", err)
		}
	})
	t.Run("ends with ctx or send", func(t *testing.T) {
		t.Parallel()
		var f Feed
		ctx, cancel := context.WithCancel(Context(t, Wait))
		cancel()
		if err := f.Follow(ctx, 0, func(*dispatchv1.TaskEvent) error { return nil }); !errors.Is(err, context.Canceled) {
			t.Fatalf("empty feed, ended ctx: %v", err)
		}
		f.Append(stateEvent(agentpb.TaskStatus_RUNNING))
		errSend := errors.New("client gone")
		if err := f.Follow(Context(t, Wait), 0, func(*dispatchv1.TaskEvent) error { return errSend }); !errors.Is(err, errSend) {
			t.Fatalf("send failed: %v", err)
		}
	})
}

package api

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/test/bufconn"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const wait = 5 * time.Second

// harness is a dispatcher served in memory (bufconn) with clients of every
// service on one connection.
type harness struct {
	t      testing.TB
	d      *dispatcher.Dispatcher
	srv    *Server
	gs     *grpc.Server
	lis    *bufconn.Listener
	conn   *grpc.ClientConn
	agent  agentpb.AgentClient
	tasks  dispatchv1.TaskServiceClient
	chat   dispatchv1.AgentInteractionClient
	tools  dispatchv1.ToolProviderServiceClient
	health healthpb.HealthClient
}

func newHarness(t testing.TB, cfg dispatcher.Config) *harness {
	t.Helper()
	return newHarnessWith(t, cfg)
}

// newHarnessWith is newHarness with extra server options (first).
func newHarnessWith(t testing.TB, cfg dispatcher.Config, extra ...grpc.ServerOption) *harness {
	t.Helper()
	if cfg.Tasks.StopGrace == 0 {
		cfg.Tasks.StopGrace = 500 * time.Millisecond
	}
	d, err := dispatcher.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := New(d)
	lis := bufconn.Listen(1 << 20)
	gs := grpc.NewServer(append(extra, s.ServerOptions()...)...)
	s.Register(gs)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		d.Close()
		gs.Stop()
	})
	return &harness{
		t: t, d: d, srv: s, gs: gs, conn: conn, lis: lis,
		agent:  agentpb.NewAgentClient(conn),
		tasks:  dispatchv1.NewTaskServiceClient(conn),
		chat:   dispatchv1.NewAgentInteractionClient(conn),
		tools:  dispatchv1.NewToolProviderServiceClient(conn),
		health: healthpb.NewHealthClient(conn),
	}
}

// dial opens another client connection to the harness's server.
func (h *harness) dial(opts ...grpc.DialOption) *grpc.ClientConn {
	h.t.Helper()
	conn, err := grpc.NewClient("passthrough:///bufnet", append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return h.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, opts...)...)
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { conn.Close() })
	return conn
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
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

// gCommander is a fake commander slot over real gRPC.
type gCommander struct {
	t      testing.TB
	stream grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]
	cancel context.CancelFunc
	in     chan *dispatchv1.DownstreamPacket
	err    chan error
}

// openChat opens a ChatStream without hello.
func (h *harness) openChat(ctx context.Context) *gCommander {
	h.t.Helper()
	ctx, cancel := context.WithCancel(ctx)
	stream, err := h.chat.ChatStream(ctx)
	if err != nil {
		cancel()
		h.t.Fatal(err)
	}
	c := &gCommander{t: h.t, stream: stream, cancel: cancel, in: make(chan *dispatchv1.DownstreamPacket, 256), err: make(chan error, 1)}
	go func() {
		for {
			p, err := stream.Recv()
			if err != nil {
				c.err <- err
				close(c.in)
				return
			}
			c.in <- p
		}
	}()
	h.t.Cleanup(cancel)
	return c
}

// commander opens a ChatStream and registers a slot with caps.
func (h *harness) commander(ctx context.Context, caps ...string) *gCommander {
	h.t.Helper()
	c := h.openChat(ctx)
	c.send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{CommanderId: "test-commander", Version: "t", Capabilities: caps}}})
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		h.t.Fatalf("hello ack %v", a)
	}
	return c
}

func (c *gCommander) send(p *dispatchv1.UpstreamPacket) {
	c.t.Helper()
	if err := c.stream.Send(p); err != nil && !errors.Is(err, io.EOF) {
		c.t.Fatalf("send: %v", err)
	}
}

func (c *gCommander) recv() *dispatchv1.DownstreamPacket {
	c.t.Helper()
	select {
	case p, ok := <-c.in:
		if !ok {
			err := <-c.err
			c.err <- err
			c.t.Fatalf("stream ended: %v", err)
		}
		return p
	case <-time.After(wait):
		c.t.Fatal("no downstream packet")
		return nil
	}
}

// recvUntil skips packets until ok says yes.
func (c *gCommander) recvUntil(ok func(*dispatchv1.DownstreamPacket) bool) *dispatchv1.DownstreamPacket {
	c.t.Helper()
	for {
		if p := c.recv(); ok(p) {
			return p
		}
	}
}

// ended waits for the stream's end and returns its status.
func (c *gCommander) ended() error {
	c.t.Helper()
	deadline := time.After(wait)
	for {
		select {
		case _, ok := <-c.in:
			if !ok {
				err := <-c.err
				c.err <- err
				return err
			}
		case <-deadline:
			c.t.Fatal("stream did not end")
			return nil
		}
	}
}

func (c *gCommander) start() (string, *dispatchv1.StartSession) {
	c.t.Helper()
	p := c.recv()
	if p.GetStart() == nil {
		c.t.Fatalf("want start, got %v", p)
	}
	return p.GetSessionId(), p.GetStart()
}

func up(sid string, payload any) *dispatchv1.UpstreamPacket {
	p := &dispatchv1.UpstreamPacket{SessionId: sid, Timestamp: time.Now().UnixMicro()}
	switch v := payload.(type) {
	case *dispatchv1.ThoughtChain:
		p.Payload = &dispatchv1.UpstreamPacket_Thought{Thought: v}
	case *dispatchv1.ContentChunk:
		p.Payload = &dispatchv1.UpstreamPacket_Content{Content: v}
	case *dispatchv1.ToolCallRequest:
		p.Payload = &dispatchv1.UpstreamPacket_ToolCall{ToolCall: v}
	case *dispatchv1.Usage:
		p.Payload = &dispatchv1.UpstreamPacket_Usage{Usage: v}
	case *dispatchv1.FinalResult:
		p.Payload = &dispatchv1.UpstreamPacket_Result{Result: v}
	case *dispatchv1.Stopped:
		p.Payload = &dispatchv1.UpstreamPacket_Stopped{Stopped: v}
	case *dispatchv1.StageChange:
		p.Payload = &dispatchv1.UpstreamPacket_Stage{Stage: v}
	case *dispatchv1.ErrorSignal:
		p.Payload = &dispatchv1.UpstreamPacket_Error{Error: v}
	case *dispatchv1.SandboxInUse:
		p.Payload = &dispatchv1.UpstreamPacket_Sandbox{Sandbox: v}
	case nil:
	default:
		panic("unknown payload")
	}
	return p
}

// playScript runs a typical chat session on c: thought, content, a
// calculator call, usage, and a SUCCESS result.
func playScript(t *testing.T, c *gCommander, answer string) (sessionID string) {
	t.Helper()
	sid, _ := c.start()
	c.send(up(sid, &dispatchv1.ThoughtChain{StepName: "Planning", Delta: "I should add"}))
	c.send(up(sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"1 + 1"}`}))
	if r := c.recv().GetToolResult(); r.GetCallId() != "k1" || r.GetError() != nil {
		t.Fatalf("tool result %v", r)
	}
	c.send(up(sid, &dispatchv1.ContentChunk{Text: answer}))
	c.send(up(sid, &dispatchv1.Usage{InputTokens: 100, OutputTokens: 20, Cost: 0.002, Currency: "USD", Steps: 1}))
	c.send(up(sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: answer}))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
		t.Fatalf("close ack %v", a)
	}
	return sid
}

package httpapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const wait = 10 * time.Second

// env is a dispatcher serving gRPC on a real loopback listener (for fake
// commanders) and the HTTP API on an httptest server.
type env struct {
	t    testing.TB
	d    *dispatcher.Dispatcher
	gs   *grpc.Server
	conn *grpc.ClientConn
	http *httptest.Server
	url  string
}

func newEnv(t testing.TB, cfg dispatcher.Config, opts Options) *env {
	t.Helper()
	if cfg.Tasks.StopGrace == 0 {
		cfg.Tasks.StopGrace = 500 * time.Millisecond
	}
	d, err := dispatcher.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := api.New(d)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(s.ServerOptions()...)
	s.Register(gs)
	go func() { _ = gs.Serve(lis) }()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	if opts.ClientToken == "" {
		opts.ClientToken = cfg.Auth.ClientToken
	}
	hs := httptest.NewServer(New(s.Local(), opts))
	e := &env{t: t, d: d, gs: gs, conn: conn, http: hs, url: hs.URL}
	t.Cleanup(func() {
		hs.CloseClientConnections()
		hs.Close()
		conn.Close()
		d.Close()
		gs.Stop()
	})
	return e
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// commander is a fake commander slot over real gRPC.
type commander struct {
	t      testing.TB
	stream grpc.BidiStreamingClient[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]
	in     chan *dispatchv1.DownstreamPacket
}

func (e *env) commander(token string, caps ...string) *commander {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e.t.Cleanup(cancel)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	stream, err := dispatchv1.NewAgentInteractionClient(e.conn).ChatStream(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	c := &commander{t: e.t, stream: stream, in: make(chan *dispatchv1.DownstreamPacket, 256)}
	go func() {
		defer close(c.in)
		for {
			p, err := stream.Recv()
			if err != nil {
				return
			}
			c.in <- p
		}
	}()
	if len(caps) == 0 {
		caps = []string{"planner:chat"}
	}
	c.send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{CommanderId: "fake", Version: "t", Capabilities: caps}}})
	if p := c.recv(); p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		e.t.Fatalf("hello ack %v", p)
	}
	return c
}

func (c *commander) send(p *dispatchv1.UpstreamPacket) {
	if err := c.stream.Send(p); err != nil && !errors.Is(err, io.EOF) {
		c.t.Errorf("send: %v", err)
	}
}

func (c *commander) recv() *dispatchv1.DownstreamPacket {
	c.t.Helper()
	select {
	case p, ok := <-c.in:
		if !ok {
			c.t.Fatal("commander stream ended")
		}
		return p
	case <-time.After(wait):
		c.t.Fatal("no downstream packet")
		return nil
	}
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
	case *dispatchv1.Artifact:
		p.Payload = &dispatchv1.UpstreamPacket_Artifact{Artifact: v}
	default:
		panic("unknown payload")
	}
	return p
}

var errStopped = errors.New("stopped")

// session is one task on a fake commander slot.
type session struct {
	c   *commander
	sid string
}

// next waits for a downstream packet of this session; on a stop it answers
// stopped and returns errStopped.
func (s *session) next(ctx context.Context) (*dispatchv1.DownstreamPacket, error) {
	select {
	case p, ok := <-s.c.in:
		if !ok {
			return nil, io.EOF
		}
		if p.GetStop() != nil {
			s.c.send(up(s.sid, &dispatchv1.Stopped{Reason: p.GetStop().GetReason()}))
			return p, errStopped
		}
		return p, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// pause waits d unless a stop comes first.
func (s *session) pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return nil
		case p, ok := <-s.c.in:
			if !ok {
				return io.EOF
			}
			if p.GetStop() != nil {
				s.c.send(up(s.sid, &dispatchv1.Stopped{Reason: p.GetStop().GetReason()}))
				return errStopped
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// serve runs sessions until ctx ends: each start is handed to play; when
// play returns, the session's closing ack is awaited.
func (c *commander) serve(ctx context.Context, play func(ctx context.Context, s *session, start *dispatchv1.StartSession) error) {
	for {
		var p *dispatchv1.DownstreamPacket
		select {
		case <-ctx.Done():
			return
		case q, ok := <-c.in:
			if !ok {
				return
			}
			p = q
		}
		if p.GetStart() == nil {
			continue
		}
		s := &session{c: c, sid: p.GetSessionId()}
		if err := play(ctx, s, p.GetStart()); err != nil && !errors.Is(err, errStopped) {
			return
		}
		for {
			q, err := s.next(ctx)
			if err != nil && !errors.Is(err, errStopped) {
				return
			}
			if q.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED {
				break
			}
		}
	}
}

// chatScript is a typical chat session: a thought, a calculator call, an
// answer, usage, SUCCESS; gap is the pause between steps.
func chatScript(gap time.Duration) func(ctx context.Context, s *session, start *dispatchv1.StartSession) error {
	return func(ctx context.Context, s *session, start *dispatchv1.StartSession) error {
		c := s.c
		c.send(up(s.sid, &dispatchv1.ThoughtChain{StepName: "Planning", Delta: "I should compute 123 * 456"}))
		if err := s.pause(ctx, gap); err != nil {
			return err
		}
		c.send(up(s.sid, &dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"123 * 456"}`}))
		for {
			p, err := s.next(ctx)
			if err != nil {
				return err
			}
			if p.GetToolResult() != nil {
				break
			}
		}
		if err := s.pause(ctx, gap); err != nil {
			return err
		}
		c.send(up(s.sid, &dispatchv1.ContentChunk{Text: "Result: 56088", IsFinish: true}))
		c.send(up(s.sid, &dispatchv1.Usage{InputTokens: 100, OutputTokens: 20, Cost: 0.002, Currency: "USD", Steps: 1}))
		c.send(up(s.sid, &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "Calculation completed: 56088"}))
		return nil
	}
}

// sseEvent is one parsed server-sent event.
type sseEvent struct {
	ID, Event, Data string
}

// readSSE parses events from r until it ends or fn returns false.
func readSSE(r io.Reader, fn func(sseEvent) bool) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<16), 8<<20)
	var ev sseEvent
	var data []string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if len(data) > 0 || ev.Event != "" {
				ev.Data = strings.Join(data, "\n")
				if !fn(ev) {
					return nil
				}
			}
			ev, data = sseEvent{}, nil
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "id: "):
			ev.ID = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "event: "):
			ev.Event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data = append(data, strings.TrimPrefix(line, "data: "))
		}
	}
	return sc.Err()
}

// do sends a request and decodes a JSON response into out (if not nil).
func (e *env) do(method, path, token, body string, out any) *http.Response {
	e.t.Helper()
	req, err := http.NewRequest(method, e.url+path, strings.NewReader(body))
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			e.t.Fatalf("%s %s: %d %q: %v", method, path, resp.StatusCode, b, err)
		}
	}
	return resp
}

package api

import (
	"context"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// freezeProxy forwards TCP until frozen; then it holds the connections open
// and forwards nothing — a commander host that died or a partition, which
// only keepalive can detect (no FIN, no RST).
type freezeProxy struct {
	lis    net.Listener
	target string
	frozen atomic.Bool
	done   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func newFreezeProxy(t *testing.T, target string) *freezeProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{lis: lis, target: target, done: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *freezeProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", p.target)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, c, s)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, s)
		go p.pipe(s, c)
	}
}

func (p *freezeProxy) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if p.frozen.Load() {
			<-p.done // swallow everything, keep the sockets open
			return
		}
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *freezeProxy) close() {
	close(p.done)
	p.lis.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// A commander that goes silent (no FIN/RST) is noticed by the server's
// keepalive within Time+Timeout, and its task fails at once. Production
// numbers are 5 s + 2 s (docs/operations.md); grpc-go's floor for the
// server ping interval is 1 s, so the test runs with 1 s + 0.5 s.
func TestKeepaliveDetectsDeadCommander(t *testing.T) {
	ka := dispatcher.Keepalive{Time: time.Second, Timeout: 500 * time.Millisecond, MinTime: 100 * time.Millisecond}
	d, err := dispatcher.New(dispatcher.Config{GRPC: dispatcher.GRPC{Keepalive: ka}})
	if err != nil {
		t.Fatal(err)
	}
	s := New(d)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(s.ServerOptions()...)
	s.Register(gs)
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(func() {
		d.Close()
		gs.Stop()
	})
	proxy := newFreezeProxy(t, lis.Addr().String())

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	viaProxy, err := grpc.NewClient(proxy.lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer viaProxy.Close()
	direct, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()

	cctx, ccancel := context.WithCancel(ctx)
	defer ccancel()
	stream, err := dispatchv1.NewAgentInteractionClient(viaProxy).ChatStream(cctx)
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Hello{Hello: &dispatchv1.Hello{CommanderId: "doomed", Capabilities: []string{"planner:chat"}}}})
	if p, err := stream.Recv(); err != nil || p.GetAck() == nil {
		t.Fatalf("hello ack %v %v", p, err)
	}
	agent := agentpb.NewAgentClient(direct)
	start, err := agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if p, err := stream.Recv(); err != nil || p.GetStart() == nil {
		t.Fatalf("start %v %v", p, err)
	}

	proxy.frozen.Store(true)
	frozenAt := time.Now()
	for {
		st, err := agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
		if err != nil {
			t.Fatal(err)
		}
		if st.GetStatus() == agentpb.TaskStatus_FAILURE {
			took := time.Since(frozenAt)
			if !strings.HasPrefix(st.GetMessage(), "commander connection lost: ") {
				t.Fatalf("message %q", st.GetMessage())
			}
			// Time + Timeout = 1.5 s, plus scheduling slack.
			if took > ka.Time+ka.Timeout+time.Second {
				t.Fatalf("dead commander noticed after %s", took)
			}
			t.Logf("dead commander noticed after %s (Time %s + Timeout %s)", took, ka.Time, ka.Timeout)
			break
		}
		if time.Since(frozenAt) > 10*time.Second {
			t.Fatalf("task still %v", st.GetStatus())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if d.Scheduler().SlotCount() != 0 {
		t.Fatal("dead slot still registered")
	}
}

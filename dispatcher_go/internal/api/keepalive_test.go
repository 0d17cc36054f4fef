package api

import (
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// freezeProxy forwards TCP until frozen; then it holds the connections open
// and forwards nothing — a commander host that died or a partition, which
// only keepalive can detect (no FIN, no RST).
type freezeProxy struct {
	lis    net.Listener
	dial   func() (net.Conn, error) // to the server
	frozen atomic.Bool
	done   chan struct{}
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func newFreezeProxy(t *testing.T, dial func() (net.Conn, error)) *freezeProxy {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &freezeProxy{lis: lis, dial: dial, done: make(chan struct{})}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() { p.close(t) })
	return p
}

func (p *freezeProxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.lis.Accept()
		if err != nil {
			return
		}
		s, err := p.dial()
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

func (p *freezeProxy) close(t *testing.T) {
	close(p.done)
	p.lis.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	testutil.Done(t, testutil.Waited(&p.wg), testutil.Wait, "the proxy to stop")
}

// A commander that goes silent (no FIN/RST) is noticed by the server's
// keepalive within Time+Timeout, and its task fails at once. Production
// numbers are 5 s + 2 s (docs/operations.md); grpc-go's floor for the
// server ping interval is 1 s, so the test runs with 1 s + 0.5 s.
func TestKeepaliveDetectsDeadCommander(t *testing.T) {
	ka := dispatcher.Keepalive{Time: time.Second, Timeout: 500 * time.Millisecond, MinTime: 100 * time.Millisecond}
	h, ctx := newHarness(t, dispatcher.Config{GRPC: dispatcher.GRPC{Keepalive: ka}})
	proxy := newFreezeProxy(t, h.g.Listener().Dial)
	viaProxy, err := grpc.NewClient(proxy.lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer viaProxy.Close()
	c := testutil.Connect(t, ctx, viaProxy, "planner:chat")
	start, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	c.Start()

	proxy.frozen.Store(true)
	frozenAt := time.Now()
	var st *agentpb.QueryTaskStatusResponse
	testutil.WaitFor(t, 10*time.Second, func() bool {
		st, err = h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
		if err != nil {
			t.Fatal(err)
		}
		return st.GetStatus() == agentpb.TaskStatus_FAILURE
	}, "the task of the dead commander to fail")
	took := time.Since(frozenAt)
	if !strings.HasPrefix(st.GetMessage(), "commander connection lost: ") {
		t.Fatalf("message %q", st.GetMessage())
	}
	// Time + Timeout = 1.5 s, plus scheduling slack.
	if took > ka.Time+ka.Timeout+time.Second {
		t.Fatalf("dead commander noticed after %s", took)
	}
	t.Logf("dead commander noticed after %s (Time %s + Timeout %s)", took, ka.Time, ka.Timeout)
	if h.d.Scheduler().SlotCount() != 0 {
		t.Fatal("dead slot still registered")
	}
}

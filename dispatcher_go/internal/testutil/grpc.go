package testutil

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
)

// GRPC is a gRPC server served in memory (bufconn) with one client
// connection to it. Everything is torn down when the test ends: the client
// connection is closed, then the OnStop functions run (newest first), then
// the server stops.
type GRPC struct {
	// Server is the gRPC server the registrar filled.
	Server *grpc.Server
	// Conn is a client connection to Server.
	Conn *grpc.ClientConn

	t   testing.TB
	lis *bufconn.Listener

	mu     sync.Mutex
	onStop []func()
}

// ServeGRPC starts a gRPC server with opts, lets register add services to
// it, serves it over bufconn and dials it.
func ServeGRPC(t testing.TB, register func(*grpc.Server), opts ...grpc.ServerOption) *GRPC {
	t.Helper()
	g := &GRPC{t: t, lis: bufconn.Listen(1 << 20), Server: grpc.NewServer(opts...)}
	register(g.Server)
	served := make(chan struct{})
	go func() {
		defer close(served)
		_ = g.Server.Serve(g.lis)
	}()
	conn, err := grpc.NewClient("passthrough:///bufnet", g.dialOptions()...)
	if err != nil {
		g.Server.Stop()
		<-served
		t.Fatal(err)
	}
	g.Conn = conn
	t.Cleanup(func() {
		_ = conn.Close()
		g.mu.Lock()
		fns := g.onStop
		g.onStop = nil
		g.mu.Unlock()
		for i := len(fns) - 1; i >= 0; i-- {
			fns[i]()
		}
		g.Server.Stop()
		<-served
	})
	return g
}

func (g *GRPC) dialOptions(extra ...grpc.DialOption) []grpc.DialOption {
	return append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return g.lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
	}, extra...)
}

// OnStop runs fn when the test ends, after the client connection is closed
// and before the server stops (where a dispatcher is closed).
func (g *GRPC) OnStop(fn func()) {
	g.mu.Lock()
	g.onStop = append(g.onStop, fn)
	g.mu.Unlock()
}

// Dial opens another client connection to the server, closed when the test
// ends.
func (g *GRPC) Dial(opts ...grpc.DialOption) *grpc.ClientConn {
	g.t.Helper()
	conn, err := grpc.NewClient("passthrough:///bufnet", g.dialOptions(opts...)...)
	if err != nil {
		g.t.Fatal(err)
	}
	g.t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// Listener is the in-memory listener the server serves, for tests that
// dial it their own way.
func (g *GRPC) Listener() *bufconn.Listener { return g.lis }

// RecvAll receives from a server stream until it ends, passing each message
// to each (if not nil) as it comes: all it received, and nil if the stream
// ended with io.EOF or else how it ended. The stream's context bounds it;
// run it with Async to read beside the test.
func RecvAll[T any](s grpc.ServerStreamingClient[T], each func(*T)) ([]*T, error) {
	var out []*T
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		if each != nil {
			each(m)
		}
		out = append(out, m)
	}
}

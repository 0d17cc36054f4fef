package httpapi

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wait bounds the waits on the HTTP API (a task reaching a status).
const wait = 10 * time.Second

// testTimeout bounds a whole test's calls (testutil.Context).
const testTimeout = 30 * time.Second

// env is a dispatcher serving gRPC in memory (testutil.ServeGRPC, for stub
// commanders) and the HTTP API on an httptest server.
type env struct {
	t    testing.TB
	d    *dispatcher.Dispatcher
	conn *grpc.ClientConn
	http *httptest.Server
	url  string
}

func newEnv(t testing.TB, cfg dispatcher.Config, opts Options) *env {
	t.Helper()
	d, err := dispatcher.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	s := api.New(d)
	g := testutil.ServeGRPC(t, s.Register, s.ServerOptions()...)
	g.OnStop(d.Close)
	if opts.ClientToken == "" {
		opts.ClientToken = cfg.Auth.ClientToken
	}
	hs := httptest.NewServer(New(s.Local(), opts))
	t.Cleanup(func() {
		hs.CloseClientConnections()
		hs.Close()
	})
	return &env{t: t, d: d, conn: g.Conn, http: hs, url: hs.URL}
}

// commander connects a stub commander (planner:chat) and runs run with it
// beside the test until the test ends, when ctx is cancelled. If run ended
// before with an error other than a stop, the test fails.
func (e *env) commander(t *testing.T, run func(ctx context.Context, c *testutil.Commander) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := testutil.Connect(t, ctx, e.conn, "planner:chat")
	ran := testutil.Async(func() (struct{}, error) { return struct{}{}, run(ctx, c) })
	t.Cleanup(func() {
		defer cancel()
		select {
		case r := <-ran:
			if r.Err != nil && !errors.Is(r.Err, testutil.ErrStopped) {
				t.Errorf("commander: %v", r.Err)
			}
		default: // still running: whatever the cancel makes it return is expected
			cancel()
			testutil.Done(t, ran, testutil.Wait, "the commander to stop")
		}
	})
}

// serve is a commander that plays script on every session.
func (e *env) serve(t *testing.T, script func(*dispatchv1.StartSession) []any) {
	t.Helper()
	e.commander(t, func(ctx context.Context, c *testutil.Commander) error { return c.Serve(ctx, script) })
}

// chatScript is a typical chat session: a thought, a calculator call, an
// answer, usage, SUCCESS; gap is the pause between steps.
func chatScript(gap time.Duration) func(*dispatchv1.StartSession) []any {
	return func(*dispatchv1.StartSession) []any {
		return []any{
			&dispatchv1.ThoughtChain{StepName: "Planning", Delta: "I should compute 123 * 456"},
			testutil.Pause(gap),
			&dispatchv1.ToolCallRequest{CallId: "k1", ToolName: "calculator", ArgumentsJson: `{"expression":"123 * 456"}`},
			testutil.Pause(gap),
			&dispatchv1.ContentChunk{Text: "Result: 56088", IsFinish: true},
			&dispatchv1.Usage{InputTokens: 100, OutputTokens: 20, Cost: 0.002, Currency: "USD", Steps: 1},
			testutil.Success("Calculation completed: 56088"),
		}
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

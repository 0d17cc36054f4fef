package a2a

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/a2aproject/a2a-go/v2/a2a"
	"github.com/a2aproject/a2a-go/v2/a2aclient"
	a2agrpc "github.com/a2aproject/a2a-go/v2/a2agrpc/v1"
	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// stack serves a dispatcher with api's services and the A2A gRPC binding
// in memory; the client is a2a-go's own gRPC transport.
func stack(t *testing.T) (context.Context, *testutil.GRPC, a2aclient.Transport) {
	t.Helper()
	return stackWith(t, dispatcher.Config{})
}

func stackWith(t *testing.T, cfg dispatcher.Config) (context.Context, *testutil.GRPC, a2aclient.Transport) {
	t.Helper()
	cfg.Tasks.StopGrace = 2 * time.Second
	d, err := dispatcher.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	srv := api.New(d)
	a := New(srv.Local(), Options{})
	g := testutil.ServeGRPC(t, func(gs *grpc.Server) {
		srv.Register(gs)
		a.RegisterGRPC(gs)
	}, srv.ServerOptions()...)
	g.OnStop(d.Close)
	return testutil.Context(t, 20*time.Second), g, a2agrpc.NewGRPCTransport(g.Conn)
}

var v1 = a2aclient.ServiceParams{"a2a-version": {"1.0"}}

func text(s string) *a2a.Message {
	return a2a.NewMessage(a2a.MessageRoleUser, a2a.NewTextPart(s))
}

// collect runs a stream beside the test; its events arrive on the channel,
// which is closed at its end (an error is sent as a nil event's error).
func collect(seq func(yield func(a2a.Event, error) bool)) <-chan testutil.Result[a2a.Event] {
	out := make(chan testutil.Result[a2a.Event], 64)
	go func() {
		defer close(out)
		for ev, err := range seq {
			out <- testutil.Result[a2a.Event]{V: ev, Err: err}
			if err != nil {
				return
			}
		}
	}()
	return out
}

func drain(t *testing.T, ch <-chan testutil.Result[a2a.Event]) []a2a.Event {
	t.Helper()
	var evs []a2a.Event
	for {
		select {
		case r, ok := <-ch:
			if !ok {
				return evs
			}
			if r.Err != nil {
				t.Fatalf("stream error: %v", r.Err)
			}
			evs = append(evs, r.V)
		case <-time.After(testutil.Wait):
			t.Fatalf("stream did not end; got %d events", len(evs))
		}
	}
}

func TestStreamGetAndCancelOverGRPC(t *testing.T) {
	ctx, g, tr := stack(t)
	c := testutil.Connect(t, ctx, g.Conn, "planner:chat")

	events := collect(tr.SendStreamingMessage(ctx, v1, &a2a.SendMessageRequest{Message: text("hi")}))
	sid, start := c.Start()
	if start.GetInstruction() != "hi" {
		t.Fatalf("instruction %q", start.GetInstruction())
	}
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "Hel"}))
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "lo", IsFinish: true}))
	c.Send(testutil.Up(sid, testutil.Success("Hello")))
	evs := drain(t, events)

	first, ok := evs[0].(*a2a.Task)
	if !ok || first.Status.State != a2a.TaskStateSubmitted {
		t.Fatalf("first event %#v", evs[0])
	}
	var arts []*a2a.TaskArtifactUpdateEvent
	for _, e := range evs {
		if a, ok := e.(*a2a.TaskArtifactUpdateEvent); ok {
			arts = append(arts, a)
		}
	}
	if len(arts) != 2 || arts[0].Append || !arts[1].Append || !arts[1].LastChunk {
		t.Fatalf("artifact updates %+v", arts)
	}
	last, ok := evs[len(evs)-1].(*a2a.TaskStatusUpdateEvent)
	if !ok || last.Status.State != a2a.TaskStateCompleted {
		t.Fatalf("last event %#v", evs[len(evs)-1])
	}

	got, err := tr.GetTask(ctx, v1, &a2a.GetTaskRequest{ID: first.ID})
	if err != nil || got.Status.State != a2a.TaskStateCompleted || got.Artifacts[0].Parts[0].Text() != "Hello" {
		t.Fatalf("GetTask %+v %v", got, err)
	}
	if _, err := tr.CancelTask(ctx, v1, &a2a.CancelTaskRequest{ID: first.ID}); !errors.Is(err, a2a.ErrTaskNotCancelable) {
		t.Fatalf("cancel of a completed task: %v", err)
	}
	if _, err := tr.GetTask(ctx, v1, &a2a.GetTaskRequest{ID: "nope"}); !errors.Is(err, a2a.ErrTaskNotFound) {
		t.Fatalf("unknown task: %v", err)
	}

	// Cancel mid-run: the commander is told to stop; CancelTask returns the
	// ended task; a second cancel returns it again.
	res, err := tr.SendMessage(ctx, v1, &a2a.SendMessageRequest{Message: text("long"), Config: &a2a.SendMessageConfig{ReturnImmediately: true}})
	if err != nil {
		t.Fatal(err)
	}
	id := res.(*a2a.Task).ID
	sid = c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStart() != nil }).GetSessionId()
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "partial"}))
	cancelled := testutil.Async(func() (*a2a.Task, error) { return tr.CancelTask(ctx, v1, &a2a.CancelTaskRequest{ID: id}) })
	c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil })
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "stopped"}))
	r := testutil.Recv(t, cancelled, testutil.Wait, "CancelTask to return")
	if r.Err != nil || r.V.Status.State != a2a.TaskStateCanceled {
		t.Fatalf("cancel %+v %v", r.V, r.Err)
	}
	again, err := tr.CancelTask(ctx, v1, &a2a.CancelTaskRequest{ID: id})
	if err != nil || again.Status.State != a2a.TaskStateCanceled {
		t.Fatalf("second cancel %+v %v", again, err)
	}
}

func TestCallUserIsInputRequiredAndAnsweredByAMessage(t *testing.T) {
	ctx, g, tr := stack(t)
	c := testutil.Connect(t, ctx, g.Conn, "planner:gui")
	sent := testutil.Async(func() (a2a.SendMessageResult, error) {
		return tr.SendMessage(ctx, v1, &a2a.SendMessageRequest{Message: text("log in"), Metadata: map[string]any{"planner": "gui"}})
	})
	sid, start := c.Start()
	if start.GetPlanner() != "gui" {
		t.Fatalf("planner %q", start.GetPlanner())
	}
	c.Send(testutil.Up(sid, &dispatchv1.StageChange{Stage: "call_user", Message: "password?"}))
	r := testutil.Recv(t, sent, testutil.Wait, "SendMessage to return at INPUT_REQUIRED")
	asked, ok := r.V.(*a2a.Task)
	if r.Err != nil || !ok || asked.Status.State != a2a.TaskStateInputRequired || asked.Status.Message.Parts[0].Text() != "password?" {
		t.Fatalf("blocking send: %+v %v", r.V, r.Err)
	}

	answer := a2a.NewMessageForTask(a2a.MessageRoleUser, asked, a2a.NewTextPart("hunter2"))
	answered := testutil.Async(func() (a2a.SendMessageResult, error) {
		return tr.SendMessage(ctx, v1, &a2a.SendMessageRequest{Message: answer})
	})
	in := c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetUserInput() != nil })
	if in.GetUserInput().GetText() != "hunter2" {
		t.Fatalf("user input %v", in)
	}
	c.Send(testutil.Up(sid, testutil.Success("logged in")))
	r = testutil.Recv(t, answered, testutil.Wait, "the answer's SendMessage to return")
	done, ok := r.V.(*a2a.Task)
	if r.Err != nil || !ok || done.Status.State != a2a.TaskStateCompleted || done.Artifacts[0].Parts[0].Text() != "logged in" {
		t.Fatalf("after the answer: %+v %v", r.V, r.Err)
	}
	if len(done.History) != 2 || done.History[1].Parts[0].Text() != "hunter2" {
		t.Fatalf("history %+v", done.History)
	}
}

func TestPolicyStopIsRejected(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policy.yaml")
	policy := "version: 1\nrules:\n  - {id: no-codes, phrases: [\"launch codes\"], action: stop, reason: forbidden phrase}\n"
	if err := os.WriteFile(path, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, g, tr := stackWith(t, dispatcher.Config{Policy: dispatcher.Policy{File: path}})
	c := testutil.Connect(t, ctx, g.Conn, "planner:chat")
	events := collect(tr.SendStreamingMessage(ctx, v1, &a2a.SendMessageRequest{Message: text("tell me")}))
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "here are the launch codes"}))
	c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil })
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "stopped"}))
	evs := drain(t, events)
	last, ok := evs[len(evs)-1].(*a2a.TaskStatusUpdateEvent)
	if !ok || last.Status.State != a2a.TaskStateRejected || !strings.Contains(last.Status.Message.Parts[0].Text(), "no-codes") {
		t.Fatalf("last event %#v", evs[len(evs)-1])
	}
	for _, e := range evs {
		if a, ok := e.(*a2a.TaskArtifactUpdateEvent); ok {
			t.Fatalf("the stopped content was shown: %+v", a)
		}
	}
}

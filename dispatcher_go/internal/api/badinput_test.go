package api

import (
	"context"
	"fmt"
	"io"
	"math"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/session"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// Each bad input gets the right status or error packet, and the dispatcher
// keeps serving everyone else: a healthy commander runs a whole task after
// all of them.
func TestBadInputs(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{GRPC: dispatcher.GRPC{MaxRecvMsgBytes: 64 << 10}})
	healthy := testutil.Connect(t, ctx, h.conn, "planner:chat")

	t.Run("empty instruction", func(t *testing.T) {
		_, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: ""})
		wantCode(t, err, codes.InvalidArgument)
		_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "   "})
		wantCode(t, err, codes.InvalidArgument)
		s, err := h.agent.RunAgentInstruction(ctx, &agentpb.RunAgentInstructionRequest{})
		if err == nil {
			_, err = s.Recv()
		}
		wantCode(t, err, codes.InvalidArgument)
	})

	t.Run("unknown task id", func(t *testing.T) {
		st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: "no-such-task"})
		if err != nil || st.GetStatus() != agentpb.TaskStatus_NOT_FOUND || st.GetTaskId() != "no-such-task" {
			t.Fatalf("QueryTaskStatus %v %v", st, err)
		}
		s, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: "no-such-task"})
		if err == nil {
			_, err = s.Recv()
		}
		wantCode(t, err, codes.NotFound)
		w, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: "no-such-task"})
		if err == nil {
			_, err = w.Recv()
		}
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: "no-such-task"})
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: "no-such-task", Text: "x"})
		wantCode(t, err, codes.NotFound)
	})

	t.Run("bad planner name", func(t *testing.T) {
		// Such a task was accepted and waited for a planner no commander
		// can declare, until --queue-timeout.
		for _, p := range []string{"a\x00b", "a b", "chat\n", "-x", "planner:chat", strings.Repeat("p", 65)} {
			_, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: p})
			wantCode(t, err, codes.InvalidArgument)
			if !strings.Contains(status.Convert(err).Message(), "not a planner name") {
				t.Fatalf("planner %q: %v", p, err)
			}
		}
	})

	t.Run("unknown status filter", func(t *testing.T) {
		// A status TaskStatus does not define matched nothing: OK and an
		// empty page, as if no task had it.
		for _, bad := range []agentpb.TaskStatus{99, -1} {
			_, err := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{Statuses: []agentpb.TaskStatus{agentpb.TaskStatus_RUNNING, bad}})
			wantCode(t, err, codes.InvalidArgument)
			if want := fmt.Sprintf("unknown status %d", bad); !strings.Contains(status.Convert(err).Message(), want) {
				t.Fatalf("ListTasks with status %d: %v, want the message to name it", bad, err)
			}
		}
		if _, err := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{Statuses: []agentpb.TaskStatus{agentpb.TaskStatus_RUNNING}}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("unknown enum values and bad configs", func(t *testing.T) {
		// A mode or sandbox os the enum does not define was taken and sent
		// on to the commander as a number, and the global config took steps
		// <= 0, an undefined mode and a 3 MiB id (black-box attack run).
		runs := map[string]*agentpb.RunAgentInstructionRequest{
			"mode 77":    {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Mode: 77}},
			"os 99":      {Instruction: "x", Sandbox: &agentpb.Sandbox{Os: 99}},
			"long id":    {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Id: strings.Repeat("i", 257)}},
			"mode -1":    {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Mode: -1}},
			"steps zero": {Instruction: "x", RunningConfig: &agentpb.CommonConfig{Steps: proto.Int32(0)}},
		}
		for name, req := range runs {
			_, err := h.agent.RunAgentInstructionAsync(ctx, req)
			wantCode(t, err, codes.InvalidArgument)
			_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", RunningConfig: req.GetRunningConfig(), Sandbox: req.Sandbox})
			wantCode(t, err, codes.InvalidArgument)
			_, err = h.agent.SetGlobalCommonConfig(ctx, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: req.GetRunningConfig()})
			if req.GetRunningConfig() != nil {
				wantCode(t, err, codes.InvalidArgument)
			}
			if name == "mode 77" && !strings.Contains(status.Convert(err).Message(), "mode 77 is not an InstanceMode") {
				t.Fatalf("%s: %v, want the message to name the mode", name, err)
			}
		}
		if cfg, err := h.agent.GetGlobalCommonConfig(ctx, &agentpb.GetGlobalCommonConfigRequest{}); err != nil || cfg.GetMode() != 0 || cfg.Steps != nil {
			t.Fatalf("the global config changed: %v %v", cfg, err)
		}
		for _, m := range []agentpb.InstanceMode{agentpb.InstanceMode_MODEUNDEFINED, agentpb.InstanceMode_NORMAL, agentpb.InstanceMode_FAST} {
			if _, err := h.agent.SetGlobalCommonConfig(ctx, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{Mode: m}}); err != nil {
				t.Fatalf("mode %v: %v", m, err)
			}
		}
		if _, err := h.agent.SetGlobalCommonConfig(ctx, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}}); err != nil {
			t.Fatal(err)
		}
		// An LLM config without a model name keeps the default model (the
		// commander falls back to it); a blank name is refused.
		if _, err := h.agent.SetGlobalCommonLLMConfig(ctx, &agentpb.SetGlobalCommonLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{}}); err != nil {
			t.Fatalf("an LLM config with no model name (the defaults): %v", err)
		}
		_, err := h.agent.SetGlobalGroundingLLMConfig(ctx, &agentpb.SetGlobalGroundingLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: " "}})
		wantCode(t, err, codes.InvalidArgument)
		if m, err := h.agent.SetGlobalEmbeddingLLMConfig(ctx, &agentpb.SetGlobalEmbeddingLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "e"}}); err != nil || m.GetModelName() != "e" {
			t.Fatalf("a named model: %v %v", m, err)
		}
		// An unknown config id was "task not found: no config with that id".
		_, err = h.agent.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: "no-such-config"})
		wantCode(t, err, codes.NotFound)
		if msg := status.Convert(err).Message(); strings.Contains(msg, "task not found") || !strings.Contains(msg, `no config with id "no-such-config"`) {
			t.Fatalf("GetCommonConfig unknown id: %q", msg)
		}
	})

	t.Run("resume past the end of an ended task", func(t *testing.T) {
		// It was an empty stream that ended OK, as if the client had read
		// everything (black-box attack run).
		sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "nobody-serves-this"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: sub.GetTaskId()}); err != nil {
			t.Fatal(err)
		}
		last := waitTerminal(t, h, sub.GetTaskId()).GetLastSeq()
		watch := func(after uint64, batch uint32) (int, error) {
			w, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: sub.GetTaskId(), AfterSeq: after, MaxBatch: batch})
			if err != nil {
				return 0, err
			}
			n := 0
			for {
				if _, err := w.Recv(); err != nil {
					if err == io.EOF {
						return n, nil
					}
					return n, err
				}
				n++
			}
		}
		if n, err := watch(last, 0); err != nil || n != 0 {
			t.Fatalf("after_seq = last (%d): %d events, %v", last, n, err)
		}
		if n, err := watch(last-1, 0); err != nil || n != 1 {
			t.Fatalf("after_seq = last-1: %d events, %v", n, err)
		}
		for _, after := range []uint64{last + 1, math.MaxUint64} {
			for _, batch := range []uint32{0, 16} {
				_, err := watch(after, batch)
				wantCode(t, err, codes.OutOfRange)
				if !strings.Contains(status.Convert(err).Message(), fmt.Sprintf("past the task's last event (seq %d)", last)) {
					t.Fatalf("after_seq %d: %v", after, err)
				}
			}
		}
	})

	t.Run("approve a call that is not held", func(t *testing.T) {
		// NOT_FOUND, but it said "task not found: no tool call …" of a task
		// that runs (black-box attack run).
		c := testutil.Connect(t, ctx, h.conn, "planner:holds")
		sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "holds"})
		if err != nil {
			t.Fatal(err)
		}
		sid, _ := c.Start()
		_, err = h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: sub.GetTaskId(), CallId: "never-held", Approve: true})
		wantCode(t, err, codes.NotFound)
		if msg := status.Convert(err).Message(); strings.Contains(msg, "task not found") || !strings.Contains(msg, "no tool call with that call_id is held") {
			t.Fatalf("approve: %q", msg)
		}
		c.Send(testutil.Up(sid, testutil.Success("ok")))
		if got := waitTerminal(t, h, sub.GetTaskId()); got.GetStatus() != agentpb.TaskStatus_SUCCESS {
			t.Fatalf("task %v", got)
		}
	})

	t.Run("message over size limit", func(t *testing.T) {
		big := testutil.Connect(t, ctx, h.conn, "planner:big")
		sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "big"})
		sid, _ := big.Start()
		// Over the 64 KiB limit, under the transport's 128 KiB ceiling: that
		// session is stopped with the reason; the stream goes on.
		big.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: strings.Repeat("x", 100<<10)}))
		stop := big.RecvUntil(isStop).GetStop()
		if stop.GetCode() != dispatchv1.StopCode_STOP_CODE_POLICY || !strings.Contains(stop.GetReason(), "exceeds the limit of 61440 bytes") {
			t.Fatalf("stop %v", stop)
		}
		big.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "stopped"}))
		big.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool {
			return p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED
		})
		got := waitTerminal(t, h, sub.GetTaskId())
		if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.Contains(got.GetMessage(), "a content packet of ") {
			t.Fatalf("task %v", got)
		}
		// The same stream takes the next task.
		sub2, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "big"})
		sid2, _ := big.Start()
		big.Send(testutil.Up(sid2, testutil.Success("ok")))
		if got := waitTerminal(t, h, sub2.GetTaskId()); got.GetStatus() != agentpb.TaskStatus_SUCCESS {
			t.Fatalf("next task on the same stream %v", got)
		}
		big.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool {
			return p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED
		})
		// Over the transport's hard ceiling (twice the limit) the stream ends.
		sub3, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "big"})
		sid3, _ := big.Start()
		big.Send(testutil.Up(sid3, &dispatchv1.ContentChunk{Text: strings.Repeat("x", 200<<10)}))
		wantCode(t, big.Ended(), codes.ResourceExhausted)
		got = waitTerminal(t, h, sub3.GetTaskId())
		if got.GetStatus() != agentpb.TaskStatus_FAILURE || !strings.HasPrefix(got.GetMessage(), "commander connection lost: ") {
			t.Fatalf("task %v", got)
		}
		// A client request over the limit is refused by our check, under the
		// ceiling, and by the transport above it.
		_, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: strings.Repeat("y", 100<<10)})
		wantCode(t, err, codes.ResourceExhausted)
		_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: strings.Repeat("y", 200<<10)})
		wantCode(t, err, codes.ResourceExhausted)
	})

	t.Run("packet before hello", func(t *testing.T) {
		c := testutil.OpenChat(t, ctx, h.conn)
		c.Send(testutil.Up("", &dispatchv1.ContentChunk{Text: "hi"}))
		wantCode(t, c.Ended(), codes.FailedPrecondition)
	})

	t.Run("batch of more packets than announced", func(t *testing.T) {
		// 60 000 empty packets, 120 KB: under the transport's ceiling
		// (128 KiB here), refused before a packet is made for each; the
		// stream ends, its task fails, the others go on (below).
		c := testutil.Connect(t, ctx, h.conn, "planner:long")
		sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "long"})
		c.Start()
		b := &dispatchv1.UpstreamBatch{Packets: make([]*dispatchv1.UpstreamPacket, 60_000)}
		for i := range b.Packets {
			b.Packets[i] = &dispatchv1.UpstreamPacket{}
		}
		c.Send(&dispatchv1.UpstreamPacket{Payload: &dispatchv1.UpstreamPacket_Batch{Batch: b}})
		err := c.Ended()
		wantCode(t, err, codes.FailedPrecondition)
		if !strings.Contains(err.Error(), "a batch of more than 256 packets") {
			t.Fatalf("ended with %v", err)
		}
		if got := waitTerminal(t, h, sub.GetTaskId()); got.GetStatus() != agentpb.TaskStatus_FAILURE {
			t.Fatalf("task %v", got)
		}
	})

	t.Run("requests that do not decode are INVALID_ARGUMENT", func(t *testing.T) {
		// Raw bytes: a string that is not UTF-8, and bytes that are not
		// protobuf. grpc-go answered INTERNAL.
		for _, b := range [][]byte{{0x0a, 2, 0xff, 0xfe}, {0xff, 0xff, 0xff}} {
			err := h.conn.Invoke(ctx, "/dispatch.v1.TaskService/GetTask", b, new(dispatchv1.GetTaskResponse), grpc.ForceCodec(bytesCodec{}))
			wantCode(t, err, codes.InvalidArgument)
			err = h.conn.Invoke(ctx, "/lybic.agent.Agent/RunAgentInstructionAsync", b, new(agentpb.RunAgentInstructionAsyncResponse), grpc.ForceCodec(bytesCodec{}))
			wantCode(t, err, codes.InvalidArgument)
			w, err := h.conn.NewStream(ctx, &dispatchv1.TaskService_ServiceDesc.Streams[0], "/dispatch.v1.TaskService/WatchTask", grpc.ForceCodec(bytesCodec{}))
			if err == nil {
				_ = w.SendMsg(b)
				_ = w.CloseSend()
				err = w.RecvMsg(new(dispatchv1.WatchTaskResponse))
			}
			wantCode(t, err, codes.InvalidArgument)
		}
		// The commander services' streams check in their own receives
		// (chatStream, connectStream), no interceptor: a hello that does
		// not decode, on ChatStream and on a provider's Connect. A
		// commander's later packet: TestInvalidUTF8FromCommanderEndsOnlyItsSession.
		for _, m := range []struct {
			desc *grpc.StreamDesc
			name string
		}{
			{&dispatchv1.AgentInteraction_ServiceDesc.Streams[0], "/dispatch.v1.AgentInteraction/ChatStream"},
			{&dispatchv1.ToolProviderService_ServiceDesc.Streams[0], "/dispatch.v1.ToolProviderService/Connect"},
		} {
			s, err := h.conn.NewStream(ctx, m.desc, m.name, grpc.ForceCodec(bytesCodec{}))
			if err == nil {
				_ = s.SendMsg([]byte{0x0a, 2, 0xff, 0xfe})
				err = s.RecvMsg(new(dispatchv1.DownstreamPacket))
			}
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "failed to unmarshal") {
				t.Fatalf("%s: error %v, want INVALID_ARGUMENT failed to unmarshal", m.name, err)
			}
		}
	})

	t.Run("upstream packet with no payload", func(t *testing.T) {
		c := testutil.Connect(t, ctx, h.conn, "planner:other")
		c.Send(testutil.Up("whatever", nil))
		a := c.Recv().GetAck()
		if a.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || !strings.Contains(a.GetDetail(), "no payload") {
			t.Fatalf("ack %v", a)
		}
	})

	t.Run("content for an unknown session", func(t *testing.T) {
		c := testutil.Connect(t, ctx, h.conn, "planner:other")
		c.Send(testutil.Up("ses-made-up", &dispatchv1.ContentChunk{Text: "late"}))
		p := c.Recv()
		if p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || p.GetSessionId() != "ses-made-up" {
			t.Fatalf("ack %v", p)
		}
		c.Send(testutil.Up("ses-made-up", &dispatchv1.ToolCallRequest{CallId: "x", ToolName: "echo"}))
		if a := c.Recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED {
			t.Fatalf("tool call for unknown session: %v", a)
		}
	})

	t.Run("unknown tool and arguments not JSON", func(t *testing.T) {
		c := testutil.Connect(t, ctx, h.conn, "planner:tools")
		sub, _ := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x", Planner: "tools"})
		sid, _ := c.Start()
		c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "u", ToolName: "rm_rf", ArgumentsJson: `{}`}))
		if r := c.Recv().GetToolResult(); r.GetCallId() != "u" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL {
			t.Fatalf("unknown tool %v", r)
		}
		c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "j", ToolName: "calculator", ArgumentsJson: `{"expression": "1+1"`}))
		if r := c.Recv().GetToolResult(); r.GetCallId() != "j" || r.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS {
			t.Fatalf("not JSON %v", r)
		}
		// The session goes on.
		c.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "ok", ToolName: "calculator", ArgumentsJson: `{"expression":"2+2"}`}))
		if r := c.Recv().GetToolResult(); r.GetError() != nil {
			t.Fatalf("good call after bad ones: %v", r)
		}
		c.Send(testutil.Up(sid, testutil.Success("4")))
		c.Recv()
		got, _ := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: sub.GetTaskId()})
		if got.GetTask().GetStatus() != agentpb.TaskStatus_SUCCESS {
			t.Fatalf("task %v", got.GetTask())
		}
	})

	t.Run("others still served", func(t *testing.T) {
		sub, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "still there?"})
		if err != nil {
			t.Fatal(err)
		}
		playChat(t, healthy, "yes")
		st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: sub.GetTaskId()})
		if st.GetStatus() != agentpb.TaskStatus_SUCCESS {
			t.Fatalf("status %v", st)
		}
	})
}

func isTerminal(s agentpb.TaskStatus) bool {
	return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
}

// waitTerminal polls GetTask until the task has ended.
func waitTerminal(t *testing.T, h *harness, id string) *dispatchv1.Task {
	t.Helper()
	return waitTask(t, h, id, "to end", func(tk *dispatchv1.Task) bool { return isTerminal(tk.GetStatus()) })
}

// waitTask polls GetTask until ok accepts the task, and returns it; what
// says what is awaited ("to end").
func waitTask(t *testing.T, h *harness, id, what string, ok func(*dispatchv1.Task) bool) *dispatchv1.Task {
	t.Helper()
	ctx := testutil.Context(t, testTimeout)
	seen := &lastTask{}
	testutil.WaitFor(t, testutil.Wait, func() bool {
		r, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
		if err != nil {
			t.Fatal(err)
		}
		seen.tk = r.GetTask()
		return ok(seen.tk)
	}, "task %s %s; it is %v", id, what, seen)
	return seen.tk
}

// lastTask prints the task a wait saw last, when the wait fails.
type lastTask struct{ tk *dispatchv1.Task }

func (l *lastTask) String() string {
	return fmt.Sprintf("%v (%s)", l.tk.GetStatus(), l.tk.GetMessage())
}

func TestQueueFullIsResourceExhausted(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Limits: dispatcher.Limits{QueueSize: 2}})
	for range 2 {
		if _, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	_, err := h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "x"})
	wantCode(t, err, codes.ResourceExhausted)
	_, err = h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	wantCode(t, err, codes.ResourceExhausted)
}

func TestUnknownErrorsDoNotLeak(t *testing.T) {
	t.Parallel()
	err := toStatus(discard(), context.Canceled)
	wantCode(t, err, codes.Canceled)
	err = toStatus(discard(), errSecret)
	wantCode(t, err, codes.Internal)
	if strings.Contains(err.Error(), "sk-") {
		t.Fatal("internal text leaked")
	}
}

// TestReattachLaterIsUnavailable: a re-attach refused for now ends the
// stream UNAVAILABLE with its reason, which commanders retry (a final
// refusal is an ack instead).
func TestReattachLaterIsUnavailable(t *testing.T) {
	t.Parallel()
	err := toStatus(discard(), fmt.Errorf("%w (the fleet's database did not answer)", session.ErrReattachLater))
	wantCode(t, err, codes.Unavailable)
	if !strings.Contains(err.Error(), "re-attach refused for now") || !strings.Contains(err.Error(), "did not answer") {
		t.Fatalf("status %v", err)
	}
}

// bytesCodec sends pre-encoded bytes as they are and decodes replies as
// protobuf (named "proto", so the server decodes with its own codec).
type bytesCodec struct{}

func (bytesCodec) Marshal(v any) ([]byte, error) { return v.([]byte), nil }

func (bytesCodec) Unmarshal(data []byte, v any) error {
	return proto.Unmarshal(data, v.(proto.Message))
}

func (bytesCodec) Name() string { return "proto" }

package api

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// Seed 000 "streaming example": RunAgentInstruction streams TaskStream
// until the task ends.
func TestRunAgentInstructionStreamsUntilTheEnd(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Version: "1.2.3"})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")

	stream, err := h.agent.RunAgentInstruction(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "Open a calculator and compute 1 + 1"})
	if err != nil {
		t.Fatal(err)
	}
	done := testutil.Async(func() ([]*agentpb.TaskStream, error) { return testutil.RecvAll(stream, nil) })
	playChat(t, c, "2")
	r := testutil.Recv(t, done, testutil.Wait, "the end of RunAgentInstruction's stream")
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	var stages []string
	var taskID string
	for _, ev := range r.V {
		if ev.GetTimestamp() == nil || ev.GetTaskId() == "" {
			t.Fatalf("event without id or timestamp: %v", ev)
		}
		taskID = ev.GetTaskId()
		stages = append(stages, ev.GetStage()+"="+ev.GetMessage())
	}
	got := strings.Join(stages, " | ")
	want := `pending=queued | running=running | thought=I should add | tool_call=calculator({"expression":"1 + 1"}) | tool_result={"expression":"1 + 1","result":2} | content=2 | final=2`
	if got != want {
		t.Fatalf("stages:\n got %s\nwant %s", got, want)
	}
	st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: taskID})
	if err != nil {
		t.Fatal(err)
	}
	es := st.GetExecutionStatistics()
	if st.GetStatus() != agentpb.TaskStatus_SUCCESS || st.GetResult() != "2" || es.GetTotalTokens() != 120 || es.GetSteps() != 1 || es.GetCurrencySymbol() != "USD" || es.GetCost() != 0.002 {
		t.Fatalf("status %v", st)
	}
}

// taskStages follows the seed-000 task stream of id to its end and lists
// its stages.
func taskStages(ctx context.Context, h *harness, id string) ([]string, error) {
	s, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: id})
	if err != nil {
		return nil, err
	}
	evs, err := testutil.RecvAll(s, nil)
	var stages []string
	for _, ev := range evs {
		stages = append(stages, ev.GetTaskStream().GetStage())
	}
	return stages, err
}

// Seed 000 "async lifecycle": RunAgentInstructionAsync, then stream and poll
// concurrently; a late stream on a finished task replays and ends.
func TestAsyncLifecycleStreamAndPollTogether(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	start, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "Create a new text document"})
	if err != nil || start.GetTaskId() == "" {
		t.Fatalf("async: %v %v", start, err)
	}
	id := start.GetTaskId()
	st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: id})
	if st.GetStatus() != agentpb.TaskStatus_PENDING {
		t.Fatalf("no commander yet: want PENDING, got %v", st.GetStatus())
	}

	// The stream, the session and the polls run at the same time.
	streamed := testutil.Async(func() ([]string, error) { return taskStages(ctx, h, id) })
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	played := testutil.Async(func() (struct{}, error) { return struct{}{}, chat(ctx, c, "done") })
	var final *agentpb.QueryTaskStatusResponse
	testutil.WaitFor(t, testutil.Wait, func() bool {
		st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: id})
		if err != nil {
			t.Fatal(err)
		}
		final = st
		return isTerminal(st.GetStatus())
	}, "task %s to end", id)
	if r := testutil.Recv(t, played, testutil.Wait, "the session to close"); r.Err != nil {
		t.Fatal(r.Err)
	}
	if final.GetResult() != "done" || final.GetExecutionStatistics().GetInputTokens() != 100 {
		t.Fatalf("final %v", final)
	}
	live := testutil.Recv(t, streamed, testutil.Wait, "the end of the task stream")
	if live.Err != nil || len(live.V) == 0 || live.V[0] != "pending" || live.V[len(live.V)-1] != "final" {
		t.Fatalf("streamed %v %v", live.V, live.Err)
	}
	// Late subscriber: history then the end, no hang.
	late, err := taskStages(ctx, h, id)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(late, ",") != strings.Join(live.V, ",") {
		t.Fatalf("replay %v != live %v", late, live.V)
	}
}

// Seed 000 "cancel": truthful success and message.
func TestCancelTaskIsTruthful(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "long job"})
	sid, _ := c.Start()
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "working"}))

	cancelled := testutil.Async(func() (*agentpb.CancelTaskResponse, error) {
		return h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	})
	p := c.RecvUntil(isStop)
	if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Errorf("stop %v", p.GetStop())
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "cancelled", FinalUsage: &dispatchv1.Usage{InputTokens: 7}}))
	cr := testutil.Recv(t, cancelled, testutil.Wait, "CancelTask to return")
	resp, err := cr.V, cr.Err
	if err != nil || !resp.GetSuccess() || resp.GetTaskId() != start.GetTaskId() {
		t.Fatalf("cancel %v %v", resp, err)
	}
	st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
	if st.GetStatus() != agentpb.TaskStatus_CANCELLED || st.GetExecutionStatistics().GetInputTokens() != 7 {
		t.Fatalf("status %v", st)
	}
	again, _ := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	if again.GetSuccess() || !strings.Contains(again.GetMessage(), "CANCELLED") {
		t.Fatalf("second cancel %v", again)
	}
	unknown, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: "nope"})
	if err != nil || unknown.GetSuccess() || unknown.GetMessage() != "task not found" {
		t.Fatalf("unknown %v %v", unknown, err)
	}
	// A pending task is dequeued.
	c.Cancel()
	waitSlots(t, h, 0)
	pending, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	resp, _ = h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: pending.GetTaskId()})
	if !resp.GetSuccess() || resp.GetMessage() != "cancelled while pending" {
		t.Fatalf("pending cancel %v", resp)
	}
}

func waitSlots(t *testing.T, h *harness, n int) {
	t.Helper()
	testutil.WaitFor(t, testutil.Wait, func() bool { return h.d.Scheduler().SlotCount() == n }, "%d slots", n)
}

func TestClientGoneCancelsRunAgentInstruction(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	cctx, cancel := context.WithCancel(ctx)
	stream, err := h.agent.RunAgentInstruction(cctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	sid, st := c.Start()
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	p := c.RecvUntil(isStop)
	if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Fatalf("stop %v", p)
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{}))
	if q := waitTerminal(t, h, st.GetTaskId()); q.GetStatus() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("status %v", q)
	}
}

// Seed 000 "config updates": set, read back masked, per-task override.
func TestConfigSetGetMaskAndOverride(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	llm, err := h.agent.SetGlobalGroundingLLMConfig(ctx, &agentpb.SetGlobalGroundingLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "doubao-1-5-ui-tars-250428", ApiKey: proto.String("sk-ground-key-1234")}})
	if err != nil || llm.GetModelName() != "doubao-1-5-ui-tars-250428" || llm.GetApiKey() != "****1234" {
		t.Fatalf("grounding %v %v", llm, err)
	}
	if _, err := h.agent.SetGlobalCommonLLMConfig(ctx, &agentpb.SetGlobalCommonLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "claude-sonnet-4-20250514"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := h.agent.SetGlobalEmbeddingLLMConfig(ctx, &agentpb.SetGlobalEmbeddingLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "emb"}}); err != nil {
		t.Fatal(err)
	}
	g, _ := h.agent.GetGlobalCommonConfig(ctx, &agentpb.GetGlobalCommonConfigRequest{})
	smc := g.GetStageModelConfig()
	if smc.GetGroundingModel().GetApiKey() != "****1234" || smc.GetActionGeneratorModel().GetModelName() != "claude-sonnet-4-20250514" || smc.GetEmbeddingModel().GetModelName() != "emb" {
		t.Fatalf("global %v", g)
	}
	wantCode(t, func() error {
		_, err := h.agent.SetGlobalCommonLLMConfig(ctx, &agentpb.SetGlobalCommonLLMConfigRequest{})
		return err
	}(), codes.InvalidArgument)

	set, err := h.agent.SetGlobalCommonConfig(ctx, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{
		Id: "global", Backend: proto.String("lybic"), Mode: agentpb.InstanceMode_FAST, Steps: proto.Int32(40),
		AuthorizationInfo: &agentpb.Authorization{OrgID: "org_123", ApiKey: "sk_live_abcdefgh"},
		StageModelConfig:  &agentpb.StageModelConfig{ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "claude", ApiKey: proto.String("sk-action-zzzz")}},
	}})
	if err != nil || !set.GetSuccess() || set.GetId() != "global" {
		t.Fatalf("set %v %v", set, err)
	}
	g, _ = h.agent.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: "global"})
	if g.GetAuthorizationInfo().GetApiKey() != "****efgh" || g.GetSteps() != 40 || g.GetStageModelConfig().GetGroundingModel() != nil {
		t.Fatalf("replaced global %v", g)
	}
	_, err = h.agent.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: "nope"})
	wantCode(t, err, codes.NotFound)

	// The override reaches the commander with secrets, for that task only.
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	start, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{
		Instruction: "x",
		RunningConfig: &agentpb.CommonConfig{Steps: proto.Int32(3), StageModelConfig: &agentpb.StageModelConfig{
			ActionGeneratorModel: &agentpb.LLMConfig{ApiKey: proto.String("sk-per-task-9876")},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, ss := c.Start()
	cfg := ss.GetConfig()
	if cfg.GetSteps() != 3 || cfg.GetBackend() != "lybic" || cfg.GetAuthorizationInfo().GetApiKey() != "sk_live_abcdefgh" ||
		cfg.GetStageModelConfig().GetActionGeneratorModel().GetApiKey() != "sk-per-task-9876" ||
		cfg.GetStageModelConfig().GetActionGeneratorModel().GetModelName() != "claude" {
		t.Fatalf("resolved config %v", cfg)
	}
	tc, err := h.agent.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: start.GetTaskId()})
	if err != nil || tc.GetStageModelConfig().GetActionGeneratorModel().GetApiKey() != "****9876" {
		t.Fatalf("task config %v %v", tc, err)
	}
	g, _ = h.agent.GetGlobalCommonConfig(ctx, &agentpb.GetGlobalCommonConfigRequest{})
	if g.GetSteps() != 40 {
		t.Fatal("override leaked into the global config")
	}
}

func TestGetAgentInfoCountsRealSlots(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Version: "9.9.9", LogLevel: "debug"})
	info, _ := h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 0 || info.GetVersion() != "9.9.9" || info.GetLogLevel() != "debug" {
		t.Fatalf("info %v", info)
	}
	a := testutil.Connect(t, ctx, h.conn, "planner:chat")
	testutil.Connect(t, ctx, h.conn, "planner:chat")
	testutil.Connect(t, ctx, h.conn, "planner:gui")
	info, _ = h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 3 {
		t.Fatalf("slots %d", info.GetMaxConcurrentTasks())
	}
	a.Cancel()
	waitSlots(t, h, 2)
	info, _ = h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 2 {
		t.Fatalf("after disconnect: %d", info.GetMaxConcurrentTasks())
	}
}

func TestStopMidGenerationNoContentReachesClients(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "write an essay"})
	watch, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: start.GetTaskId()})
	if err != nil {
		t.Fatal(err)
	}
	flowing := make(chan struct{})
	var once sync.Once
	watched := testutil.Async(func() ([]*agentpb.GetAgentTaskStreamResponse, error) {
		return testutil.RecvAll(watch, func(ev *agentpb.GetAgentTaskStreamResponse) {
			if ev.GetTaskStream().GetStage() == "content" {
				once.Do(func() { close(flowing) })
			}
		})
	})
	sid, _ := c.Start()
	// The commander streams content without pause and keeps going for a
	// while after the stop (a misbehaving planner). The client cancels
	// once the content reaches it.
	cancelDone := testutil.Async(func() (*agentpb.CancelTaskResponse, error) {
		select {
		case <-flowing:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	})
	timeout := time.After(testutil.Wait)
	for stopSeen := false; !stopSeen; {
		c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "word "}))
		select {
		case p := <-c.Packets():
			stopSeen = p.GetStop() != nil
		case <-timeout:
			t.Fatal("no stop while streaming")
		default:
		}
	}
	for range 50 {
		c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "AFTER-STOP "}))
	}
	c.Send(testutil.Up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	if r := testutil.Recv(t, cancelDone, testutil.Wait, "CancelTask to return"); r.Err != nil {
		t.Fatal(r.Err)
	}
	w := testutil.Recv(t, watched, testutil.Wait, "the end of the task stream")
	if w.Err != nil {
		t.Fatal(w.Err)
	}
	var afterStop bool
	for _, ev := range w.V {
		ts := ev.GetTaskStream()
		if ts.GetStage() == "stop" {
			afterStop = true
		}
		if strings.Contains(ts.GetMessage(), "AFTER-STOP") || (afterStop && ts.GetStage() == "content") {
			t.Fatalf("content after the stop reached a client: %v", ts)
		}
	}
	if !afterStop {
		t.Fatal("no stop event")
	}
	if h.d.Sessions().Stats().DroppedAfterStop.Load() < 50 {
		t.Fatalf("dropped %d", h.d.Sessions().Stats().DroppedAfterStop.Load())
	}
}

// A commander that ignores the stop loses its stream (ABORTED) after the
// grace; the cancel still reports the truth.
func TestIgnoredStopAbortsStream(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{StopGrace: 150 * time.Millisecond}})
	c := testutil.Connect(t, ctx, h.conn, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	c.Start()
	resp, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	if err != nil || !resp.GetSuccess() {
		t.Fatalf("cancel %v %v", resp, err)
	}
	wantCode(t, c.Ended(), codes.Aborted)
	st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
	if st.GetStatus() != agentpb.TaskStatus_CANCELLED || !strings.Contains(st.GetMessage(), "did not acknowledge") {
		t.Fatalf("status %v", st)
	}
}

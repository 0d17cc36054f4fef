package api

import (
	"context"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// Seed 000 "streaming example": RunAgentInstruction streams TaskStream
// until the task ends.
func TestRunAgentInstructionStreamsUntilTheEnd(t *testing.T) {
	h := newHarness(t, dispatcher.Config{Version: "1.2.3"})
	ctx := ctxT(t)
	c := h.commander(ctx, "planner:chat")

	stream, err := h.agent.RunAgentInstruction(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "Open a calculator and compute 1 + 1"})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		stages []string
		taskID string
		err    error
	}
	done := make(chan result, 1)
	go func() {
		var r result
		for {
			ev, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				r.err = err
				break
			}
			if ev.GetTimestamp() == nil || ev.GetTaskId() == "" {
				r.err = errors.New("event without id or timestamp")
				break
			}
			r.taskID = ev.GetTaskId()
			r.stages = append(r.stages, ev.GetStage()+"="+ev.GetMessage())
		}
		done <- r
	}()
	playScript(t, c, "2")
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	stages, taskID := r.stages, r.taskID
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

// Seed 000 "async lifecycle": RunAgentInstructionAsync, then stream and poll
// concurrently; a late stream on a finished task replays and ends.
func TestAsyncLifecycleStreamAndPollTogether(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
	start, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "Create a new text document"})
	if err != nil || start.GetTaskId() == "" {
		t.Fatalf("async: %v %v", start, err)
	}
	id := start.GetTaskId()
	st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: id})
	if st.GetStatus() != agentpb.TaskStatus_PENDING {
		t.Fatalf("no commander yet: want PENDING, got %v", st.GetStatus())
	}

	var wg sync.WaitGroup
	var streamed []string
	wg.Add(2)
	go func() {
		defer wg.Done()
		s, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: id})
		if err != nil {
			t.Error(err)
			return
		}
		for {
			ev, err := s.Recv()
			if err != nil {
				if !errors.Is(err, io.EOF) {
					t.Error(err)
				}
				return
			}
			streamed = append(streamed, ev.GetTaskStream().GetStage())
		}
	}()
	var final *agentpb.QueryTaskStatusResponse
	go func() {
		defer wg.Done()
		for {
			st, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: id})
			if err != nil {
				t.Error(err)
				return
			}
			if st.GetStatus() == agentpb.TaskStatus_SUCCESS || st.GetStatus() == agentpb.TaskStatus_FAILURE || st.GetStatus() == agentpb.TaskStatus_CANCELLED {
				final = st
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	c := h.commander(ctx, "planner:chat")
	playScript(t, c, "done")
	wg.Wait()
	if final.GetResult() != "done" || final.GetExecutionStatistics().GetInputTokens() != 100 {
		t.Fatalf("final %v", final)
	}
	if streamed[0] != "pending" || streamed[len(streamed)-1] != "final" {
		t.Fatalf("streamed %v", streamed)
	}
	// Late subscriber: history then the end, no hang.
	s, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: id})
	if err != nil {
		t.Fatal(err)
	}
	var late []string
	for {
		ev, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		late = append(late, ev.GetTaskStream().GetStage())
	}
	if strings.Join(late, ",") != strings.Join(streamed, ",") {
		t.Fatalf("replay %v != live %v", late, streamed)
	}
}

// Seed 000 "cancel": truthful success and message.
func TestCancelTaskIsTruthful(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
	c := h.commander(ctx, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "long job"})
	sid, _ := c.start()
	c.send(up(sid, &dispatchv1.ContentChunk{Text: "working"}))

	type cancelResult struct {
		resp *agentpb.CancelTaskResponse
		err  error
	}
	cancelled := make(chan cancelResult, 1)
	go func() {
		resp, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
		cancelled <- cancelResult{resp, err}
	}()
	p := c.recvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil })
	if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Errorf("stop %v", p.GetStop())
	}
	c.send(up(sid, &dispatchv1.Stopped{Reason: "cancelled", FinalUsage: &dispatchv1.Usage{InputTokens: 7}}))
	cr := <-cancelled
	resp, err := cr.resp, cr.err
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
	c.cancel()
	waitSlots(t, h, 0)
	pending, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	resp, _ = h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: pending.GetTaskId()})
	if !resp.GetSuccess() || resp.GetMessage() != "cancelled while pending" {
		t.Fatalf("pending cancel %v", resp)
	}
}

func waitSlots(t *testing.T, h *harness, n int) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for h.d.Scheduler().SlotCount() != n {
		if time.Now().After(deadline) {
			t.Fatalf("slots %d, want %d", h.d.Scheduler().SlotCount(), n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func TestClientGoneCancelsRunAgentInstruction(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
	c := h.commander(ctx, "planner:chat")
	cctx, cancel := context.WithCancel(ctx)
	stream, err := h.agent.RunAgentInstruction(cctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	if err != nil {
		t.Fatal(err)
	}
	sid, st := c.start()
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	cancel()
	p := c.recvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetStop() != nil })
	if p.GetStop().GetCode() != dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL {
		t.Fatalf("stop %v", p)
	}
	c.send(up(sid, &dispatchv1.Stopped{}))
	q, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: st.GetTaskId()})
	for q.GetStatus() == agentpb.TaskStatus_RUNNING {
		time.Sleep(5 * time.Millisecond)
		q, _ = h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: st.GetTaskId()})
	}
	if q.GetStatus() != agentpb.TaskStatus_CANCELLED {
		t.Fatalf("status %v", q)
	}
}

// Seed 000 "config updates": set, read back masked, per-task override.
func TestConfigSetGetMaskAndOverride(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
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
	c := h.commander(ctx, "planner:chat")
	start, err := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{
		Instruction: "x",
		RunningConfig: &agentpb.CommonConfig{Steps: proto.Int32(3), StageModelConfig: &agentpb.StageModelConfig{
			ActionGeneratorModel: &agentpb.LLMConfig{ApiKey: proto.String("sk-per-task-9876")},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, ss := c.start()
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
	h := newHarness(t, dispatcher.Config{Version: "9.9.9", LogLevel: "debug"})
	ctx := ctxT(t)
	info, _ := h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 0 || info.GetVersion() != "9.9.9" || info.GetLogLevel() != "debug" {
		t.Fatalf("info %v", info)
	}
	a := h.commander(ctx, "planner:chat")
	h.commander(ctx, "planner:chat")
	h.commander(ctx, "planner:gui")
	info, _ = h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 3 {
		t.Fatalf("slots %d", info.GetMaxConcurrentTasks())
	}
	a.cancel()
	waitSlots(t, h, 2)
	info, _ = h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	if info.GetMaxConcurrentTasks() != 2 {
		t.Fatalf("after disconnect: %d", info.GetMaxConcurrentTasks())
	}
}

func TestStopMidGenerationNoContentReachesClients(t *testing.T) {
	h := newHarness(t, dispatcher.Config{})
	ctx := ctxT(t)
	c := h.commander(ctx, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "write an essay"})
	watch, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: start.GetTaskId()})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ := c.start()
	// The commander streams content without pause and keeps going for a
	// while after the stop (a misbehaving planner).
	cancelDone := make(chan error, 1)
	go func() {
		time.Sleep(30 * time.Millisecond)
		_, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
		cancelDone <- err
	}()
	stopSeen := false
	for !stopSeen {
		c.send(up(sid, &dispatchv1.ContentChunk{Text: "word "}))
		select {
		case p := <-c.in:
			stopSeen = p.GetStop() != nil
		default:
		}
	}
	for range 50 {
		c.send(up(sid, &dispatchv1.ContentChunk{Text: "AFTER-STOP "}))
	}
	c.send(up(sid, &dispatchv1.Stopped{Reason: "ok"}))
	if err := <-cancelDone; err != nil {
		t.Fatal(err)
	}
	var afterStop bool
	for {
		ev, err := watch.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
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
	h := newHarness(t, dispatcher.Config{Tasks: dispatcher.Tasks{StopGrace: 150 * time.Millisecond}})
	ctx := ctxT(t)
	c := h.commander(ctx, "planner:chat")
	start, _ := h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "x"})
	c.start()
	resp, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	if err != nil || !resp.GetSuccess() {
		t.Fatalf("cancel %v %v", resp, err)
	}
	wantCode(t, c.ended(), codes.Aborted)
	st, _ := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
	if st.GetStatus() != agentpb.TaskStatus_CANCELLED || !strings.Contains(st.GetMessage(), "did not acknowledge") {
		t.Fatalf("status %v", st)
	}
}

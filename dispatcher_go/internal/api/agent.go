package api

import (
	"context"
	"errors"
	"math"
	"strings"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// agentService is lybic.agent.Agent, wire-compatible with seed 000.
type agentService struct {
	agentpb.UnimplementedAgentServer
	s *Server
}

// GetAgentInfo reports the version and the real number of connected slots
// that may run the caller's tasks (its tenant's and those serving every
// tenant; an admin's: all).
func (a *agentService) GetAgentInfo(ctx context.Context, _ *agentpb.GetAgentInfoRequest) (*agentpb.AgentInfo, error) {
	c := tenant.FromContext(ctx)
	return &agentpb.AgentInfo{
		Version:            a.s.d.Config().Version,
		MaxConcurrentTasks: int32(min(a.s.d.SlotsServing(c.Tenant, c.Admin), math.MaxInt32)),
		LogLevel:           a.s.d.Config().LogLevel,
	}, nil
}

// GetGlobalCommonConfig returns the global config, secrets masked.
func (a *agentService) GetGlobalCommonConfig(context.Context, *agentpb.GetGlobalCommonConfigRequest) (*agentpb.CommonConfig, error) {
	return secret.Mask(a.s.d.Tasks().Configs().Global()), nil
}

// GetCommonConfig returns the global config or a task's resolved config by id, masked.
func (a *agentService) GetCommonConfig(ctx context.Context, req *agentpb.GetCommonConfigRequest) (*agentpb.CommonConfig, error) {
	cfg, err := a.s.d.Tasks().ConfigByIDAs(tenant.FromContext(ctx), req.GetId())
	if errors.Is(err, task.ErrNotFound) {
		// Not toStatus's "task not found: …": the id names a config.
		return nil, status.Errorf(codes.NotFound, "no config with id %q (the global config, or a task's)", textcut.Shorten(req.GetId(), 64))
	}
	if err != nil {
		return nil, toStatus(a.s.d.Logger(), err)
	}
	return cfg, nil
}

// SetGlobalCommonConfig replaces the global config.
func (a *agentService) SetGlobalCommonConfig(ctx context.Context, req *agentpb.SetGlobalCommonConfigRequest) (*agentpb.SetCommonConfigResponse, error) {
	if err := a.mayConfigure(ctx); err != nil {
		return nil, err
	}
	if req.GetCommonConfig() == nil {
		return nil, status.Error(codes.InvalidArgument, "commonConfig is required")
	}
	if err := task.ValidateConfig(req.GetCommonConfig()); err != nil {
		return nil, toStatus(a.s.d.Logger(), err)
	}
	id := a.s.d.Tasks().Configs().SetGlobal(req.GetCommonConfig())
	return &agentpb.SetCommonConfigResponse{Success: true, Id: id}, nil
}

// SetGlobalCommonLLMConfig sets stageModelConfig.actionGeneratorModel.
func (a *agentService) SetGlobalCommonLLMConfig(ctx context.Context, req *agentpb.SetGlobalCommonLLMConfigRequest) (*agentpb.LLMConfig, error) {
	return a.setModel(ctx, task.ActionGeneratorModel, req.GetLlmConfig())
}

// SetGlobalGroundingLLMConfig sets stageModelConfig.groundingModel.
func (a *agentService) SetGlobalGroundingLLMConfig(ctx context.Context, req *agentpb.SetGlobalGroundingLLMConfigRequest) (*agentpb.LLMConfig, error) {
	return a.setModel(ctx, task.GroundingModel, req.GetLlmConfig())
}

// SetGlobalEmbeddingLLMConfig sets stageModelConfig.embeddingModel.
func (a *agentService) SetGlobalEmbeddingLLMConfig(ctx context.Context, req *agentpb.SetGlobalEmbeddingLLMConfigRequest) (*agentpb.LLMConfig, error) {
	return a.setModel(ctx, task.EmbeddingModel, req.GetLlmConfig())
}

// mayConfigure refuses a non-admin the global config when there are
// tenants: it applies to every tenant's tasks (another tenant's model
// endpoint would receive their prompts). Admins may; without a tenants file
// so may the default tenant (the one-tenant case). With one, the default
// tenant (the plain --client-token) is one tenant among others.
func (a *agentService) mayConfigure(ctx context.Context) error {
	if c := tenant.FromContext(ctx); !c.Admin && (c.Tenant != "" || a.s.d.Auth().HasTenants()) {
		return status.Error(codes.PermissionDenied, "the global config applies to every tenant: only an admin token may change it")
	}
	return nil
}

func (a *agentService) setModel(ctx context.Context, which task.StageModel, llm *agentpb.LLMConfig) (*agentpb.LLMConfig, error) {
	if err := a.mayConfigure(ctx); err != nil {
		return nil, err
	}
	if llm == nil {
		return nil, status.Error(codes.InvalidArgument, "llmConfig is required")
	}
	if n := llm.GetModelName(); n != "" && strings.TrimSpace(n) == "" {
		// An empty name keeps the planner's default model (a config that
		// sets only the key or the endpoint, or LLMConfig{} to restore the
		// defaults: seed 001's ark_apikey is such a config); a name of
		// spaces names no model.
		return nil, status.Error(codes.InvalidArgument, "llmConfig.modelName is blank: leave it empty for the default model")
	}
	return secret.Mask(a.s.d.Tasks().Configs().SetStageModel(which, llm)), nil
}

func specFromRun(ctx context.Context, req *agentpb.RunAgentInstructionRequest) task.Spec {
	return task.Spec{
		Caller:         tenant.FromContext(ctx),
		Trace:          trace.SpanContextFromContext(ctx),
		Instruction:    req.GetInstruction(),
		RunningConfig:  req.GetRunningConfig(),
		Sandbox:        req.GetSandbox(),
		DestroySandbox: req.GetDestroySandbox(),
		PreviousTaskID: req.GetPreviousTaskId(),
	}
}

// RunAgentInstruction runs a task and streams it until it ends. A client
// that goes away cancels its task: nobody else knows its id.
func (a *agentService) RunAgentInstruction(req *agentpb.RunAgentInstructionRequest, stream grpc.ServerStreamingServer[agentpb.TaskStream]) error {
	t, err := a.s.d.Tasks().Submit(specFromRun(stream.Context(), req))
	if err != nil {
		return toStatus(a.s.d.Logger(), err)
	}
	ctx := stream.Context()
	err = a.s.follow(ctx, t, 0, func(ev *dispatchv1.TaskEvent) error {
		stage, msg, ok := events.Seed000(ev)
		if !ok {
			return nil
		}
		return stream.Send(&agentpb.TaskStream{TaskId: t.ID(), Stage: stage, Message: msg, Timestamp: ev.GetTime()})
	})
	if err != nil && !task.Terminal(t.Status()) {
		// Do not wait for the stop: the caller is gone.
		_, _ = a.s.d.Tasks().Cancel(context.WithoutCancel(ctx), t.ID(), "client disconnected", false)
	}
	return toStatus(a.s.d.Logger(), err)
}

// RunAgentInstructionAsync queues a task and returns its id at once.
func (a *agentService) RunAgentInstructionAsync(ctx context.Context, req *agentpb.RunAgentInstructionRequest) (*agentpb.RunAgentInstructionAsyncResponse, error) {
	t, err := a.s.d.Tasks().Submit(specFromRun(ctx, req))
	if err != nil {
		return nil, toStatus(a.s.d.Logger(), err)
	}
	return &agentpb.RunAgentInstructionAsyncResponse{TaskId: t.ID()}, nil
}

// GetAgentTaskStream streams a task's history, then live events, ending
// when the task ends (at once after the history for a finished task).
func (a *agentService) GetAgentTaskStream(req *agentpb.GetAgentTaskStreamRequest, stream grpc.ServerStreamingServer[agentpb.GetAgentTaskStreamResponse]) error {
	t, err := a.s.d.Tasks().GetAs(tenant.FromContext(stream.Context()), req.GetTaskId())
	if err != nil {
		return toStatus(a.s.d.Logger(), err)
	}
	err = a.s.follow(stream.Context(), t, 0, func(ev *dispatchv1.TaskEvent) error {
		stage, msg, ok := events.Seed000(ev)
		if !ok {
			return nil
		}
		return stream.Send(&agentpb.GetAgentTaskStreamResponse{TaskStream: &agentpb.TaskStream{
			TaskId: t.ID(), Stage: stage, Message: msg, Timestamp: ev.GetTime(),
		}})
	})
	return toStatus(a.s.d.Logger(), err)
}

// QueryTaskStatus reports an unknown id as status NOT_FOUND in the response
// (seed-000 semantics), not as a gRPC error.
func (a *agentService) QueryTaskStatus(ctx context.Context, req *agentpb.QueryTaskStatusRequest) (*agentpb.QueryTaskStatusResponse, error) {
	t, err := a.s.d.Tasks().GetAs(tenant.FromContext(ctx), req.GetTaskId())
	if err != nil {
		return &agentpb.QueryTaskStatusResponse{TaskId: req.GetTaskId(), Status: agentpb.TaskStatus_NOT_FOUND, Message: "task not found"}, nil
	}
	info := t.Info()
	return &agentpb.QueryTaskStatusResponse{
		TaskId:              info.ID,
		Status:              info.Status,
		Message:             info.Message,
		Result:              textcut.Prefix(info.Result, maxResultBytes),
		Sandbox:             info.Sandbox,
		ExecutionStatistics: statistics(&info, time.Now()),
	}, nil
}

// CancelTask answers truthfully: success only if this call stopped or
// dequeued the task; an unknown id is success=false (seed semantics).
func (a *agentService) CancelTask(ctx context.Context, req *agentpb.CancelTaskRequest) (*agentpb.CancelTaskResponse, error) {
	out, err := a.s.cancel(ctx, req.GetTaskId(), "cancelled by client")
	if err != nil {
		st := toStatus(a.s.d.Logger(), err)
		if status.Code(st) == codes.NotFound {
			return &agentpb.CancelTaskResponse{TaskId: req.GetTaskId(), Success: false, Message: "task not found"}, nil
		}
		return nil, st
	}
	return &agentpb.CancelTaskResponse{TaskId: req.GetTaskId(), Success: out.Cancelled, Message: out.Message}, nil
}

// statistics renders a task's ExecutionStatistics.
func statistics(info *task.Info, now time.Time) *agentpb.ExecutionStatistics {
	st := info.Stats
	return &agentpb.ExecutionStatistics{
		Steps:           st.Steps,
		DurationSeconds: int32(min(info.Duration(now).Round(time.Second)/time.Second, math.MaxInt32)),
		InputTokens:     st.InputTokens,
		OutputTokens:    st.OutputTokens,
		TotalTokens:     st.InputTokens + st.OutputTokens,
		Cost:            st.Cost,
		CurrencySymbol:  st.Currency,
	}
}

// taskProto renders a task for the native API; its tenant only for an
// admin caller.
func taskProto(info *task.Info, now time.Time, caller tenant.Caller) *dispatchv1.Task {
	ts := func(t time.Time) *timestamppb.Timestamp {
		if t.IsZero() {
			return nil
		}
		return timestamppb.New(t)
	}
	return &dispatchv1.Task{
		TaskId:      info.ID,
		Instruction: textcut.Prefix(info.Instruction, maxInstructionBytes),
		Status:      info.Status,
		Message:     info.Message,
		Result:      textcut.Prefix(info.Result, maxResultBytes),
		Statistics:  statistics(info, now),
		CreatedAt:   ts(info.CreatedAt),
		StartedAt:   ts(info.StartedAt),
		EndedAt:     ts(info.EndedAt),
		LastSeq:     info.LastSeq,
		Planner:     info.Planner,
		CommanderId: info.CommanderID,
		Labels:      info.Labels,
		Sandbox:     info.Sandbox,
		Tenant:      tenantFor(caller, info.Tenant),
		Models:      info.Stats.ModelList(),
	}
}

func tenantFor(caller tenant.Caller, owner string) string {
	if caller.Admin {
		return owner
	}
	return ""
}

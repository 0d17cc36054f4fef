package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"time"
	"unicode/utf8"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// Paging of ListTasks.
const (
	defaultPageSize = 50
	maxPageSize     = 1000
)

// taskService is dispatch.v1.TaskService, the native client API.
type taskService struct {
	dispatchv1.UnimplementedTaskServiceServer
	s *Server
}

// SubmitTask queues a task.
func (ts *taskService) SubmitTask(ctx context.Context, req *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error) {
	var extra *policy.Policy
	if src := req.GetPolicyYaml(); src != "" {
		p, err := policy.CompileTask([]byte(src))
		if err != nil {
			// The compile error names the rule or test and what is wrong;
			// it is about the caller's own text.
			return nil, toStatus(ts.s.d.Logger(), fmt.Errorf("%w: policy_yaml: %v", task.ErrInvalidArgument, err))
		}
		extra = p
	}
	t, err := ts.s.d.Tasks().Submit(task.Spec{
		Caller:               tenant.FromContext(ctx),
		Policy:               extra,
		Instruction:          req.GetInstruction(),
		RunningConfig:        req.GetRunningConfig(),
		Sandbox:              req.GetSandbox(),
		DestroySandbox:       req.GetDestroySandbox(),
		PreviousTaskID:       req.GetPreviousTaskId(),
		Planner:              req.GetPlanner(),
		RequiredCapabilities: req.GetRequiredCapabilities(),
		Labels:               req.GetLabels(),
		TimeoutSeconds:       req.GetTimeoutSeconds(),
		UserSystemPrompt:     req.GetUserSystemPrompt(),
		Trace:                trace.SpanContextFromContext(ctx),
	})
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	return &dispatchv1.SubmitTaskResponse{TaskId: t.ID()}, nil
}

// WatchTask streams events with seq > after_seq: history, then live, until
// the end; one per response in event, or with max_batch, as many as are
// ready (up to max_batch) per response in events.
func (ts *taskService) WatchTask(req *dispatchv1.WatchTaskRequest, stream grpc.ServerStreamingServer[dispatchv1.WatchTaskResponse]) error {
	t, err := ts.s.d.Tasks().GetAs(tenant.FromContext(stream.Context()), req.GetTaskId())
	if err != nil {
		return toStatus(ts.s.d.Logger(), err)
	}
	w := watchSender{log: t.Log(), send: stream.Send}
	if n := req.GetMaxBatch(); n > 0 {
		err = ts.s.followBatches(stream.Context(), t, req.GetAfterSeq(), int(min(n, maxWatchBatch)), w.batches)
		return toStatus(ts.s.d.Logger(), err)
	}
	err = ts.s.followBatches(stream.Context(), t, req.GetAfterSeq(), followChunk, w.oneByOne)
	return toStatus(ts.s.d.Logger(), err)
}

// GetTask returns a task's state, result and statistics.
func (ts *taskService) GetTask(ctx context.Context, req *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error) {
	caller := tenant.FromContext(ctx)
	t, err := ts.s.d.Tasks().GetAs(caller, req.GetTaskId())
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	info := t.Info()
	tp := taskProto(&info, time.Now(), caller)
	tp.Conversation, tp.UserSystemPrompt = conversation(t), t.UserSystemPrompt()
	return &dispatchv1.GetTaskResponse{Task: tp}, nil
}

// ListTasks lists tasks newest first, filtered by status, paged: the tasks
// in memory and, with a store, the finished ones only stored there (evicted
// from memory, or from before a restart).
func (ts *taskService) ListTasks(ctx context.Context, req *dispatchv1.ListTasksRequest) (*dispatchv1.ListTasksResponse, error) {
	size := int(req.GetPageSize())
	switch {
	case size < 0:
		return nil, status.Error(codes.InvalidArgument, "page_size must not be negative")
	case size == 0:
		size = defaultPageSize
	case size > maxPageSize:
		size = maxPageSize
	}
	for _, st := range req.GetStatuses() {
		// A value TaskStatus does not define matches no task: say so
		// rather than answer an empty page.
		if _, ok := agentpb.TaskStatus_name[int32(st)]; !ok {
			return nil, status.Errorf(codes.InvalidArgument, "unknown status %d in statuses", int32(st))
		}
	}
	after, err := decodePageToken(req.GetPageToken())
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, "invalid page_token")
	}
	infos, next, err := ts.s.d.Tasks().List(ctx, req.GetStatuses(), size, after)
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	now := time.Now()
	resp := &dispatchv1.ListTasksResponse{Tasks: make([]*dispatchv1.Task, 0, len(infos))}
	pageBytes := 0
	for i := range infos {
		tp := taskProto(&infos[i], now, tenant.FromContext(ctx))
		n := proto.Size(tp) + 16 // the field's tag and length
		if i > 0 && pageBytes+n > maxPageBytes {
			// The page would not fit a default client: it ends here and
			// the next one starts after the last task listed.
			next = &task.ListKey{CreatedAt: infos[i-1].CreatedAt, ID: infos[i-1].ID}
			break
		}
		pageBytes += n
		resp.Tasks = append(resp.Tasks, tp)
	}
	if next != nil {
		resp.NextPageToken = encodePageToken(*next)
	}
	return resp, nil
}

// Page tokens are opaque to clients: the place of the last task of the page
// (its creation time in Unix microseconds, 8 bytes, then its id),
// base64url-encoded.
func encodePageToken(k task.ListKey) string {
	b := make([]byte, 8, 8+len(k.ID))
	binary.BigEndian.PutUint64(b, uint64(store.Micros(k.CreatedAt)))
	return base64.RawURLEncoding.EncodeToString(append(b, k.ID...))
}

func decodePageToken(s string) (*task.ListKey, error) {
	if s == "" {
		return nil, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	// A task id is never empty; 8 bytes alone is the token format of
	// earlier versions (a sequence number), which must not read as 1970.
	// The id goes into a store query: PostgreSQL refuses a text parameter
	// that is not UTF-8 or has a NUL byte (task ids never do).
	if err != nil || len(b) <= 8 || len(b) > 8+maxTokenID || !utf8.Valid(b[8:]) || bytes.IndexByte(b[8:], 0) >= 0 {
		return nil, status.Error(codes.InvalidArgument, "invalid page_token")
	}
	return &task.ListKey{CreatedAt: store.FromMicros(int64(binary.BigEndian.Uint64(b))), ID: string(b[8:])}, nil
}

// maxTokenID bounds the id in a page token.
const maxTokenID = 256

// CancelTask stops a pending or running task and says what happened.
func (ts *taskService) CancelTask(ctx context.Context, req *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error) {
	out, err := ts.s.cancel(ctx, req.GetTaskId(), req.GetReason())
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	return &dispatchv1.CancelTaskResponse{Cancelled: out.Cancelled, Status: out.Status, Message: out.Message}, nil
}

// Interject delivers a user message to a running task's planner.
func (ts *taskService) Interject(ctx context.Context, req *dispatchv1.InterjectRequest) (*dispatchv1.InterjectResponse, error) {
	if err := ts.s.visible(ctx, req.GetTaskId()); err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	id, seq, err := ts.s.d.Tasks().Interject(ctx, req.GetTaskId(), req.GetText())
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	return &dispatchv1.InterjectResponse{MessageId: id, Seq: seq}, nil
}

// ApproveToolCall resolves a tool call held by a policy.
func (ts *taskService) ApproveToolCall(ctx context.Context, req *dispatchv1.ApproveToolCallRequest) (*dispatchv1.ApproveToolCallResponse, error) {
	if err := ts.s.visible(ctx, req.GetTaskId()); err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	outcome, seq, err := ts.s.d.Tasks().ApproveToolCall(req.GetTaskId(), req.GetCallId(), req.GetApprove(), req.GetReason())
	if err != nil {
		return nil, toStatus(ts.s.d.Logger(), err)
	}
	return &dispatchv1.ApproveToolCallResponse{Outcome: outcome, Seq: seq}, nil
}

// visible is nil if the caller in ctx sees task id, else the error to
// answer (task.ErrNotFound for another tenant's task, as for none). A
// task's tenant never changes, so the check holds for the operation that
// follows it.
func (s *Server) visible(ctx context.Context, id string) error {
	_, err := s.d.Tasks().GetAs(tenant.FromContext(ctx), id)
	return err
}

// cancel is Manager.CancelAs for the caller in ctx, waiting for the
// outcome (a task the caller does not see is ErrNotFound; in a fleet the
// check of a task another replica runs comes after the stop's
// announcement, and that replica checks the caller too).
func (s *Server) cancel(ctx context.Context, id, reason string) (task.CancelOutcome, error) {
	return s.d.Tasks().CancelAs(ctx, tenant.FromContext(ctx), id, reason, true)
}

// ListTools lists the tools a planner can call now and their executors.
func (ts *taskService) ListTools(context.Context, *dispatchv1.ListToolsRequest) (*dispatchv1.ListToolsResponse, error) {
	specs, execs := ts.s.d.Broker().Tools()
	return &dispatchv1.ListToolsResponse{Tools: specs, Executors: execs}, nil
}

// conversation is the conversation t ran with, for GetTask (seed 001's
// llm_context): secrets of its config (while it still holds them) and
// anything shaped like a key are masked.
func conversation(t *task.Task) []*dispatchv1.ConversationTurn {
	var known []string
	if cfg := t.Config(); cfg != nil {
		known = secret.Values(cfg)
	}
	turns := t.Conversation()
	// The newest turns within maxConversationBytes (each cut at a character
	// boundary): with the instruction and the result GetTask carries, the
	// answer stays under the message limit.
	var out []*dispatchv1.ConversationTurn
	room := maxConversationBytes
	for i := len(turns) - 1; i >= 0 && room > 0; i-- {
		c := textcut.Prefix(secret.RedactText(turns[i].GetContent(), known...), room)
		room -= len(c)
		out = append(out, &dispatchv1.ConversationTurn{Role: turns[i].GetRole(), Content: c})
	}
	slices.Reverse(out)
	return out
}

// maxConversationBytes bounds Task.conversation in GetTask.
const maxConversationBytes = 512 << 10

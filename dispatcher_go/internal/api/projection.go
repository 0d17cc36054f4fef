package api

import (
	"context"
	"errors"
	"io"
	"strings"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// project maps a task event to the seed-000 TaskStream{stage, message}
// (the table in docs/protocol.md). Events without a row (usage, artifact,
// stopped, user input, a failed result, the SUCCESS state that follows
// "final") are not projected.
func project(ev *dispatchv1.TaskEvent) (stage, message string, ok bool) {
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_State:
		switch k.State.GetStatus() {
		case agentpb.TaskStatus_PENDING:
			return "pending", k.State.GetMessage(), true
		case agentpb.TaskStatus_RUNNING:
			return "running", k.State.GetMessage(), true
		case agentpb.TaskStatus_FAILURE:
			return "failure", k.State.GetMessage(), true
		case agentpb.TaskStatus_CANCELLED:
			return "cancelled", k.State.GetMessage(), true
		}
	case *dispatchv1.TaskEvent_Thought:
		return "thought", k.Thought.GetDelta(), true
	case *dispatchv1.TaskEvent_Content:
		return "content", k.Content.GetText(), true
	case *dispatchv1.TaskEvent_ToolCall:
		return "tool_call", k.ToolCall.GetToolName() + "(" + k.ToolCall.GetArgumentsJson() + ")", true
	case *dispatchv1.TaskEvent_ToolResult:
		r := k.ToolResult.GetResult()
		if e := r.GetError(); e != nil {
			code := strings.TrimPrefix(e.GetCode().String(), "TOOL_ERROR_CODE_")
			return "tool_result", "error: " + code + ": " + e.GetMessage(), true
		}
		return "tool_result", r.GetResultJson(), true
	case *dispatchv1.TaskEvent_Stage:
		return k.Stage.GetStage(), k.Stage.GetMessage(), true
	case *dispatchv1.TaskEvent_Error:
		return "error", k.Error.GetMessage(), true
	case *dispatchv1.TaskEvent_Stop:
		return "stop", k.Stop.GetReason(), true
	case *dispatchv1.TaskEvent_Policy:
		return "policy", policyMessage(k.Policy), true
	case *dispatchv1.TaskEvent_Result:
		if k.Result.GetOutcome() == dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS {
			return "final", k.Result.GetResult(), true
		}
	}
	return "", "", false
}

// policyMessage words a policy decision for the seed-000 stream, e.g.
// "hold computer.click (call c1) by rule gui-needs-approval: ..." or
// "approved computer.click (call c1) by rule gui-needs-approval: ...".
func policyMessage(pd *dispatchv1.PolicyDecision) string {
	verb := strings.ToLower(strings.TrimPrefix(pd.GetAction().String(), "POLICY_ACTION_"))
	if o := pd.GetHoldOutcome(); o != dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED {
		verb = strings.ToLower(strings.TrimPrefix(o.String(), "HOLD_OUTCOME_"))
	}
	var b strings.Builder
	b.WriteString(verb)
	if pd.GetToolName() != "" {
		b.WriteString(" " + pd.GetToolName() + " (call " + pd.GetCallId() + ")")
	} else if pd.GetPacketKind() != "" {
		b.WriteString(" on " + pd.GetPacketKind())
	}
	b.WriteString(" by rule " + pd.GetRuleId())
	if pd.GetReason() != "" {
		b.WriteString(": " + pd.GetReason())
	}
	return b.String()
}

// follow calls fn for each event of t with seq > after, history first, then
// live, until the log's terminal event (nil), ctx's end or fn's error. It
// reads the log by cursor: a slow caller only falls behind in the log.
func (s *Server) follow(ctx context.Context, t *task.Task, after uint64, fn func(*dispatchv1.TaskEvent) error) error {
	s.follows.Add(1)
	defer s.follows.Add(-1)
	ctx, cancel := s.streamContext(ctx)
	defer cancel()
	buf := make([]*dispatchv1.TaskEvent, 0, 64)
	for {
		evs, err := t.Log().Read(ctx, after, buf)
		for _, ev := range evs {
			if err := fn(ev); err != nil {
				return err
			}
			after = ev.GetSeq()
		}
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case err != nil:
			if cause := context.Cause(ctx); cause != nil {
				return cause
			}
			return err
		}
	}
}

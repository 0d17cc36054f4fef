package protoenum_test

import (
	"testing"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/reflect/protoreflect"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestName(t *testing.T) {
	for _, c := range []struct {
		e    protoreflect.Enum
		want string
	}{
		{dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT, "timeout"},
		{dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE, "provider_unavailable"},
		{dispatchv1.ToolErrorCode(42), "42"},
		{dispatchv1.HoldOutcome_HOLD_OUTCOME_TIMED_OUT, "timed_out"},
		{dispatchv1.PolicyAction_POLICY_ACTION_UNSPECIFIED, "unspecified"},
		{dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL, "client_cancel"},
		{dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, "success"},
		{dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED, "session_closed"},
		{agentpb.TaskStatus_NOT_FOUND, "not_found"},
		{agentpb.TaskStatus_TASKSTATUSUNDEFINED, "taskstatusundefined"},
		{agentpb.SandboxOS_LINUX, "linux"},
	} {
		for range 2 { // the second call is served by the cache
			if got := protoenum.Name(c.e); got != c.want {
				t.Errorf("Name(%v) = %q, want %q", c.e, got, c.want)
			}
		}
	}
}

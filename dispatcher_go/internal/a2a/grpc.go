package a2a

import (
	"context"

	a2agrpc "github.com/a2aproject/a2a-go/v2/a2agrpc/v1"
	a2apb "github.com/a2aproject/a2a-go/v2/a2apb/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// grpcService is the SDK's gRPC binding with the status codes of the
// specification's table (section 5.4): a2a-go v2.2.0 answers
// UnsupportedOperation, PushNotificationNotSupported and
// VersionNotSupported with UNIMPLEMENTED; the table says
// FAILED_PRECONDITION. The google.rpc.ErrorInfo detail (reason, domain
// a2a-protocol.org) is kept.
type grpcService struct {
	*a2agrpc.Handler
}

// failedPrecondition are the ErrorInfo reasons the table maps to FAILED_PRECONDITION.
var failedPrecondition = map[string]bool{
	"UNSUPPORTED_OPERATION":              true,
	"PUSH_NOTIFICATION_NOT_SUPPORTED":    true,
	"VERSION_NOT_SUPPORTED":              true,
	"EXTENSION_SUPPORT_REQUIRED":         true,
	"EXTENDED_AGENT_CARD_NOT_CONFIGURED": true,
	"TASK_NOT_CANCELABLE":                true,
}

func fixCode(err error) error {
	st, ok := status.FromError(err)
	if !ok || st.Code() == codes.FailedPrecondition {
		return err
	}
	for _, d := range st.Details() {
		if info, ok := d.(*errdetails.ErrorInfo); ok && failedPrecondition[info.GetReason()] {
			p := st.Proto()
			p.Code = int32(codes.FailedPrecondition)
			return status.FromProto(p).Err()
		}
	}
	return err
}

func (g grpcService) SendMessage(ctx context.Context, r *a2apb.SendMessageRequest) (*a2apb.SendMessageResponse, error) {
	if c := r.GetConfiguration(); c != nil && c.HistoryLength != nil && c.GetHistoryLength() < 0 {
		return nil, errNegativeHistory
	}
	resp, err := g.Handler.SendMessage(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) SendStreamingMessage(r *a2apb.SendMessageRequest, s grpc.ServerStreamingServer[a2apb.StreamResponse]) error {
	if c := r.GetConfiguration(); c != nil && c.HistoryLength != nil && c.GetHistoryLength() < 0 {
		return errNegativeHistory
	}
	return fixCode(g.Handler.SendStreamingMessage(r, s))
}

// errNegativeHistory: the SDK's conversion drops a negative
// history_length (reads it as unset); the JSON-RPC binding refuses it, and
// so does this one.
var errNegativeHistory = status.Error(codes.InvalidArgument, "history_length must not be negative")

func (g grpcService) GetTask(ctx context.Context, r *a2apb.GetTaskRequest) (*a2apb.Task, error) {
	if r.HistoryLength != nil && r.GetHistoryLength() < 0 {
		return nil, errNegativeHistory
	}
	resp, err := g.Handler.GetTask(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) ListTasks(ctx context.Context, r *a2apb.ListTasksRequest) (*a2apb.ListTasksResponse, error) {
	// A page_size of 0 (below the minimum of 1) stays "unset" here,
	// unlike on JSON-RPC: a2a-go's own gRPC client always sends the field,
	// 0 for a request that leaves it unset.
	if r.HistoryLength != nil && r.GetHistoryLength() < 0 {
		return nil, errNegativeHistory
	}
	// The SDK's conversion reads a state TaskState does not define as no
	// filter: every task was listed (the JSON-RPC binding refuses it).
	if _, ok := a2apb.TaskState_name[int32(r.GetStatus())]; !ok {
		return nil, status.Errorf(codes.InvalidArgument, "unknown status %d", int32(r.GetStatus()))
	}
	resp, err := g.Handler.ListTasks(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) CancelTask(ctx context.Context, r *a2apb.CancelTaskRequest) (*a2apb.Task, error) {
	resp, err := g.Handler.CancelTask(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) SubscribeToTask(r *a2apb.SubscribeToTaskRequest, s grpc.ServerStreamingServer[a2apb.StreamResponse]) error {
	return fixCode(g.Handler.SubscribeToTask(r, s))
}

func (g grpcService) CreateTaskPushNotificationConfig(ctx context.Context, r *a2apb.TaskPushNotificationConfig) (*a2apb.TaskPushNotificationConfig, error) {
	resp, err := g.Handler.CreateTaskPushNotificationConfig(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) GetTaskPushNotificationConfig(ctx context.Context, r *a2apb.GetTaskPushNotificationConfigRequest) (*a2apb.TaskPushNotificationConfig, error) {
	resp, err := g.Handler.GetTaskPushNotificationConfig(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) ListTaskPushNotificationConfigs(ctx context.Context, r *a2apb.ListTaskPushNotificationConfigsRequest) (*a2apb.ListTaskPushNotificationConfigsResponse, error) {
	resp, err := g.Handler.ListTaskPushNotificationConfigs(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) GetExtendedAgentCard(ctx context.Context, r *a2apb.GetExtendedAgentCardRequest) (*a2apb.AgentCard, error) {
	resp, err := g.Handler.GetExtendedAgentCard(ctx, r)
	return resp, fixCode(err)
}

func (g grpcService) DeleteTaskPushNotificationConfig(ctx context.Context, r *a2apb.DeleteTaskPushNotificationConfigRequest) (*emptypb.Empty, error) {
	resp, err := g.Handler.DeleteTaskPushNotificationConfig(ctx, r)
	return resp, fixCode(err)
}

package api

import (
	"context"
	"errors"
	"log/slog"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/broker"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/eventlog"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/session"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// errorClasses maps domain sentinels to gRPC codes. The wrapped text of
// these errors is written for clients by the domain packages (no internal
// state, no secrets), so it is passed on; anything not listed becomes a
// bare INTERNAL.
var errorClasses = []struct {
	err  error
	code codes.Code
}{
	{task.ErrInvalidArgument, codes.InvalidArgument},
	{task.ErrNotFound, codes.NotFound},
	{task.ErrNotRunning, codes.FailedPrecondition},
	{task.ErrClosed, codes.Unavailable},
	{scheduler.ErrQueueFull, codes.ResourceExhausted},
	{eventlog.ErrFull, codes.ResourceExhausted},
	{session.ErrProtocol, codes.FailedPrecondition},
	{session.ErrStopNotAcknowledged, codes.Aborted},
	{session.ErrShutdown, codes.Unavailable},
	{session.ErrReattachLater, codes.Unavailable},
	{session.ErrHelloTimeout, codes.DeadlineExceeded},
	{broker.ErrHelloTimeout, codes.DeadlineExceeded},
	{broker.ErrProtocol, codes.FailedPrecondition},
	{broker.ErrToolExists, codes.AlreadyExists},
	{broker.ErrInvalidTool, codes.InvalidArgument},
	{dispatcher.ErrShuttingDown, codes.Unavailable},
	{store.ErrUnavailable, codes.Unavailable},
}

// toStatus turns an internal error into the gRPC status a caller sees.
func toStatus(log *slog.Logger, err error) error {
	if err == nil {
		return nil
	}
	for _, c := range errorClasses {
		if errors.Is(err, c.err) {
			return status.Error(c.code, err.Error())
		}
	}
	// gRPC's own errors (a stream's Recv/Send failing, a size limit) are
	// already statuses about the caller's own call.
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	switch {
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "cancelled")
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	}
	log.Error("internal error", "error", err)
	return status.Error(codes.Internal, "internal error")
}

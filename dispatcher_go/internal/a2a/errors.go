package a2a

import (
	"context"
	"errors"

	"github.com/a2aproject/a2a-go/v2/a2a"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// toA2A maps an error of the native API (a gRPC status) to the A2A error
// the bindings turn into their codes (JSON-RPC -320xx, gRPC status with
// google.rpc.ErrorInfo). Its message is the status's, which api made safe
// for clients.
func toA2A(err error) error {
	if err == nil {
		return nil
	}
	var ae *a2a.Error
	if errors.As(err, &ae) {
		return err
	}
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return a2a.NewError(a2a.ErrInternalError, "internal error")
	}
	var kind error
	switch st.Code() {
	case codes.NotFound:
		kind = a2a.ErrTaskNotFound
	case codes.InvalidArgument, codes.OutOfRange:
		kind = a2a.ErrInvalidParams
	case codes.FailedPrecondition:
		kind = a2a.ErrUnsupportedOperation
	case codes.Unauthenticated:
		kind = a2a.ErrUnauthenticated
	case codes.PermissionDenied:
		kind = a2a.ErrUnauthorized
	case codes.Canceled:
		return context.Canceled
	case codes.DeadlineExceeded:
		return context.DeadlineExceeded
	case codes.ResourceExhausted, codes.Unavailable, codes.Aborted:
		kind = a2a.ErrServerError
	default:
		kind = a2a.ErrInternalError
	}
	return a2a.NewError(kind, st.Message())
}

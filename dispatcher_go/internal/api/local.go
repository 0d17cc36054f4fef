package api

import (
	"context"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Local is the native client API (dispatch.v1.TaskService) for in-process
// front ends such as the HTTP API (internal/httpapi). It runs the same code
// as the gRPC service, so validation and error mapping are the same: every
// error is a gRPC status (see errors.go). It does no auth; the front end
// checks the client token itself and puts the caller in the context
// (tenant.WithCaller): every call answers only what that caller sees (a
// context without one is the default tenant).
type Local struct {
	taskService
}

// Local returns the in-process native client API.
func (s *Server) Local() *Local { return &Local{taskService{s: s}} }

// Watch calls fn for each event of task id with seq > afterSeq, history
// first, then live, until the task's terminal event (nil), ctx's end or
// fn's error. An unknown id is codes.NotFound.
func (l *Local) Watch(ctx context.Context, id string, afterSeq uint64, fn func(*dispatchv1.TaskEvent) error) error {
	t, err := l.s.d.Tasks().GetAs(tenant.FromContext(ctx), id)
	if err != nil {
		return toStatus(l.s.d.Logger(), err)
	}
	return toStatus(l.s.d.Logger(), l.s.follow(ctx, t, afterSeq, fn))
}

// Serving reports whether the dispatcher accepts work (false while it drains).
func (l *Local) Serving(ctx context.Context) bool {
	return l.s.d.Serving(ctx)
}

// HealthText says why the dispatcher does not accept work ("" when it
// does): see Dispatcher.HealthText.
func (l *Local) HealthText(ctx context.Context) string {
	return l.s.d.HealthText(ctx)
}

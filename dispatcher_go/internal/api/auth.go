package api

import (
	"context"
	"errors"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/tenant"
)

// Method prefixes of the services each token guards. Health and reflection
// (openServices) are open, for probes and tooling; any other method is
// refused while auth is configured.
var (
	clientServices = []string{
		"/" + agentpb.Agent_ServiceDesc.ServiceName + "/",
		"/" + dispatchv1.TaskService_ServiceDesc.ServiceName + "/",
		"/lf.a2a.v1.A2AService/", // internal/a2a's gRPC binding
	}
	commanderServices = []string{
		"/" + dispatchv1.AgentInteraction_ServiceDesc.ServiceName + "/",
		"/" + dispatchv1.ToolProviderService_ServiceDesc.ServiceName + "/",
	}
)

var errUnauthenticated = status.Error(codes.Unauthenticated, "missing or invalid bearer token")

// toolProviderService is the prefix of ToolProviderService's methods: a
// tool provider serves every tenant's tasks, so a tenant's own commander
// token does not admit one.
var toolProviderMethods = "/" + dispatchv1.ToolProviderService_ServiceDesc.ServiceName + "/"

func (s *Server) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	ctx, err := s.authorize(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	auth := s.d.Auth()
	changed := auth.Changed()
	ctx, err := s.authorize(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	if auth.HasTenants() {
		// A stream outlives a reload of the tenants file: it ends when its
		// token stops meaning what it meant (revoked, or moved to another
		// tenant), as its next call would be refused.
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		go s.endIfRevoked(ctx, cancel, ss.Context(), info.FullMethod, changed)
	}
	err = handler(srv, &authedStream{ServerStream: ss, ctx: ctx})
	if errors.Is(context.Cause(ctx), errRevoked) {
		return errRevoked
	}
	return err
}

var errRevoked = status.Error(codes.Unauthenticated, "the bearer token was revoked (the tenants file changed)")

// endIfRevoked ends ctx (a stream's, authorized from incoming) with
// errRevoked once a reload of the tenants file makes its token mean
// something else; it returns when ctx ends.
func (s *Server) endIfRevoked(ctx context.Context, cancel context.CancelCauseFunc, incoming context.Context, method string, changed <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		changed = s.d.Auth().Changed()
		now, err := s.authorize(incoming, method)
		if err != nil || tenant.FromContext(now) != tenant.FromContext(ctx) || tenant.CommanderFromContext(now) != tenant.CommanderFromContext(ctx) {
			cancel(errRevoked)
			s.abortStream(incoming, errRevoked) // a ChatStream waits in Recv (chatstream.go)
			return
		}
	}
}

// authedStream is a server stream whose context carries who called.
type authedStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (a *authedStream) Context() context.Context { return a.ctx }

// authorize checks the bearer token the method's service requires and
// returns ctx carrying who presented it: a client's tenant
// (tenant.WithCaller), a commander's (tenant.WithCommander). A client
// service's context always carries a caller, so the handlers scope every
// task operation to it.
func (s *Server) authorize(ctx context.Context, method string) (context.Context, error) {
	auth := s.d.Auth()
	switch {
	case hasAnyPrefix(method, clientServices):
		c, ok := auth.Client(bearerToken(ctx))
		if !ok {
			return nil, errUnauthenticated
		}
		return tenant.WithCaller(ctx, c), nil
	case hasAnyPrefix(method, commanderServices):
		c, ok := auth.Commander(bearerToken(ctx))
		if !ok || (c.Restricted && strings.HasPrefix(method, toolProviderMethods)) {
			return nil, errUnauthenticated
		}
		return tenant.WithCommander(ctx, c), nil
	case hasAnyPrefix(method, openServices) || !auth.ClientAuth() && !auth.CommanderAuth():
		return ctx, nil
	}
	// A method of no service above (a path grpc would not route, a
	// service registered later and not listed): never served without a
	// token.
	return nil, errUnauthenticated
}

// openServices need no token: probes and tooling.
var openServices = []string{
	"/grpc.health.v1.Health/",
	"/grpc.reflection.v1.ServerReflection/",
	"/grpc.reflection.v1alpha.ServerReflection/",
}

// bearerToken is the request's bearer token ("" without one). The token is
// compared in constant time by internal/tenant.
func bearerToken(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		scheme, token, ok := strings.Cut(v, " ")
		if ok && strings.EqualFold(scheme, "Bearer") {
			return strings.TrimSpace(token)
		}
	}
	return ""
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

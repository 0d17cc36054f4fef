package api

import (
	"context"
	"crypto/subtle"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// Method prefixes of the services each token guards. Health and reflection
// are not listed: they are open, for probes and tooling.
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

func (s *Server) unaryAuth(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := s.authorize(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (s *Server) streamAuth(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := s.authorize(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}

// authorize checks the bearer token the method's service requires.
func (s *Server) authorize(ctx context.Context, method string) error {
	var want string
	switch {
	case hasAnyPrefix(method, clientServices):
		want = s.d.Config().Auth.ClientToken
	case hasAnyPrefix(method, commanderServices):
		want = s.d.Config().Auth.CommanderToken
	}
	if want == "" {
		return nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	for _, v := range md.Get("authorization") {
		scheme, token, ok := strings.Cut(v, " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") {
			continue
		}
		// Constant time: the comparison must not tell how much of a guess
		// was right.
		if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(token)), []byte(want)) == 1 {
			return nil
		}
	}
	return errUnauthenticated
}

func hasAnyPrefix(s string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

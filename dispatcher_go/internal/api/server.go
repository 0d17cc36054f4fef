// Package api serves the dispatcher's gRPC services on one server:
// lybic.agent.Agent (seed-000 client API), dispatch.v1.TaskService (native
// client API), dispatch.v1.AgentInteraction (commanders' ChatStream),
// dispatch.v1.ToolProviderService (tool providers), grpc.health.v1.Health and
// server reflection. Local is the same native client API in process, for
// internal/httpapi.
//
// It owns the gRPC adaptation only: the services over a
// dispatcher.Dispatcher, the grpc.ServerOptions made from its config
// (message size, window, keepalive, auth interceptors, the codec that
// decodes commanders' streamed packets by hand), and the mapping of
// errors to gRPC codes. It is the only place that knows gRPC codes: domain
// packages return wrapped sentinel errors and toStatus (errors.go) maps
// them, never passing internal text or secrets to a caller. Auth (auth.go)
// is a pair of interceptors that put who called (a client's tenant, a
// commander's; internal/tenant) in the request's context: every client
// call answers only the caller's tasks, another tenant's being NOT_FOUND.
//
// It must not build components, start goroutines other than per-request
// ones, or own drain and close: those are internal/dispatcher's.
package api

import (
	"context"
	"math"

	"google.golang.org/grpc"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// Server is the gRPC adapter of a dispatcher: its services and server
// options.
type Server struct {
	d *dispatcher.Dispatcher
}

// New returns the gRPC adapter of d. d stays the caller's: it drains and
// closes it.
func New(d *dispatcher.Dispatcher) *Server { return &Server{d: d} }

// healthNames are the names grpc health answers for ("" is the server).
var healthNames = []string{
	"",
	agentpb.Agent_ServiceDesc.ServiceName,
	dispatchv1.TaskService_ServiceDesc.ServiceName,
	dispatchv1.AgentInteraction_ServiceDesc.ServiceName,
	dispatchv1.ToolProviderService_ServiceDesc.ServiceName,
}

// ServerOptions are the grpc.Server options the dispatcher needs, from its
// config: message size limit, stream window, keepalive, auth. Callers add
// transport credentials.
func (s *Server) ServerOptions() []grpc.ServerOption {
	g := s.d.Config().GRPC
	ka := g.Keepalive
	var window []grpc.ServerOption
	if w := g.StreamWindowBytes; w > 0 {
		// A fixed HTTP/2 receive window (grpc-go then turns BDP estimation
		// off). With the dynamic one a flooding commander had up to 35 000
		// packets of its own content ahead of its stopped (stop-flood in
		// docs/benchmarks.md); 128 KiB a stream bounds that queue and is
		// still ~2.6 MB/s per stream at a 50 ms round trip.
		window = []grpc.ServerOption{grpc.InitialWindowSize(int32(min(w, 1<<30))), grpc.InitialConnWindowSize(int32(min(8*w, 1<<30)))}
	}
	return append(window,
		// The transport takes up to twice the announced limit; the limit
		// itself is enforced per message by the broker (an error result for
		// that call) and the session (that session stops), so an oversized
		// message never ends a connection that carries other work
		// (docs/protocol.md, "Message sizes").
		grpc.MaxRecvMsgSize(TransportRecvLimit(g.MaxRecvMsgBytes)),
		// No MaxConnectionIdle/MaxConnectionAge: idle-closing never helps
		// a long-lived commander, and an age limit would cut its streams.
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: ka.Time, Timeout: ka.Timeout}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: ka.MinTime, PermitWithoutStream: true}),
		// A ChatStream's transport reads and writes wait on the context
		// made here: its cancel lets the session end the stream from its
		// side while receiving in the RPC's own goroutine (chatstream.go).
		grpc.InTapHandle(chatStreamTap),
		// grpc's proto codec, with a commander's streamed packets decoded
		// by hand (upcodec.go).
		grpc.ForceServerCodecV2(serverCodec{}),
		// unaryDecode first: a request that did not decode is
		// INVALID_ARGUMENT (decodeerr.go; streams check in their RecvMsg).
		grpc.ChainUnaryInterceptor(unaryDecode, s.unaryAuth, s.unarySize),
		grpc.ChainStreamInterceptor(s.streamAuth, s.streamSize),
	)
}

// Register registers all services on gs and marks each SERVING in the
// dispatcher's health state.
func (s *Server) Register(gs *grpc.Server) {
	agentpb.RegisterAgentServer(gs, &agentService{s: s})
	dispatchv1.RegisterTaskServiceServer(gs, &taskService{s: s})
	dispatchv1.RegisterAgentInteractionServer(gs, &interactionService{s: s})
	dispatchv1.RegisterToolProviderServiceServer(gs, &toolProviderService{s: s})
	healthpb.RegisterHealthServer(gs, s.d.Health())
	reflection.Register(gs)
	s.d.TrackHealth(healthNames...)
}

// streamContext is ctx ended also by the dispatcher's shutdown.
func (s *Server) streamContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return s.d.StreamContext(ctx)
}

// TransportRecvLimit is grpc's MaxRecvMsgSize for an announced per-message
// limit: twice it, so that a message somewhat over the limit reaches our own
// check (an error for that call or session) instead of ending the stream.
// Only a message over this hard ceiling still ends its stream.
func TransportRecvLimit(limit int) int {
	if limit > math.MaxInt32/2 {
		return math.MaxInt32
	}
	return 2 * limit
}

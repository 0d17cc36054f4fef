package api

import (
	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// interactionService is dispatch.v1.AgentInteraction (commanders).
type interactionService struct {
	dispatchv1.UnimplementedAgentInteractionServer
	s *Server
}

// ChatStream runs one commander slot.
func (is *interactionService) ChatStream(stream grpc.BidiStreamingServer[dispatchv1.UpstreamPacket, dispatchv1.DownstreamPacket]) error {
	return toStatus(is.s.d.Logger(), is.s.d.Sessions().Serve(is.s.withAbort(stream)))
}

// toolProviderService is dispatch.v1.ToolProviderService (tool providers).
type toolProviderService struct {
	dispatchv1.UnimplementedToolProviderServiceServer
	s *Server
}

// Connect runs one tool provider's stream until it or the server ends.
func (tp *toolProviderService) Connect(stream grpc.BidiStreamingServer[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse]) error {
	ctx, cancel := tp.s.streamContext(stream.Context())
	defer cancel()
	return toStatus(tp.s.d.Logger(), tp.s.d.Broker().ServeProvider(ctx, connectStream{stream}))
}

// connectStream is a provider's Connect stream as the broker sees it: a
// message that did not decode fails its Recv with INVALID_ARGUMENT
// (decodeerr.go; see chatStream for why not an interceptor).
type connectStream struct {
	grpc.BidiStreamingServer[dispatchv1.ConnectRequest, dispatchv1.ConnectResponse]
}

func (c connectStream) Recv() (*dispatchv1.ConnectRequest, error) {
	m := new(dispatchv1.ConnectRequest)
	if err := c.RecvMsg(m); err != nil {
		return nil, err
	}
	return m, nil
}

// RecvMsg is checked too, so a caller that receives through it (as the
// session does on ChatStream) cannot bypass the decode check.
func (c connectStream) RecvMsg(m any) error {
	if err := c.BidiStreamingServer.RecvMsg(m); err != nil {
		return err
	}
	if pm, ok := m.(*dispatchv1.ConnectRequest); ok {
		return decodeFailure(pm)
	}
	return nil
}

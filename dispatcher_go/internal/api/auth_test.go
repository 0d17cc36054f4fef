package api

import (
	"errors"
	"log/slog"
	"testing"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

var errSecret = errors.New("dial postgres://admin:sk-very-secret@db")

func discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

func TestAuthSeparateTokens(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Auth: dispatcher.Auth{ClientToken: "client-secret", CommanderToken: "commander-secret"}})

	_, err := h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{})
	wantCode(t, err, codes.Unauthenticated)
	_, err = h.agent.GetAgentInfo(bearer(ctx, "wrong"), &agentpb.GetAgentInfoRequest{})
	wantCode(t, err, codes.Unauthenticated)
	_, err = h.agent.GetAgentInfo(bearer(ctx, "commander-secret"), &agentpb.GetAgentInfoRequest{})
	wantCode(t, err, codes.Unauthenticated)
	if _, err := h.agent.GetAgentInfo(bearer(ctx, "client-secret"), &agentpb.GetAgentInfoRequest{}); err != nil {
		t.Fatalf("client token refused: %v", err)
	}
	_, err = h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{})
	wantCode(t, err, codes.Unauthenticated)
	if _, err := h.tasks.ListTasks(bearer(ctx, "client-secret"), &dispatchv1.ListTasksRequest{}); err != nil {
		t.Fatal(err)
	}

	// Commander services want the commander token.
	c := testutil.OpenChat(t, bearer(ctx, "client-secret"), h.conn)
	wantCode(t, c.Ended(), codes.Unauthenticated)
	p, err := h.tools.Connect(ctx)
	if err == nil {
		_, err = p.Recv()
	}
	wantCode(t, err, codes.Unauthenticated)
	testutil.Connect(t, bearer(ctx, "commander-secret"), h.conn, "planner:chat")
	if h.d.Scheduler().SlotCount() != 1 {
		t.Fatal("authorised commander not registered")
	}

	// Health and reflection are open.
	hr, err := h.health.Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health %v %v", hr, err)
	}
	hr, err = h.health.Check(ctx, &healthpb.HealthCheckRequest{Service: "lybic.agent.Agent"})
	if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("service health %v %v", hr, err)
	}
	rs, err := reflectionpb.NewServerReflectionClient(h.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := rs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, s := range resp.GetListServicesResponse().GetService() {
		names[s.GetName()] = true
	}
	for _, want := range []string{"lybic.agent.Agent", "dispatch.v1.TaskService", "dispatch.v1.AgentInteraction", "dispatch.v1.ToolProviderService", "grpc.health.v1.Health"} {
		if !names[want] {
			t.Fatalf("reflection lacks %s: %v", want, names)
		}
	}
	_ = rs.CloseSend()
}

func TestNoTokenMeansOpen(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{})
	if _, err := h.agent.GetAgentInfo(ctx, &agentpb.GetAgentInfoRequest{}); err != nil {
		t.Fatal(err)
	}
}

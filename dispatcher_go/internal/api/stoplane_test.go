package api

import (
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestStopLane: AgentInteraction.Stopped wants the commander token, says
// NOT_FOUND for a session that is not here, and ends a stopped session
// beside its stream: SESSION_CLOSED on the stream, the task CANCELLED with
// the usage the stopped carried, no REJECTED for the stream's late copy.
func TestStopLane(t *testing.T) {
	t.Parallel()
	h, ctx := newHarness(t, dispatcher.Config{Auth: dispatcher.Auth{ClientToken: "client-secret", CommanderToken: "commander-secret"}})
	cctx := bearer(ctx, "commander-secret")
	lane := dispatchv1.NewAgentInteractionClient(h.conn)
	stoppedPkt := func(sid string, seq uint64) *dispatchv1.StoppedRequest {
		p := testutil.Up(sid, &dispatchv1.Stopped{Reason: "cancelled", FinalUsage: &dispatchv1.Usage{InputTokens: 7}})
		p.Seq = seq
		return &dispatchv1.StoppedRequest{Packets: []*dispatchv1.UpstreamPacket{p}}
	}

	_, err := lane.Stopped(bearer(ctx, "client-secret"), stoppedPkt("ses-x", 1))
	wantCode(t, err, codes.Unauthenticated)
	_, err = lane.Stopped(cctx, stoppedPkt("ses-x", 1))
	wantCode(t, err, codes.NotFound)
	_, err = lane.Stopped(cctx, &dispatchv1.StoppedRequest{})
	wantCode(t, err, codes.InvalidArgument)

	c := testutil.Connect(t, cctx, h.conn, "planner:chat")
	actx := bearer(ctx, "client-secret")
	start, err := h.agent.RunAgentInstructionAsync(actx, &agentpb.RunAgentInstructionRequest{Instruction: "long job"})
	if err != nil {
		t.Fatal(err)
	}
	sid, _ := c.Start()
	content := testutil.Up(sid, &dispatchv1.ContentChunk{Text: "working"})
	content.Seq = 1
	c.Send(content)
	_, err = lane.Stopped(cctx, stoppedPkt(sid, 2))
	wantCode(t, err, codes.FailedPrecondition) // no stop decided yet

	cancelled := testutil.Async(func() (*agentpb.CancelTaskResponse, error) {
		return h.agent.CancelTask(actx, &agentpb.CancelTaskRequest{TaskId: start.GetTaskId()})
	})
	c.RecvUntil(isStop)
	if _, err := lane.Stopped(cctx, stoppedPkt(sid, 2)); err != nil {
		t.Fatalf("Stopped: %v", err)
	}
	c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool {
		return p.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_SESSION_CLOSED && p.GetSessionId() == sid
	})
	if cr := testutil.Recv(t, cancelled, testutil.Wait, "CancelTask to return"); cr.Err != nil || !cr.V.GetSuccess() {
		t.Fatalf("cancel %v %v", cr.V, cr.Err)
	}
	st, _ := h.agent.QueryTaskStatus(actx, &agentpb.QueryTaskStatusRequest{TaskId: start.GetTaskId()})
	if st.GetStatus() != agentpb.TaskStatus_CANCELLED || st.GetExecutionStatistics().GetInputTokens() != 7 {
		t.Fatalf("status %v", st)
	}
	// The stream's copy comes late: dropped, not REJECTED; a packet past it is.
	c.Send(stoppedPkt(sid, 2).GetPackets()[0])
	late := testutil.Up(sid, &dispatchv1.ContentChunk{Text: "late"})
	late.Seq = 3
	c.Send(late)
	p := c.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool {
		return p.GetAck() != nil && p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_RECORDED
	})
	if p.GetAck().GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED || p.GetSessionId() != sid {
		t.Fatalf("want REJECTED for seq 3 only, got %v", p)
	}
	_, err = lane.Stopped(cctx, stoppedPkt(sid, 2))
	wantCode(t, err, codes.NotFound) // ended
}

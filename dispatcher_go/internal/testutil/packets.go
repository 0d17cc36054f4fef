package testutil

import (
	"fmt"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Up builds the upstream packet of session sid that carries payload, stamped
// now. payload is any message of UpstreamPacket's oneof (*dispatchv1.Hello,
// *dispatchv1.ContentChunk, *dispatchv1.ToolCallRequest, ...), or nil for a
// packet without one (a protocol error the dispatcher must reject). Any other
// type panics: it is a bug in the test.
func Up(sid string, payload any) *dispatchv1.UpstreamPacket {
	p := &dispatchv1.UpstreamPacket{SessionId: sid, Timestamp: time.Now().UnixMicro()}
	switch v := payload.(type) {
	case *dispatchv1.Hello:
		p.Payload = &dispatchv1.UpstreamPacket_Hello{Hello: v}
	case *dispatchv1.ThoughtChain:
		p.Payload = &dispatchv1.UpstreamPacket_Thought{Thought: v}
	case *dispatchv1.ContentChunk:
		p.Payload = &dispatchv1.UpstreamPacket_Content{Content: v}
	case *dispatchv1.ToolCallRequest:
		p.Payload = &dispatchv1.UpstreamPacket_ToolCall{ToolCall: v}
	case *dispatchv1.ErrorSignal:
		p.Payload = &dispatchv1.UpstreamPacket_Error{Error: v}
	case *dispatchv1.Usage:
		p.Payload = &dispatchv1.UpstreamPacket_Usage{Usage: v}
	case *dispatchv1.StageChange:
		p.Payload = &dispatchv1.UpstreamPacket_Stage{Stage: v}
	case *dispatchv1.Artifact:
		p.Payload = &dispatchv1.UpstreamPacket_Artifact{Artifact: v}
	case *dispatchv1.FinalResult:
		p.Payload = &dispatchv1.UpstreamPacket_Result{Result: v}
	case *dispatchv1.Stopped:
		p.Payload = &dispatchv1.UpstreamPacket_Stopped{Stopped: v}
	case *dispatchv1.SandboxInUse:
		p.Payload = &dispatchv1.UpstreamPacket_Sandbox{Sandbox: v}
	case *dispatchv1.UpstreamBatch:
		p.Payload = &dispatchv1.UpstreamPacket_Batch{Batch: v}
	case nil:
	default:
		panic(fmt.Sprintf("testutil.Up: %T is not an upstream payload", payload))
	}
	return p
}

// Hello is the first packet of a commander slot offering caps.
func Hello(commanderID string, caps ...string) *dispatchv1.UpstreamPacket {
	return Up("", &dispatchv1.Hello{CommanderId: commanderID, Version: "test", Capabilities: caps})
}

// Success is the final result of a session that succeeded with result.
func Success(result string) *dispatchv1.FinalResult {
	return &dispatchv1.FinalResult{Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: result}
}

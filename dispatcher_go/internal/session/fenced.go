package session

import dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"

// fencedOutput reports whether pkt is planner output a stop fences and that
// has no effect but its record: once the stop is decided the receiving
// goroutine drops it before any work (the size check, the policy, the
// event and its refusal by the log's fence), so that the content a
// commander wrote before it heard of the stop costs little to get through
// (its stopped comes after it on the stream). Tool calls are not dropped:
// they are answered (DENIED).
func fencedOutput(pkt *dispatchv1.UpstreamPacket) bool {
	switch pkt.GetPayload().(type) {
	case *dispatchv1.UpstreamPacket_Content, *dispatchv1.UpstreamPacket_Thought,
		*dispatchv1.UpstreamPacket_Stage, *dispatchv1.UpstreamPacket_Artifact,
		*dispatchv1.UpstreamPacket_Error:
		return true
	}
	return false
}

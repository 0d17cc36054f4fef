// Package events is the dispatcher's one event vocabulary. For every kind
// of task event (a field of the dispatch.v1 TaskEvent kind oneof) one row
// of one table (table.go) says:
//
//   - its name, which is also its metric label (task_events_total{kind});
//   - whether the commander sends it (the ChatStream UpstreamPacket payload
//     of the same name) or the dispatcher makes it;
//   - its event-log class (eventlog.Control, Capped, Fenceable);
//   - what a policy sees of it (policy.Packet), if policies evaluate it;
//   - its seed-000 projection (lybic.agent TaskStream{stage, message});
//   - its seed-001 projection (one SSE event of /api/agent/run).
//
// Enum values become words through internal/protoenum
// (TOOL_ERROR_CODE_TIMEOUT → "timeout"), the one way the dispatcher and
// dispatchctl word them.
//
// The packages that record, evaluate, project or count events (session,
// api, httpapi, metrics) read the vocabulary here instead of naming kinds
// themselves: a kind is added, or a projection changed, in one place, and
// the table test fails until every column of a new row is filled.
//
// What it must not do: anything but map. Its functions are pure functions
// of their arguments: no recording, sending, deciding, counting, logging,
// I/O or goroutines, and no transport (no gRPC, HTTP or JSON encoding: the
// callers encode). It depends only on the generated protos, protoenum and
// the vocabularies of eventlog (classes) and policy (packet kinds and
// actions), never on the packages that use it.
package events

import (
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Kind is a kind of task event: one field of the TaskEvent kind oneof.
type Kind uint8

// The kinds, in the order of the oneof's fields.
const (
	// None is no kind: a TaskEvent without one, or an upstream payload
	// that records no event (hello, sandbox_in_use).
	None Kind = iota
	State
	Thought
	Content
	ToolCall
	ToolResult
	Error
	Usage
	Stage
	Artifact
	Result
	Stop
	Stopped
	UserInput
	Policy

	numKinds
)

// Kinds lists every kind but None, in order.
func Kinds() []Kind {
	ks := make([]Kind, 0, numKinds-1)
	for k := None + 1; k < numKinds; k++ {
		ks = append(ks, k)
	}
	return ks
}

// Spec is k's row of the table (the zero row for None and unknown kinds).
// It is a copy: the table cannot be changed through it.
func (k Kind) Spec() Spec {
	if k >= numKinds {
		k = None
	}
	return table[k]
}

// String is k's name ("none" for None).
func (k Kind) String() string {
	if n := k.Spec().Name; n != "" {
		return n
	}
	return "none"
}

// Of is the kind of ev (None for an event without a kind, or with a kind
// this build does not know).
func Of(ev *dispatchv1.TaskEvent) Kind {
	switch ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_State:
		return State
	case *dispatchv1.TaskEvent_Thought:
		return Thought
	case *dispatchv1.TaskEvent_Content:
		return Content
	case *dispatchv1.TaskEvent_ToolCall:
		return ToolCall
	case *dispatchv1.TaskEvent_ToolResult:
		return ToolResult
	case *dispatchv1.TaskEvent_Error:
		return Error
	case *dispatchv1.TaskEvent_Usage:
		return Usage
	case *dispatchv1.TaskEvent_Stage:
		return Stage
	case *dispatchv1.TaskEvent_Artifact:
		return Artifact
	case *dispatchv1.TaskEvent_Result:
		return Result
	case *dispatchv1.TaskEvent_Stop:
		return Stop
	case *dispatchv1.TaskEvent_Stopped:
		return Stopped
	case *dispatchv1.TaskEvent_UserInput:
		return UserInput
	case *dispatchv1.TaskEvent_Policy:
		return Policy
	}
	return None
}

// FromUpstream is the task event that a commander's packet records, with
// its kind: the payload moves into the event unchanged, and the event's
// emitted_at_us is the packet's timestamp. It is (nil, None) for payloads
// that record no event (hello, sandbox_in_use) and for unknown ones.
//
// The event and its kind's oneof wrapper are one allocation (withKind):
// they live exactly as long as each other, and this runs once per packet.
func FromUpstream(pkt *dispatchv1.UpstreamPacket) (*dispatchv1.TaskEvent, Kind) {
	return FromUpstreamAt(pkt, time.Time{})
}

// FromUpstreamAt is FromUpstream with the event's time set to at (none if
// at is zero), in the same allocation: the time the task would give the
// event when recording it, taken by the caller just before.
func FromUpstreamAt(pkt *dispatchv1.UpstreamPacket, at time.Time) (*dispatchv1.TaskEvent, Kind) {
	var ev *dispatchv1.TaskEvent
	var ts *timestamppb.Timestamp
	var k Kind
	switch p := pkt.GetPayload().(type) {
	case *dispatchv1.UpstreamPacket_Thought:
		b := &withKind[dispatchv1.TaskEvent_Thought]{k: dispatchv1.TaskEvent_Thought{Thought: p.Thought}}
		ev, k, ts = &b.ev, Thought, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Content:
		b := &withKind[dispatchv1.TaskEvent_Content]{k: dispatchv1.TaskEvent_Content{Content: p.Content}}
		ev, k, ts = &b.ev, Content, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_ToolCall:
		b := &withKind[dispatchv1.TaskEvent_ToolCall]{k: dispatchv1.TaskEvent_ToolCall{ToolCall: p.ToolCall}}
		ev, k, ts = &b.ev, ToolCall, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Error:
		b := &withKind[dispatchv1.TaskEvent_Error]{k: dispatchv1.TaskEvent_Error{Error: p.Error}}
		ev, k, ts = &b.ev, Error, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Usage:
		b := &withKind[dispatchv1.TaskEvent_Usage]{k: dispatchv1.TaskEvent_Usage{Usage: p.Usage}}
		ev, k, ts = &b.ev, Usage, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Stage:
		b := &withKind[dispatchv1.TaskEvent_Stage]{k: dispatchv1.TaskEvent_Stage{Stage: p.Stage}}
		ev, k, ts = &b.ev, Stage, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Artifact:
		b := &withKind[dispatchv1.TaskEvent_Artifact]{k: dispatchv1.TaskEvent_Artifact{Artifact: p.Artifact}}
		ev, k, ts = &b.ev, Artifact, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Result:
		b := &withKind[dispatchv1.TaskEvent_Result]{k: dispatchv1.TaskEvent_Result{Result: p.Result}}
		ev, k, ts = &b.ev, Result, &b.ts
		ev.Kind = &b.k
	case *dispatchv1.UpstreamPacket_Stopped:
		b := &withKind[dispatchv1.TaskEvent_Stopped]{k: dispatchv1.TaskEvent_Stopped{Stopped: p.Stopped}}
		ev, k, ts = &b.ev, Stopped, &b.ts
		ev.Kind = &b.k
	default:
		return nil, None
	}
	ev.EmittedAtUs = pkt.GetTimestamp()
	if !at.IsZero() {
		ts.Seconds, ts.Nanos = at.Unix(), int32(at.Nanosecond())
		ev.Time = ts
	}
	return ev, k
}

// withKind is a task event, its kind's oneof wrapper and its time in one
// allocation.
type withKind[K any] struct {
	ev dispatchv1.TaskEvent
	k  K
	ts timestamppb.Timestamp
}

// Label is ev's metric label: its kind's name, "other" for None.
func Label(ev *dispatchv1.TaskEvent) string {
	if k := Of(ev); k != None {
		return k.Spec().Name
	}
	return "other"
}

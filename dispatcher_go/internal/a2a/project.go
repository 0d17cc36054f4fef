package a2a

import (
	"fmt"
	"strings"
	"time"

	"github.com/a2aproject/a2a-go/v2/a2a"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// SeqKey is the metadata key that carries our event seq on every streamed
// A2A event and on every Task snapshot (the resume extension, docs/a2a.md).
const SeqKey = "dispatcher.seq"

// hold is a tool call a policy holds for approval.
type hold struct {
	callID, tool, reason string
}

// projector turns one task's event log, in seq order, into A2A: the events
// a stream sends and the Task a snapshot shows. It is fed by one goroutine.
type projector struct {
	id        a2a.TaskID
	contextID string
	inst      string
	created   time.Time

	state   a2a.TaskState
	msg     *a2a.Message
	at      time.Time
	seq     uint64
	arts    []*a2a.Artifact
	byID    map[a2a.ArtifactID]int
	answer  int  // answers started (content artifacts answer-1, answer-2, ...)
	open    bool // the current answer has had a chunk and no is_finish
	content bool // any content recorded
	policy  bool // a policy stopped the session
	holds   []hold
	asking  bool // call_user is waiting for the user
	history []*a2a.Message
}

func newProjector(t *dispatchv1.Task) *projector {
	p := &projector{
		id:        a2a.TaskID(t.GetTaskId()),
		contextID: contextOf(t),
		inst:      t.GetInstruction(),
		created:   t.GetCreatedAt().AsTime(),
		state:     a2a.TaskStateSubmitted,
		at:        t.GetCreatedAt().AsTime(),
		byID:      map[a2a.ArtifactID]int{},
	}
	p.history = []*a2a.Message{{
		ID: t.GetTaskId() + "-instruction", Role: a2a.MessageRoleUser, TaskID: p.id, ContextID: p.contextID,
		Parts: a2a.ContentParts{a2a.NewTextPart(p.inst)},
	}}
	return p
}

// contextOf is the A2A contextId of a task: the one it was submitted with
// over A2A (a label), else its own id (a conversation starts with it).
func contextOf(t *dispatchv1.Task) string {
	if c := t.GetLabels()[contextLabel]; c != "" {
		return c
	}
	return t.GetTaskId()
}

// stateOf maps our status to an A2A state when no events are replayed.
func stateOf(s agentpb.TaskStatus) a2a.TaskState {
	switch s {
	case agentpb.TaskStatus_PENDING:
		return a2a.TaskStateSubmitted
	case agentpb.TaskStatus_RUNNING:
		return a2a.TaskStateWorking
	case agentpb.TaskStatus_SUCCESS:
		return a2a.TaskStateCompleted
	case agentpb.TaskStatus_CANCELLED:
		return a2a.TaskStateCanceled
	default:
		return a2a.TaskStateFailed
	}
}

func (p *projector) agentMsg(text string) *a2a.Message {
	return &a2a.Message{
		ID: fmt.Sprintf("%s-%d", p.id, p.seq), Role: a2a.MessageRoleAgent, TaskID: p.id, ContextID: p.contextID,
		Parts: a2a.ContentParts{a2a.NewTextPart(text)},
	}
}

// status moves to state with an agent message (text may be empty) and
// returns the status update event.
func (p *projector) status(state a2a.TaskState, text string) a2a.Event {
	p.state = state
	p.msg = nil
	if text != "" {
		p.msg = p.agentMsg(text)
	}
	ts := p.at
	return &a2a.TaskStatusUpdateEvent{
		TaskID: p.id, ContextID: p.contextID,
		Status:   a2a.TaskStatus{State: state, Message: p.msg, Timestamp: &ts},
		Metadata: map[string]any{SeqKey: p.seq},
	}
}

// artifact records an artifact update and returns its event. Appended
// text is kept as one text part in the snapshot.
func (p *projector) artifact(id a2a.ArtifactID, name string, parts a2a.ContentParts, appendTo, last bool) a2a.Event {
	if i, ok := p.byID[id]; ok && appendTo {
		old := p.arts[i]
		cp := *old
		cp.Parts = append(a2a.ContentParts(nil), old.Parts...)
		if len(cp.Parts) > 0 && len(parts) == 1 && cp.Parts[len(cp.Parts)-1].Text() != "" && parts[0].Text() != "" {
			cp.Parts[len(cp.Parts)-1] = a2a.NewTextPart(cp.Parts[len(cp.Parts)-1].Text() + parts[0].Text())
		} else {
			cp.Parts = append(cp.Parts, parts...)
		}
		p.arts[i] = &cp
	} else {
		p.byID[id] = len(p.arts)
		p.arts = append(p.arts, &a2a.Artifact{ID: id, Name: name, Parts: append(a2a.ContentParts(nil), parts...)})
	}
	return &a2a.TaskArtifactUpdateEvent{
		TaskID: p.id, ContextID: p.contextID, Append: appendTo, LastChunk: last,
		Artifact: &a2a.Artifact{ID: id, Name: name, Parts: parts},
		Metadata: map[string]any{SeqKey: p.seq},
	}
}

// interrupted is the state while the task waits for the client.
func (p *projector) interrupted() bool { return len(p.holds) > 0 || p.asking }

func (p *projector) holdText() string {
	h := p.holds[0]
	return fmt.Sprintf("tool call %s (%s) is held by policy: %s. Reply \"approve\" to run it, anything else rejects it.", h.callID, h.tool, h.reason)
}

// apply feeds the next event and returns the A2A events it makes.
func (p *projector) apply(ev *dispatchv1.TaskEvent) []a2a.Event {
	p.seq = ev.GetSeq()
	if ev.GetTime() != nil {
		p.at = ev.GetTime().AsTime()
	}
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_State:
		switch st := k.State.GetStatus(); st {
		case agentpb.TaskStatus_PENDING:
			return []a2a.Event{p.status(a2a.TaskStateSubmitted, "")}
		case agentpb.TaskStatus_RUNNING:
			return []a2a.Event{p.status(a2a.TaskStateWorking, "")}
		default:
			state := stateOf(st)
			if state == a2a.TaskStateFailed && p.policy {
				state = a2a.TaskStateRejected
			}
			p.holds, p.asking = nil, false
			return []a2a.Event{p.status(state, k.State.GetMessage())}
		}
	case *dispatchv1.TaskEvent_Content:
		c := k.Content
		if !p.open {
			p.answer++
		}
		id := a2a.ArtifactID(fmt.Sprintf("answer-%d", p.answer))
		out := p.artifact(id, "answer", a2a.ContentParts{a2a.NewTextPart(c.GetText())}, p.open, c.GetIsFinish())
		p.open = !c.GetIsFinish()
		p.content = true
		return []a2a.Event{out}
	case *dispatchv1.TaskEvent_Artifact:
		a := k.Artifact
		var part *a2a.Part
		if a.GetUri() != "" {
			part = a2a.NewFileURLPart(a2a.URL(a.GetUri()), a.GetMimeType())
		} else {
			part = a2a.NewRawPart(a.GetData())
			part.MediaType = a.GetMimeType()
		}
		kind := a.GetKind()
		if kind == "" {
			kind = "artifact"
		}
		part.Filename = fmt.Sprintf("%s-%d%s", kind, p.seq, extension(a.GetMimeType()))
		id := a2a.ArtifactID(fmt.Sprintf("%s-%d", kind, p.seq))
		ev := p.artifact(id, kind, a2a.ContentParts{part}, false, true)
		if d := a.GetDescription(); d != "" {
			p.arts[p.byID[id]].Description = d
			ev.(*a2a.TaskArtifactUpdateEvent).Artifact.Description = d
		}
		return []a2a.Event{ev}
	case *dispatchv1.TaskEvent_Result:
		if r := k.Result.GetResult(); r != "" && !p.content {
			return []a2a.Event{p.artifact("result", "result", a2a.ContentParts{a2a.NewTextPart(r)}, false, true)}
		}
	case *dispatchv1.TaskEvent_Stage:
		s := k.Stage
		if s.GetStage() == "call_user" {
			p.asking = true
			text := s.GetMessage()
			if text == "" {
				text = "the agent asks for your help"
			}
			return []a2a.Event{p.status(a2a.TaskStateInputRequired, text)}
		}
		if p.interrupted() || p.state.Terminal() {
			return nil
		}
		text := s.GetStage()
		if m := s.GetMessage(); m != "" {
			text += ": " + m
		}
		return []a2a.Event{p.status(a2a.TaskStateWorking, text)}
	case *dispatchv1.TaskEvent_UserInput:
		p.history = append(p.history, &a2a.Message{
			ID: k.UserInput.GetMessageId(), Role: a2a.MessageRoleUser, TaskID: p.id, ContextID: p.contextID,
			Parts: a2a.ContentParts{a2a.NewTextPart(k.UserInput.GetText())},
		})
		if p.asking {
			p.asking = false
			return p.resume()
		}
	case *dispatchv1.TaskEvent_Policy:
		d := k.Policy
		switch {
		case d.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_STOP:
			p.policy = true
		case d.GetHoldOutcome() != dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED:
			for i, h := range p.holds {
				if h.callID == d.GetCallId() {
					p.holds = append(p.holds[:i:i], p.holds[i+1:]...)
					return p.resume()
				}
			}
		case d.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_HOLD:
			p.holds = append(p.holds, hold{callID: d.GetCallId(), tool: d.GetToolName(), reason: d.GetReason()})
			return []a2a.Event{p.status(a2a.TaskStateInputRequired, p.holdText())}
		}
	case *dispatchv1.TaskEvent_Stop:
		if k.Stop.GetCode() == dispatchv1.StopCode_STOP_CODE_POLICY {
			p.policy = true
		}
	}
	return nil
}

// resume: an answer arrived; the task works again unless it still waits.
func (p *projector) resume() []a2a.Event {
	switch {
	case p.state.Terminal():
		return nil
	case len(p.holds) > 0:
		return []a2a.Event{p.status(a2a.TaskStateInputRequired, p.holdText())}
	case p.asking:
		return nil
	}
	return []a2a.Event{p.status(a2a.TaskStateWorking, "")}
}

// snapshot is the Task now. historyLength: nil = all, 0 = none.
func (p *projector) snapshot(historyLength *int, artifacts bool) *a2a.Task {
	ts := p.at
	t := &a2a.Task{
		ID: p.id, ContextID: p.contextID,
		Status:   a2a.TaskStatus{State: p.state, Message: p.msg, Timestamp: &ts},
		Metadata: map[string]any{SeqKey: p.seq},
	}
	if artifacts && len(p.arts) > 0 {
		// Only the newest files: a GUI task's screenshots would make a
		// snapshot larger than a client takes (each was streamed already).
		files := 0
		keep := make([]bool, len(p.arts))
		for i := len(p.arts) - 1; i >= 0; i-- {
			if isFile(p.arts[i]) {
				if files++; files > snapshotFiles {
					continue
				}
			}
			keep[i] = true
		}
		for i, a := range p.arts {
			if keep[i] {
				cp := *a
				cp.Parts = append(a2a.ContentParts(nil), a.Parts...)
				t.Artifacts = append(t.Artifacts, &cp)
			}
		}
	}
	h := p.history
	if historyLength != nil {
		n := max(*historyLength, 0)
		if n < len(h) {
			h = h[len(h)-n:]
		}
	}
	if len(h) > 0 {
		t.History = append([]*a2a.Message(nil), h...)
	}
	return t
}

// snapshotFiles is how many file artifacts (the newest) a Task snapshot holds.
const snapshotFiles = 3

func isFile(a *a2a.Artifact) bool {
	for _, part := range a.Parts {
		switch part.Content.(type) {
		case a2a.Raw, a2a.URL:
			return true
		}
	}
	return false
}

func extension(mime string) string {
	switch strings.ToLower(mime) {
	case "image/png":
		return ".png"
	case "image/jpeg":
		return ".jpg"
	case "image/webp":
		return ".webp"
	case "text/plain":
		return ".txt"
	case "application/json":
		return ".json"
	}
	return ""
}

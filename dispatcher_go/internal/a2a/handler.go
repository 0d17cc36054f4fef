package a2a

import (
	"context"
	"iter"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/a2aproject/a2a-go/v2/a2a"
	"github.com/a2aproject/a2a-go/v2/a2asrv"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// handler is the a2asrv.RequestHandler of both bindings.
type handler struct {
	b   Backend
	log *slog.Logger
}

var _ a2asrv.RequestHandler = (*handler)(nil)

// Paging of ListTasks (A2A: 1..100, default 50) and the search for a
// context's newest task.
const (
	defaultPageSize = 50
	maxPageSize     = 100
	contextScanPage = 500
	contextScanMax  = 10 // pages
)

// errReplayed ends a Watch that has read what it needed (a status, so
// that api does not log it as an internal error).
var errReplayed = status.Error(codes.Aborted, "a2a: replay done")

// checkVersion refuses a request for a protocol version other than 1.x
// (or 0.3 on the JSON-RPC 0.3 binding, which an absent A2A-Version selects).
func checkVersion(ctx context.Context) error {
	if legacy, _ := ctx.Value(legacyKey{}).(bool); legacy {
		return nil
	}
	cc, ok := a2asrv.CallContextFrom(ctx)
	if !ok {
		return nil
	}
	v, ok := cc.ServiceParams().Get(a2a.SvcParamVersion)
	if !ok || len(v) == 0 || strings.TrimSpace(v[0]) == "" {
		return nil
	}
	if major, _, _ := strings.Cut(strings.TrimSpace(v[0]), "."); major != "1" {
		return a2a.NewError(a2a.ErrVersionNotSupported, "A2A-Version "+v[0]+" is not supported; this agent speaks 1.0")
	}
	return nil
}

// resumeAfter is the seq of the resume extension's service parameter.
func resumeAfter(ctx context.Context) (*uint64, error) {
	cc, ok := a2asrv.CallContextFrom(ctx)
	if !ok {
		return nil, nil
	}
	v, ok := cc.ServiceParams().Get(ResumeParam)
	if !ok || len(v) == 0 || v[0] == "" {
		return nil, nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v[0]), 10, 64)
	if err != nil {
		return nil, a2a.NewError(a2a.ErrInvalidParams, ResumeParam+" must be an event seq (a non-negative integer)")
	}
	cc.Extensions().Activate(&a2a.AgentExtension{URI: ResumeExtension})
	return &n, nil
}

func (h *handler) getTask(ctx context.Context, id string) (*dispatchv1.Task, error) {
	if id == "" {
		return nil, a2a.NewError(a2a.ErrInvalidParams, "task id is required")
	}
	resp, err := h.b.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
	if err != nil {
		return nil, toA2A(err)
	}
	return resp.GetTask(), nil
}

// follow replays the log of t into a projector up to the seq t had (or
// snapAt, if lower and not 0) (onReplay sees each replayed event's A2A events), calls onSnap once, then
// follows the log live: onLive for each later event, false ends it. It
// returns at the task's end, ctx's end, or when a callback says so.
func (h *handler) follow(ctx context.Context, t *dispatchv1.Task, snapAt uint64,
	onReplay func(ev *dispatchv1.TaskEvent, out []a2a.Event),
	onSnap func(p *projector) bool,
	onLive func(p *projector, ev *dispatchv1.TaskEvent, out []a2a.Event) bool,
) (*projector, error) {
	p := newProjector(t)
	last := t.GetLastSeq()
	if snapAt > 0 && snapAt < last {
		last = snapAt
	}
	snapped := false
	if last == 0 {
		snapped = true
		if !onSnap(p) {
			return p, nil
		}
	}
	stopped := false
	err := h.b.Watch(ctx, t.GetTaskId(), 0, func(ev *dispatchv1.TaskEvent) error {
		out := p.apply(ev)
		if !snapped {
			if onReplay != nil {
				onReplay(ev, out)
			}
			if ev.GetSeq() < last {
				return nil
			}
			snapped = true
			if !onSnap(p) {
				stopped = true
				return errReplayed
			}
			return nil
		}
		if onLive == nil || !onLive(p, ev, out) {
			stopped = true
			return errReplayed
		}
		return nil
	})
	if err != nil && !stopped {
		return p, toA2A(err)
	}
	return p, nil
}

// load is the task's snapshot now.
func (h *handler) load(ctx context.Context, id string) (*projector, error) {
	t, err := h.getTask(ctx, id)
	if err != nil {
		return nil, err
	}
	return h.follow(ctx, t, 0, nil, func(*projector) bool { return false }, nil)
}

// GetTask implements a2asrv.RequestHandler.
func (h *handler) GetTask(ctx context.Context, req *a2a.GetTaskRequest) (*a2a.Task, error) {
	if err := checkVersion(ctx); err != nil {
		return nil, err
	}
	if req.HistoryLength != nil && *req.HistoryLength < 0 {
		return nil, a2a.NewError(a2a.ErrInvalidParams, "historyLength must not be negative")
	}
	p, err := h.load(ctx, string(req.ID))
	if err != nil {
		return nil, err
	}
	return p.snapshot(req.HistoryLength, true), nil
}

// ourStatuses is the native status filter for an A2A state.
func ourStatuses(s a2a.TaskState) ([]agentpb.TaskStatus, error) {
	switch s {
	case a2a.TaskStateUnspecified:
		return nil, nil
	case a2a.TaskStateSubmitted:
		return []agentpb.TaskStatus{agentpb.TaskStatus_PENDING}, nil
	case a2a.TaskStateWorking, a2a.TaskStateInputRequired:
		return []agentpb.TaskStatus{agentpb.TaskStatus_RUNNING}, nil
	case a2a.TaskStateCompleted:
		return []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, nil
	case a2a.TaskStateFailed, a2a.TaskStateRejected:
		return []agentpb.TaskStatus{agentpb.TaskStatus_FAILURE}, nil
	case a2a.TaskStateCanceled:
		return []agentpb.TaskStatus{agentpb.TaskStatus_CANCELLED}, nil
	case a2a.TaskStateAuthRequired:
		return []agentpb.TaskStatus{agentpb.TaskStatus_NOT_FOUND}, nil // never: we do not ask for auth
	}
	return nil, a2a.NewError(a2a.ErrInvalidParams, "unknown status "+string(s))
}

// CancelTask implements a2asrv.RequestHandler: our CancelTask, which
// fences the log (no content after it) and waits for the task's end.
// Cancelling a cancelled task returns it again (idempotent); a task that
// ended otherwise is TaskNotCancelable.
func (h *handler) CancelTask(ctx context.Context, req *a2a.CancelTaskRequest) (*a2a.Task, error) {
	if err := checkVersion(ctx); err != nil {
		return nil, err
	}
	if _, err := h.getTask(ctx, string(req.ID)); err != nil {
		return nil, err
	}
	resp, err := h.b.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: string(req.ID), Reason: "cancelled by A2A client"})
	if err != nil {
		return nil, toA2A(err)
	}
	st := resp.GetStatus()
	if !resp.GetCancelled() && st != agentpb.TaskStatus_RUNNING && st != agentpb.TaskStatus_PENDING && st != agentpb.TaskStatus_CANCELLED {
		p, err := h.load(ctx, string(req.ID))
		if err == nil && p.state == a2a.TaskStateCanceled {
			return p.snapshot(nil, true), nil
		}
		return nil, a2a.NewError(a2a.ErrTaskNotCancelable, "task already ended: "+string(stateOf(st)))
	}
	p, err := h.load(ctx, string(req.ID))
	if err != nil {
		return nil, err
	}
	return p.snapshot(nil, true), nil
}

// message is what a client's message asks for.
type message struct {
	text    string
	approve *bool // a data part {"approve": bool}
}

func parseMessage(m *a2a.Message) (message, error) {
	var out message
	if m == nil {
		return out, a2a.NewError(a2a.ErrInvalidParams, "message is required")
	}
	if m.ID == "" {
		return out, a2a.NewError(a2a.ErrInvalidParams, "message.messageId is required")
	}
	if m.Role != a2a.MessageRoleUser {
		return out, a2a.NewError(a2a.ErrInvalidParams, "message.role must be ROLE_USER")
	}
	if len(m.Parts) == 0 {
		return out, a2a.NewError(a2a.ErrInvalidParams, "message.parts must not be empty")
	}
	var texts []string
	for _, part := range m.Parts {
		switch c := part.Content.(type) {
		case a2a.Text:
			texts = append(texts, string(c))
		case a2a.Data:
			if obj, ok := c.Value.(map[string]any); ok {
				if v, ok := obj["approve"].(bool); ok {
					out.approve = &v
					continue
				}
			}
			return out, a2a.NewError(a2a.ErrUnsupportedContentType, "data parts other than {\"approve\": bool} are not accepted")
		case nil:
			return out, a2a.NewError(a2a.ErrInvalidParams, "a message part has no content (text, data, url or raw)")
		default:
			return out, a2a.NewError(a2a.ErrUnsupportedContentType, "only text parts are accepted (file parts are not)")
		}
	}
	out.text = strings.Join(texts, "\n")
	return out, nil
}

// approveWords answer a held tool call yes; any other text rejects it.
var approveWords = []string{"approve", "approved", "yes", "y", "ok", "allow"}

// send carries out a SendMessage: a new task (returns its id, seq 0) or
// the answer to an existing one (returns the seq of the answer's event).
func (h *handler) send(ctx context.Context, req *a2a.SendMessageRequest) (string, uint64, error) {
	if err := checkVersion(ctx); err != nil {
		return "", 0, err
	}
	if req.Config != nil && req.Config.PushConfig != nil {
		return "", 0, a2a.NewError(a2a.ErrPushNotificationNotSupported, "push notifications are not supported")
	}
	if req.Config != nil && req.Config.HistoryLength != nil && *req.Config.HistoryLength < 0 {
		return "", 0, a2a.NewError(a2a.ErrInvalidParams, "configuration.historyLength must not be negative")
	}
	msg, err := parseMessage(req.Message)
	if err != nil {
		return "", 0, err
	}
	if id := string(req.Message.TaskID); id != "" {
		return h.answer(ctx, id, req.Message.ContextID, msg)
	}
	if msg.text == "" {
		return "", 0, a2a.NewError(a2a.ErrInvalidParams, "the message has no text (the instruction)")
	}
	ctxID := req.Message.ContextID
	prev := ""
	if ctxID != "" {
		if prev, err = h.newestInContext(ctx, ctxID); err != nil {
			return "", 0, err
		}
	} else {
		ctxID = a2a.NewContextID()
	}
	sub := &dispatchv1.SubmitTaskRequest{
		Instruction: msg.text, PreviousTaskId: prev,
		Labels: map[string]string{contextLabel: ctxID},
	}
	for _, md := range []map[string]any{req.Message.Metadata, req.Metadata} {
		if p, ok := md["planner"].(string); ok && p != "" {
			sub.Planner = p
		}
		if s, ok := md["timeoutSeconds"].(float64); ok && s > 0 && s < 1<<31 {
			sub.TimeoutSeconds = int32(s)
		}
		if l, ok := md["labels"].(map[string]any); ok {
			for k, v := range l {
				if v, ok := v.(string); ok && k != contextLabel {
					sub.Labels[k] = v
				}
			}
		}
	}
	resp, err := h.b.SubmitTask(ctx, sub)
	if err != nil {
		return "", 0, toA2A(err)
	}
	return resp.GetTaskId(), 0, nil
}

// answer delivers a follow-up message to task id: the decision on its
// oldest held tool call, else a user message (call_user's answer).
func (h *handler) answer(ctx context.Context, id, ctxID string, msg message) (string, uint64, error) {
	t, err := h.getTask(ctx, id)
	if err != nil {
		return "", 0, err
	}
	if ctxID != "" && ctxID != contextOf(t) {
		return "", 0, a2a.NewError(a2a.ErrInvalidParams, "contextId does not match the task's")
	}
	p, err := h.follow(ctx, t, 0, nil, func(*projector) bool { return false }, nil)
	if err != nil {
		return "", 0, err
	}
	if p.state.Terminal() {
		return "", 0, a2a.NewError(a2a.ErrUnsupportedOperation, "task is in a terminal state ("+string(p.state)+"); send a new message with its contextId to continue")
	}
	if len(p.holds) > 0 {
		yes := msg.approve != nil && *msg.approve
		if msg.approve == nil {
			yes = slices.Contains(approveWords, strings.ToLower(strings.TrimSpace(msg.text)))
		}
		resp, err := h.b.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: id, CallId: p.holds[0].callID, Approve: yes, Reason: msg.text})
		if err != nil {
			return "", 0, toA2A(err)
		}
		return id, resp.GetSeq(), nil
	}
	if msg.text == "" {
		return "", 0, a2a.NewError(a2a.ErrInvalidParams, "the message has no text")
	}
	resp, err := h.b.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: id, Text: msg.text})
	if err != nil {
		return "", 0, toA2A(err)
	}
	return id, resp.GetSeq(), nil
}

// newestInContext is the newest task of a conversation ("" for a new one):
// the tasks labelled with it, or the task whose id it is, searched newest
// first over at most contextScanMax pages.
func (h *handler) newestInContext(ctx context.Context, ctxID string) (string, error) {
	token := ""
	for range contextScanMax {
		resp, err := h.b.ListTasks(ctx, &dispatchv1.ListTasksRequest{PageSize: contextScanPage, PageToken: token})
		if err != nil {
			return "", toA2A(err)
		}
		for _, t := range resp.GetTasks() {
			if contextOf(t) == ctxID {
				return t.GetTaskId(), nil
			}
		}
		if token = resp.GetNextPageToken(); token == "" {
			break
		}
	}
	return "", nil
}

// waiting: the task waits for the client or has ended.
func waiting(s a2a.TaskState) bool {
	return s.Terminal() || s == a2a.TaskStateInputRequired || s == a2a.TaskStateAuthRequired
}

// SendMessage implements a2asrv.RequestHandler. Blocking (the default) it
// returns the task once it ended or waits for input (after the answer this
// message gave); returnImmediately returns it at once.
func (h *handler) SendMessage(ctx context.Context, req *a2a.SendMessageRequest) (a2a.SendMessageResult, error) {
	id, after, err := h.send(ctx, req)
	if err != nil {
		return nil, err
	}
	var hl *int
	if req.Config != nil {
		hl = req.Config.HistoryLength
	}
	t, err := h.getTask(ctx, id)
	if err != nil {
		return nil, err
	}
	immediate := req.Config != nil && req.Config.ReturnImmediately
	done := func(p *projector) bool { return p.seq > after && waiting(p.state) }
	p, err := h.follow(ctx, t, 0, nil,
		func(p *projector) bool { return !immediate && !done(p) },
		func(p *projector, _ *dispatchv1.TaskEvent, _ []a2a.Event) bool { return !done(p) })
	if err != nil {
		return nil, err
	}
	return p.snapshot(hl, true), nil
}

// SendStreamingMessage implements a2asrv.RequestHandler: the Task, then
// its status and artifact updates, until it ends or waits for input (a
// follow-up message opens the next stream).
func (h *handler) SendStreamingMessage(ctx context.Context, req *a2a.SendMessageRequest) iter.Seq2[a2a.Event, error] {
	return func(yield func(a2a.Event, error) bool) {
		id, after, err := h.send(ctx, req)
		if err != nil {
			yield(nil, err)
			return
		}
		var hl *int
		if req.Config != nil {
			hl = req.Config.HistoryLength
		}
		t, err := h.getTask(ctx, id)
		if err != nil {
			yield(nil, err)
			return
		}
		// A new task's stream starts with it as submitted, an answer's with
		// the task as the answer left it: the same events whenever the
		// client's stream started.
		snapAt := after
		if req.Message.TaskID == "" {
			snapAt = 1
		}
		h.stream(ctx, t, snapAt, hl, nil, true, after, yield)
	}
}

// stream sends the snapshot, then (resume set) the replayed events after
// *resume, then the live events, until the end; stopAtInput also ends it
// when the task waits for input after seq after.
// snapAt 1 makes the snapshot that of a new task (its first event).
func (h *handler) stream(ctx context.Context, t *dispatchv1.Task, snapAt uint64, hl *int, resume *uint64, stopAtInput bool, after uint64, yield func(a2a.Event, error) bool) {
	var missed []a2a.Event
	onReplay := func(ev *dispatchv1.TaskEvent, out []a2a.Event) {
		if resume != nil && ev.GetSeq() > *resume {
			missed = append(missed, out...)
		}
	}
	onSnap := func(p *projector) bool {
		if !yield(p.snapshot(hl, true), nil) {
			return false
		}
		for _, e := range missed {
			if !yield(e, nil) {
				return false
			}
		}
		missed = nil
		return !p.state.Terminal() && !(stopAtInput && p.seq > after && waiting(p.state))
	}
	onLive := func(p *projector, ev *dispatchv1.TaskEvent, out []a2a.Event) bool {
		if resume != nil && ev.GetSeq() <= *resume {
			return true
		}
		for _, e := range out {
			if !yield(e, nil) {
				return false
			}
		}
		return !(stopAtInput && waiting(p.state))
	}
	if _, err := h.follow(ctx, t, snapAt, onReplay, onSnap, onLive); err != nil && ctx.Err() == nil {
		yield(nil, err)
	}
}

// SubscribeToTask implements a2asrv.RequestHandler: the Task first, then
// its updates until it ends. With the resume extension (ResumeParam: N)
// the events after seq N follow the snapshot, and a task that has ended
// may be subscribed to (the snapshot and the missed events, then the end).
func (h *handler) SubscribeToTask(ctx context.Context, req *a2a.SubscribeToTaskRequest) iter.Seq2[a2a.Event, error] {
	return func(yield func(a2a.Event, error) bool) {
		if err := checkVersion(ctx); err != nil {
			yield(nil, err)
			return
		}
		resume, err := resumeAfter(ctx)
		if err != nil {
			yield(nil, err)
			return
		}
		t, err := h.getTask(ctx, string(req.ID))
		if err != nil {
			yield(nil, err)
			return
		}
		if resume == nil && stateOf(t.GetStatus()).Terminal() {
			yield(nil, a2a.NewError(a2a.ErrUnsupportedOperation, "task is in a terminal state; use GetTask"))
			return
		}
		h.stream(ctx, t, 0, nil, resume, false, 0, yield)
	}
}

var errNoPush = a2a.NewError(a2a.ErrPushNotificationNotSupported, "push notifications are not supported")

// GetTaskPushConfig implements a2asrv.RequestHandler: not supported.
func (h *handler) GetTaskPushConfig(context.Context, *a2a.GetTaskPushConfigRequest) (*a2a.TaskPushConfig, error) {
	return nil, errNoPush
}

// ListTaskPushConfigs implements a2asrv.RequestHandler: not supported.
func (h *handler) ListTaskPushConfigs(context.Context, *a2a.ListTaskPushConfigRequest) ([]*a2a.TaskPushConfig, error) {
	return nil, errNoPush
}

// CreateTaskPushConfig implements a2asrv.RequestHandler: not supported.
func (h *handler) CreateTaskPushConfig(context.Context, *a2a.CreateTaskPushConfigRequest) (*a2a.TaskPushConfig, error) {
	return nil, errNoPush
}

// DeleteTaskPushConfig implements a2asrv.RequestHandler: not supported.
func (h *handler) DeleteTaskPushConfig(context.Context, *a2a.DeleteTaskPushConfigRequest) error {
	return errNoPush
}

// GetExtendedAgentCard implements a2asrv.RequestHandler: not declared.
func (h *handler) GetExtendedAgentCard(context.Context, *a2a.GetExtendedAgentCardRequest) (*a2a.AgentCard, error) {
	return nil, a2a.NewError(a2a.ErrUnsupportedOperation, "no extended agent card")
}

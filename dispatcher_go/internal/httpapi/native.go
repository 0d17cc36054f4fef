package httpapi

import (
	"context"
	"net/http"
	"strconv"
	"strings"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// listTasks: GET /api/tasks?status=RUNNING&status=PENDING&page_size=50&page_token=…
// → dispatch.v1.ListTasksResponse as JSON, newest first.
func (h *handler) listTasks(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	req := &dispatchv1.ListTasksRequest{PageToken: q.Get("page_token")}
	for _, v := range q["status"] {
		for _, name := range strings.Split(v, ",") {
			s, ok := agentpb.TaskStatus_value[strings.ToUpper(strings.TrimSpace(name))]
			if !ok {
				writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "unknown status "+strconv.Quote(name))
				return
			}
			req.Statuses = append(req.Statuses, agentpb.TaskStatus(s))
		}
	}
	if v := q.Get("page_size"); v != "" {
		n, err := strconv.ParseInt(v, 10, 32)
		if err != nil {
			writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "page_size must be an integer")
			return
		}
		req.PageSize = int32(n)
	}
	resp, err := h.b.ListTasks(r.Context(), req)
	h.reply(w, http.StatusOK, resp, err)
}

// submitTask: POST /api/tasks with a dispatch.v1.SubmitTaskRequest as JSON
// → {"task_id": …}.
func (h *handler) submitTask(w http.ResponseWriter, r *http.Request) {
	req := &dispatchv1.SubmitTaskRequest{}
	if err := h.decodeProto(w, r, req); err != nil {
		h.writeBad(w, err)
		return
	}
	resp, err := h.b.SubmitTask(r.Context(), req)
	h.reply(w, http.StatusCreated, resp, err)
}

// getTask: GET /api/tasks/{id} → dispatch.v1.Task as JSON.
func (h *handler) getTask(w http.ResponseWriter, r *http.Request) {
	resp, err := h.b.GetTask(r.Context(), &dispatchv1.GetTaskRequest{TaskId: r.PathValue("id")})
	h.reply(w, http.StatusOK, resp.GetTask(), err)
}

// cancelTask: POST /api/tasks/{id}/cancel, body {"reason": …} (optional)
// → dispatch.v1.CancelTaskResponse.
func (h *handler) cancelTask(w http.ResponseWriter, r *http.Request) {
	body, ok := strictBody[reasonBody](h, w, r)
	if !ok {
		return
	}
	resp, err := h.b.CancelTask(r.Context(), &dispatchv1.CancelTaskRequest{TaskId: r.PathValue("id"), Reason: body.Reason})
	h.reply(w, http.StatusOK, resp, err)
}

// interject: POST /api/tasks/{id}/interject, body {"text": …} → {"message_id", "seq"}.
// It is how a client answers a call_user stage.
func (h *handler) interject(w http.ResponseWriter, r *http.Request) {
	body, ok := strictBody[struct {
		Text string `json:"text"`
	}](h, w, r)
	if !ok {
		return
	}
	resp, err := h.b.Interject(r.Context(), &dispatchv1.InterjectRequest{TaskId: r.PathValue("id"), Text: body.Text})
	h.reply(w, http.StatusOK, resp, err)
}

// approve: POST /api/tasks/{id}/tool-calls/{call_id}/approve|reject, body
// {"reason": …} (optional) → {"outcome", "seq"}.
func (h *handler) approve(yes bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		body, ok := strictBody[reasonBody](h, w, r)
		if !ok {
			return
		}
		resp, err := h.b.ApproveToolCall(r.Context(), &dispatchv1.ApproveToolCallRequest{
			TaskId: r.PathValue("id"), CallId: r.PathValue("call_id"), Approve: yes, Reason: body.Reason,
		})
		h.reply(w, http.StatusOK, resp, err)
	}
}

// reasonBody is the body of cancel, approve and reject: {"reason": …},
// optional.
type reasonBody struct {
	Reason string `json:"reason"`
}

// strictBody decodes the request's JSON body (unknown fields refused; an
// empty body is {}) into a T. ok is false when it could not: the 4xx is
// written.
func strictBody[T any](h *handler, w http.ResponseWriter, r *http.Request) (body T, ok bool) {
	if err := h.decodeJSON(w, r, &body, true); err != nil {
		h.writeBad(w, err)
		return body, false
	}
	return body, true
}

// reply answers a call to the backend: resp as JSON with code, or err (a
// gRPC status) as an HTTP error.
func (h *handler) reply(w http.ResponseWriter, code int, resp proto.Message, err error) {
	if err != nil {
		h.writeStatus(w, err)
		return
	}
	writeProto(w, code, resp)
}

// events: GET /api/tasks/{id}/events — the task's events as SSE, history
// first, then live. Each event is "id: <seq>" and "data: <TaskEvent as
// JSON>"; after the terminal event comes "event: end" and the stream
// closes. Resume with the Last-Event-ID header (what EventSource sends on
// reconnect) or ?after_seq=N: events with seq > N follow, with no gap and
// no duplicate.
func (h *handler) events(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	after, err := resumePoint(r)
	if err != nil {
		h.writeBad(w, err)
		return
	}
	// Unknown ids get a JSON 404, not an empty stream; a resume point past
	// an ended task's last event a JSON 400 (OUT_OF_RANGE), not an empty
	// stream that ends as if all had been read (the stream cannot say so
	// once it has started).
	got, err := h.b.GetTask(r.Context(), &dispatchv1.GetTaskRequest{TaskId: id})
	if err != nil {
		h.writeStatus(w, err)
		return
	}
	if tk := got.GetTask(); ended(tk.GetStatus()) && after > tk.GetLastSeq() {
		h.writeStatus(w, status.Errorf(codes.OutOfRange, "after_seq %d is past the task's last event (seq %d): the task has ended", after, tk.GetLastSeq()))
		return
	}
	s := startSSE(w)
	stop := h.heartbeat(s)
	defer stop()
	err = h.b.Watch(r.Context(), id, after, func(ev *dispatchv1.TaskEvent) error {
		b, err := pj.Marshal(ev)
		if err != nil {
			return err
		}
		return s.send(strconv.FormatUint(ev.GetSeq(), 10), "", b)
	})
	h.endStream(r.Context(), s, err)
}

// endStream tells the client why the stream ends: "event: end" after the
// terminal event, "event: stream_error" when the dispatcher ended it (shutdown).
func (h *handler) endStream(ctx context.Context, s *sse, err error) {
	switch {
	case err == nil:
		_ = s.send("", "end", []byte(`{}`))
	case ctx.Err() != nil:
		// The client went away; nobody to tell.
	default:
		b, _ := pj.Marshal(&dispatchv1.ErrorSignal{Code: "stream_ended", Message: err.Error()})
		_ = s.send("", "stream_error", b)
	}
}

// resumePoint is the seq after which a stream starts: Last-Event-ID wins
// over ?after_seq= (it is the browser's own record after a reconnect).
func resumePoint(r *http.Request) (uint64, error) {
	v := r.Header.Get("Last-Event-ID")
	name := "Last-Event-ID"
	if v == "" {
		v, name = r.URL.Query().Get("after_seq"), "after_seq"
	}
	if v == "" {
		return 0, nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
	if err != nil {
		return 0, &badRequest{http.StatusBadRequest, "INVALID_ARGUMENT", name + " must be an event seq (a non-negative integer)"}
	}
	return n, nil
}

// ended reports whether s is a terminal status (the task's log is sealed).
func ended(s agentpb.TaskStatus) bool {
	return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
}

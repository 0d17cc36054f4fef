package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/lybicsandbox"
)

// lybicAuth is seed 001's LybicAuthentication object.
type lybicAuth struct {
	APIKey      string `json:"api_key"`
	OrgID       string `json:"org_id"`
	APIEndpoint string `json:"api_endpoint"`
}

// runRequest is seed 001's RunAgentRequest and SubmitTaskRequest (which
// adds max_steps), plus the dispatcher's planner, labels and
// timeout_seconds. Unknown fields are ignored, as by the seed's server.
type runRequest struct {
	Instruction      string     `json:"instruction"`
	SandboxID        string     `json:"sandbox_id"`
	UserSystemPrompt string     `json:"user_system_prompt"`
	ContinueContext  bool       `json:"continue_context"`
	TaskID           string     `json:"task_id"`
	Authentication   *lybicAuth `json:"authentication"`
	ArkAPIKey        string     `json:"ark_apikey"`
	MaxSteps         *int32     `json:"max_steps"`

	Planner        string            `json:"planner"`
	Labels         map[string]string `json:"labels"`
	TimeoutSeconds int32             `json:"timeout_seconds"`
}

// submitRequest maps a seed-001 request onto the native one:
// user_system_prompt is added to the planner's system prompt; credentials
// go into the task's running config (stored masked, see docs/operations.md),
// ark_apikey is the action generator model's key, max_steps the config's
// steps, continue_context+task_id the previous task.
func (rr *runRequest) submitRequest() (*dispatchv1.SubmitTaskRequest, error) {
	req := &dispatchv1.SubmitTaskRequest{
		Instruction:      rr.Instruction,
		Planner:          rr.Planner,
		Labels:           rr.Labels,
		TimeoutSeconds:   rr.TimeoutSeconds,
		UserSystemPrompt: rr.UserSystemPrompt,
	}
	if rr.SandboxID != "" {
		req.Sandbox = &agentpb.Sandbox{Id: rr.SandboxID}
	}
	if rr.ContinueContext {
		if rr.TaskID == "" {
			return nil, status.Error(codes.InvalidArgument, "continue_context needs task_id (the task to continue)")
		}
		req.PreviousTaskId = rr.TaskID
	}
	cfg := &agentpb.CommonConfig{}
	used := false
	if a := rr.Authentication; a != nil && (a.APIKey != "" || a.OrgID != "" || a.APIEndpoint != "") {
		cfg.AuthorizationInfo = &agentpb.Authorization{ApiKey: a.APIKey, OrgID: a.OrgID}
		if a.APIEndpoint != "" {
			cfg.AuthorizationInfo.ApiEndpoint = &a.APIEndpoint
		}
		used = true
	}
	if rr.ArkAPIKey != "" {
		k := rr.ArkAPIKey
		cfg.StageModelConfig = &agentpb.StageModelConfig{ActionGeneratorModel: &agentpb.LLMConfig{ApiKey: &k}}
		used = true
	}
	if rr.MaxSteps != nil {
		if *rr.MaxSteps <= 0 {
			return nil, status.Error(codes.InvalidArgument, "max_steps must be positive")
		}
		cfg.Steps = rr.MaxSteps
		used = true
	}
	if used {
		req.RunningConfig = cfg
	}
	return req, nil
}

func (h *handler) readRun(w http.ResponseWriter, r *http.Request) (*dispatchv1.SubmitTaskRequest, bool) {
	var rr runRequest
	if err := h.decodeJSON(w, r, &rr, false); err != nil {
		h.writeBad(w, err)
		return nil, false
	}
	req, err := rr.submitRequest()
	if err != nil {
		h.writeStatus(w, err)
		return nil, false
	}
	return req, true
}

// seedSubmit: POST /api/agent/task/submit → {"success": true, "task_id", "message"}.
func (h *handler) seedSubmit(w http.ResponseWriter, r *http.Request) {
	req, ok := h.readRun(w, r)
	if !ok {
		return
	}
	resp, err := h.b.SubmitTask(r.Context(), req)
	if err != nil {
		h.writeStatus(w, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"success": true, "task_id": resp.GetTaskId(), "message": "Task submitted successfully"})
}

// seedRun: POST /api/agent/run — submits and streams the task as SSE
// (seed 001's data: {"type": …} lines, each with id: <seq>) until it ends.
// The task id is also in the X-Task-Id header. A client that goes away
// cancels its task, as with the gRPC RunAgentInstruction.
func (h *handler) seedRun(w http.ResponseWriter, r *http.Request) {
	req, ok := h.readRun(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	resp, err := h.b.SubmitTask(ctx, req)
	if err != nil {
		h.writeStatus(w, err)
		return
	}
	id := resp.GetTaskId()
	all := allEvents(r)
	w.Header().Set("X-Task-Id", id)
	s := startSSE(w)
	stop := h.heartbeat(s)
	defer stop()
	var result string
	err = h.b.Watch(ctx, id, 0, func(ev *dispatchv1.TaskEvent) error {
		if res := ev.GetResult(); res != nil {
			result = res.GetResult()
		}
		e, ok := events.Seed001(ev, result)
		if !ok || (!all && !seedTypes[e.Type]) {
			return nil
		}
		if res := ev.GetResult(); res != nil && !all && res.GetOutcome() != dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS {
			return nil // not a result: the "error" or "cancelled" that follows says why
		}
		b, err := json.Marshal(e)
		if err != nil {
			return err
		}
		return s.send(strconv.FormatUint(ev.GetSeq(), 10), "", b)
	})
	if err != nil && ctx.Err() != nil {
		// Do not wait for the stop: the caller is gone.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 100*time.Millisecond)
		_, _ = h.b.CancelTask(cctx, &dispatchv1.CancelTaskRequest{TaskId: id, Reason: "client disconnected"})
		cancel()
		return
	}
	switch {
	case all:
		h.endStream(ctx, s, err)
	case err != nil:
		// The dispatcher ended the stream (shutdown): a seed client reads
		// only data lines with a type.
		b, _ := json.Marshal(events.Seed001Event{Type: "error", TaskID: id, Content: "stream ended: " + err.Error()})
		_ = s.send("", "", b)
	}
	// Seed mode: the terminal event ("finished", "error", "cancelled") was
	// the last line; the stream just ends, as the seed's server does.
}

// seedTypes are the event types a seed-001 client is sent by default:
// the seed's own (thinking, action, observation, result, and the terminal
// finished / error / cancelled) plus the streamed answer (message) and
// screenshots. The dispatcher's other types (status, usage, policy, stage,
// stop, user_input) and the closing "event: end" come only with
// ?events=all or the header X-Dispatcher-Events: all.
var seedTypes = map[string]bool{
	"thinking": true, "action": true, "observation": true, "result": true, "message": true,
	"screenshot": true, "artifact": true, "error": true, "finished": true, "cancelled": true,
}

// allEvents: the client asked for every event type and the closing
// "event: end" (?events=all, or X-Dispatcher-Events: all).
func allEvents(r *http.Request) bool {
	return r.URL.Query().Get("events") == "all" || strings.EqualFold(r.Header.Get("X-Dispatcher-Events"), "all")
}

// seedStatus: GET /api/agent/task/status/{id} → seed 001's
// {"task_id", "status", "query", "finished_output", "llm_context",
// "sandbox_info": {"sandbox_id"}} plus message and statistics.
func (h *handler) seedStatus(w http.ResponseWriter, r *http.Request) {
	resp, err := h.b.GetTask(r.Context(), &dispatchv1.GetTaskRequest{TaskId: r.PathValue("id")})
	if err != nil {
		h.writeStatus(w, err)
		return
	}
	t := resp.GetTask()
	out := map[string]any{
		"task_id":         t.GetTaskId(),
		"status":          events.Seed001Status(t.GetStatus()),
		"query":           t.GetInstruction(),
		"finished_output": t.GetResult(),
		"message":         t.GetMessage(),
		"llm_context":     llmContext(t),
		"sandbox_info":    nil,
		"planner":         t.GetPlanner(),
		"last_seq":        t.GetLastSeq(),
	}
	if t.GetStatus() == agentpb.TaskStatus_FAILURE {
		out["error_message"] = t.GetMessage() // the seed server's name for why
	}
	if sb := t.GetSandbox(); sb != nil {
		out["sandbox_info"] = map[string]any{"sandbox_id": sb.GetId()}
	}
	if st := t.GetStatistics(); st != nil {
		out["statistics"] = map[string]any{
			"steps": st.GetSteps(), "duration_seconds": st.GetDurationSeconds(),
			"input_tokens": st.GetInputTokens(), "output_tokens": st.GetOutputTokens(),
			"total_tokens": st.GetTotalTokens(), "cost": st.GetCost(), "currency": st.GetCurrencySymbol(),
			"models": t.GetModels(), // the models that ran
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// llmContext is seed 001's llm_context: the conversation the task ran with
// (the turns it continued from, its instruction, its result; secrets
// masked by the API layer) as {"messages": [{"role", "content"}],
// "user_system_prompt"}; null when there is none.
func llmContext(t *dispatchv1.Task) any {
	if len(t.GetConversation()) == 0 {
		return nil
	}
	msgs := make([]map[string]string, 0, len(t.GetConversation()))
	for _, c := range t.GetConversation() {
		msgs = append(msgs, map[string]string{"role": c.GetRole(), "content": c.GetContent()})
	}
	out := map[string]any{"messages": msgs}
	if p := t.GetUserSystemPrompt(); p != "" {
		out["user_system_prompt"] = p
	}
	return out
}

// seedCancel: POST /api/agent/cancel {"task_id": …} cancels one task;
// without task_id it cancels every pending and running task of the caller
// (its tenant's; an admin's: every tenant's; ListTasks lists only those).
func (h *handler) seedCancel(w http.ResponseWriter, r *http.Request) {
	var body struct {
		TaskID         string     `json:"task_id"`
		Authentication *lybicAuth `json:"authentication"`
	}
	if err := h.decodeJSON(w, r, &body, false); err != nil {
		h.writeBad(w, err)
		return
	}
	ctx := r.Context()
	if body.TaskID != "" {
		resp, err := h.b.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: body.TaskID})
		if err != nil {
			h.writeStatus(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{
			"success": resp.GetCancelled(), "task_id": body.TaskID,
			"status": events.Seed001Status(resp.GetStatus()), "message": resp.GetMessage(),
		})
		return
	}
	var ids []string
	req := &dispatchv1.ListTasksRequest{Statuses: []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING}, PageSize: 1000}
	for {
		page, err := h.b.ListTasks(ctx, req)
		if err != nil {
			h.writeStatus(w, err)
			return
		}
		for _, t := range page.GetTasks() {
			ids = append(ids, t.GetTaskId())
		}
		if page.GetNextPageToken() == "" {
			break
		}
		req.PageToken = page.GetNextPageToken()
	}
	var (
		mu        sync.Mutex
		cancelled = []string{}
		wg        sync.WaitGroup
		sem       = make(chan struct{}, 16)
	)
	for _, id := range ids {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			resp, err := h.b.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: id})
			if err == nil && resp.GetCancelled() {
				mu.Lock()
				cancelled = append(cancelled, id)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	writeJSON(w, http.StatusOK, map[string]any{
		"success": true, "cancelled": cancelled,
		"message": strconv.Itoa(len(cancelled)) + " of " + strconv.Itoa(len(ids)) + " active tasks cancelled",
	})
}

// seedSandboxCreate: POST /api/sandbox/create creates a sandbox on the
// configured Lybic sandbox API (Options.Sandboxes: the Lybic cloud, or the
// local sandbox server) with seed 001's CreateSandboxRequest: name, shape
// (default beijing-2c-4g-cpu, or the dispatcher's --sandbox-shape),
// maxLifeSeconds (1..86400, default 3600), projectId, and authentication
// {api_key, org_id} replacing the configured credentials. api_endpoint may
// only name the configured endpoint: the dispatcher does not call URLs its
// clients choose. Answers the seed server's fields.
func (h *handler) seedSandboxCreate(w http.ResponseWriter, r *http.Request) {
	var body struct {
		Name           string     `json:"name"`
		Shape          string     `json:"shape"`
		MaxLifeSeconds *int       `json:"maxLifeSeconds"`
		ProjectID      string     `json:"projectId"`
		Authentication *lybicAuth `json:"authentication"`
	}
	if err := h.decodeJSON(w, r, &body, false); err != nil {
		h.writeBad(w, err)
		return
	}
	sbx := h.opts.Sandboxes
	if sbx == nil {
		writeError(w, http.StatusNotImplemented, "UNIMPLEMENTED", "this dispatcher has no sandbox API configured (--sandbox-endpoint)")
		return
	}
	req := lybicsandbox.Request{Name: body.Name, Shape: body.Shape, ProjectID: body.ProjectID, MaxLifeSeconds: lybicsandbox.DefaultLifeSeconds}
	if m := body.MaxLifeSeconds; m != nil {
		if *m < 1 || *m > lybicsandbox.MaxLifeSeconds {
			writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "maxLifeSeconds must be between 1 and "+strconv.Itoa(lybicsandbox.MaxLifeSeconds))
			return
		}
		req.MaxLifeSeconds = *m
	}
	if len(body.Name) > 256 || len(body.Shape) > 256 || len(body.ProjectID) > 256 {
		writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "name, shape and projectId are at most 256 bytes")
		return
	}
	if a := body.Authentication; a != nil {
		if a.APIEndpoint != "" && strings.TrimRight(a.APIEndpoint, "/") != sbx.Endpoint() {
			writeError(w, http.StatusBadRequest, "INVALID_ARGUMENT", "authentication.api_endpoint must be this dispatcher's sandbox endpoint ("+sbx.Endpoint()+") or absent")
			return
		}
		req.OrgID, req.APIKey = a.OrgID, a.APIKey
	}
	sb, err := sbx.Create(r.Context(), req)
	if err != nil {
		var se *lybicsandbox.Error
		if errors.As(err, &se) {
			writeError(w, se.Status, se.Code, se.Message)
			return
		}
		h.log.Error("sandbox create", "error", err)
		writeError(w, http.StatusInternalServerError, "INTERNAL", "internal error")
		return
	}
	msg := "Sandbox " + sb.ID + " created successfully"
	if sb.Requested != "" {
		msg += " (shape " + sb.Requested + " is not offered by " + sbx.Endpoint() + "; it has shape " + sb.Shape + ")"
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"success": true, "sandbox_id": sb.ID, "name": sb.Name, "shape": sb.Shape, "os": sb.OS,
		"hardware_accelerated_encoding": sb.HardwareAcceleratedEncoding, "virtualization": sb.Virtualization,
		"architecture": sb.Architecture, "expires_at": sb.ExpiresAt, "message": msg,
	})
}

package mcp

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
	"google.golang.org/grpc/status"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// RunTaskTool is the name of the MCP tool that runs a task on our agents.
const RunTaskTool = "run_task"

// Backend is the native task API the server calls (api.Local). Its errors
// are gRPC statuses.
type Backend interface {
	SubmitTask(context.Context, *dispatchv1.SubmitTaskRequest) (*dispatchv1.SubmitTaskResponse, error)
	GetTask(context.Context, *dispatchv1.GetTaskRequest) (*dispatchv1.GetTaskResponse, error)
	CancelTask(context.Context, *dispatchv1.CancelTaskRequest) (*dispatchv1.CancelTaskResponse, error)
	// Watch calls fn for each event with seq > afterSeq until the task's end.
	Watch(ctx context.Context, taskID string, afterSeq uint64, fn func(*dispatchv1.TaskEvent) error) error
}

// Tools is the tool broker (*broker.Broker).
type Tools interface {
	Tools() (specs []*dispatchv1.ToolSpec, executors []string)
	Call(ctx context.Context, c broker.Call) broker.Result
}

// ServerOptions configure the /mcp handler.
type ServerOptions struct {
	Backend Backend
	Tools   Tools
	// Policy is the policy in force (*policy.Engine); a brokered tool
	// call is evaluated as a tool_call packet before it runs. Nil: none.
	Policy policy.Source
	// Version is announced as the server's version.
	Version string
	// Logger receives errors; nil discards.
	Logger *slog.Logger
}

// cancelWait bounds the CancelTask sent when a run_task's client went away.
const cancelWait = 5 * time.Second

// maxProgressText bounds the text of one progress notification.
const maxProgressText = 256

// NewServer returns the dispatcher's MCP endpoint: stateless streamable
// HTTP (every POST stands alone, so any replica of a fleet can answer it),
// with the tool run_task and every brokered tool. The caller mounts it
// (at /mcp) behind its auth and origin checks.
func NewServer(opts ServerOptions) http.Handler {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	h := &mcpServer{opts: opts, log: opts.Logger, have: map[string]*dispatchv1.ToolSpec{}}
	if opts.Policy != nil {
		h.pol = policy.NewSession(opts.Policy, nil)
	}
	// The SDK logs every stateless request's session at info: keep its
	// warnings and errors only.
	sdkLog := slog.New(warnOnly{opts.Logger.Handler()})
	// Prompts and resources: none, but the SDK answers their methods (with
	// empty lists), and a server that answers them must declare them (the
	// MCP conformance suite, 2026-07-28: sep-2575-server-declares-prompts-in-discover).
	// Their lists never change.
	h.srv = sdk.NewServer(&sdk.Implementation{Name: "agentdispatch", Version: opts.Version}, &sdk.ServerOptions{
		Logger: sdkLog,
		Capabilities: &sdk.ServerCapabilities{
			Logging:   &sdk.LoggingCapabilities{},
			Tools:     &sdk.ToolCapabilities{ListChanged: true},
			Prompts:   &sdk.PromptCapabilities{},
			Resources: &sdk.ResourceCapabilities{},
		},
	})
	h.srv.AddTool(&sdk.Tool{
		Name: RunTaskTool,
		Description: "Runs an instruction as a task on the dispatcher's agents and returns its result. " +
			"Progress notifications follow the task's events; cancelling the request (or closing its stream) cancels the task.",
		InputSchema: json.RawMessage(runTaskSchema),
	}, h.runTask)
	sh := sdk.NewStreamableHTTPHandler(func(*http.Request) *sdk.Server {
		h.syncTools()
		return h.srv
	}, &sdk.StreamableHTTPOptions{
		Stateless: true,
		// The HTTP API's guard checks Host and Origin for every path.
		DisableLocalhostProtection:   true,
		PropagateRequestCancellation: true,
		Logger:                       sdkLog,
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if v := r.Header.Get("MCP-Protocol-Version"); v != "" && !versionShaped(v) {
			// The SDK orders versions as strings: "bogus" sorted after
			// 2026-07-28 and was refused for a missing _meta field.
			writeRPCErrorCode(w, http.StatusBadRequest, nil, -32600, fmt.Sprintf(
				"unsupported MCP-Protocol-Version %q (supported: %s)", textcut.Shorten(v, 64), strings.Join(sdk.SupportedProtocolVersions(), ", ")))
			return
		}
		var body []byte
		if r.Method == http.MethodPost {
			var ok bool
			if body, ok = boundBatch(w, r); !ok || !checkBody(w, body) {
				return
			}
		}
		// The SDK's text/plain errors leave as JSON-RPC errors (rpcerror.go).
		ew := &rpcErrorWriter{ResponseWriter: w}
		// The request's context rides along so that a handler ends when
		// its HTTP request does, whatever the protocol version.
		sh.ServeHTTP(ew, r.WithContext(context.WithValue(r.Context(), requestKey{}, r.Context())))
		if ew.status != 0 { // the body is decoded again only for an error's id
			ew.finish(requestID(body))
		}
	})
}

type requestKey struct{}

// MaxBatch is the most JSON-RPC messages one POST may carry (a batch: only
// protocol 2025-03-26 and before; the SDK refuses batches of later ones).
// The SDK answers every message of a batch and keeps the answers until the
// client reads them: a 4 MiB batch of tools/list made ~130 MB of answers
// and minutes of CPU, held by a client that does not read.
const MaxBatch = 32

// maxBody bounds a POST's body: the SDK's own default
// (sdk.DefaultMaxRequestBodyBytes), read here first to count the batch.
const maxBody = sdk.DefaultMaxRequestBodyBytes

// boundBatch reads r's body (at most maxBody), puts it back and returns it;
// a body over maxBody, or a batch of more than MaxBatch messages, is
// answered here with a JSON-RPC error (HTTP 413 or 400) and false.
func boundBatch(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeRPCError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body larger than %d bytes", maxBody))
		} else {
			writeRPCError(w, http.StatusBadRequest, "the request body could not be read")
		}
		return nil, false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if batchOver(body, MaxBatch) {
		writeRPCError(w, http.StatusBadRequest, fmt.Sprintf("a JSON-RPC batch of more than %d messages", MaxBatch))
		return nil, false
	}
	return body, true
}

// batchOver reports whether body is a JSON array of more than limit
// elements. It decodes one element at a time into the same buffer and
// stops at limit+1, so counting a 4 MiB array of zeros allocates nothing
// like the 2 Mi elements it holds; a body that is not an array, or does not
// parse, is left to the SDK.
func batchOver(body []byte, limit int) bool {
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) == 0 || t[0] != '[' {
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if _, err := dec.Token(); err != nil {
		return false
	}
	var msg json.RawMessage
	for n := 0; dec.More(); n++ {
		if n == limit {
			return true
		}
		msg = msg[:0]
		if err := dec.Decode(&msg); err != nil {
			return false
		}
	}
	return false
}

// writeRPCError answers with a JSON-RPC "invalid request" error (-32600)
// of no id, with HTTP status code.
func writeRPCError(w http.ResponseWriter, code int, msg string) {
	b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": nil, "error": map[string]any{"code": -32600, "message": msg}})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

// requestContext is ctx ended also by the end of the HTTP request that
// carried the call (the client closed the stream).
func requestContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(ctx)
	if rc, ok := ctx.Value(requestKey{}).(context.Context); ok {
		stop := context.AfterFunc(rc, cancel)
		return ctx, func() { stop(); cancel() }
	}
	return ctx, cancel
}

type mcpServer struct {
	opts ServerOptions
	log  *slog.Logger
	srv  *sdk.Server

	polMu sync.Mutex
	pol   *policy.Session // one for all MCP calls: the per-minute limit counts them all

	mu    sync.Mutex
	specs []*dispatchv1.ToolSpec          // the broker's list last synced
	have  map[string]*dispatchv1.ToolSpec // published brokered tools

	nextCall atomic.Uint64
}

const runTaskSchema = `{"type":"object","properties":{` +
	`"instruction":{"type":"string","minLength":1,"description":"what the agent should do"},` +
	`"planner":{"type":"string","description":"the planner to run (default: the dispatcher's)"},` +
	`"previous_task_id":{"type":"string","description":"continue the conversation of this task"},` +
	`"labels":{"type":"object","additionalProperties":{"type":"string"}},` +
	`"timeout_seconds":{"type":"integer","minimum":0}},` +
	`"required":["instruction"],"additionalProperties":false}`

type runTaskArgs struct {
	Instruction    string            `json:"instruction"`
	Planner        string            `json:"planner"`
	PreviousTaskID string            `json:"previous_task_id"`
	Labels         map[string]string `json:"labels"`
	TimeoutSeconds int32             `json:"timeout_seconds"`
}

func toolError(msg string) *sdk.CallToolResult {
	return &sdk.CallToolResult{IsError: true, Content: []sdk.Content{&sdk.TextContent{Text: msg}}}
}

// runTask submits a task, reports its events as progress and returns its
// result. The call's end before the task's (notifications/cancelled, or
// the request's stream closed) cancels the task.
func (h *mcpServer) runTask(ctx context.Context, req *sdk.CallToolRequest) (*sdk.CallToolResult, error) {
	ctx, cancel := requestContext(ctx)
	defer cancel()
	var args runTaskArgs
	dec := json.NewDecoder(strings.NewReader(string(req.Params.Arguments)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&args); err != nil {
		return toolError("invalid arguments: " + err.Error()), nil
	}
	if strings.TrimSpace(args.Instruction) == "" {
		return toolError("invalid arguments: instruction is required"), nil
	}
	sub, err := h.opts.Backend.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{
		Instruction:    args.Instruction,
		Planner:        args.Planner,
		PreviousTaskId: args.PreviousTaskID,
		Labels:         args.Labels,
		TimeoutSeconds: args.TimeoutSeconds,
	})
	if err != nil {
		return toolError("submit: " + status.Convert(err).Message()), nil
	}
	taskID := sub.GetTaskId()
	token := req.Params.GetProgressToken()
	if token != nil {
		// First the task's id, so that a client can follow or cancel the
		// task by other means too; then one notification per event, its
		// progress the event's seq.
		_ = req.Session.NotifyProgress(ctx, &sdk.ProgressNotificationParams{ProgressToken: token, Progress: 0, Message: "task " + taskID})
	}
	var content strings.Builder
	err = h.opts.Backend.Watch(ctx, taskID, 0, func(ev *dispatchv1.TaskEvent) error {
		if c := ev.GetContent(); c != nil && content.Len() < 1<<20 {
			content.WriteString(c.GetText())
		}
		if token == nil {
			return nil
		}
		if msg := describe(ev); msg != "" {
			// A notification that cannot be sent (the client went away)
			// is not an error: the context's end says so.
			_ = req.Session.NotifyProgress(ctx, &sdk.ProgressNotificationParams{
				ProgressToken: token, Progress: float64(ev.GetSeq()), Message: msg,
			})
		}
		return nil
	})
	if ctx.Err() != nil {
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), cancelWait)
		_, cerr := h.opts.Backend.CancelTask(cctx, &dispatchv1.CancelTaskRequest{TaskId: taskID, Reason: "the MCP client cancelled run_task"})
		ccancel()
		if cerr != nil {
			h.log.Warn("mcp run_task: cancel after the client left failed", "task_id", taskID, "error", cerr)
		}
		return nil, ctx.Err()
	}
	if err != nil {
		return toolError(fmt.Sprintf("task %s: %s", taskID, status.Convert(err).Message())), nil
	}
	got, err := h.opts.Backend.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: taskID})
	if err != nil {
		return toolError(fmt.Sprintf("task %s: %s", taskID, status.Convert(err).Message())), nil
	}
	t := got.GetTask()
	st := strings.ToLower(agentpb.TaskStatus_name[int32(t.GetStatus())])
	result := t.GetResult()
	if result == "" {
		result = content.String()
	}
	text := result
	if text == "" {
		text = t.GetMessage()
	}
	return &sdk.CallToolResult{
		Content: []sdk.Content{&sdk.TextContent{Text: text}},
		StructuredContent: map[string]any{
			"task_id": taskID, "status": st, "result": result, "message": t.GetMessage(),
		},
		IsError: t.GetStatus() != agentpb.TaskStatus_SUCCESS,
	}, nil
}

// describe is the progress message of an event ("" for none: usage and
// thoughts are not reported).
func describe(ev *dispatchv1.TaskEvent) string {
	var s string
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_State:
		s = "status " + strings.ToLower(agentpb.TaskStatus_name[int32(k.State.GetStatus())])
		if m := k.State.GetMessage(); m != "" {
			s += ": " + m
		}
	case *dispatchv1.TaskEvent_Stage:
		s = "stage " + k.Stage.GetStage()
		if m := k.Stage.GetMessage(); m != "" {
			s += ": " + m
		}
	case *dispatchv1.TaskEvent_Content:
		if k.Content.GetText() == "" {
			return ""
		}
		s = "content: " + k.Content.GetText()
	case *dispatchv1.TaskEvent_ToolCall:
		s = "tool call " + k.ToolCall.GetToolName()
	case *dispatchv1.TaskEvent_ToolResult:
		s = "tool result " + k.ToolResult.GetResult().GetToolName()
		if e := k.ToolResult.GetResult().GetError(); e != nil {
			s += ": " + e.GetMessage()
		}
	case *dispatchv1.TaskEvent_Error:
		s = "error: " + k.Error.GetMessage()
	case *dispatchv1.TaskEvent_Stop:
		s = "stop: " + k.Stop.GetReason()
	case *dispatchv1.TaskEvent_Result:
		s = "result"
	case *dispatchv1.TaskEvent_Artifact:
		s = "artifact " + k.Artifact.GetKind()
	case *dispatchv1.TaskEvent_Policy:
		s = "policy " + strings.ToLower(k.Policy.GetAction().String()) + " " + k.Policy.GetRuleId()
	default:
		return ""
	}
	return textcut.Shorten(s, maxProgressText)
}

// syncTools publishes the broker's tools when its list changed (the list
// is replaced, never modified, on every change: comparing it is cheap).
func (h *mcpServer) syncTools() {
	specs, _ := h.opts.Tools.Tools()
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(specs) == len(h.specs) && (len(specs) == 0 || &specs[0] == &h.specs[0]) {
		return
	}
	h.specs = specs
	seen := make(map[string]bool, len(specs))
	for _, spec := range specs {
		name := spec.GetName()
		if name == RunTaskTool {
			continue
		}
		seen[name] = true
		if h.have[name] == spec {
			continue
		}
		h.have[name] = spec
		h.srv.AddTool(&sdk.Tool{Name: name, Description: spec.GetDescription(), InputSchema: inputSchema(spec)}, h.brokered(name))
	}
	var gone []string
	for name := range h.have {
		if !seen[name] {
			gone = append(gone, name)
			delete(h.have, name)
		}
	}
	if len(gone) > 0 {
		h.srv.RemoveTools(gone...)
	}
}

// inputSchema is a tool's argument schema as MCP wants it: an object
// schema (the broker checks the arguments against the tool's own schema).
func inputSchema(spec *dispatchv1.ToolSpec) any {
	var m map[string]any
	if json.Unmarshal([]byte(spec.GetParametersJsonSchema()), &m) == nil && m["type"] == "object" {
		return m
	}
	return map[string]any{"type": "object"}
}

// brokered runs a call of the brokered tool name: policy first (anything
// but allow refuses it: there is no one to approve a hold), then the
// broker with its schema check, timeout and size limit.
func (h *mcpServer) brokered(name string) sdk.ToolHandler {
	return func(ctx context.Context, req *sdk.CallToolRequest) (*sdk.CallToolResult, error) {
		ctx, cancel := requestContext(ctx)
		defer cancel()
		args := strings.TrimSpace(string(req.Params.Arguments))
		if args == "" || args == "null" {
			args = "{}"
		}
		if h.pol != nil {
			h.polMu.Lock()
			d := h.pol.Evaluate(ctx, policy.Packet{Kind: policy.KindToolCall, ToolName: name, ToolArgsJSON: args}, policy.State{Planner: "mcp"})
			h.polMu.Unlock()
			if d.Action != policy.Allow {
				return toolError(fmt.Sprintf("DENIED: policy rule %s: %s", d.RuleID, d.Reason)), nil
			}
		}
		res := h.opts.Tools.Call(ctx, broker.Call{
			SessionID:     "mcp",
			CallID:        fmt.Sprintf("mcp-%d", h.nextCall.Add(1)),
			ToolName:      name,
			ArgumentsJSON: args,
		})
		if e := res.Result.GetError(); e != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			code := strings.TrimPrefix(e.GetCode().String(), "TOOL_ERROR_CODE_")
			return toolError(code + ": " + e.GetMessage()), nil
		}
		out := res.Result.GetResultJson()
		r := &sdk.CallToolResult{Content: []sdk.Content{&sdk.TextContent{Text: out}}}
		if strings.HasPrefix(strings.TrimSpace(out), "{") {
			r.StructuredContent = json.RawMessage(out)
		}
		return r, nil
	}
}

// warnOnly passes on records at warn level and above.
type warnOnly struct{ slog.Handler }

// Enabled is false below warn.
func (w warnOnly) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelWarn && w.Handler.Enabled(ctx, l)
}

// WithAttrs keeps the filter.
func (w warnOnly) WithAttrs(as []slog.Attr) slog.Handler { return warnOnly{w.Handler.WithAttrs(as)} }

// WithGroup keeps the filter.
func (w warnOnly) WithGroup(name string) slog.Handler { return warnOnly{w.Handler.WithGroup(name)} }

// versionShaped reports whether v looks like an MCP protocol version: a
// date, YYYY-MM-DD.
func versionShaped(v string) bool {
	if len(v) != len("2025-06-18") || v[4] != '-' || v[7] != '-' {
		return false
	}
	for i, c := range []byte(v) {
		if i != 4 && i != 7 && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// config is what the model server does for a request the script does not
// cover, and how fast it does it.
type config struct {
	// Model is the id listed by /v1/models and used when a request names none.
	Model string
	// TokensPerSec paces every response; 0 sends as fast as possible.
	TokensPerSec float64
	// Tokens is the length of a generated (unscripted) answer.
	Tokens int
	// ReasoningTokens is the length of a generated reasoning part.
	ReasoningTokens int
	// FirstTokenDelay is waited before the first token (time to first token).
	FirstTokenDelay time.Duration
	// Script replays fixed turns; see Response.
	Script []Response
	// MaxRecords bounds /stats: the oldest records are dropped past it.
	MaxRecords int
	// ContextTokens, when positive, is the model's context window, answered
	// as llama-cpp-python's server does: a request whose messages hold more
	// tokens (4 bytes a token) gets, streamed, a 200 event stream that ends
	// at once with no chunk; not streamed, 400 context_length_exceeded.
	ContextTokens int
}

// Outcomes of a stream, as /stats reports them.
const (
	outcomeActive       = "active"
	outcomeCompleted    = "completed"
	outcomeClientClosed = "client_closed"
)

// streamRecord is what /stats says about one request.
type streamRecord struct {
	ID       int64  `json:"id"`
	Model    string `json:"model"`
	Stream   bool   `json:"stream"`
	Turn     int    `json:"turn"`
	LastUser string `json:"last_user,omitempty"`
	// Unix microseconds, comparable with UpstreamPacket.timestamp.
	StartUs      int64 `json:"start_us"`
	FirstChunkUs int64 `json:"first_chunk_us,omitempty"`
	EndUs        int64 `json:"end_us,omitempty"`
	// Outcome is active, completed, or client_closed (the client went away:
	// its context was cancelled or a write failed).
	Outcome       string  `json:"outcome"`
	CloseCause    string  `json:"close_cause,omitempty"`
	DurationMs    float64 `json:"duration_ms,omitempty"`
	Chunks        int     `json:"chunks"`
	Tokens        int     `json:"tokens"`
	PlannedTokens int     `json:"planned_tokens"`
}

// statsDoc is the body of GET /stats.
type statsDoc struct {
	Started        int64          `json:"started"`
	Active         int64          `json:"active"`
	Completed      int64          `json:"completed"`
	ClientClosed   int64          `json:"client_closed"`
	DroppedRecords int64          `json:"dropped_records"`
	Streams        []streamRecord `json:"streams"`
}

// server is the scripted OpenAI-compatible model.
type server struct {
	cfg config

	mu           sync.Mutex
	nextID       int64
	records      []*streamRecord
	started      int64
	active       int64
	completed    int64
	clientClosed int64
	dropped      int64
}

func newServer(cfg config) *server {
	if cfg.Model == "" {
		cfg.Model = "scripted"
	}
	if cfg.MaxRecords <= 0 {
		cfg.MaxRecords = 10000
	}
	return &server{cfg: cfg}
}

// handler routes the OpenAI endpoints and the recorder's.
func (s *server) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/chat/completions", s.chatCompletions)
	mux.HandleFunc("GET /v1/models", s.models)
	mux.HandleFunc("GET /stats", s.stats)
	mux.HandleFunc("/stats/reset", s.reset)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	return mux
}

// chatRequest is the part of an OpenAI chat request the server reads.
type chatRequest struct {
	Model    string `json:"model"`
	Messages []struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	} `json:"messages"`
	Stream        bool `json:"stream"`
	StreamOptions *struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Tools               []json.RawMessage `json:"tools"`
	MaxTokens           int               `json:"max_tokens"`
	MaxCompletionTokens int               `json:"max_completion_tokens"`
}

// text returns a message's content whether it is a string or a list of parts.
func messageText(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if json.Unmarshal(raw, &parts) == nil {
		var b strings.Builder
		for _, p := range parts {
			b.WriteString(p.Text)
		}
		return b.String()
	}
	return ""
}

// plan is what one response will send.
type plan struct {
	reasoning []string
	content   []string
	toolCalls []ToolCall
	prompt    int
}

func (p plan) completionTokens() int { return len(p.reasoning) + len(p.content) }

func (s *server) plan(req *chatRequest) (plan, int, string) {
	turn, promptChars := 0, 0
	lastUser := ""
	for _, m := range req.Messages {
		text := messageText(m.Content)
		promptChars += len(text)
		switch m.Role {
		case "assistant":
			turn++
		case "user":
			lastUser = text
		}
	}
	var p plan
	p.prompt = max(1, promptChars/4)
	if turn < len(s.cfg.Script) {
		r := s.cfg.Script[turn]
		p.reasoning = splitTokens(r.Reasoning)
		p.content = splitTokens(r.Content)
		if len(req.Tools) > 0 {
			p.toolCalls = r.ToolCalls
		}
	} else {
		p.reasoning = generated(s.cfg.ReasoningTokens)
		p.content = generated(s.cfg.Tokens)
	}
	if limit := max(req.MaxTokens, req.MaxCompletionTokens); limit > 0 {
		p.reasoning = p.reasoning[:min(len(p.reasoning), limit)]
		p.content = p.content[:min(len(p.content), limit-len(p.reasoning))]
	}
	lastUser = textcut.Prefix(lastUser, 200)
	return p, turn, lastUser
}

func writeError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(map[string]any{
		"error": map[string]any{"message": msg, "type": "invalid_request_error", "code": nil},
	})
}

func (s *server) chatCompletions(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "invalid JSON body: "+err.Error())
		return
	}
	if len(req.Messages) == 0 {
		writeError(w, http.StatusBadRequest, "messages must not be empty")
		return
	}
	if n := s.cfg.ContextTokens; n > 0 {
		prompt := 0
		for _, m := range req.Messages {
			prompt += len(messageText(m.Content))
		}
		if prompt = (prompt + 3) / 4; prompt > n {
			if req.Stream {
				w.Header().Set("Content-Type", "text/event-stream")
				w.WriteHeader(http.StatusOK)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			_ = json.NewEncoder(w).Encode(map[string]any{"error": map[string]any{
				"message": fmt.Sprintf("This model's maximum context length is %d tokens. However, you requested %d tokens (%d in the messages, None in the completion). Please reduce the length of the messages or completion.", n, prompt, prompt),
				"type":    "invalid_request_error", "param": "messages", "code": "context_length_exceeded",
			}})
			return
		}
	}
	p, turn, lastUser := s.plan(&req)
	model := req.Model
	if model == "" {
		model = s.cfg.Model
	}
	rec := s.begin(streamRecord{
		Model: model, Stream: req.Stream, Turn: turn, LastUser: lastUser,
		PlannedTokens: p.completionTokens(),
	})
	w.Header().Set("X-Scripted-Stream-Id", strconv.FormatInt(rec.ID, 10))
	var err error
	if req.Stream {
		includeUsage := req.StreamOptions != nil && req.StreamOptions.IncludeUsage
		err = s.stream(r.Context(), w, rec, model, p, includeUsage)
	} else {
		err = s.complete(r.Context(), w, rec, model, p)
	}
	s.end(rec, err)
}

// pacer releases token i at start + firstDelay + i/rate.
type pacer struct {
	start time.Time
	first time.Duration
	every time.Duration
}

// wait blocks until token i is due; an error means the client went away.
func (p pacer) wait(ctx context.Context, i int) error {
	d := time.Until(p.start.Add(p.first + time.Duration(i)*p.every))
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (s *server) pacer() pacer {
	p := pacer{start: time.Now(), first: s.cfg.FirstTokenDelay}
	if s.cfg.TokensPerSec > 0 {
		p.every = time.Duration(float64(time.Second) / s.cfg.TokensPerSec)
	}
	return p
}

// errClientGone marks a stream the client closed; the wrapped error says how.
var errClientGone = errors.New("client closed the stream")

func (s *server) stream(ctx context.Context, w http.ResponseWriter, rec *streamRecord, model string, p plan, includeUsage bool) error {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	id := fmt.Sprintf("chatcmpl-scripted-%d", rec.ID)
	created := time.Now().Unix()
	send := func(choices []any, usage map[string]any) error {
		chunk := map[string]any{
			"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
			"choices": choices,
		}
		if usage != nil {
			chunk["usage"] = usage
		}
		b, _ := json.Marshal(chunk)
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return fmt.Errorf("%w: write: %v", errClientGone, err)
		}
		if err := rc.Flush(); err != nil {
			return fmt.Errorf("%w: flush: %v", errClientGone, err)
		}
		s.sentChunk(rec)
		return nil
	}
	delta := func(d map[string]any, finish any) []any {
		return []any{map[string]any{"index": 0, "delta": d, "finish_reason": finish}}
	}
	gone := func(err error) error {
		if errors.Is(err, errClientGone) {
			return err
		}
		return fmt.Errorf("%w: %v", errClientGone, err)
	}

	if err := send(delta(map[string]any{"role": "assistant", "content": ""}, nil), nil); err != nil {
		return err
	}
	pace := s.pacer()
	i := 0
	for _, parts := range []struct {
		field  string
		tokens []string
	}{{"reasoning_content", p.reasoning}, {"content", p.content}} {
		for _, tok := range parts.tokens {
			if err := pace.wait(ctx, i); err != nil {
				return gone(err)
			}
			if err := send(delta(map[string]any{parts.field: tok}, nil), nil); err != nil {
				return err
			}
			s.sentToken(rec)
			i++
		}
	}
	finish := "stop"
	for k, c := range p.toolCalls {
		if err := pace.wait(ctx, i); err != nil {
			return gone(err)
		}
		callID := fmt.Sprintf("call_%d_%d", rec.ID, k)
		head := map[string]any{"index": k, "id": callID, "type": "function",
			"function": map[string]any{"name": c.Name, "arguments": ""}}
		if err := send(delta(map[string]any{"tool_calls": []any{head}}, nil), nil); err != nil {
			return err
		}
		args := map[string]any{"index": k, "function": map[string]any{"arguments": c.argumentsText()}}
		if err := send(delta(map[string]any{"tool_calls": []any{args}}, nil), nil); err != nil {
			return err
		}
		finish = "tool_calls"
	}
	if err := send(delta(map[string]any{}, finish), nil); err != nil {
		return err
	}
	if includeUsage {
		if err := send([]any{}, usage(p)); err != nil {
			return err
		}
	}
	if _, err := fmt.Fprint(w, "data: [DONE]\n\n"); err != nil {
		return fmt.Errorf("%w: write: %v", errClientGone, err)
	}
	if err := rc.Flush(); err != nil {
		return fmt.Errorf("%w: flush: %v", errClientGone, err)
	}
	return nil
}

func usage(p plan) map[string]any {
	c := p.completionTokens()
	return map[string]any{
		"prompt_tokens": p.prompt, "completion_tokens": c, "total_tokens": p.prompt + c,
		"completion_tokens_details": map[string]any{"reasoning_tokens": len(p.reasoning)},
	}
}

// complete answers a non-streaming request after the time the tokens take.
func (s *server) complete(ctx context.Context, w http.ResponseWriter, rec *streamRecord, model string, p plan) error {
	if n := p.completionTokens(); n > 0 {
		if err := s.pacer().wait(ctx, n-1); err != nil {
			return fmt.Errorf("%w: %v", errClientGone, err)
		}
	}
	msg := map[string]any{"role": "assistant", "content": strings.Join(p.content, "")}
	if len(p.reasoning) > 0 {
		msg["reasoning_content"] = strings.Join(p.reasoning, "")
	}
	finish := "stop"
	if len(p.toolCalls) > 0 {
		calls := make([]any, len(p.toolCalls))
		for k, c := range p.toolCalls {
			calls[k] = map[string]any{"id": fmt.Sprintf("call_%d_%d", rec.ID, k), "type": "function",
				"function": map[string]any{"name": c.Name, "arguments": c.argumentsText()}}
		}
		msg["tool_calls"] = calls
		finish = "tool_calls"
	}
	body := map[string]any{
		"id": fmt.Sprintf("chatcmpl-scripted-%d", rec.ID), "object": "chat.completion",
		"created": time.Now().Unix(), "model": model,
		"choices": []any{map[string]any{"index": 0, "message": msg, "finish_reason": finish}},
		"usage":   usage(p),
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(body); err != nil {
		return fmt.Errorf("%w: write: %v", errClientGone, err)
	}
	s.sentChunk(rec)
	s.mu.Lock()
	rec.Tokens = p.completionTokens()
	s.mu.Unlock()
	return nil
}

func (s *server) models(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{
		"object": "list",
		"data": []any{map[string]any{
			"id": s.cfg.Model, "object": "model", "created": 0, "owned_by": "scriptedllm",
		}},
	})
}

// --- the recorder ---

func nowUs() int64 { return time.Now().UnixMicro() }

func (s *server) begin(r streamRecord) *streamRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	r.ID = s.nextID
	r.StartUs = nowUs()
	r.Outcome = outcomeActive
	rec := &r
	s.records = append(s.records, rec)
	if over := len(s.records) - s.cfg.MaxRecords; over > 0 {
		clear(s.records[:over])
		s.records = s.records[over:]
		s.dropped += int64(over)
	}
	s.started++
	s.active++
	return rec
}

func (s *server) sentChunk(rec *streamRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec.Chunks++
	if rec.FirstChunkUs == 0 {
		rec.FirstChunkUs = nowUs()
	}
}

func (s *server) sentToken(rec *streamRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec.Tokens++
}

func (s *server) end(rec *streamRecord, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	rec.EndUs = nowUs()
	rec.DurationMs = float64(rec.EndUs-rec.StartUs) / 1e3
	s.active--
	if err != nil {
		rec.Outcome = outcomeClientClosed
		rec.CloseCause = err.Error()
		s.clientClosed++
		return
	}
	rec.Outcome = outcomeCompleted
	s.completed++
}

func (s *server) snapshot() statsDoc {
	s.mu.Lock()
	defer s.mu.Unlock()
	doc := statsDoc{
		Started: s.started, Active: s.active, Completed: s.completed,
		ClientClosed: s.clientClosed, DroppedRecords: s.dropped,
		Streams: make([]streamRecord, len(s.records)),
	}
	for i, r := range s.records {
		doc.Streams[i] = *r
	}
	return doc
}

func (s *server) stats(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s.snapshot())
}

// reset forgets finished and listed streams; streams still running keep
// counting in active but are no longer listed.
func (s *server) reset(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost && r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	s.mu.Lock()
	s.records = nil
	s.started, s.completed, s.clientClosed, s.dropped = s.active, 0, 0, 0
	s.mu.Unlock()
	s.stats(w, r)
}

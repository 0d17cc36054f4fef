package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// start serves cfg on a test server that is closed with the test.
func start(t *testing.T, cfg config) (*server, *httptest.Server) {
	t.Helper()
	s := newServer(cfg)
	ts := httptest.NewServer(s.handler())
	t.Cleanup(func() {
		ts.Client().Transport.(*http.Transport).CloseIdleConnections()
		ts.Close()
	})
	return s, ts
}

// chunk is the part of a chat.completion.chunk the tests read.
type chunk struct {
	Object  string `json:"object"`
	Choices []struct {
		Delta struct {
			Role             string `json:"role"`
			Content          string `json:"content"`
			ReasoningContent string `json:"reasoning_content"`
			ToolCalls        []struct {
				Index    int    `json:"index"`
				ID       string `json:"id"`
				Function struct {
					Name      string `json:"name"`
					Arguments string `json:"arguments"`
				} `json:"function"`
			} `json:"tool_calls"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
		Details          struct {
			ReasoningTokens int `json:"reasoning_tokens"`
		} `json:"completion_tokens_details"`
	} `json:"usage"`
}

func post(t *testing.T, ctx context.Context, ts *httptest.Server, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ts.URL+"/v1/chat/completions", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := ts.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// readSSE reads a whole event stream; done says whether [DONE] arrived.
func readSSE(t *testing.T, r io.Reader) (chunks []chunk, done bool) {
	t.Helper()
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			return chunks, true
		}
		var c chunk
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			t.Fatalf("bad chunk %q: %v", data, err)
		}
		chunks = append(chunks, c)
	}
	return chunks, false
}

// collect joins the streamed text of chunks.
func collect(chunks []chunk) (reasoning, content string, finish string) {
	for _, c := range chunks {
		for _, ch := range c.Choices {
			reasoning += ch.Delta.ReasoningContent
			content += ch.Delta.Content
			if ch.FinishReason != nil {
				finish = *ch.FinishReason
			}
		}
	}
	return
}

func getStats(t *testing.T, ts *httptest.Server) statsDoc {
	t.Helper()
	resp, err := ts.Client().Get(ts.URL + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc statsDoc
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	return doc
}

// settledStats is getStats once no stream is active: the handler records a
// stream's end just after its last write, so a client that has read
// everything can ask before the record says so.
func settledStats(t *testing.T, ts *httptest.Server) statsDoc {
	t.Helper()
	var doc statsDoc
	testutil.WaitFor(t, testutil.Wait, func() bool {
		doc = getStats(t, ts)
		return doc.Active == 0
	}, "no active stream in /stats")
	return doc
}

const userMsg = `"messages":[{"role":"user","content":"hello there"}]`

func TestStreamGeneratedWithUsage(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 5, ReasoningTokens: 2})
	resp := post(t, t.Context(), ts, `{"model":"m1","stream":true,"stream_options":{"include_usage":true},`+userMsg+`}`)
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	chunks, done := readSSE(t, resp.Body)
	if !done {
		t.Fatal("no [DONE]")
	}
	// role, 2 reasoning, 5 content, finish, usage.
	if len(chunks) != 10 {
		t.Fatalf("%d chunks, want 10", len(chunks))
	}
	if chunks[0].Object != "chat.completion.chunk" || chunks[0].Choices[0].Delta.Role != "assistant" {
		t.Fatalf("first chunk %+v", chunks[0])
	}
	if chunks[1].Choices[0].Delta.ReasoningContent == "" || chunks[3].Choices[0].Delta.Content == "" {
		t.Fatal("reasoning must come before content")
	}
	reasoning, content, finish := collect(chunks)
	if reasoning != "the dispatcher" || content != strings.Join(generated(5), "") || finish != "stop" {
		t.Fatalf("reasoning %q content %q finish %q", reasoning, content, finish)
	}
	u := chunks[9].Usage
	if u == nil || len(chunks[9].Choices) != 0 || u.CompletionTokens != 7 || u.Details.ReasoningTokens != 2 || u.PromptTokens < 1 {
		t.Fatalf("usage chunk %+v", chunks[9])
	}

	doc := settledStats(t, ts)
	if doc.Started != 1 || doc.Completed != 1 || doc.Active != 0 || len(doc.Streams) != 1 {
		t.Fatalf("stats %+v", doc)
	}
	r := doc.Streams[0]
	if r.Outcome != outcomeCompleted || r.Chunks != 10 || r.Tokens != 7 || r.PlannedTokens != 7 ||
		r.Model != "m1" || !r.Stream || r.LastUser != "hello there" || r.EndUs < r.StartUs || r.FirstChunkUs == 0 {
		t.Fatalf("record %+v", r)
	}
}

func TestStreamWithoutUsageOption(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 3})
	resp := post(t, t.Context(), ts, `{"stream":true,`+userMsg+`}`)
	defer resp.Body.Close()
	chunks, done := readSSE(t, resp.Body)
	if !done || len(chunks) != 5 {
		t.Fatalf("done=%v chunks=%d, want 5", done, len(chunks))
	}
	for _, c := range chunks {
		if c.Usage != nil {
			t.Fatal("usage sent without include_usage")
		}
	}
}

func TestTokenRatePacesTheStream(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 11, TokensPerSec: 100})
	began := time.Now()
	resp := post(t, t.Context(), ts, `{"stream":true,`+userMsg+`}`)
	defer resp.Body.Close()
	if _, done := readSSE(t, resp.Body); !done {
		t.Fatal("no [DONE]")
	}
	// 11 tokens at 100/s: the last is due 100 ms after the first.
	if took := time.Since(began); took < 95*time.Millisecond || took > 2*time.Second {
		t.Fatalf("took %v, want about 100ms", took)
	}
}

func TestClientCloseIsRecorded(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 1000, TokensPerSec: 200})
	ctx, cancel := context.WithCancel(t.Context())
	resp := post(t, ctx, ts, `{"stream":true,`+userMsg+`}`)
	br := bufio.NewReader(resp.Body)
	for seen := 0; seen < 4; {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if strings.HasPrefix(line, "data: ") {
			seen++
		}
	}
	closedAt := time.Now()
	cancel()
	resp.Body.Close()

	var doc statsDoc
	testutil.WaitFor(t, testutil.Wait, func() bool {
		doc = getStats(t, ts)
		return doc.ClientClosed == 1
	}, "the client's close recorded in /stats")
	if doc.Active != 0 || doc.Completed != 0 {
		t.Fatalf("stats %+v", doc)
	}
	r := doc.Streams[0]
	if r.Outcome != outcomeClientClosed || r.CloseCause == "" || r.Chunks < 4 || r.Chunks > 100 || r.Tokens >= r.PlannedTokens {
		t.Fatalf("record %+v", r)
	}
	// The server must notice within a few token intervals, not at the end of
	// the 5 s the whole answer would take.
	if lag := time.UnixMicro(r.EndUs).Sub(closedAt); lag > time.Second {
		t.Fatalf("close noticed %v after the client closed", lag)
	}
}

const script = `[
  {"reasoning": "I should add.", "content": "Let me compute.", "tool_calls": [{"name": "calculator", "arguments": {"expression": "2 + 2"}}]},
  {"content": "The answer is 4.", "tool_calls": [{"name": "echo", "arguments": "{\"text\": \"hi\"}"}]}
]`

func TestScriptReplaysTurnsAndToolCalls(t *testing.T) {
	t.Parallel()
	resps, err := parseScript([]byte(script))
	if err != nil {
		t.Fatal(err)
	}
	_, ts := start(t, config{Script: resps, Tokens: 2})
	tools := `"tools":[{"type":"function","function":{"name":"calculator","parameters":{"type":"object"}}}]`

	// Turn 0, tools offered: reasoning, content, then the tool call.
	resp := post(t, t.Context(), ts, `{"stream":true,`+tools+`,`+userMsg+`}`)
	chunks, _ := readSSE(t, resp.Body)
	resp.Body.Close()
	reasoning, content, finish := collect(chunks)
	if reasoning != "I should add." || content != "Let me compute." || finish != "tool_calls" {
		t.Fatalf("turn 0: %q %q %q", reasoning, content, finish)
	}
	var name, args, id string
	for _, c := range chunks {
		for _, ch := range c.Choices {
			for _, tc := range ch.Delta.ToolCalls {
				name += tc.Function.Name
				args += tc.Function.Arguments
				id += tc.ID
			}
		}
	}
	if name != "calculator" || args != `{"expression":"2 + 2"}` || id == "" {
		t.Fatalf("tool call %q %q %q", name, args, id)
	}

	// Turn 1 (one assistant message so far), no tools offered: content only.
	turn1 := `"messages":[{"role":"user","content":"add"},{"role":"assistant","content":"Let me compute."},` +
		`{"role":"tool","content":"4"}]`
	resp = post(t, t.Context(), ts, `{"stream":true,`+turn1+`}`)
	chunks, _ = readSSE(t, resp.Body)
	resp.Body.Close()
	if _, content, finish := collect(chunks); content != "The answer is 4." || finish != "stop" {
		t.Fatalf("turn 1: %q %q", content, finish)
	}

	// Past the script: generated text.
	turn2 := `"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"assistant","content":"c"}]`
	resp = post(t, t.Context(), ts, `{"stream":true,`+turn2+`}`)
	chunks, _ = readSSE(t, resp.Body)
	resp.Body.Close()
	if _, content, _ := collect(chunks); content != "the dispatcher" {
		t.Fatalf("turn 2: %q", content)
	}
	if turns := getStats(t, ts).Streams; turns[0].Turn != 0 || turns[1].Turn != 1 || turns[2].Turn != 2 {
		t.Fatalf("turns %+v", turns)
	}
}

func TestNonStreaming(t *testing.T) {
	t.Parallel()
	resps, _ := parseScript([]byte(script))
	_, ts := start(t, config{Script: resps})
	resp := post(t, t.Context(), ts, `{"model":"x","tools":[{"type":"function"}],`+
		`"messages":[{"role":"user","content":[{"type":"text","text":"parts"}]}]}`)
	defer resp.Body.Close()
	var body struct {
		Object  string `json:"object"`
		Choices []struct {
			Message struct {
				Content          string `json:"content"`
				ReasoningContent string `json:"reasoning_content"`
				ToolCalls        []struct {
					Function struct{ Name, Arguments string } `json:"function"`
				} `json:"tool_calls"`
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage struct {
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	m := body.Choices[0].Message
	if body.Object != "chat.completion" || m.Content != "Let me compute." || m.ReasoningContent != "I should add." ||
		len(m.ToolCalls) != 1 || m.ToolCalls[0].Function.Name != "calculator" || body.Choices[0].FinishReason != "tool_calls" ||
		body.Usage.CompletionTokens != 6 {
		t.Fatalf("body %+v", body)
	}
	if r := settledStats(t, ts).Streams[0]; r.Stream || r.Outcome != outcomeCompleted || r.LastUser != "parts" {
		t.Fatalf("record %+v", r)
	}
}

func TestMaxTokensCapsTheAnswer(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 50, ReasoningTokens: 2})
	resp := post(t, t.Context(), ts, `{"stream":true,"max_tokens":5,`+userMsg+`}`)
	defer resp.Body.Close()
	chunks, _ := readSSE(t, resp.Body)
	reasoning, content, _ := collect(chunks)
	if len(splitTokens(reasoning)) != 2 || len(splitTokens(content)) != 3 {
		t.Fatalf("reasoning %q content %q", reasoning, content)
	}
}

func TestModelsErrorsAndReset(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Model: "bench-model", Tokens: 1})
	resp, err := ts.Client().Get(ts.URL + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var models struct {
		Data []struct{ ID string } `json:"data"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&models)
	resp.Body.Close()
	if len(models.Data) != 1 || models.Data[0].ID != "bench-model" {
		t.Fatalf("models %+v", models)
	}

	for _, body := range []string{`{not json`, `{"stream":true}`} {
		resp := post(t, t.Context(), ts, body)
		var e struct {
			Error struct{ Message string } `json:"error"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&e)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || e.Error.Message == "" {
			t.Fatalf("%s: status %d, error %+v", body, resp.StatusCode, e)
		}
	}

	resp = post(t, t.Context(), ts, `{"stream":true,`+userMsg+`}`)
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if doc := getStats(t, ts); doc.Started != 1 {
		t.Fatalf("stats before reset %+v", doc)
	}
	resp, err = ts.Client().Post(ts.URL+"/stats/reset", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if doc := getStats(t, ts); doc.Started != 0 || len(doc.Streams) != 0 {
		t.Fatalf("stats after reset %+v", doc)
	}
}

func TestRecordsAreBounded(t *testing.T) {
	t.Parallel()
	_, ts := start(t, config{Tokens: 0, MaxRecords: 3})
	for range 5 {
		resp := post(t, t.Context(), ts, `{"stream":true,`+userMsg+`}`)
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	doc := settledStats(t, ts)
	if len(doc.Streams) != 3 || doc.DroppedRecords != 2 || doc.Started != 5 || doc.Streams[0].ID != 3 {
		t.Fatalf("stats %+v", doc)
	}
}

func TestParseScript(t *testing.T) {
	t.Parallel()
	if r, err := parseScript([]byte(`{"responses":[{"content":"a"}]}`)); err != nil || len(r) != 1 || r[0].Content != "a" {
		t.Fatalf("object form: %v %v", r, err)
	}
	for _, bad := range []string{
		`{"responses": 3}`,
		`[{"tool_calls":[{"arguments":{}}]}]`,
		`[{"tool_calls":[{"name":"x","arguments":"not json"}]}]`,
	} {
		if _, err := parseScript([]byte(bad)); err == nil {
			t.Errorf("parseScript(%s) succeeded", bad)
		}
	}
}

func TestSplitTokensRoundTrips(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"", "one", "Hello world", "  lead\nand  trail  ", "日本語 テキスト"} {
		toks := splitTokens(s)
		if strings.Join(toks, "") != s {
			t.Errorf("splitTokens(%q) = %q", s, toks)
		}
	}
	if got := splitTokens("a b c"); len(got) != 3 || got[1] != " b" {
		t.Errorf("splitTokens(a b c) = %q", got)
	}
}

// TestContextWindowAnswersAsLlamaCpp: a prompt over --context-tokens gets
// an empty 200 stream (streamed) or 400 context_length_exceeded.
func TestContextWindowAnswersAsLlamaCpp(t *testing.T) {
	_, ts := start(t, config{Model: "m", Tokens: 2, ContextTokens: 10})
	long := `{"model":"x","messages":[{"role":"user","content":"` + strings.Repeat("word ", 20) + `"}]`
	resp := post(t, t.Context(), ts, long+`,"stream":true}`)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || len(b) != 0 {
		t.Fatalf("streamed: %d %q", resp.StatusCode, b)
	}
	resp = post(t, t.Context(), ts, long+`}`)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.Contains(string(b), "maximum context length is 10 tokens") || !strings.Contains(string(b), "context_length_exceeded") {
		t.Fatalf("not streamed: %d %s", resp.StatusCode, b)
	}
	resp = post(t, t.Context(), ts, `{"model":"x","messages":[{"role":"user","content":"hi"}],"stream":true}`)
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(b), "[DONE]") {
		t.Fatalf("short prompt: %d %s", resp.StatusCode, b)
	}
}

package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"unicode"
)

// Response is one scripted model turn. Which turn a request gets is the number
// of assistant messages already in its conversation, so a planner that loops
// model → tool → model replays the script in order, and concurrent
// conversations do not disturb one another.
type Response struct {
	// Reasoning is streamed first, as delta.reasoning_content.
	Reasoning string `json:"reasoning,omitempty"`
	// Content is streamed next, as delta.content.
	Content string `json:"content,omitempty"`
	// ToolCalls are emitted last, only when the request offers tools.
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
}

// ToolCall is a function call the scripted model makes.
type ToolCall struct {
	Name string `json:"name"`
	// Arguments is a JSON object, or a string that holds one (as OpenAI sends).
	Arguments json.RawMessage `json:"arguments,omitempty"`
}

// argumentsText returns the arguments as the JSON text OpenAI puts in
// function.arguments.
func (c ToolCall) argumentsText() string {
	raw := bytes.TrimSpace(c.Arguments)
	if len(raw) == 0 {
		return "{}"
	}
	if raw[0] == '"' {
		var s string
		if json.Unmarshal(raw, &s) == nil {
			return s
		}
	}
	var buf bytes.Buffer
	if json.Compact(&buf, raw) == nil {
		return buf.String()
	}
	return string(raw)
}

// loadScript reads a script file: a JSON array of responses, or an object
// {"responses": [...]}.
func loadScript(path string) ([]Response, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseScript(b)
}

func parseScript(b []byte) ([]Response, error) {
	b = bytes.TrimSpace(b)
	var list []Response
	var err error
	if len(b) > 0 && b[0] == '{' {
		var doc struct {
			Responses []Response `json:"responses"`
		}
		err = json.Unmarshal(b, &doc)
		list = doc.Responses
	} else {
		err = json.Unmarshal(b, &list)
	}
	if err != nil {
		return nil, fmt.Errorf("script: %w", err)
	}
	for i, r := range list {
		for j, c := range r.ToolCalls {
			if c.Name == "" {
				return nil, fmt.Errorf("script: response %d, tool call %d: no name", i, j)
			}
			if !json.Valid([]byte(c.argumentsText())) {
				return nil, fmt.Errorf("script: response %d, tool call %d: arguments are not JSON", i, j)
			}
		}
	}
	return list, nil
}

// splitTokens cuts text into stream pieces the way a tokenizer roughly does:
// each piece is a word with the whitespace before it. Joined, the pieces give
// back text exactly.
func splitTokens(text string) []string {
	var out []string
	start := 0
	inWord := false
	for i, r := range text {
		space := unicode.IsSpace(r)
		if inWord && space {
			out = append(out, text[start:i])
			start = i
		}
		inWord = !space
	}
	if start < len(text) {
		out = append(out, text[start:])
	}
	return out
}

// words are the generated tokens when no script says otherwise.
var words = strings.Fields("the dispatcher relays every token of the model to each client " +
	"that watches the task and stops the stream at once when asked")

// generated returns n tokens of filler text.
func generated(n int) []string {
	out := make([]string, n)
	for i := range out {
		w := words[i%len(words)]
		if i > 0 {
			w = " " + w
		}
		out[i] = w
	}
	return out
}

package a2a

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	a2apb "github.com/a2aproject/a2a-go/v2/a2apb/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// rpcCode posts body to /a2a (url may add a query) with headers and
// returns the JSON-RPC error code of the answer (0: none).
func rpcCode(t *testing.T, s *Server, url, body string, headers map[string]string) int {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	var resp struct {
		Error struct{ Code int } `json:"error"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil {
		t.Fatalf("answer is not JSON: %q", rec.Body.String())
	}
	return resp.Error.Code
}

// Params that are JSON but not what the method takes are InvalidParams
// (-32602), not ParseError (-32700, for a body that is not JSON): found by
// the A2A TCK (tasks_list: an invalid statusTimestampAfter; pageSize 0,
// below the minimum of 1).
func TestBadParamsAreInvalidParams(t *testing.T) {
	s := New(nil, Options{})
	v1h := map[string]string{"A2A-Version": "1.0"}
	for name, params := range map[string]string{
		"timestamp":  `{"statusTimestampAfter":"-1"}`,
		"pageSize 0": `{"pageSize":0}`,
	} {
		body := `{"jsonrpc":"2.0","id":"1","method":"ListTasks","params":` + params + `}`
		if code := rpcCode(t, s, "http://127.0.0.1/a2a", body, v1h); code != -32602 {
			t.Errorf("%s: code %d, want -32602", name, code)
		}
	}
	// A body that is not JSON stays a parse error.
	if code := rpcCode(t, s, "http://127.0.0.1/a2a", `{"jsonrpc":"2.0","method":"ListTasks","params":{`, v1h); code != -32700 {
		t.Errorf("malformed JSON: code %d, want -32700", code)
	}
}

// A body that is not one JSON-RPC request object gets the envelope's
// error codes on both bindings (1.0 and 0.3), never InvalidParams, which
// is for a method's params: a2a-go answered a batch, a string body, a
// method of another type and id 1e400 with -32602, served a request
// followed by garbage, and answered a request without params with
// ParseError (-32700). Found by the black-box attack run.
func TestEnvelopeErrorsUseTheJSONRPCCodes(t *testing.T) {
	s := New(nil, Options{})
	for _, bind := range []struct {
		name, get string
		headers   map[string]string
	}{{"1.0", "GetTask", map[string]string{"A2A-Version": "1.0"}}, {"0.3", "tasks/get", nil}} {
		for name, c := range map[string]struct {
			body string
			code int
		}{
			"trailing garbage": {`{"jsonrpc":"2.0","id":1,"method":"` + bind.get + `","params":{"id":"x"}} junk`, -32700},
			"too deep":         {`{"jsonrpc":"2.0","id":1,"method":"x","params":` + strings.Repeat("[", 20000) + strings.Repeat("]", 20000) + `}`, -32700},
			"a string":         {`"hello"`, -32600},
			"a number":         {`5`, -32600},
			"empty batch":      {`[]`, -32600},
			"batch":            {`[{"jsonrpc":"2.0","id":1,"method":"` + bind.get + `","params":{"id":"x"}}]`, -32600},
			"method a number":  {`{"jsonrpc":"2.0","id":1,"method":5}`, -32600},
			"id 1e400":         {`{"jsonrpc":"2.0","id":1e400,"method":"` + bind.get + `","params":{"id":"x"}}`, -32600},
			"id an object":     {`{"jsonrpc":"2.0","id":{},"method":"` + bind.get + `","params":{"id":"x"}}`, -32600},
			"no params":        {`{"jsonrpc":"2.0","id":1,"method":"` + bind.get + `"}`, -32602},
			"unknown method":   {`{"jsonrpc":"2.0","id":1,"method":"nope"}`, -32601},
		} {
			if code := rpcCode(t, s, "http://127.0.0.1/a2a", c.body, bind.headers); code != c.code {
				t.Errorf("%s %s: code %d, want %d", bind.name, name, code, c.code)
			}
		}
	}
	// A part with no content was "only text parts are accepted (file parts
	// are not)", ContentTypeNotSupported; a negative historyLength in
	// SendMessage's configuration was taken (GetTask refuses it).
	v1h := map[string]string{"A2A-Version": "1.0"}
	msg := `"message":{"messageId":"m","role":"ROLE_USER","parts":[{"text":"hi"}]}`
	for name, params := range map[string]string{
		"empty part":       `{"message":{"messageId":"m","role":"ROLE_USER","parts":[{"bogus":1}]}}`,
		"history negative": `{` + msg + `,"configuration":{"historyLength":-5}}`,
	} {
		body := `{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":` + params + `}`
		if code := rpcCode(t, s, "http://127.0.0.1/a2a", body, v1h); code != -32602 {
			t.Errorf("%s: code %d, want -32602", name, code)
		}
	}
	// Over the bound: 413, InvalidRequest (it was ParseError with 200).
	big := `{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"` + strings.Repeat("x", maxBodyBytes) + `"}}`
	req := httptest.NewRequest(http.MethodPost, "http://127.0.0.1/a2a", strings.NewReader(big))
	req.Header.Set("A2A-Version", "1.0")
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	if rec.Code != http.StatusRequestEntityTooLarge || !strings.Contains(rec.Body.String(), `"code":-32600`) {
		t.Fatalf("oversized body: %d %s", rec.Code, rec.Body.String())
	}
}

// The version may come as a request parameter instead of the header
// (spec §3.6.1): ?A2A-Version=2.0 is refused as unsupported rather than
// served by the 0.3 binding (where GetTask is no method).
func TestVersionAsRequestParameter(t *testing.T) {
	s := New(nil, Options{})
	body := `{"jsonrpc":"2.0","id":1,"method":"GetTask","params":{"id":"x"}}`
	if code := rpcCode(t, s, "http://127.0.0.1/a2a?A2A-Version=2.0", body, nil); code != -32009 {
		t.Fatalf("?A2A-Version=2.0: code %d, want -32009 (VersionNotSupported)", code)
	}
}

// The gRPC binding refuses a negative history_length as the JSON-RPC one
// does, although a2a-go's conversion reads it as unset: found by the A2A
// TCK on gRPC (tasks_list). A page_size of 0 is "unset" (a2a-go's client
// sends 0 for a request without one).
func TestGRPCRefusesBadListParams(t *testing.T) {
	ctx, g, _ := stack(t)
	c := a2apb.NewA2AServiceClient(g.Conn)
	ctx = metadata.AppendToOutgoingContext(ctx, "a2a-version", "1.0")
	neg, zero := int32(-1), int32(0)
	if _, err := c.ListTasks(ctx, &a2apb.ListTasksRequest{HistoryLength: &neg}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListTasks history_length -1: %v, want InvalidArgument", err)
	}
	if _, err := c.ListTasks(ctx, &a2apb.ListTasksRequest{PageSize: &zero}); err != nil {
		t.Errorf("ListTasks page_size 0 (a2a-go's client's unset): %v", err)
	}
	if _, err := c.GetTask(ctx, &a2apb.GetTaskRequest{Id: "x", HistoryLength: &neg}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("GetTask history_length -1: %v, want InvalidArgument", err)
	}
	// Found by the black-box attack run: a status TaskState does not define
	// listed every task; a negative history_length in SendMessage's
	// configuration was dropped and the message sent.
	if _, err := c.ListTasks(ctx, &a2apb.ListTasksRequest{Status: 99}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("ListTasks status 99: %v, want InvalidArgument", err)
	}
	msg := &a2apb.Message{MessageId: "m", Role: a2apb.Role_ROLE_USER, Parts: []*a2apb.Part{{Content: &a2apb.Part_Text{Text: "x"}}}}
	cfg := &a2apb.SendMessageConfiguration{HistoryLength: &neg}
	if _, err := c.SendMessage(ctx, &a2apb.SendMessageRequest{Message: msg, Configuration: cfg}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("SendMessage history_length -1: %v, want InvalidArgument", err)
	}
	s, err := c.SendStreamingMessage(ctx, &a2apb.SendMessageRequest{Message: msg, Configuration: cfg})
	if err == nil {
		_, err = s.Recv()
	}
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("SendStreamingMessage history_length -1: %v, want InvalidArgument", err)
	}
}

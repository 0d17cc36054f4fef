package a2a

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/a2aproject/a2a-go/v2/a2a"
)

// paramTypes are the request types of the JSON-RPC 1.x binding's
// non-streaming methods, for checkParams.
var paramTypes = map[string]func() any{
	"SendMessage":                      func() any { return new(a2a.SendMessageRequest) },
	"GetTask":                          func() any { return new(a2a.GetTaskRequest) },
	"ListTasks":                        func() any { return new(a2a.ListTasksRequest) },
	"CancelTask":                       func() any { return new(a2a.CancelTaskRequest) },
	"GetTaskPushNotificationConfig":    func() any { return new(a2a.GetTaskPushConfigRequest) },
	"CreateTaskPushNotificationConfig": func() any { return new(a2a.CreateTaskPushConfigRequest) },
	"ListTaskPushNotificationConfigs":  func() any { return new(a2a.ListTaskPushConfigRequest) },
	"DeleteTaskPushNotificationConfig": func() any { return new(a2a.DeleteTaskPushConfigRequest) },
}

// checkParams answers a JSON-RPC request whose body is JSON but whose
// params its method cannot take with InvalidParams (-32602), and reports
// whether it did. a2a-go's binding answers a value it cannot read (a
// statusTimestampAfter that is not RFC 3339, ...) with ParseError
// (-32700), which JSON-RPC 2.0 reserves for a body that is not JSON. It
// also refuses ListTasks pageSize 0 (the minimum is 1), which the SDK's
// int cannot tell from an absent one. Otherwise the body is left for the
// SDK as it was read (a read error, such as the size bound, included).
func checkParams(w http.ResponseWriter, r *http.Request) bool {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		r.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), errReader{err}))
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	var env struct {
		ID     json.RawMessage `json:"id"`
		Method string          `json:"method"`
		Params json.RawMessage `json:"params"`
	}
	if json.Unmarshal(body, &env) != nil || len(env.Params) == 0 {
		return false // not JSON, or not a request: the SDK's errors
	}
	mk, ok := paramTypes[env.Method]
	if !ok {
		return false
	}
	var id any
	if json.Unmarshal(env.ID, &id) != nil {
		return false
	}
	switch id.(type) {
	case string, float64, nil:
	default:
		return false // an invalid id: the SDK's InvalidRequest
	}
	msg := ""
	if err := json.Unmarshal(env.Params, mk()); err != nil {
		var syn *json.SyntaxError
		if errors.As(err, &syn) {
			return false
		}
		msg = "invalid params: " + err.Error()
	} else if env.Method == "ListTasks" {
		var ps struct {
			PageSize *int `json:"pageSize"`
		}
		if json.Unmarshal(env.Params, &ps) == nil && ps.PageSize != nil && *ps.PageSize == 0 {
			msg = "pageSize must be 1..100"
		}
	}
	if msg == "" {
		return false
	}
	b, _ := json.Marshal(map[string]any{
		"jsonrpc": "2.0", "id": id,
		"error": map[string]any{"code": -32602, "message": msg},
	})
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(b)
	return true
}

type errReader struct{ err error }

func (e errReader) Read([]byte) (int, error) { return 0, e.err }

// needParams are the methods (of both bindings) whose params are a
// request object: without params they are InvalidParams. a2a-go reads
// the absent params as empty JSON and answers ParseError.
var needParams = map[string]bool{
	"SendMessage": true, "SendStreamingMessage": true, "GetTask": true, "CancelTask": true,
	"SubscribeToTask": true, "GetTaskPushNotificationConfig": true,
	"CreateTaskPushNotificationConfig": true, "ListTaskPushNotificationConfigs": true,
	"DeleteTaskPushNotificationConfig": true,
	"message/send":                     true, "message/stream": true, "tasks/get": true, "tasks/cancel": true,
	"tasks/resubscribe": true, "tasks/pushNotificationConfig/get": true,
	"tasks/pushNotificationConfig/set": true, "tasks/pushNotificationConfig/list": true,
	"tasks/pushNotificationConfig/delete": true,
}

// checkEnvelope answers, with the error JSON-RPC 2.0 gives it, a POST
// body that is not one well-formed request object, and reports whether
// it did; otherwise the body is left for the SDK as it was read. a2a-go
// decodes only the body's first JSON value and answers a value that is
// not an object (a batch array, a string), a method that is not a string
// and an id it cannot hold (1e400) with InvalidParams (-32602), meant for
// a method's params; serves a request followed by garbage; answers a
// request without params ParseError (-32700), meant for a body that is
// not JSON; and a body over the bound ParseError too. Here: over the
// bound → HTTP 413 and InvalidRequest; not JSON (trailing data
// included) → ParseError; not an object, an empty or any batch (this
// server takes none), a method that is not a string, an id that is not a
// string, number or null → InvalidRequest; a method of needParams
// without params → InvalidParams.
func checkEnvelope(w http.ResponseWriter, r *http.Request) bool {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeRPCError(w, http.StatusRequestEntityTooLarge, nil, -32600,
				fmt.Sprintf("request body larger than %d bytes", tooBig.Limit))
			return true
		}
		r.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body), errReader{err}))
		return false
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	if !json.Valid(body) {
		writeRPCError(w, http.StatusOK, nil, -32700, "parse error: the body is not one JSON value")
		return true
	}
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	switch {
	case trimmed[0] == '[':
		writeRPCError(w, http.StatusOK, nil, -32600, "invalid request: batches are not supported, send one request object")
		return true
	case trimmed[0] != '{':
		writeRPCError(w, http.StatusOK, nil, -32600, "invalid request: the body must be a JSON-RPC request object")
		return true
	}
	var env map[string]json.RawMessage
	if json.Unmarshal(body, &env) != nil {
		return false
	}
	var id any
	if raw, ok := env["id"]; ok {
		if err := json.Unmarshal(raw, &id); err != nil {
			writeRPCError(w, http.StatusOK, nil, -32600, "invalid request: id must be a string, a number or null")
			return true
		}
		switch id.(type) {
		case string, float64, nil:
		default:
			writeRPCError(w, http.StatusOK, nil, -32600, "invalid request: id must be a string, a number or null")
			return true
		}
	}
	var method string
	if raw, ok := env["method"]; ok && json.Unmarshal(raw, &method) != nil {
		writeRPCError(w, http.StatusOK, id, -32600, "invalid request: method must be a string")
		return true
	}
	if _, ok := env["params"]; needParams[method] && !ok {
		writeRPCError(w, http.StatusOK, id, -32602, "invalid params: "+method+" needs params (a request object)")
		return true
	}
	return false
}

func writeRPCError(w http.ResponseWriter, status int, id any, code int, msg string) {
	b, _ := json.Marshal(map[string]any{
		"jsonrpc": "2.0", "id": id,
		"error": map[string]any{"code": code, "message": msg},
	})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

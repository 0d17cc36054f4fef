package a2a

import (
	"bytes"
	"encoding/json"
	"errors"
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

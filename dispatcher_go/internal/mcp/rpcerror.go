package mcp

import (
	"bytes"
	"encoding/json"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/modelcontextprotocol/go-sdk/jsonrpc"
	sdk "github.com/modelcontextprotocol/go-sdk/mcp"
)

// The SDK answers a POST it cannot take (a body that is not JSON, a message
// that is not JSON-RPC, an id it cannot represent such as 1e400, a method
// it does not serve) with net/http's text/plain http.Error. Clients of an
// MCP endpoint read JSON-RPC: these answers are made JSON-RPC errors here,
// with the SDK's HTTP status and message. A body the SDK's own decoder
// (jsonrpc.DecodeMessage, as its readBatch uses it) refuses is answered
// before the SDK sees it: -32700 when it is not JSON at all, -32600
// otherwise. Any other text/plain error the SDK writes is rewritten as it
// leaves (rpcErrorWriter): -32601 when its message is the SDK's "method
// not handled" (jsonrpc2.ErrNotHandled's text, "JSON RPC not handled"),
// -32600 for the rest; should a later SDK word it otherwise, that
// error stays JSON-RPC, only with -32600.

// sdkNotHandled is the text of the SDK's jsonrpc2.ErrNotHandled (internal
// to the SDK), which starts its "unknown method" error.
const sdkNotHandled = "JSON RPC not handled"

// checkBody answers body with a JSON-RPC error, and returns false, when the
// SDK would refuse it as malformed.
func checkBody(w http.ResponseWriter, body []byte) bool {
	if !json.Valid(body) {
		writeRPCErrorCode(w, http.StatusBadRequest, nil, jsonrpc.CodeParseError, "parse error: the body is not JSON")
		return false
	}
	msgs := []json.RawMessage{body}
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) > 0 && t[0] == '[' {
		msgs = nil
		if json.Unmarshal(body, &msgs) != nil || len(msgs) == 0 {
			writeRPCErrorCode(w, http.StatusBadRequest, nil, jsonrpc.CodeInvalidRequest, "invalid request: an empty batch")
			return false
		}
	}
	for _, m := range msgs {
		dm, err := jsonrpc.DecodeMessage(m)
		if err != nil {
			writeRPCErrorCode(w, http.StatusBadRequest, nil, jsonrpc.CodeInvalidRequest, "invalid request: "+err.Error())
			return false
		}
		if !integralID(m) {
			writeRPCErrorCode(w, http.StatusBadRequest, nil, jsonrpc.CodeInvalidRequest, "invalid request: a numeric id must be an integer")
			return false
		}
		// The SDK answers initialize params it cannot read with error
		// code 0 (its unmarshal error is no JSON-RPC error there).
		if r, ok := dm.(*jsonrpc.Request); ok && r.Method == "initialize" && len(r.Params) > 0 && r.ID.IsValid() {
			var p sdk.InitializeParams
			if err := json.Unmarshal(r.Params, &p); err != nil {
				writeRPCErrorCode(w, http.StatusBadRequest, r.ID.Raw(), jsonrpc.CodeInvalidParams, "invalid params: initialize: "+err.Error())
				return false
			}
		}
	}
	return true
}

// integralID reports whether msg's id, if a number, is an integer that an
// int64 holds: the SDK keeps a numeric id as an int64, so it answered id
// 1.5 with id 1, an answer the client cannot match to its request.
func integralID(msg json.RawMessage) bool {
	var env struct {
		ID json.RawMessage `json:"id"`
	}
	if json.Unmarshal(msg, &env) != nil || len(env.ID) == 0 {
		return true
	}
	c := env.ID[0]
	if c != '-' && (c < '0' || c > '9') {
		return true // a string or null: not a number
	}
	if _, err := strconv.ParseInt(string(env.ID), 10, 64); err == nil {
		return true
	}
	f, err := strconv.ParseFloat(string(env.ID), 64)
	return err == nil && f == math.Trunc(f) && math.Abs(f) < 1<<63
}

// requestID is the id of body when it is one request (else nil: null).
func requestID(body []byte) any {
	if m, err := jsonrpc.DecodeMessage(body); err == nil {
		if r, ok := m.(*jsonrpc.Request); ok && r.ID.IsValid() {
			return r.ID.Raw()
		}
	}
	return nil
}

// writeRPCErrorCode answers with a JSON-RPC error of id (nil: null) and
// code, with HTTP status.
func writeRPCErrorCode(w http.ResponseWriter, status int, id any, code int64, msg string) {
	b, _ := json.Marshal(map[string]any{"jsonrpc": "2.0", "id": id, "error": map[string]any{"code": code, "message": msg}})
	h := w.Header()
	h.Del("Content-Length")
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// rpcErrorWriter passes the SDK's answer through, except a text/plain
// error (status >= 400), which it keeps to be rewritten by finish.
type rpcErrorWriter struct {
	http.ResponseWriter
	status  int // a text/plain error's, kept; 0: passing through
	started bool
	text    bytes.Buffer
}

func (e *rpcErrorWriter) WriteHeader(code int) {
	if !e.started && code >= 400 && strings.HasPrefix(e.Header().Get("Content-Type"), "text/plain") {
		e.started, e.status = true, code
		return
	}
	e.started = true
	e.ResponseWriter.WriteHeader(code)
}

func (e *rpcErrorWriter) Write(b []byte) (int, error) {
	if !e.started {
		e.WriteHeader(http.StatusOK)
	}
	if e.status != 0 {
		if e.text.Len() < 4096 {
			e.text.Write(b)
		}
		return len(b), nil
	}
	return e.ResponseWriter.Write(b)
}

// Flush lets the SDK's event streams through (a kept error is not flushed).
func (e *rpcErrorWriter) Flush() {
	if e.status != 0 {
		return
	}
	if f, ok := e.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// Unwrap serves http.ResponseController.
func (e *rpcErrorWriter) Unwrap() http.ResponseWriter { return e.ResponseWriter }

// finish writes the kept error, if any, as a JSON-RPC error of id.
func (e *rpcErrorWriter) finish(id any) {
	if e.status == 0 {
		return
	}
	msg := strings.TrimSpace(e.text.String())
	code := int64(jsonrpc.CodeInvalidRequest)
	if strings.Contains(msg, sdkNotHandled) {
		code = jsonrpc.CodeMethodNotFound
	}
	writeRPCErrorCode(e.ResponseWriter, e.status, id, code, msg)
}

package httpapi

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// pj renders protobuf messages as JSON with the proto field names
// (snake_case), as the seed-001 shapes are.
var pj = protojson.MarshalOptions{UseProtoNames: true}

// httpStatus maps gRPC codes (how the API layer reports every error) to
// HTTP statuses.
var httpStatus = map[codes.Code]int{
	codes.InvalidArgument:    http.StatusBadRequest,
	codes.OutOfRange:         http.StatusBadRequest,
	codes.NotFound:           http.StatusNotFound,
	codes.AlreadyExists:      http.StatusConflict,
	codes.FailedPrecondition: http.StatusConflict,
	codes.Aborted:            http.StatusConflict,
	codes.ResourceExhausted:  http.StatusTooManyRequests,
	codes.Unauthenticated:    http.StatusUnauthorized,
	codes.PermissionDenied:   http.StatusForbidden,
	codes.Unavailable:        http.StatusServiceUnavailable,
	codes.DeadlineExceeded:   http.StatusGatewayTimeout,
	codes.Canceled:           499, // client closed request (nginx); rarely seen by anyone
	codes.Unimplemented:      http.StatusNotImplemented,
}

// errorBody is every error response.
type errorBody struct {
	Success bool   `json:"success"`
	Code    string `json:"code"`
	Error   string `json:"error"`
}

func writeError(w http.ResponseWriter, httpCode int, code, msg string) {
	writeJSON(w, httpCode, errorBody{Code: code, Error: msg})
}

// writeStatus writes err, a gRPC status from the backend, as an HTTP error.
// Its text was written for clients by the API layer (internal errors are
// already reduced to "internal error" there).
func (h *handler) writeStatus(w http.ResponseWriter, err error) {
	st := status.Convert(err)
	code, ok := httpStatus[st.Code()]
	if !ok {
		code = http.StatusInternalServerError
		h.log.Error("http api: internal error", "error", err)
	}
	writeError(w, code, strings.ToUpper(strings.ReplaceAll(codeName(st.Code()), " ", "_")), st.Message())
}

func codeName(c codes.Code) string {
	// codes.Code.String gives e.g. "NotFound"; the JSON uses NOT_FOUND.
	s := c.String()
	var b strings.Builder
	for i, r := range s {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return strings.ToUpper(b.String())
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		code, b = http.StatusInternalServerError, []byte(`{"success":false,"code":"INTERNAL","error":"internal error"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

func writeProto(w http.ResponseWriter, code int, m proto.Message) {
	b, err := pj.Marshal(m)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "INTERNAL", "internal error")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

// badRequest is a client error found while reading a request.
type badRequest struct {
	status int
	code   string
	msg    string
}

func (e *badRequest) Error() string { return e.msg }

func (h *handler) writeBad(w http.ResponseWriter, err error) {
	var br *badRequest
	if errors.As(err, &br) {
		writeError(w, br.status, br.code, br.msg)
		return
	}
	h.writeStatus(w, err)
}

// readBody reads the request body under the size limit. An empty body
// reads as "{}".
func (h *handler) readBody(w http.ResponseWriter, r *http.Request) ([]byte, error) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, h.opts.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, &badRequest{http.StatusRequestEntityTooLarge, "REQUEST_TOO_LARGE", fmt.Sprintf("request body larger than %d bytes", mbe.Limit)}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			// The server's ReadTimeout passed before the body was in.
			w.Header().Set("Connection", "close")
			return nil, &badRequest{http.StatusRequestTimeout, "REQUEST_TIMEOUT", "the request body did not arrive in time"}
		}
		return nil, &badRequest{http.StatusBadRequest, "BAD_REQUEST", "could not read the request body"}
	}
	if len(bytes.TrimSpace(body)) == 0 {
		body = []byte("{}")
	}
	if !utf8.Valid(body) {
		// encoding/json would replace each bad byte with U+FFFD and store
		// an instruction the client never wrote.
		return nil, &badRequest{http.StatusBadRequest, "INVALID_ARGUMENT", "the body is not valid UTF-8 (JSON text must be)"}
	}
	return body, nil
}

// decodeJSON reads a JSON object into v. Unknown fields are ignored (as
// the seed's server does) unless strict; a field of the wrong type, bad
// JSON, or trailing data is a 400.
func (h *handler) decodeJSON(w http.ResponseWriter, r *http.Request, v any, strict bool) error {
	body, err := h.readBody(w, r)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(v); err != nil {
		return &badRequest{http.StatusBadRequest, "INVALID_ARGUMENT", jsonError(err)}
	}
	if dec.More() {
		return &badRequest{http.StatusBadRequest, "INVALID_ARGUMENT", "invalid JSON: data after the object"}
	}
	return nil
}

func jsonError(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("invalid JSON at byte %d: %v", se.Offset, se)
	case errors.As(err, &te):
		if te.Field != "" {
			return fmt.Sprintf("field %q must be %s, not %s", te.Field, jsonType(te.Type.Kind().String()), te.Value)
		}
		return fmt.Sprintf("the body must be a JSON object, not %s", te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "invalid JSON: unexpected end of input"
	}
	return "invalid JSON: " + err.Error()
}

func jsonType(kind string) string {
	switch kind {
	case "string":
		return "a string"
	case "bool":
		return "a boolean"
	case "struct", "map", "ptr":
		return "an object"
	case "slice":
		return "an array"
	case "int32":
		return "an integer of -2147483648..2147483647"
	case "int", "int64":
		return "an integer"
	case "uint", "uint32", "uint64":
		return "a non-negative integer"
	}
	return "a number"
}

// decodeProto reads a protobuf message as JSON (protojson): unknown fields
// and wrong types are a 400.
func (h *handler) decodeProto(w http.ResponseWriter, r *http.Request, m proto.Message) error {
	body, err := h.readBody(w, r)
	if err != nil {
		return err
	}
	if err := protojson.Unmarshal(body, m); err != nil {
		return &badRequest{http.StatusBadRequest, "INVALID_ARGUMENT", "invalid request: " + err.Error()}
	}
	return nil
}

// sse writes a text/event-stream. send and comment may be called from two
// goroutines (events and heartbeats).
type sse struct {
	mu sync.Mutex
	w  http.ResponseWriter
	rc *http.ResponseController
}

func startSSE(w http.ResponseWriter) *sse {
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-store")
	hd.Set("X-Accel-Buffering", "no") // nginx: do not buffer the stream
	w.WriteHeader(http.StatusOK)
	s := &sse{w: w, rc: http.NewResponseController(w)}
	s.mu.Lock()
	// A client that lost the connection retries after 1 s.
	_, _ = io.WriteString(w, "retry: 1000\n\n")
	_ = s.rc.Flush()
	s.mu.Unlock()
	return s
}

// send writes one event; id and event may be empty. data is one line of JSON.
func (s *sse) send(id, event string, data []byte) error {
	var b bytes.Buffer
	if id != "" {
		b.WriteString("id: " + id + "\n")
	}
	if event != "" {
		b.WriteString("event: " + event + "\n")
	}
	b.WriteString("data: ")
	b.Write(data)
	b.WriteString("\n\n")
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := s.w.Write(b.Bytes()); err != nil {
		return errClientGone
	}
	if err := s.rc.Flush(); err != nil {
		return errClientGone
	}
	return nil
}

func (s *sse) comment(text string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := io.WriteString(s.w, ": "+text+"\n\n"); err != nil {
		return err
	}
	return s.rc.Flush()
}

// heartbeat writes a comment every interval until stop is called.
func (h *handler) heartbeat(s *sse) (stop func()) {
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(h.opts.Heartbeat)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if s.comment("keepalive") != nil {
					return
				}
			}
		}
	}()
	return func() {
		close(done)
		<-finished
	}
}

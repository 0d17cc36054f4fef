package lybicsandbox

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestNewChecksTheEndpoint(t *testing.T) {
	for _, bad := range []string{"ftp://x", "http://", "http://u:p@host", "http://h/?q=1", "://x"} {
		if _, err := New(Config{Endpoint: bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	c, err := New(Config{})
	if err != nil || c.Endpoint() != DefaultEndpoint {
		t.Fatalf("default: %v %v", c, err)
	}
	if c, _ := New(Config{Endpoint: "http://127.0.0.1:9/"}); c.Endpoint() != "http://127.0.0.1:9" {
		t.Fatalf("trailing slash kept: %s", c.Endpoint())
	}
}

// An API that cannot be reached is 502, one that does not answer in time
// 504, one that fails 502 with its message; the key is never in the error.
func TestErrorsSayWhatFailed(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	hang := make(chan struct{})
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-hang:
		case <-r.Context().Done():
		}
	}))
	defer slow.Close()
	defer close(hang)
	broken := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		_, _ = w.Write([]byte(`{"code":"INTERNAL_ERROR","message":"display did not start"}`))
	}))
	defer broken.Close()
	for _, tc := range []struct {
		endpoint string
		status   int
		text     string
	}{
		{"http://" + addr, 502, "could not be reached"},
		{slow.URL, 504, "did not answer in time"},
		{broken.URL, 502, "display did not start"},
	} {
		c, err := New(Config{Endpoint: tc.endpoint, OrgID: "o", APIKey: "sk-secret-key-1", Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		_, err = c.Create(context.Background(), Request{})
		var e *Error
		if !errors.As(err, &e) || e.Status != tc.status || !strings.Contains(e.Message, tc.text) || strings.Contains(e.Message, "sk-secret") {
			t.Errorf("%s: %v (%+v)", tc.endpoint, err, e)
		}
	}
	c, _ := New(Config{Endpoint: broken.URL})
	if _, err := c.Create(context.Background(), Request{}); !errors.Is(err, ErrNoCredentials) {
		t.Errorf("no credentials: %v", err)
	}
}

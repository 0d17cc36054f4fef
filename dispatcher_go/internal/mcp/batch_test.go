package mcp

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
)

// A JSON-RPC batch of more than MaxBatch messages, or a body over maxBody,
// is refused with a JSON-RPC error before the SDK answers any of it: a
// 4 MiB batch of 75 000 tools/list was answered in full (~130 MB of
// answers, held while the client did not read). MaxBatch messages are
// answered as before.
func TestBatchIsBounded(t *testing.T) {
	hs := httptest.NewServer(NewServer(ServerOptions{Backend: newFakeTasks(), Tools: newBroker(t)}))
	t.Cleanup(hs.Close)
	batch := func(n int) string {
		msgs := make([]string, n)
		for i := range msgs {
			msgs[i] = fmt.Sprintf(`{"jsonrpc":"2.0","id":%d,"method":"tools/list"}`, i)
		}
		return "[" + strings.Join(msgs, ",") + "]"
	}
	post := func(body string) (int, string, string) {
		req, _ := http.NewRequest(http.MethodPost, hs.URL, strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Accept", "application/json, text/event-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("Content-Type"), string(b)
	}
	refused := func(body string, wantCode int, wantMsg string) {
		t.Helper()
		code, ct, got := post(body)
		var e struct {
			Error struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		if code != wantCode || ct != "application/json" || json.Unmarshal([]byte(got), &e) != nil ||
			e.Error.Code != -32600 || !strings.Contains(e.Error.Message, wantMsg) {
			t.Fatalf("got %d %s %.200q, want %d with %q", code, ct, got, wantCode, wantMsg)
		}
	}
	refused("  \n"+batch(MaxBatch+1), http.StatusBadRequest, fmt.Sprintf("a JSON-RPC batch of more than %d messages", MaxBatch))
	refused(batch(20000), http.StatusBadRequest, "a JSON-RPC batch of more than")
	refused(`{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"x":"`+strings.Repeat("a", maxBody)+`"}}`,
		http.StatusRequestEntityTooLarge, "request body larger than")

	code, _, got := post(batch(MaxBatch))
	if code != http.StatusOK || strings.Count(got, `"tools":[`) != MaxBatch {
		t.Fatalf("a batch of %d: %d, %d answers", MaxBatch, code, strings.Count(got, `"tools":[`))
	}
	// A lone message still works after the refusals.
	code, _, got = post(`{"jsonrpc":"2.0","id":1,"method":"tools/list"}`)
	if code != http.StatusOK || !strings.Contains(got, `"tools":[`) {
		t.Fatalf("one message: %d %.200q", code, got)
	}
}

// Counting a batch stops at MaxBatch+1 elements: a 4 MiB array of 2 Mi
// zeros allocated ~255 MB when it was decoded whole to be counted.
func TestBatchCountStopsEarly(t *testing.T) {
	body := []byte("[" + strings.Repeat("0,", 2<<20) + "0]")
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	over := batchOver(body, MaxBatch)
	runtime.ReadMemStats(&after)
	if !over {
		t.Fatal("not over")
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 1<<20 {
		t.Fatalf("counting allocated %d bytes", n)
	}
	for _, c := range []struct {
		body string
		over bool
	}{{"[]", false}, {"{}", false}, {"[1,2", false}, {" [" + strings.Repeat("{},", MaxBatch-1) + "{}]", false}, {"[" + strings.Repeat("{},", MaxBatch) + "{}]", true}, {"[1,2,,]", false}} {
		if got := batchOver([]byte(c.body), MaxBatch); got != c.over {
			t.Errorf("%.40q: over %v, want %v", c.body, got, c.over)
		}
	}
}

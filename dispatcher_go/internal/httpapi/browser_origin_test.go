package httpapi

// Browser tests of the origin rules (issue 12, class 3) in a real headless
// Chromium: a page on another origin cannot drive the API, and the web page
// works with a token holding / + = (a base64 token).

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// waitTrue polls a JavaScript boolean expression until it holds.
func waitTrue(t *testing.T, bctx context.Context, what, expr string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if ok, err := chromedp.Run(bctx, chromedp.Evaluate[bool](expr)); err == nil && ok {
			return
		}
		if time.Now().After(deadline) {
			html, _ := chromedp.Run(bctx, chromedp.OuterHTML(chromedp.CSS("body")))
			t.Fatalf("waiting for %s (%s); page: %.3000s", what, expr, html)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestWebPageTokenWithSlashPlusEquals: with a base64-like client token the
// page submits a task and shows its event stream (the stream's GET carries
// the token in the cookie, URL-encoded).
func TestWebPageTokenWithSlashPlusEquals(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	const token = "Zm9v/YmFy+YmF6=="
	f := &fakeBackend{}
	s := guardServer(t, f, Options{ClientToken: token}, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bctx := headless(t, ctx)
	if err := chromedp.Do(bctx, chromedp.Navigate(s.URL+"/"), chromedp.WaitVisible(chromedp.CSS("#instruction"))); err != nil {
		t.Fatal(err)
	}
	if _, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`setToken(`+strconv.Quote(token)+`), true`)); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(bctx,
		chromedp.SendKeys(chromedp.CSS("#instruction"), "hello"),
		chromedp.Click(chromedp.CSS("#submit"))); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, bctx, "the task's events", `document.querySelector("#events").textContent.includes("hello from the fake task")`)
	waitTrue(t, bctx, "the stream's end", `document.querySelector("#conn").textContent === "ended"`)
	waitTrue(t, bctx, "the task list", `Array.from(document.querySelectorAll("#tasks tbody tr")).some(r => r.dataset.task === "t-1")`)
	if c := f.called(); !slices.Contains(c, "SubmitTask") || !slices.Contains(c, "Watch") {
		t.Fatalf("calls %v", c)
	}
}

// TestCrossOriginPageInChromium: a page on another origin (here another
// port of 127.0.0.1: the same site, another origin) posts text/plain to
// submit and to cancel-all — what a browser sends without a preflight. The
// dispatcher refuses both; nothing reaches the task API.
func TestCrossOriginPageInChromium(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	f := &fakeBackend{}
	target := guardServer(t, f, Options{}, nil)
	evil := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprintf(w, `<!doctype html><title>evil</title><script>
const target = %q;
const post = (path, body) => fetch(target + path, {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}, body})
  .then(() => "sent", (e) => "error: " + e);
Promise.all([post("/api/agent/cancel", "{}"), post("/api/agent/task/submit", '{"instruction":"pwned"}')])
  .then((r) => { window.results = r; document.title = "done"; });
</script>`, target.URL)
	}))
	defer evil.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	bctx := headless(t, ctx)
	if err := chromedp.Do(bctx, chromedp.Navigate(evil.URL+"/")); err != nil {
		t.Fatal(err)
	}
	waitTrue(t, bctx, "the attacker's requests to finish", `document.title === "done"`)
	results, err := chromedp.Run(bctx, chromedp.Evaluate[[]string](`window.results`))
	if err != nil {
		t.Fatal(err)
	}
	if c := f.called(); len(c) != 0 {
		t.Fatalf("a page on another origin reached the task API: %v (its fetches: %v)", c, results)
	}
	t.Logf("attacker's fetches: %v; nothing reached the task API", results)
}

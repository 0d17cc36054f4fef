package httpapi

import (
	"context"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// onePixelPNG is a 1×1 PNG, the "screenshot" of the fake session.
var onePixelPNG, _ = base64.StdEncoding.DecodeString("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

// browserScript is the stub commander the page watches: on its first
// session, content chunks every 40 ms until stopped, a call_user question, a
// tool call that the policy holds, and a screenshot; a user answer and a
// tool result are echoed as content.
func browserScript(ctx context.Context, c *testutil.Commander) error {
	s, err := c.NextSession(ctx)
	if err != nil {
		return err
	}
	tick := time.NewTicker(40 * time.Millisecond)
	defer tick.Stop()
	for i := 0; i < 2000; {
		var step any
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		case p, ok := <-c.Packets():
			switch {
			case !ok:
				return nil
			case p.GetStop() != nil:
				if err := s.Send(&dispatchv1.Stopped{Reason: p.GetStop().GetReason()}); err != nil {
					return err
				}
				return testutil.ErrStopped
			case p.GetUserInput() != nil:
				step = &dispatchv1.ContentChunk{Text: "got: " + p.GetUserInput().GetText()}
			case p.GetToolResult() != nil:
				step = &dispatchv1.ContentChunk{Text: "tool said: " + p.GetToolResult().GetResultJson()}
			default:
				continue
			}
		}
		if step == nil {
			i++
			switch i {
			case 5:
				step = &dispatchv1.StageChange{Stage: "call_user", Message: "what is the password?"}
			case 8:
				step = &dispatchv1.ToolCallRequest{CallId: "h1", ToolName: "echo", ArgumentsJson: `{"text":"approved-echo"}`}
			case 12:
				step = &dispatchv1.Artifact{Kind: "screenshot", MimeType: "image/png", Data: onePixelPNG, Description: "the screen"}
			default:
				step = &dispatchv1.ContentChunk{Text: fmt.Sprintf("chunk %d ", i)}
			}
		}
		if err := s.Send(step); err != nil {
			return err
		}
	}
	return s.Send(testutil.Success("all chunks sent"))
}

// lazy prints as what its function returns when it is printed: a failure
// message's part that costs something to get.
type lazy func() string

func (f lazy) String() string { return f() }

// TestWebPageInChromium drives the page in a real headless Chromium:
// submit, watch events arrive, answer call_user, approve a held tool call,
// see the screenshot, reload mid-stream and survive a dropped connection
// with no gap and no duplicate, cancel, see the final state and the task
// in the list.
func TestWebPageInChromium(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a browser")
	}
	findChromium(t) // skips without a browser, before anything starts
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(policy, []byte("rules:\n  - id: echo-needs-approval\n    when: tool_name == \"echo\"\n    action: hold\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	const token = "page-token"
	e := newEnv(t, dispatcher.Config{Auth: dispatcher.Auth{ClientToken: token}, Policy: dispatcher.Policy{File: policy}}, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	e.commander(t, browserScript)

	bctx := headless(t, ctx)

	run := func(what string, steps ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		if err := chromedp.Do(bctx, steps...); err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}
	evalInt := func(what, expr string) int {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.Evaluate[int](expr))
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return v
	}
	// page is what the page shows, read when a wait fails.
	page := lazy(func() string {
		html, _ := chromedp.Run(bctx, chromedp.OuterHTML(chromedp.CSS("#right")))
		return fmt.Sprintf("%.3000s", html)
	})
	// waitJS polls a JavaScript boolean expression.
	waitJS := func(what, expr string) {
		t.Helper()
		testutil.WaitFor(t, 20*time.Second, func() bool {
			ok, err := chromedp.Run(bctx, chromedp.Evaluate[bool](expr))
			return err == nil && ok
		}, "%s (%s); page: %v", what, expr, page)
	}
	maxSeq := `Math.max(0, ...Array.from(document.querySelectorAll("#events [data-seq]")).map(e => +e.dataset.seq))`

	run("open the page", chromedp.Navigate(e.url+"/"), chromedp.WaitVisible(chromedp.CSS("#instruction")))
	if _, err := chromedp.Run(bctx, chromedp.Evaluate[bool](`setToken("`+token+`"), true`)); err != nil {
		t.Fatal(err)
	}
	run("submit",
		chromedp.SendKeys(chromedp.CSS("#instruction"), "Stream chunks until cancelled"),
		chromedp.Click(chromedp.CSS("#submit")))
	waitJS("first events", maxSeq+` >= 4`)
	taskID, err := chromedp.Run(bctx, chromedp.Text(chromedp.CSS("#task-id")))
	if err != nil || taskID == "" {
		t.Fatalf("task id %q: %v", taskID, err)
	}

	// call_user: the question shows; the answer reaches the planner.
	waitJS("call_user question", `!document.querySelector("#reply").hidden && document.querySelector("#reply-question").textContent.includes("password")`)
	run("answer", chromedp.SendKeys(chromedp.CSS("#reply-text"), "hunter2"), chromedp.Click(chromedp.CSS("#reply-send")))
	waitJS("answer echoed", `document.querySelector("#events").textContent.includes("got: hunter2")`)

	// A held tool call: approve it from the page.
	waitJS("approve button", `!!document.querySelector("button.approve")`)
	run("approve", chromedp.Click(chromedp.CSS("button.approve")))
	waitJS("tool result", `document.querySelector("#events").textContent.includes("tool said:") && !document.querySelector("button.approve")`)

	// The screenshot is an image.
	waitJS("screenshot", `(() => { const i = document.querySelector("#events img"); return !!i && i.complete && i.naturalWidth === 1 })()`)

	// Reload in the middle of the stream: it resumes where it was.
	before := evalInt("seq before reload", maxSeq)
	run("reload", chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("#task-head")))
	waitJS("events after reload", fmt.Sprintf("%s >= %d", maxSeq, before+10))

	// A dropped connection: EventSource reconnects with Last-Event-ID.
	beforeDrop := evalInt("seq before drop", maxSeq)
	e.http.CloseClientConnections()
	waitJS("events after the drop", fmt.Sprintf("%s >= %d", maxSeq, beforeDrop+10))

	// DISPATCHER_PAGE_SCREENSHOT=file.png saves what the page looks like
	// mid-stream (for people reviewing the page).
	if path := os.Getenv("DISPATCHER_PAGE_SCREENSHOT"); path != "" {
		if png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100)); err == nil {
			_ = os.WriteFile(path, png, 0o644)
		}
	}
	run("cancel", chromedp.Click(chromedp.CSS("#cancel")))
	waitJS("final state", `document.querySelector("#status").textContent === "CANCELLED"`)
	waitJS("stream ended", `document.querySelector("#conn").textContent === "ended"`)
	waitJS("task listed", `Array.from(document.querySelectorAll("#tasks tbody tr")).some(r => r.dataset.task === "`+taskID+`" && r.textContent.includes("CANCELLED"))`)

	// Every event of the task is on the page exactly once, in order.
	seqs, err := chromedp.Run(bctx, chromedp.Evaluate[[]int](`Array.from(document.querySelectorAll("#events [data-seq]")).map(e => +e.dataset.seq)`))
	if err != nil {
		t.Fatal(err)
	}
	counters, err := chromedp.Run(bctx, chromedp.Evaluate[map[string]any](`({gaps: window.__dispatcher.gaps, dupes: window.__dispatcher.dupes})`))
	if err != nil {
		t.Fatal(err)
	}
	var task map[string]any
	e.do("GET", "/api/tasks/"+taskID, token, "", &task)
	if task["status"] != "CANCELLED" {
		t.Fatalf("task %v", task)
	}
	last := fmt.Sprint(task["last_seq"])
	if len(seqs) == 0 || fmt.Sprint(len(seqs)) != last {
		t.Fatalf("page shows %d events, the task has %s", len(seqs), last)
	}
	for i, s := range seqs {
		if s != i+1 {
			t.Fatalf("page events %v: gap or duplicate at index %d", seqs, i)
		}
	}
	if counters["gaps"] != float64(0) || counters["dupes"] != float64(0) {
		t.Fatalf("page counters %v", counters)
	}
	t.Logf("task %s: %d events shown once each, across a reload (at seq %d) and a dropped connection (at seq %d)", taskID, len(seqs), before, beforeDrop)
}

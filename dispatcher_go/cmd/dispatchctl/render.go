package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
	"github.com/agentdispatch/dispatcher/internal/textcut"
)

// ANSI styles, used only when stdout is a terminal.
const (
	styleReset   = "\x1b[0m"
	styleBold    = "\x1b[1m"
	styleThought = "\x1b[2;3m" // dim italic
	styleDim     = "\x1b[2m"
	styleTool    = "\x1b[36m"   // cyan
	styleBad     = "\x1b[31m"   // red
	styleStop    = "\x1b[1;31m" // bold red
	styleGood    = "\x1b[32m"   // green
)

// Which inline block is open.
const (
	noBlock = iota
	inThought
	inContent
)

// renderer prints a task's events readably: thoughts and content stream
// inline as they arrive (thoughts prefixed, and dim italic on a terminal);
// everything else gets a line of its own.
type renderer struct {
	// mu serializes printing with asides from other goroutines.
	mu    sync.Mutex
	w     io.Writer
	color bool
	mode  int
	// midLine is true when the cursor is not at the start of a line.
	midLine bool
	// contentBytes counts the answer streamed, so the summary does not
	// repeat a result the reader has just seen.
	contentBytes int
}

func (r *renderer) style(style, s string) string {
	if !r.color || style == "" {
		return s
	}
	return style + s + styleReset
}

// endLine closes an inline thought or content block.
func (r *renderer) endLine() {
	if r.midLine {
		fmt.Fprintln(r.w)
		r.midLine = false
	}
	r.mode = noBlock
}

// line prints one whole line in style, after closing any inline block.
func (r *renderer) line(style, format string, args ...any) {
	r.endLine()
	fmt.Fprintln(r.w, r.style(style, fmt.Sprintf(format, args...)))
}

// inline streams text as part of a thought or content block. Every line of a
// thought starts with a prefix, so piped output can be told apart line by line.
func (r *renderer) inline(mode int, text string) {
	if text == "" {
		return
	}
	if r.mode != mode {
		r.endLine()
		r.mode = mode
	}
	prefix, style := "", ""
	if mode == inThought {
		prefix, style = "thought: ", styleThought
	}
	for text != "" {
		seg, rest, newline := strings.Cut(text, "\n")
		if !r.midLine && prefix != "" {
			fmt.Fprint(r.w, r.style(style, prefix))
			r.midLine = true
		}
		if seg != "" {
			fmt.Fprint(r.w, r.style(style, seg))
			r.midLine = true
		}
		if newline {
			fmt.Fprintln(r.w)
			r.midLine = false
		}
		text = rest
	}
}

// aside runs print (which writes elsewhere, e.g. a notice on stderr) between
// two events; on a terminal it first ends the line being streamed, so the
// aside does not land in the middle of it.
func (r *renderer) aside(print func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.color {
		r.endLine()
	}
	print()
}

// close ends any line left open, before the program prints an error or exits.
func (r *renderer) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.endLine()
}

// event prints one task event.
func (r *renderer) event(ev *dispatchv1.TaskEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch k := ev.GetKind().(type) {
	case *dispatchv1.TaskEvent_State:
		st := k.State
		style := styleDim
		switch st.GetStatus() {
		case agentpb.TaskStatus_SUCCESS:
			style = styleGood
		case agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_CANCELLED:
			style = styleBad
		}
		msg := st.GetMessage()
		if strings.EqualFold(msg, st.GetStatus().String()) {
			msg = "" // "RUNNING: running" says nothing twice
		}
		r.line(style, "-- %s%s", st.GetStatus(), suffix(": ", msg))
	case *dispatchv1.TaskEvent_Thought:
		r.inline(inThought, k.Thought.GetDelta())
	case *dispatchv1.TaskEvent_Content:
		r.contentBytes += len(k.Content.GetText())
		r.inline(inContent, k.Content.GetText())
		if k.Content.GetIsFinish() {
			r.endLine()
		}
	case *dispatchv1.TaskEvent_ToolCall:
		c := k.ToolCall
		r.line(styleTool, "-> %s(%s)  [call %s]", c.GetToolName(), clip(c.GetArgumentsJson(), 300), c.GetCallId())
	case *dispatchv1.TaskEvent_ToolResult:
		res := k.ToolResult.GetResult()
		where := fmt.Sprintf("%d ms, %s", k.ToolResult.GetDurationMs(), k.ToolResult.GetExecutor())
		if e := res.GetError(); e != nil {
			code := strings.ToUpper(protoenum.Name(e.GetCode()))
			r.line(styleBad, "<- %s failed %s: %s  [call %s, %s]", res.GetToolName(), code, e.GetMessage(), res.GetCallId(), where)
			return
		}
		r.line(styleTool, "<- %s = %s  [call %s, %s]", res.GetToolName(), clip(res.GetResultJson(), 300), res.GetCallId(), where)
	case *dispatchv1.TaskEvent_Error:
		r.line(styleBad, "!! error %s: %s", k.Error.GetCode(), k.Error.GetMessage())
	case *dispatchv1.TaskEvent_Usage:
		// Folded into the statistics printed at the end.
	case *dispatchv1.TaskEvent_Stage:
		r.line(styleDim, "== %s%s", k.Stage.GetStage(), suffix(": ", k.Stage.GetMessage()))
	case *dispatchv1.TaskEvent_Artifact:
		a := k.Artifact
		where := a.GetUri()
		if where == "" {
			where = fmt.Sprintf("%d bytes inline", len(a.GetData()))
		}
		r.line(styleDim, "[artifact %s %s %s]%s", a.GetKind(), a.GetMimeType(), where, suffix(" ", a.GetDescription()))
	case *dispatchv1.TaskEvent_Result:
		outcome := strings.ToUpper(protoenum.Name(k.Result.GetOutcome()))
		r.line(styleDim, "== result %s%s", outcome, suffix(": ", k.Result.GetMessage()))
	case *dispatchv1.TaskEvent_Stop:
		code := strings.ReplaceAll(protoenum.Name(k.Stop.GetCode()), "_", " ")
		r.line(styleStop, "## stop (%s): %s%s", code, k.Stop.GetReason(), suffix(" rule ", k.Stop.GetRuleId()))
	case *dispatchv1.TaskEvent_Stopped:
		r.line(styleStop, "## stopped%s", suffix(": ", k.Stopped.GetReason()))
	case *dispatchv1.TaskEvent_Policy:
		r.line(policyStyle(k.Policy), "%s", policyLine(ev.GetTaskId(), k.Policy))
	case *dispatchv1.TaskEvent_UserInput:
		r.line(styleBold, "> user: %s", k.UserInput.GetText())
	default:
		// A kind this build does not know by name (the API grew): name the
		// oneof field and show its content compactly.
		m := ev.ProtoReflect()
		fd := m.WhichOneof(m.Descriptor().Oneofs().ByName("kind"))
		if fd == nil {
			r.line(styleDim, "-- event %d (no kind)", ev.GetSeq())
			return
		}
		body := ""
		if fd.Message() != nil {
			b, _ := protojson.Marshal(m.Get(fd).Message().Interface())
			body = " " + clip(string(b), 300)
		}
		r.line(styleDim, "-- %s%s", fd.Name(), body)
	}
}

// policyLine words a policy decision, e.g.
// "!! policy stop [no-secrets]: forbidden phrase (on content)",
// "!! policy hold [gui-needs-approval]: computer.click [call c1] — held until 12:00:30; dispatchctl approve t1 c1 [--reject]",
// "!! policy approved [gui-needs-approval]: computer.click [call c1]: ok".
func policyLine(taskID string, pd *dispatchv1.PolicyDecision) string {
	if taskID == "" {
		taskID = "TASK_ID"
	}
	verb := protoenum.Name(pd.GetAction())
	if o := pd.GetHoldOutcome(); o != dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED {
		verb = strings.ReplaceAll(protoenum.Name(o), "_", " ")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "!! policy %s [%s]", verb, pd.GetRuleId())
	if pd.GetToolName() != "" || pd.GetCallId() != "" {
		fmt.Fprintf(&b, ": %s [call %s]", pd.GetToolName(), pd.GetCallId())
	}
	if pd.GetReason() != "" {
		b.WriteString(": " + pd.GetReason())
	}
	if pd.GetToolName() == "" && pd.GetPacketKind() != "" {
		fmt.Fprintf(&b, " (on %s)", pd.GetPacketKind())
	}
	if pd.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_HOLD && pd.GetHoldDeadline() != nil {
		fmt.Fprintf(&b, " — held until %s; dispatchctl approve %s %s [--reject]",
			pd.GetHoldDeadline().AsTime().Local().Format("15:04:05"), taskID, pd.GetCallId())
	}
	return b.String()
}

// policyStyle colours a decision by what it does to the task.
func policyStyle(pd *dispatchv1.PolicyDecision) string {
	switch {
	case pd.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_STOP:
		return styleStop
	case pd.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_ALLOW:
		return styleGood
	case pd.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_HOLD:
		return styleBold
	}
	return styleBad
}

// summary prints a task's final status, result and statistics.
func (r *renderer) summary(t *dispatchv1.Task) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.endLine()
	style := styleBad
	if t.GetStatus() == agentpb.TaskStatus_SUCCESS {
		style = styleGood
	}
	fmt.Fprintf(r.w, "%s%s\n", r.style(styleBold+style, "status: "+t.GetStatus().String()), suffix("  ", t.GetMessage()))
	if t.GetResult() != "" && r.contentBytes == 0 {
		fmt.Fprintf(r.w, "result: %s\n", t.GetResult())
	}
	if s := t.GetStatistics(); s != nil {
		fmt.Fprintln(r.w, r.style(styleDim, statsLine(s)))
	}
	fmt.Fprintln(r.w, r.style(styleDim, "task: "+t.GetTaskId()))
}

// statsLine renders ExecutionStatistics on one line.
func statsLine(s *agentpb.ExecutionStatistics) string {
	line := fmt.Sprintf("steps %d · %s · tokens %d in / %d out / %d total",
		s.GetSteps(), time.Duration(s.GetDurationSeconds())*time.Second,
		s.GetInputTokens(), s.GetOutputTokens(), s.GetTotalTokens())
	if s.GetCost() != 0 {
		line += fmt.Sprintf(" · cost %.4g %s", s.GetCost(), s.GetCurrencySymbol())
	}
	return line
}

// suffix returns sep+s, or nothing when s is empty.
func suffix(sep, s string) string {
	if s == "" {
		return ""
	}
	return sep + s
}

// clip shortens s to about n bytes for display, saying how much was cut; it
// never cuts a UTF-8 character in two.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return textcut.Prefix(s, n) + fmt.Sprintf("… (%d bytes)", len(s))
}

// shorten is clip for prose: it cuts at n bytes and marks the cut with "…".
func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return textcut.Prefix(s, n) + textcut.Mark
}

package policy

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"time"
	"unicode/utf8"

	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/interpreter"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// maxCallTimes bounds the tool-call timestamps a session keeps for the
// per-minute limit; past it the count saturates (and the limit, if lower,
// has long denied).
const maxCallTimes = 4096

// Session is the policy state of one session: the recent text of its
// content and thought streams (so that a phrase split across chunks is
// caught) and its recent tool calls. It is used by one goroutine (the
// session's receiver) and is not safe for concurrent use.
type Session struct {
	src   Source
	extra *Policy
	stats *Stats
	now   func() time.Time
	// tails hold the recent text of the content and thought streams:
	// between keep and 2*keep bytes, compacted by copying (amortized, no
	// allocation per packet).
	tails   [2][]byte
	scratch []byte // lower-cased text for phrase matching
	calls   []time.Time
	// spent is what policies with a budget spent (CEL cost units) since
	// the inline tests last reset it.
	spent uint64
}

// Source yields the global policy in force; *Engine implements it.
type Source interface {
	Current() *Policy
	Stats() *Stats
}

// NewSession returns the policy state of a new session under src (the
// global policy, re-read on every packet so reloads apply at once) and
// extra (the task's own rules, may be nil).
func NewSession(src Source, extra *Policy) *Session {
	return &Session{src: src, extra: extra, stats: src.Stats(), now: time.Now}
}

func tailIndex(kind string) int {
	if kind == KindThought {
		return 1
	}
	return 0
}

// activation resolves CEL variables lazily from the packet and state.
type activation struct {
	pkt       *Packet
	st        *State
	window    []byte // the window's bytes; made a string on first use
	winStr    *string
	lastMin   int64
	args      any
	argsDone  bool
	argsError bool
}

func (a *activation) ResolveName(name string) (any, bool) {
	switch name {
	case "kind":
		return a.pkt.Kind, true
	case "text":
		return a.pkt.Text, true
	case "window":
		if a.winStr == nil {
			w := a.pkt.Text // not a text stream: the window is the packet
			if a.window != nil {
				w = string(a.window)
			}
			a.winStr = &w
		}
		return *a.winStr, true
	case "stage":
		return a.pkt.Stage, true
	case "tool_name":
		return a.pkt.ToolName, true
	case "tool_args_json":
		return a.pkt.ToolArgsJSON, true
	case "tool_args":
		if !a.argsDone {
			a.argsDone = true
			if a.pkt.ToolArgsJSON != "" {
				if err := json.Unmarshal([]byte(a.pkt.ToolArgsJSON), &a.args); err != nil {
					a.args = nil
				}
			}
			if a.args == nil {
				a.args = map[string]any{}
			}
		}
		return a.args, true
	case "tokens":
		return a.st.tokens(), true
	case "input_tokens":
		return a.st.InputTokens, true
	case "output_tokens":
		return a.st.OutputTokens, true
	case "cost":
		return a.st.Cost, true
	case "steps":
		return a.st.Steps, true
	case "elapsed":
		return a.st.Elapsed, true
	case "tool_calls":
		return a.st.ToolCalls, true
	case "tool_calls_last_minute":
		return a.lastMin, true
	case "tenant":
		return a.st.Tenant, true
	case "labels":
		if a.st.Labels == nil {
			return map[string]string{}, true
		}
		return a.st.Labels, true
	case "planner":
		return a.st.Planner, true
	case "task_id":
		return a.st.TaskID, true
	}
	return nil, false
}

func (a *activation) Parent() interpreter.Activation { return nil }

// setWindow makes w (a suffix of the stream's tail) the variable window.
func (a *activation) setWindow(w []byte) {
	if a.window == nil || len(w) != len(a.window) {
		a.window, a.winStr = w, nil
	}
}

// Evaluate decides about one packet. It also advances the session's state:
// the text tail keeps the packet's text unless the decision is a stop, and a
// tool call that is not denied counts toward the per-minute limit.
func (s *Session) Evaluate(ctx context.Context, pkt Packet, st State) Decision {
	global := s.src.Current()
	s.stats.Evaluations.Add(1)
	text := pkt.Kind == KindContent || pkt.Kind == KindThought
	var tail *[]byte
	var before int
	if text {
		// The chunk goes into the tail now; it is taken out again on a stop.
		tail = &s.tails[tailIndex(pkt.Kind)]
		before = len(*tail)
		*tail = append(*tail, pkt.Text...)
	}
	d := evaluate(ctx, global, s.extra, s, &pkt, &st, tail, before)
	if d.Action != Allow {
		s.stats.count(d)
	}
	// Advance the state.
	if text {
		if d.Action == Stop {
			*tail = (*tail)[:before]
		} else {
			*tail = compact(*tail, max(global.keepBytes(), s.extra.keepBytes()))
		}
	}
	if pkt.Kind == KindToolCall && d.Action != Deny && d.Action != Stop {
		if len(s.calls) >= maxCallTimes {
			s.calls = s.calls[1:]
		}
		s.calls = append(s.calls, s.now())
	}
	return d
}

// Skip is Evaluate's shortcut for a packet that no policy in force can act
// on: every policy in force (the global one, re-read here, and the task's)
// has no rules and no limits, and kind is not a tool call (whose time
// counts toward a per-minute limit a reload may bring). It then only
// advances the state as Evaluate would with an Allow (a text packet's
// text goes into the tail, for the window of rules a reload brings),
// counts the evaluation and reports true; the caller need not build the
// Packet and State. False: nothing was done, call Evaluate.
func (s *Session) Skip(kind, text string) bool {
	global := s.src.Current()
	if kind == KindToolCall || !global.inert() || !s.extra.inert() {
		return false
	}
	s.stats.Evaluations.Add(1)
	if kind == KindContent || kind == KindThought {
		tail := &s.tails[tailIndex(kind)]
		*tail = compact(append(*tail, text...), max(global.keepBytes(), s.extra.keepBytes()))
	}
	return true
}

// inert reports whether p can only allow (nil, or no rules and no limits).
func (p *Policy) inert() bool {
	return p == nil || (p.numRules == 0 && len(p.rules) == 0 && len(p.text) == 0 && p.limits == Limits{})
}

func (p *Policy) windowBytes() int {
	if p == nil {
		return 0
	}
	return p.window
}

func (p *Policy) keepBytes() int {
	if p == nil {
		return 0
	}
	return p.keep
}

func (p *Policy) phraseBytes() int {
	if p == nil {
		return 0
	}
	return p.maxPhrase
}

// compact keeps the tail between keep and 2*keep bytes: past 2*keep the
// last keep bytes (from a rune boundary) move to the front. A buffer grown
// by a huge chunk is replaced, so a session holds O(keep) memory.
func compact(b []byte, keep int) []byte {
	if len(b) <= 2*keep {
		return b
	}
	start := suffixStart(b, keep)
	if cap(b) > 8*keep+4096 {
		return append(make([]byte, 0, 2*keep+256), b[start:]...)
	}
	n := copy(b, b[start:])
	return b[:n]
}

// suffixStart is where the last n bytes of b begin, moved forward to a
// rune boundary.
func suffixStart(b []byte, n int) int {
	if len(b) <= n {
		return 0
	}
	i := len(b) - n
	for i < len(b) && !utf8.RuneStart(b[i]) {
		i++
	}
	return i
}

// lowerInto writes the lower-cased b into dst (no allocation for ASCII).
func lowerInto(dst, b []byte) []byte {
	dst = dst[:0]
	for _, c := range b {
		if c >= utf8.RuneSelf {
			return append(dst[:0], bytes.ToLower(b)...)
		}
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		dst = append(dst, c)
	}
	return dst
}

// callsLastMinute counts the session's tool calls in the last 60 s and
// drops older timestamps.
func (s *Session) callsLastMinute() int64 {
	cut := s.now().Add(-time.Minute)
	i := 0
	for i < len(s.calls) && !s.calls[i].After(cut) {
		i++
	}
	if i > 0 {
		s.calls = slices.Delete(s.calls, 0, i)
	}
	return int64(len(s.calls))
}

func kindBit(kind string) uint16 {
	if i := slices.Index(kinds, kind); i >= 0 {
		return 1 << i
	}
	return 0
}

// evaluate runs limits, phrase rules and CEL rules of global then extra and
// returns the most severe decision; the first rule of that severity wins.
//
// For content and thought, tail holds the stream's recent text followed by
// the packet's text, which starts at before.
func evaluate(ctx context.Context, global, extra *Policy, s *Session, pkt *Packet, st *State, tail *[]byte, before int) Decision {
	var best Decision
	take := func(p *Policy, d Decision) bool {
		if d.Action > best.Action {
			d.PolicyVersion = p.Version
			best = d
		}
		return best.Action == Stop
	}
	bit := kindBit(pkt.Kind)
	act := &activation{pkt: pkt, st: st}
	lastMin := s.callsLastMinute()
	act.lastMin = lastMin
	if pkt.Kind == KindToolCall {
		// The call being decided counts.
		act.lastMin++
	}

	// Built-in limits: the tighter of both policies.
	var lim Limits
	var limFrom *Policy
	for _, p := range []*Policy{global, extra} {
		if p != nil {
			lim = lim.tighter(p.limits)
			if limFrom == nil {
				limFrom = p
			}
		}
	}
	if limFrom != nil {
		if d, ok := checkLimits(lim, pkt, st, lastMin); ok && take(limFrom, d) {
			return best
		}
	}

	// The text window: the stream's recent text (up to window bytes) plus
	// this packet. Phrases are searched only where a new match can be: the
	// last (longest phrase - 1) bytes before the packet, and the packet
	// (older text was searched before, with no match).
	var hay []byte
	win := max(global.windowBytes(), extra.windowBytes())
	if tail != nil {
		b := *tail
		reach := max(global.phraseBytes(), extra.phraseBytes()) - 1
		hay = b[suffixStart(b[:before], max(reach, 0)):]
	}
	var lower []byte
	for _, p := range []*Policy{global, extra} {
		if p == nil {
			continue
		}
		// A policy with a budget (a task's) pays for what its rules cost on
		// this packet: past the budget, or past its time limit (the
		// backstop), the evaluation ends with a stop.
		var spent uint64
		charge := func(c uint64) bool {
			spent += c
			s.spent += c
			return spent > p.budget
		}
		over := func(at string) Decision {
			return budgetStop(PolicyCostRule, fmt.Sprintf(
				"task policy over its evaluation budget: cost %d > %d units on a %s packet (at rule %s)",
				spent, p.budget, pkt.Kind, at))
		}
		rctx := ctx
		var timedOut func() bool
		if p.budget > 0 && p.timeLimit > 0 && len(p.rules) > 0 {
			var cancel context.CancelFunc
			rctx, cancel = context.WithTimeout(ctx, p.timeLimit)
			defer cancel()
			timedOut = func() bool { return rctx.Err() != nil && ctx.Err() == nil }
		}
		if tail != nil {
			// A policy with a budget sees the window it asked for (what it
			// pays for), the others the larger of both.
			w := win
			if p.budget > 0 {
				w = p.window
			}
			b := *tail
			act.setWindow(b[suffixStart(b[:before], w):])
			for _, r := range p.text {
				if !r.applies(bit) {
					continue
				}
				if p.budget > 0 && charge(TaskRuleCharge) {
					take(p, over(r.id))
					return best
				}
				h := hay
				if !r.caseSens {
					if lower == nil {
						s.scratch = lowerInto(s.scratch, hay)
						lower = s.scratch
					}
					h = lower
				}
				for _, ph := range r.phrases {
					if p.budget > 0 && charge(phraseCharge(min(len(h), len(pkt.Text)+len(ph)-1))) {
						take(p, over(r.id))
						return best
					}
					if bytes.Contains(h, ph) {
						if take(p, r.decision(r.reason)) {
							return best
						}
						break
					}
				}
			}
		}
		for _, r := range p.rules {
			if !r.applies(bit) || r.action <= best.Action {
				continue
			}
			if p.budget > 0 && charge(TaskRuleCharge) {
				take(p, over(r.id))
				return best
			}
			out, det, err := r.prg.ContextEval(rctx, act)
			if timedOut != nil && timedOut() {
				take(p, budgetStop(PolicyCostRule, fmt.Sprintf(
					"task policy over its evaluation time limit: more than %s on a %s packet (at rule %s)",
					p.timeLimit, pkt.Kind, r.id)))
				return best
			}
			if p.budget > 0 {
				c := r.costLimit // if the tracker's count were missing
				if det != nil {
					if ac := det.ActualCost(); ac != nil {
						c = *ac
					}
				}
				if charge(c) {
					take(p, over(r.id))
					return best
				}
			}
			var hit bool
			reason := r.reason
			switch {
			case err != nil:
				s.stats.Errors.Add(1)
				hit = r.failClosed
				if hit {
					reason = fmt.Sprintf("%s (evaluation failed: %s)", r.reason, clip(err.Error(), maxErrorText))
				}
			case out == types.True:
				hit = true
			}
			if hit {
				if take(p, r.decision(reason)) {
					return best
				}
			}
		}
	}
	return best
}

// decision is the rule's decision, for the given reason. A rule's stop is
// a policy stop.
func (r *rule) decision(reason string) Decision {
	d := Decision{Action: r.action, RuleID: r.id, Reason: reason}
	switch r.action {
	case Hold:
		d.HoldTimeout = r.holdTimeout
	case Stop:
		d.StopCode = dispatchv1.StopCode_STOP_CODE_POLICY
	}
	return d
}

// budgetStop is the stop of a spending limit.
func budgetStop(ruleID, reason string) Decision {
	return Decision{Action: Stop, RuleID: ruleID, Reason: reason, StopCode: dispatchv1.StopCode_STOP_CODE_BUDGET}
}

// tokens is input plus output tokens, at most math.MaxInt64 (a sum that
// overflowed would read as negative, under every limit).
func (st *State) tokens() int64 {
	sum, carry := bits.Add64(uint64(max(st.InputTokens, 0)), uint64(max(st.OutputTokens, 0)), 0)
	if carry != 0 || sum > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(sum)
}

// checkLimits applies the built-in limits. Spending that cannot be
// compared with a limit counts as over it: a cost of NaN (false in every
// comparison) and a token sum that overflows stop the session rather than
// slip past the limit.
func checkLimits(l Limits, pkt *Packet, st *State, lastMin int64) (Decision, bool) {
	tokens := st.tokens()
	switch {
	case l.MaxTokens > 0 && tokens > l.MaxTokens:
		return budgetStop("limit.max_tokens", fmt.Sprintf("token limit exceeded (%d > %d)", tokens, l.MaxTokens)), true
	case l.MaxCost > 0 && !(st.Cost <= l.MaxCost):
		return budgetStop("limit.max_cost", fmt.Sprintf("cost limit exceeded (%.4g > %.4g)", st.Cost, l.MaxCost)), true
	case l.MaxSteps > 0 && st.Steps > l.MaxSteps:
		return budgetStop("limit.max_steps", fmt.Sprintf("step limit exceeded (%d > %d)", st.Steps, l.MaxSteps)), true
	case pkt.Kind == KindToolCall && l.MaxToolCallsPerMinute > 0 && lastMin >= l.MaxToolCallsPerMinute:
		return Decision{Action: Deny, RuleID: "limit.max_tool_calls_per_minute", Reason: fmt.Sprintf("more than %d tool calls per minute", l.MaxToolCallsPerMinute)}, true
	}
	return Decision{}, false
}

// maxErrorText bounds the CEL error quoted in a decision's reason: an error
// may quote a value (a missing map key) as long as the packet, and the
// reason is recorded and sent to the commander.
const maxErrorText = 256

// clip cuts s to at most n bytes at a rune boundary, marking the cut.
func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i] + "…"
}

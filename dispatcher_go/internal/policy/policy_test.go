package policy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// The stop codes a decision carries.
const (
	noStop     = dispatchv1.StopCode_STOP_CODE_UNSPECIFIED
	policyStop = dispatchv1.StopCode_STOP_CODE_POLICY
	budget     = dispatchv1.StopCode_STOP_CODE_BUDGET
)

func TestMain(m *testing.M) {
	// The wall-clock backstop of a task's policy (TaskPacketTimeLimit,
	// 100 ms) fires on a test process stalled that long, which a busy
	// machine does: at load 30 on 2 cores (-race) it stopped packets of
	// TestTaskRulesSeeTheirOwnWindow and TestTaskPolicyOverBudgetStops
	// ("over its evaluation time limit" where the cost budget was
	// expected). Only TestTaskPolicyTimeLimit and
	// TestTaskPolicyInlineTestsIgnoreTheTimeLimit are about it, with a
	// limit of their own; the other tests check what the cost budget
	// decides, so here the backstop is far away.
	taskBounds.timeLimit = time.Minute
	goleak.VerifyTestMain(m)
}

func mustCompile(t testing.TB, src string) *Policy {
	t.Helper()
	p, err := Compile([]byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestTestdataPolicies compiles every policy under testdata/, which runs its
// inline test cases (a failing case fails Compile).
func TestTestdataPolicies(t *testing.T) {
	t.Parallel()
	files, _ := filepath.Glob("testdata/*.yaml")
	if len(files) == 0 {
		t.Fatal("no testdata policies")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			t.Parallel()
			src, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			mustCompile(t, string(src))
		})
	}
}

// TestInvalidPolicies: each file under testdata/invalid is rejected with an
// error that says what is wrong.
func TestInvalidPolicies(t *testing.T) {
	t.Parallel()
	want := map[string]string{
		"syntax.yaml":       "rule bad: when:",
		"notbool.yaml":      "must be a bool expression",
		"allow.yaml":        `"allow" is not a rule action`,
		"phrase_deny.yaml":  "phrase rules stop",
		"hold_content.yaml": "tool calls only",
		"dup.yaml":          "duplicate id",
		"unknown_key.yaml":  "field rulez not found",
		"failing_test.yaml": `test "should stop": got stop by "a"`,
		"undeclared.yaml":   "undeclared reference",
		"reserved_id.yaml":  `not start with "limit."`,
		"negative.yaml":     "must not be negative",
	}
	files, _ := filepath.Glob("testdata/invalid/*.yaml")
	if len(files) != len(want) {
		t.Fatalf("%d invalid files, %d expectations", len(files), len(want))
	}
	for _, f := range files {
		name := filepath.Base(f)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			src, _ := os.ReadFile(f)
			_, err := Compile(src)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v, want ErrInvalid", err)
			}
			if w, ok := want[name]; !ok || !strings.Contains(err.Error(), w) {
				t.Fatalf("error %q does not contain %q", err, w)
			}
		})
	}
}

func TestEvaluateTable(t *testing.T) {
	t.Parallel()
	p := mustCompile(t, `
version: 1
limits: {max_tokens: 100}
rules:
  - id: stop-word
    phrases: ["forbidden phrase"]
    action: stop
  - id: deny-del
    when: tool_name == "delete"
    action: deny
    reason: no deletes
  - id: hold-pay
    when: tool_name == "pay" && double(tool_args.amount) > 10.0
    action: hold
    hold_timeout: 3s
  - id: stop-tenant
    when: tenant == "blocked"
    action: stop
  - id: loop
    when: "[1,2,3,4,5,6,7,8,9,10].all(i, [1,2,3,4,5,6,7,8,9,10].all(j, [1,2,3,4,5,6,7,8,9,10].all(k, window.contains(string(i*j*k)) || true)))"
    on: [error]
    action: stop
`)
	tests := []struct {
		name   string
		pkts   []Packet
		st     State
		action Action
		rule   string
		code   dispatchv1.StopCode
	}{
		{"allow content", []Packet{{Kind: KindContent, Text: "hello"}}, State{}, Allow, "", noStop},
		{"phrase in one chunk", []Packet{{Kind: KindContent, Text: "a Forbidden Phrase!"}}, State{}, Stop, "stop-word", policyStop},
		{"phrase split", []Packet{{Kind: KindContent, Text: "forbid"}, {Kind: KindContent, Text: "den phr"}, {Kind: KindContent, Text: "ase"}}, State{}, Stop, "stop-word", policyStop},
		{"phrase across utf-8", []Packet{{Kind: KindContent, Text: "é forbidden "}, {Kind: KindContent, Text: "phrase"}}, State{}, Stop, "stop-word", policyStop},
		{"deny", []Packet{{Kind: KindToolCall, ToolName: "delete", ToolArgsJSON: "{}"}}, State{}, Deny, "deny-del", noStop},
		{"hold", []Packet{{Kind: KindToolCall, ToolName: "pay", ToolArgsJSON: `{"amount": 12}`}}, State{}, Hold, "hold-pay", noStop},
		{"small pay", []Packet{{Kind: KindToolCall, ToolName: "pay", ToolArgsJSON: `{"amount": 2}`}}, State{}, Allow, "", noStop},
		{"bad json fails closed", []Packet{{Kind: KindToolCall, ToolName: "pay", ToolArgsJSON: `{not json`}}, State{}, Hold, "hold-pay", noStop},
		{"stop beats deny", []Packet{{Kind: KindToolCall, ToolName: "delete"}}, State{Tenant: "blocked"}, Stop, "stop-tenant", policyStop},
		{"tokens", []Packet{{Kind: KindUsage}}, State{InputTokens: 60, OutputTokens: 41}, Stop, "limit.max_tokens", budget},
		{"tokens at limit", []Packet{{Kind: KindUsage}}, State{InputTokens: 60, OutputTokens: 40}, Allow, "", noStop},
		{"cost limit fires", []Packet{{Kind: KindError, Text: "x"}}, State{}, Stop, "loop", policyStop},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src := &staticSource{p: p}
			s := NewSession(src, nil)
			var d Decision
			for i, pkt := range tc.pkts {
				d = s.Evaluate(context.Background(), pkt, tc.st)
				if i < len(tc.pkts)-1 && d.Action != Allow {
					t.Fatalf("packet %d: %v", i, d)
				}
			}
			if d.Action != tc.action || d.RuleID != tc.rule || d.StopCode != tc.code {
				t.Fatalf("got %s %q %v (%s), want %s %q %v", d.Action, d.RuleID, d.StopCode, d.Reason, tc.action, tc.rule, tc.code)
			}
			if d.Action == Hold && d.HoldTimeout != 3*time.Second {
				t.Fatalf("hold timeout %v", d.HoldTimeout)
			}
			if d.Action != Allow && (d.PolicyVersion != p.Version || src.stats.RuleCount(d.RuleID) != 1) {
				t.Fatalf("version %q count %d", d.PolicyVersion, src.stats.RuleCount(d.RuleID))
			}
		})
	}
}

// TestTaskRulesOnlyTighten: a task's extra policy adds restrictions and
// tighter limits; its looser limit does not loosen the global one.
func TestTaskRulesOnlyTighten(t *testing.T) {
	t.Parallel()
	global := mustCompile(t, `
limits: {max_cost: 1.0}
rules:
  - {id: g-deny, when: 'tool_name == "rm"', action: deny}
`)
	extra := mustCompile(t, `
limits: {max_cost: 100.0, max_steps: 2}
rules:
  - {id: t-hold, when: 'tool_name == "rm" || tool_name == "ls"', action: hold}
  - {id: t-stop, phrases: [oops], action: stop}
`)
	src := &staticSource{p: global}
	cases := []struct {
		name   string
		pkt    Packet
		st     State
		action Action
		rule   string
		code   dispatchv1.StopCode
	}{
		{"global deny beats task hold", Packet{Kind: KindToolCall, ToolName: "rm"}, State{}, Deny, "g-deny", noStop},
		{"task hold", Packet{Kind: KindToolCall, ToolName: "ls"}, State{}, Hold, "t-hold", noStop},
		{"task phrase", Packet{Kind: KindContent, Text: "oops"}, State{}, Stop, "t-stop", policyStop},
		{"global cost limit still holds", Packet{Kind: KindUsage}, State{Cost: 1.5}, Stop, "limit.max_cost", budget},
		{"task step limit", Packet{Kind: KindUsage}, State{Steps: 3}, Stop, "limit.max_steps", budget},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			d := NewSession(src, extra).Evaluate(context.Background(), c.pkt, c.st)
			if d.Action != c.action || d.RuleID != c.rule || d.StopCode != c.code {
				t.Errorf("got %s %q %v, want %s %q %v", d.Action, d.RuleID, d.StopCode, c.action, c.rule, c.code)
			}
		})
	}
}

func TestTailIsBounded(t *testing.T) {
	t.Parallel()
	p := mustCompile(t, `
text_window: 16
rules:
  - {id: long, phrases: ["abcdefghijklmnopqrstuvwxyz0123456789"], action: stop}
`)
	s := NewSession(&staticSource{p: p}, nil)
	for range 1000 {
		s.Evaluate(context.Background(), Packet{Kind: KindContent, Text: "0123456789"}, State{})
	}
	if n := len(s.tails[0]); n > 2*35 { // keep = longest phrase - 1
		t.Fatalf("tail %d bytes", n)
	}
	// The longest phrase still matches when split in single bytes.
	var d Decision
	for _, c := range "abcdefghijklmnopqrstuvwxyz0123456789" {
		d = s.Evaluate(context.Background(), Packet{Kind: KindContent, Text: string(c)}, State{})
	}
	if d.Action != Stop {
		t.Fatalf("byte-by-byte phrase: %v", d)
	}
}

func TestEngineWatchReloads(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "policy.yaml")
	v1 := "rules:\n  - {id: r1, phrases: [one], action: stop}\n"
	if err := os.WriteFile(path, []byte(v1), 0o600); err != nil {
		t.Fatal(err)
	}
	e := NewEngine(nil)
	p1, err := e.LoadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { defer close(watched); e.Watch(ctx, path, 5*time.Millisecond) }()
	defer func() {
		cancel()
		testutil.Done(t, watched, testutil.Wait, "Watch to return when its context ends")
	}()

	// A broken file is rejected; the old policy stays.
	if err := os.WriteFile(path, []byte("rules:\n  - {id: r2, when: 'nope(', action: stop}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool { return e.Stats().ReloadFailures.Load() == 1 }, "the broken file's rejection")
	if e.Current() != p1 {
		t.Fatal("broken policy replaced the old one")
	}
	// A good file replaces it.
	v2 := "rules:\n  - {id: r2, phrases: [two], action: stop}\n"
	if err := os.WriteFile(path, []byte(v2), 0o600); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, testutil.Wait, func() bool { return e.Stats().Reloads.Load() >= 1 }, "the good file's reload")
	// os.WriteFile truncates, then writes: on a loaded machine the watcher
	// may see the file part-written first (held still for one 5 ms
	// interval) and load that, then the whole file. What must hold is that
	// the good file ends up in force.
	testutil.WaitFor(t, testutil.Wait, func() bool {
		return NewSession(e, nil).Evaluate(context.Background(), Packet{Kind: KindContent, Text: "two"}, State{}).RuleID == "r2"
	}, "the good file's rule in force")
}

// FuzzEvaluate: no packet, however odd, makes evaluation panic or hang
// (every CEL evaluation has a cost limit).
func FuzzEvaluate(f *testing.F) {
	src, err := os.ReadFile("testdata/example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	global := mustCompile(f, string(src))
	extra := mustCompile(f, `
rules:
  - {id: big, when: 'tool_args_json.size() > 100 && tool_args.exists(k, k.size() > 3)', action: hold}
  - {id: re, when: 'window.matches("(a|b)*c+d")', on: [content, thought], action: stop}
  - {id: nested, when: 'has(tool_args.a) && tool_args.a.b.c == 1', action: deny, on_error: ignore}
`)
	f.Add(uint8(1), "The laun", "ch codes", "shell", `{"cmd":"rm -rf /"}`, int64(10), 0.5)
	f.Add(uint8(2), "", "", "computer.click", `{"x":1}`, int64(0), 0.0)
	f.Add(uint8(0), "\xff\xfe", "BEGIN PRIVATE", "", `[1,2,`, int64(-5), -1.0)
	f.Add(uint8(5), "abababab", "ccd", "x", `{"a":{"b":{"c":1}}}`, int64(1<<62), 1e308)
	f.Fuzz(func(t *testing.T, k uint8, t1, t2, tool, args string, tokens int64, cost float64) {
		s := NewSession(&staticSource{p: global}, extra)
		kind := kinds[int(k)%len(kinds)]
		st := State{InputTokens: tokens, Cost: cost, Labels: map[string]string{"mode": t1}}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		start := time.Now()
		for _, text := range []string{t1, t2} {
			d := s.Evaluate(ctx, Packet{Kind: kind, Text: text, ToolName: tool, ToolArgsJSON: args}, st)
			if d.Action < Allow || d.Action > Stop || (d.Action != Allow && d.RuleID == "") {
				t.Fatalf("bad decision %+v", d)
			}
		}
		if el := time.Since(start); el > time.Second {
			t.Fatalf("evaluation took %v", el)
		}
	})
}

// BenchmarkEvaluate measures one content packet and one tool call against
// policies of 0, 1, 10 and 100 CEL rules (plus one phrase rule and limits).
func BenchmarkEvaluate(b *testing.B) {
	for _, n := range []int{0, 1, 10, 100} {
		var sb strings.Builder
		sb.WriteString("limits: {max_tokens: 1000000, max_tool_calls_per_minute: 1000000000}\nrules:\n  - {id: phrase, phrases: [launch codes, private key], action: stop}\n")
		for i := range n {
			switch i % 3 {
			case 0:
				fmt.Fprintf(&sb, "  - {id: r%d, when: 'tool_name == \"tool%d\" && tool_args.cmd.contains(\"rm\")', action: deny}\n", i, i)
			case 1:
				fmt.Fprintf(&sb, "  - {id: r%d, when: 'kind == \"content\" && window.contains(\"word%d\")', action: stop}\n", i, i)
			default:
				fmt.Fprintf(&sb, "  - {id: r%d, when: 'cost > %d.0 || labels[\"tenant%d\"] == \"x\"', action: stop, on_error: ignore}\n", i, 1000+i, i)
			}
		}
		p := mustCompile(b, sb.String())
		src := &staticSource{p: p}
		st := State{InputTokens: 100, Cost: 0.1, Labels: map[string]string{"team": "a"}}
		b.Run(fmt.Sprintf("content/rules=%d", n), func(b *testing.B) {
			s := NewSession(src, nil)
			pkt := Packet{Kind: KindContent, Text: "a typical streamed chunk of text "}
			b.ReportAllocs()
			for b.Loop() {
				s.Evaluate(context.Background(), pkt, st)
			}
		})
		b.Run(fmt.Sprintf("tool_call/rules=%d", n), func(b *testing.B) {
			s := NewSession(src, nil)
			pkt := Packet{Kind: KindToolCall, ToolName: "shell", ToolArgsJSON: `{"cmd":"ls -l"}`}
			b.ReportAllocs()
			for b.Loop() {
				s.Evaluate(context.Background(), pkt, st)
			}
		})
	}
}

// FuzzPhraseSplit: splitting a text into three chunks at any byte offsets
// stops the session exactly when the unsplit text would: the tail window
// loses no match and invents none.
func FuzzPhraseSplit(f *testing.F) {
	p := mustCompile(f, `
text_window: 8
rules:
  - {id: p, phrases: ["launch codes", "Straße key", "xx"], action: stop}
`)
	f.Add("the launch codes are", 7, 14)
	f.Add("STRASSE straße KEY", 3, 12)
	f.Add("ax xa", 2, 3)
	f.Add("launch cod", 0, 10)
	f.Fuzz(func(t *testing.T, text string, i, j int) {
		if len(text) > 4096 {
			return
		}
		i = min(max(i, 0), len(text))
		j = min(max(j, i), len(text))
		src := &staticSource{p: p}
		whole := NewSession(src, nil).Evaluate(context.Background(), Packet{Kind: KindContent, Text: text}, State{}).Action == Stop
		s := NewSession(src, nil)
		stoppedAt := -1
		for k, ch := range []string{text[:i], text[i:j], text[j:]} {
			if s.Evaluate(context.Background(), Packet{Kind: KindContent, Text: ch}, State{}).Action == Stop {
				stoppedAt = k
				break
			}
		}
		if whole != (stoppedAt >= 0) {
			t.Fatalf("whole text stop=%v, split stop at chunk %d", whole, stoppedAt)
		}
	})
}

// TestCompileConcurrently: policies are compiled concurrently (each
// SubmitTask compiles its task's rules, a reload compiles the file) and
// must not race on the shared CEL environment, also when one of them has
// a mistake (the checker builds its error catalog then) while others have
// comprehensions (the checker clones its environment then). Run with -race.
// It uses an environment of its own, so that no earlier test has already
// made the first mistake.
func TestCompileConcurrently(t *testing.T) {
	t.Parallel()
	env, err := newCELEnv()
	if err != nil {
		t.Fatal(err)
	}
	const loops, workers = 20, 4
	started := make(chan struct{}, workers)
	done := make(chan error, workers)
	for range workers {
		go func() {
			for i := range loops {
				if _, iss := env.Compile(`[1, 2].all(i, i > 0) && labels.exists(k, k == "x")`); iss.Err() != nil {
					done <- iss.Err()
					return
				}
				if i == 0 {
					started <- struct{}{}
				}
			}
			done <- nil
		}()
	}
	for range workers {
		testutil.Recv(t, started, testutil.Wait, "the comprehensions to be compiling")
	}
	if _, iss := env.Compile("no_such_variable == 1"); iss.Err() == nil {
		t.Error("an undeclared reference compiled")
	}
	for range workers {
		if err := testutil.Recv(t, done, testutil.Wait, "the comprehensions to compile"); err != nil {
			t.Error(err)
		}
	}
}

// TestSkipIsEvaluateWithoutRules: with no rules and no limits in force,
// Skip advances a session exactly as Evaluate's Allow would (the text tail,
// so that a phrase split across a reload is still caught) and counts the
// evaluation; with rules, limits or a tool call it does nothing.
func TestSkipIsEvaluateWithoutRules(t *testing.T) {
	t.Parallel()
	e := NewEngine(nil)
	skipped, evaluated := NewSession(e, nil), NewSession(e, nil)
	for i := range 500 {
		kind := KindContent
		if i%3 == 0 {
			kind = KindThought
		}
		text := strings.Repeat("ab", i%40)
		if !skipped.Skip(kind, text) {
			t.Fatalf("packet %d: Skip refused under the empty policy", i)
		}
		if d := evaluated.Evaluate(context.Background(), Packet{Kind: kind, Text: text}, State{}); d.Action != Allow {
			t.Fatalf("packet %d: %v", i, d)
		}
	}
	if got, want := e.Stats().Evaluations.Load(), int64(1000); got != want {
		t.Fatalf("evaluations %d, want %d", got, want)
	}
	for i := range skipped.tails {
		if string(skipped.tails[i]) != string(evaluated.tails[i]) {
			t.Fatalf("tail %d: %q after Skip, %q after Evaluate", i, skipped.tails[i], evaluated.tails[i])
		}
	}
	if skipped.Skip(KindToolCall, "") {
		t.Fatal("Skip took a tool call")
	}

	// The first half of a phrase skipped, the reload, the second half.
	if !skipped.Skip(KindContent, "xx launch") {
		t.Fatal("Skip refused")
	}
	if _, err := e.Load([]byte("version: 1\nrules:\n  - {id: p, phrases: [\"launch codes\"], action: stop}\n")); err != nil {
		t.Fatal(err)
	}
	if skipped.Skip(KindContent, " codes") {
		t.Fatal("Skip took a packet under a policy with rules")
	}
	if d := skipped.Evaluate(context.Background(), Packet{Kind: KindContent, Text: " codes"}, State{}); d.Action != Stop || d.RuleID != "p" {
		t.Fatalf("phrase split across the reload: %v", d)
	}

	limits := NewSession(NewEngine(nil), mustCompile(t, "version: 1\nlimits: {max_steps: 3}\n"))
	if limits.Skip(KindContent, "x") {
		t.Fatal("Skip took a packet under a task policy with limits")
	}
	rules := NewSession(NewEngine(nil), mustCompile(t, "version: 1\nrules:\n  - {id: w, when: 'kind == \"content\"', action: stop}\n"))
	if rules.Skip(KindContent, "x") {
		t.Fatal("Skip took a packet under a task policy with rules")
	}
}

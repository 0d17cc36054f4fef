package policy

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/cost"
	"cel.dev/cel-go/ext"
	yaml "go.yaml.in/yaml/v3"
)

// ErrInvalid wraps every reason a policy is rejected (syntax, compile
// error, failed inline test).
var ErrInvalid = errors.New("invalid policy")

// Bounds of a policy file.
const (
	// DefaultCostLimit is the CEL cost budget of one rule's evaluation.
	DefaultCostLimit = 100_000
	// MaxCostLimit caps cost_limit in a file.
	MaxCostLimit = 10_000_000
	// DefaultTextWindow is how many bytes of recent text (per stream:
	// content, thought) the variable window holds besides the packet.
	DefaultTextWindow = 1024
	// MaxTextWindow caps text_window and the length of a phrase.
	MaxTextWindow = 64 << 10
	// DefaultHoldTimeout is how long a hold waits for an approval.
	DefaultHoldTimeout = 5 * time.Minute
	// MaxHoldTimeout caps hold_timeout.
	MaxHoldTimeout = time.Hour
	maxRules       = 1000
	maxFileBytes   = 4 << 20
	maxIDLen       = 128
)

// Limits are the built-in rules that need no CEL. Zero means no limit.
type Limits struct {
	// MaxTokens bounds input + output tokens of the session (stop).
	MaxTokens int64 `yaml:"max_tokens"`
	// MaxCost bounds the session's cost (stop).
	MaxCost float64 `yaml:"max_cost"`
	// MaxSteps bounds the planner steps (stop).
	MaxSteps int64 `yaml:"max_steps"`
	// MaxToolCallsPerMinute bounds tool calls in any 60 s (deny).
	MaxToolCallsPerMinute int64 `yaml:"max_tool_calls_per_minute"`
}

// tighter combines two limit sets: the smaller non-zero value of each.
func (l Limits) tighter(o Limits) Limits {
	minI := func(a, b int64) int64 {
		if a == 0 || (b != 0 && b < a) {
			return b
		}
		return a
	}
	minF := func(a, b float64) float64 {
		if a == 0 || (b != 0 && b < a) {
			return b
		}
		return a
	}
	return Limits{
		MaxTokens:             minI(l.MaxTokens, o.MaxTokens),
		MaxCost:               minF(l.MaxCost, o.MaxCost),
		MaxSteps:              minI(l.MaxSteps, o.MaxSteps),
		MaxToolCallsPerMinute: minI(l.MaxToolCallsPerMinute, o.MaxToolCallsPerMinute),
	}
}

// duration is a time.Duration written as "30s" in YAML.
type duration time.Duration

func (d *duration) UnmarshalYAML(n *yaml.Node) error {
	var s string
	if err := n.Decode(&s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("line %d: %q is not a duration (e.g. 30s, 5m)", n.Line, s)
	}
	*d = duration(v)
	return nil
}

// fileSpec is the YAML document (docs/policies.md).
type fileSpec struct {
	Version     int        `yaml:"version"`
	CostLimit   uint64     `yaml:"cost_limit"`
	TextWindow  int        `yaml:"text_window"`
	HoldTimeout duration   `yaml:"hold_timeout"`
	Limits      Limits     `yaml:"limits"`
	Rules       []ruleSpec `yaml:"rules"`
	Tests       []testSpec `yaml:"tests"`
}

type ruleSpec struct {
	ID          string   `yaml:"id"`
	Description string   `yaml:"description"`
	When        string   `yaml:"when"`
	Phrases     []string `yaml:"phrases"`
	// CaseSensitive makes phrase matching exact (default: ASCII case folded).
	CaseSensitive bool     `yaml:"case_sensitive"`
	On            []string `yaml:"on"`
	Action        string   `yaml:"action"`
	Reason        string   `yaml:"reason"`
	HoldTimeout   duration `yaml:"hold_timeout"`
	// OnError is what an evaluation error (including the cost limit) means:
	// "fire" (default: fail closed, the rule's action applies) or "ignore".
	OnError string `yaml:"on_error"`
}

// rule is one compiled rule: a CEL condition or a phrase list.
type rule struct {
	id          string
	action      Action
	reason      string
	holdTimeout time.Duration
	on          uint16 // bit per kind index
	prg         cel.Program
	costLimit   uint64   // the program's cost limit
	estimate    uint64   // static cost for a nominal packet (with a budget only)
	regex       int      // size of its constant patterns (task policies only)
	phrases     [][]byte // lower-cased unless caseSensitive
	caseSens    bool
	failClosed  bool
}

func (r *rule) applies(kindBit uint16) bool { return r.on&kindBit != 0 }

// Policy is a compiled, tested policy. It is immutable and safe for
// concurrent use.
type Policy struct {
	// Version is a short hash of the source, recorded with decisions.
	Version     string
	limits      Limits
	rules       []*rule // CEL rules, file order
	text        []*rule // phrase rules, file order
	window      int
	keep        int // bytes of text tail to keep: max(window, longest phrase-1)
	maxPhrase   int // longest phrase, bytes
	holdTimeout time.Duration
	numRules    int
	src         []byte // the YAML it was compiled from, for storing with a task
	// budget is the most the policy may spend on one packet (CEL cost
	// units; 0: no budget, the operator's policy), estimate its static
	// estimate for a nominal packet (budget.go).
	budget    uint64
	estimate  uint64
	timeLimit time.Duration // the backstop of budget (0: none)
}

// Source returns the YAML the policy was compiled from. Compiling it again
// gives an equivalent policy (tasks store their own policy this way).
func (p *Policy) Source() []byte { return p.src }

// Limits returns the policy's built-in limits.
func (p *Policy) Limits() Limits { return p.limits }

// NumRules is the number of rules (CEL and phrase; limits not counted).
func (p *Policy) NumRules() int {
	if p == nil {
		return 0
	}
	return p.numRules
}

// celEnv declares the variables rules see (docs/policies.md).
var celEnv = sync.OnceValues(newCELEnv)

// newCELEnv returns a new CEL environment for rules, ready for concurrent
// use. Compile may run concurrently (task policies at submit, reloads), and
// cel-go's type checker, shared by every compilation, fills its error
// catalog lazily the first time an expression has a mistake while other
// checks read it without a lock (a data race in cel-go v0.33). One failing
// check here fills it before anyone else can use the environment.
func newCELEnv() (*cel.Env, error) {
	env, err := cel.NewEnv(
		cel.Variable("kind", cel.StringType),
		cel.Variable("text", cel.StringType),
		cel.Variable("window", cel.StringType),
		cel.Variable("stage", cel.StringType),
		cel.Variable("tool_name", cel.StringType),
		cel.Variable("tool_args", cel.DynType),
		cel.Variable("tool_args_json", cel.StringType),
		cel.Variable("tokens", cel.IntType),
		cel.Variable("input_tokens", cel.IntType),
		cel.Variable("output_tokens", cel.IntType),
		cel.Variable("cost", cel.DoubleType),
		cel.Variable("steps", cel.IntType),
		cel.Variable("elapsed", cel.DurationType),
		cel.Variable("tool_calls", cel.IntType),
		cel.Variable("tool_calls_last_minute", cel.IntType),
		cel.Variable("tenant", cel.StringType),
		cel.Variable("labels", cel.MapType(cel.StringType, cel.StringType)),
		cel.Variable("planner", cel.StringType),
		cel.Variable("task_id", cel.StringType),
		ext.Strings(),
	)
	if err != nil {
		return nil, err
	}
	_, _ = env.Compile("undeclared_reference_fills_the_checker_catalog")
	return env, nil
}

// Compile parses a policy file, compiles its rules and runs its inline
// tests. Any problem is an error wrapping ErrInvalid that names the rule or
// test and says what is wrong. It is for the operator's file; a task's own
// policy is compiled by CompileTask.
func Compile(src []byte) (*Policy, error) { return compile(src, operatorBounds) }

func compile(src []byte, b *bounds) (*Policy, error) {
	if len(src) > b.maxBytes {
		return nil, fmt.Errorf("%w: %s too large: %d bytes > %d", ErrInvalid, b.name, len(src), b.maxBytes)
	}
	var spec fileSpec
	dec := yaml.NewDecoder(bytes.NewReader(src))
	dec.KnownFields(true)
	// io.EOF: an empty document, an empty policy (it allows everything).
	if err := dec.Decode(&spec); err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	p, err := build(&spec, src, b)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	if b.maxTestPackets > 0 {
		n := 0
		for _, tc := range spec.Tests {
			n += max(len(tc.Packets), 1)
		}
		if n > b.maxTestPackets {
			return nil, fmt.Errorf("%w: too many test packets: %d (max %d for a %s)", ErrInvalid, n, b.maxTestPackets, b.name)
		}
	}
	if err := runTests(p, spec.Tests, b.testBudget); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return p, nil
}

func build(spec *fileSpec, src []byte, b *bounds) (*Policy, error) {
	if spec.Version != 0 && spec.Version != 1 {
		return nil, fmt.Errorf("version %d is not supported (want 1)", spec.Version)
	}
	sum := sha256.Sum256(src)
	p := &Policy{
		src:         bytes.Clone(src),
		Version:     hex.EncodeToString(sum[:6]),
		limits:      spec.Limits,
		window:      DefaultTextWindow,
		holdTimeout: DefaultHoldTimeout,
		budget:      b.packetBudget,
		timeLimit:   b.timeLimit,
	}
	if c := spec.Limits.MaxCost; math.IsNaN(c) || math.IsInf(c, 0) {
		// NaN compares false with every cost and Inf is never reached:
		// either would be no limit at all.
		return nil, errors.New("max_cost must be a finite number")
	}
	if l := spec.Limits; l.MaxTokens < 0 || l.MaxCost < 0 || l.MaxSteps < 0 || l.MaxToolCallsPerMinute < 0 {
		return nil, errors.New("limits must not be negative")
	}
	costLimit := b.defaultCostLimit
	if spec.CostLimit > 0 {
		costLimit = min(spec.CostLimit, b.maxCostLimit)
	}
	if spec.TextWindow < 0 || spec.TextWindow > b.maxTextWindow {
		return nil, fmt.Errorf("text_window must be between 0 and %d", b.maxTextWindow)
	}
	if spec.TextWindow > 0 {
		p.window = spec.TextWindow
	}
	if spec.HoldTimeout != 0 {
		ht := time.Duration(spec.HoldTimeout)
		if ht <= 0 || ht > MaxHoldTimeout {
			return nil, fmt.Errorf("hold_timeout must be positive and at most %s", MaxHoldTimeout)
		}
		p.holdTimeout = ht
	}
	if len(spec.Rules) > b.maxRules {
		return nil, fmt.Errorf("too many rules: %d (max %d for a %s)", len(spec.Rules), b.maxRules, b.name)
	}
	// The cheap bounds first: nothing is compiled if they fail.
	var exprBytes, phrases int
	for _, rs := range spec.Rules {
		exprBytes += len(rs.When)
		phrases += len(rs.Phrases)
	}
	if b.maxExprBytes > 0 && exprBytes > b.maxExprBytes {
		return nil, fmt.Errorf("conditions too long: %d bytes of CEL in all (max %d for a %s)", exprBytes, b.maxExprBytes, b.name)
	}
	if b.maxPhrases > 0 && phrases > b.maxPhrases {
		return nil, fmt.Errorf("too many phrases: %d (max %d for a %s)", phrases, b.maxPhrases, b.name)
	}
	env, err := b.env()
	if err != nil {
		return nil, fmt.Errorf("CEL environment: %v", err)
	}
	p.keep = p.window
	seen := map[string]bool{}
	ests := map[string]uint64{}
	regex := 0
	for i, rs := range spec.Rules {
		r, est, err := buildRule(env, &rs, p, costLimit, b)
		if err != nil {
			name := rs.ID
			if name == "" {
				name = fmt.Sprintf("#%d", i+1)
			}
			return nil, fmt.Errorf("rule %s: %v", name, err)
		}
		if seen[r.id] {
			return nil, fmt.Errorf("rule %s: duplicate id", r.id)
		}
		seen[r.id] = true
		if regex = satAdd(regex, r.regex); b.maxRegexProgram > 0 && regex > b.maxRegexProgram {
			return nil, fmt.Errorf("regular expressions too large: about %d instructions in all (max %d for a %s)", regex, b.maxRegexProgram, b.name)
		}
		if p.budget > 0 {
			ests[r.id] = est
			p.estimate = cost.SafeAdd(p.estimate, est)
		}
		if r.prg != nil {
			p.rules = append(p.rules, r)
		} else {
			p.text = append(p.text, r)
			for _, ph := range r.phrases {
				p.keep = max(p.keep, len(ph)-1)
				p.maxPhrase = max(p.maxPhrase, len(ph))
			}
		}
	}
	p.numRules = len(p.rules) + len(p.text)
	if err := checkEstimate(p, ests, b); err != nil {
		return nil, err
	}
	return p, nil
}

func validID(id string) bool {
	if id == "" || len(id) > maxIDLen || strings.HasPrefix(id, "limit.") {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// buildRule compiles one rule; with a budget (b.packetBudget) it also
// returns the rule's estimated cost for a nominal packet.
func buildRule(env *cel.Env, rs *ruleSpec, p *Policy, costLimit uint64, b *bounds) (*rule, uint64, error) {
	r, err := buildRuleOnly(env, rs, p, costLimit, b)
	if err != nil || b.packetBudget == 0 {
		return r, 0, err
	}
	if r.prg == nil {
		// A phrase rule scans the packet (and the end of the stream before
		// it) for each phrase.
		est := uint64(TaskRuleCharge)
		for _, ph := range r.phrases {
			est += phraseCharge(nominalPacketBytes + len(ph) - 1)
		}
		return r, est, nil
	}
	return r, r.estimate, nil
}

func buildRuleOnly(env *cel.Env, rs *ruleSpec, p *Policy, costLimit uint64, b *bounds) (*rule, error) {
	if !validID(rs.ID) {
		return nil, errors.New("id must be 1-128 characters of [A-Za-z0-9._-] and not start with \"limit.\"")
	}
	act, ok := parseAction(rs.Action)
	if !ok {
		return nil, fmt.Errorf("action %q is not stop, deny or hold", rs.Action)
	}
	if act == Allow {
		// Rules only restrict: an allow rule could not loosen anything
		// (the most severe decision wins), so it is refused as a mistake.
		return nil, errors.New(`action "allow" is not a rule action: rules only stop, deny or hold; write the exception into the condition`)
	}
	r := &rule{id: rs.ID, action: act, reason: rs.Reason, holdTimeout: p.holdTimeout, caseSens: rs.CaseSensitive, failClosed: true}
	switch rs.OnError {
	case "", "fire":
	case "ignore":
		r.failClosed = false
	default:
		return nil, fmt.Errorf("on_error %q is not fire or ignore", rs.OnError)
	}
	if rs.HoldTimeout != 0 {
		if act != Hold {
			return nil, errors.New("hold_timeout is only for hold rules")
		}
		ht := time.Duration(rs.HoldTimeout)
		if ht <= 0 || ht > MaxHoldTimeout {
			return nil, fmt.Errorf("hold_timeout must be positive and at most %s", MaxHoldTimeout)
		}
		r.holdTimeout = ht
	}
	if (rs.When == "") == (len(rs.Phrases) == 0) {
		return nil, errors.New("a rule has exactly one of when (a CEL expression) or phrases")
	}
	if len(rs.Phrases) > 0 && act != Stop {
		return nil, errors.New("phrase rules stop the session (action: stop)")
	}
	// Which packets the rule looks at.
	on := rs.On
	if len(on) == 0 {
		switch {
		case len(rs.Phrases) > 0:
			on = []string{KindContent, KindThought}
		case act == Deny || act == Hold:
			on = []string{KindToolCall}
		default:
			on = kinds
		}
	}
	for _, k := range on {
		i := slices.Index(kinds, k)
		if i < 0 {
			return nil, fmt.Errorf("on: %q is not a packet kind (%s)", k, strings.Join(kinds, ", "))
		}
		if (act == Deny || act == Hold) && k != KindToolCall {
			return nil, fmt.Errorf("%s applies to tool calls only (on: %q)", act, k)
		}
		r.on |= 1 << i
	}
	if len(rs.Phrases) > 0 {
		for _, ph := range rs.Phrases {
			if ph == "" || len(ph) > b.maxPhraseBytes {
				return nil, fmt.Errorf("phrases must be 1 to %d bytes", b.maxPhraseBytes)
			}
			if !rs.CaseSensitive {
				ph = strings.ToLower(ph)
			}
			r.phrases = append(r.phrases, []byte(ph))
		}
		if r.reason == "" {
			r.reason = "forbidden phrase in the output"
		}
		return r, nil
	}
	ast, iss := env.Parse(rs.When)
	if iss.Err() != nil {
		return nil, fmt.Errorf("when: %v", iss.Err())
	}
	if b.maxRegexProgram > 0 {
		// Before anything compiles the patterns (the type checker does,
		// to check cel.RegexProgramSizeLimit, and so does the program).
		r.regex = regexSize(ast)
		if r.regex > b.maxRegexProgram {
			return nil, fmt.Errorf("when: regular expressions too large: about %d instructions (max %d for a %s)", r.regex, b.maxRegexProgram, b.name)
		}
	}
	ast, iss = env.Check(ast)
	if iss.Err() != nil {
		return nil, fmt.Errorf("when: %v", iss.Err())
	}
	if ast.OutputType() != cel.BoolType {
		return nil, fmt.Errorf("when must be a bool expression, not %s", ast.OutputType())
	}
	opts := b.programOptions(costLimit)
	if b.packetBudget > 0 {
		// The static estimate, and the same charges when it runs.
		est, err := ruleEstimate(env, ast, uint64(p.window)+nominalPacketBytes, costLimit)
		if err != nil {
			return nil, fmt.Errorf("when: estimating its cost: %v", err)
		}
		r.estimate = est
	}
	prg, err := env.Program(ast, opts...)
	if err != nil {
		return nil, fmt.Errorf("when: %v", err)
	}
	r.prg, r.costLimit = prg, costLimit
	if r.reason == "" {
		r.reason = "policy rule " + r.id
	}
	return r, nil
}

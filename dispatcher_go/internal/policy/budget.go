package policy

import (
	"fmt"
	"math"
	"regexp/syntax"
	"sort"
	"strings"
	"sync"
	"time"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/ast"
	"cel.dev/cel-go/common/cost"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/interpreter"
)

// A task's own policy (SubmitTaskRequest.policy_yaml) is a client's text
// run by the dispatcher on every packet of that task, so what it may cost is
// bounded twice (docs/policies.md, "Task policies: what they may cost"):
//
//   - at submission (CompileTask): its size, rules, phrases, the length and
//     nesting of its expressions, the size of its regular expressions and
//     the work of its inline tests are capped, so that compiling it takes a
//     few milliseconds at most; and the sum over its rules of CEL's static
//     cost estimate (cel.Env.EstimateCost) for a nominal packet must fit in
//     TaskEstimateBudget, or the task is refused;
//   - on every packet: the actual cost of its rules (CEL's cost tracker),
//     a fixed charge per rule evaluated and the phrases scanned are summed;
//     past TaskPacketBudget the evaluation ends and the task is stopped
//     (rule limit.policy_cost, STOP_CODE_BUDGET). A wall-clock backstop,
//     TaskPacketTimeLimit, does the same for whatever CEL would undercount.
//
// The operator's policy file is trusted and keeps its own, larger bounds
// (no total): nothing here applies to it.
const (
	// MaxTaskPolicyBytes caps the YAML of a task's policy.
	MaxTaskPolicyBytes = 16 << 10
	// MaxTaskRules caps the rules (CEL and phrase) of a task's policy.
	MaxTaskRules = 32
	// MaxTaskExprBytes caps the CEL source of all `when` conditions of a
	// task's policy together: parsing dominates compile time (1 to 5 µs a
	// byte, the most for dense list literals and macros).
	MaxTaskExprBytes = 1 << 10
	// MaxTaskNesting caps the nesting depth of a task rule's expression
	// (cel.ParserRecursionLimit): nested brackets make CEL's parser slow
	// down exponentially (120 nested `[1].map(x, …)` take over a second).
	MaxTaskNesting = 16
	// MaxTaskRegexProgram caps the size of the regular expressions of a
	// task's policy (instructions of the compiled program, all constant
	// patterns together; and each pattern computed at run time): a short
	// pattern such as `a{1000}` expands to a large program, and compiling
	// it takes about 0.3 µs an instruction.
	MaxTaskRegexProgram = 2048
	// MaxTaskPhrases caps the phrases of a task's policy (all rules), and
	// MaxTaskPhraseBytes the length of each.
	MaxTaskPhrases     = 64
	MaxTaskPhraseBytes = 256
	// MaxTaskTextWindow caps a task policy's text_window.
	MaxTaskTextWindow = 4096
	// MaxTaskTestPackets caps the packets of a task policy's inline tests
	// (all tests together).
	MaxTaskTestPackets = 64
	// TaskPacketBudget is what a task's policy may spend on one packet, in
	// CEL cost units (about one per operation, one per ten bytes a string
	// function reads; see docs/policies.md for the measured time). It is
	// also the default and the largest cost_limit of a task rule.
	TaskPacketBudget = 2000
	// TaskEstimateBudget bounds the static estimate of a task's policy: the
	// sum over its rules of CEL's worst case for a nominal packet, each rule
	// counted at most at its cost_limit. The estimate is an upper bound
	// (for a comprehension, often many times the actual cost), hence the
	// margin over TaskPacketBudget.
	TaskEstimateBudget = 4 * TaskPacketBudget
	// TaskTestBudget bounds what the inline tests of a task's policy may
	// spend together at submission.
	TaskTestBudget = 2 * TaskPacketBudget
	// TaskRuleCharge is charged for each rule evaluated besides its CEL
	// cost: the fixed work of one evaluation (activation, cost tracker).
	TaskRuleCharge = 10
	// TaskPacketTimeLimit is the backstop: a task's policy that takes longer
	// than this on one packet is stopped like one over its budget. Within
	// the budget an evaluation takes well under a millisecond; the limit is
	// there for work that CEL's cost model does not count (hashing a long
	// string as a map key, for instance).
	TaskPacketTimeLimit = 100 * time.Millisecond
	// regexCompileCharge is charged for each matches() call (with a unit
	// per byte of the pattern), for the pattern it may compile.
	regexCompileCharge = 20
	// phraseBytesPerUnit is the charge for scanning a packet for one
	// phrase (bytes.Contains is about ten times as fast per byte as a CEL
	// string function, which costs a unit per ten bytes).
	phraseBytesPerUnit = 100
	// nominalPacketBytes is the size of text, tool_args_json and tool_args
	// assumed by the static estimate: the estimate says whether a policy can
	// evaluate an ordinary packet within the budget. A larger packet costs
	// more and is checked when it comes.
	nominalPacketBytes = 1024
	// shortFieldBytes bounds tool_name, stage, planner, task_id, tenant and
	// label keys and values in the estimate (the task manager's limit on
	// client fields; model-sent names are short).
	shortFieldBytes = 256
	// maxLabelsEstimate is the task manager's maximum number of labels.
	maxLabelsEstimate = 64
)

// PolicyCostRule is the rule id of the stop of a task whose policy spent
// more than TaskPacketBudget on one packet. Like the other built-in limits
// ("limit.*", which no rule may take as its id) it stops with
// STOP_CODE_BUDGET: an allowance the dispatcher grants the task ran out.
const PolicyCostRule = "limit.policy_cost"

// bounds are what a policy file may hold and what it may cost.
type bounds struct {
	name             string // in errors: "policy file" or "task policy"
	maxBytes         int
	maxRules         int
	maxExprBytes     int // 0: no total
	defaultCostLimit uint64
	maxCostLimit     uint64
	maxTextWindow    int
	maxPhraseBytes   int
	maxPhrases       int    // 0: no total
	maxTestPackets   int    // 0: no total
	maxRegexProgram  int    // 0: no total
	packetBudget     uint64 // 0: no budget (and no estimate)
	estimateBudget   uint64
	testBudget       uint64
	timeLimit        time.Duration
	env              func() (*cel.Env, error)
	// programOptions are those of every rule's program.
	programOptions func(costLimit uint64) []cel.ProgramOption
}

// operatorBounds are those of the operator's policy file (--policy-file).
var operatorBounds = &bounds{
	name:             "policy file",
	maxBytes:         maxFileBytes,
	maxRules:         maxRules,
	defaultCostLimit: DefaultCostLimit,
	maxCostLimit:     MaxCostLimit,
	maxTextWindow:    MaxTextWindow,
	maxPhraseBytes:   MaxTextWindow,
	env:              celEnv,
	programOptions: func(costLimit uint64) []cel.ProgramOption {
		return []cel.ProgramOption{
			cel.CostLimit(costLimit),
			cel.InterruptCheckFrequency(100),
			cel.EvalOptions(cel.OptOptimize),
		}
	},
}

// taskBounds are those of a task's own policy.
var taskBounds = &bounds{
	name:             "task policy",
	maxBytes:         MaxTaskPolicyBytes,
	maxRules:         MaxTaskRules,
	maxExprBytes:     MaxTaskExprBytes,
	defaultCostLimit: TaskPacketBudget,
	maxCostLimit:     TaskPacketBudget,
	maxTextWindow:    MaxTaskTextWindow,
	maxPhraseBytes:   MaxTaskPhraseBytes,
	maxPhrases:       MaxTaskPhrases,
	maxTestPackets:   MaxTaskTestPackets,
	maxRegexProgram:  MaxTaskRegexProgram,
	packetBudget:     TaskPacketBudget,
	estimateBudget:   TaskEstimateBudget,
	testBudget:       TaskTestBudget,
	timeLimit:        TaskPacketTimeLimit,
	env:              taskEnv,
	programOptions: func(costLimit uint64) []cel.ProgramOption {
		return []cel.ProgramOption{
			cel.CostLimit(costLimit),
			// The charges of taskCost, on top of CEL's own.
			cel.CostTracking(taskCost{}),
			// Every comprehension step looks at the deadline
			// (TaskPacketTimeLimit).
			cel.InterruptCheckFrequency(1),
			// Constant patterns compiled once. Not OptOptimize: its
			// set-membership rewrite of `x in [...]` hashes x at no cost
			// in CEL's model, where in_list is charged by taskCost.
			cel.OptimizeRegex(interpreter.MatchesRegexOptimization),
		}
	},
}

// CompileTask is Compile for a task's own policy (SubmitTaskRequest
// .policy_yaml): the same format, within the task bounds above. A policy
// over them is an error wrapping ErrInvalid that says which bound and by how
// much ("policy too expensive: estimated cost 9120 per packet > budget
// 5000 …"). The policy it returns stops its task when one packet costs it
// more than TaskPacketBudget.
func CompileTask(src []byte) (*Policy, error) { return compile(src, taskBounds) }

// EstimatedCost is the static estimate of what the policy spends on a
// nominal packet, in CEL cost units; 0 for a policy without a budget (the
// operator's).
func (p *Policy) EstimatedCost() uint64 { return p.estimate }

// Budget is the most the policy may spend on one packet, in CEL cost
// units; 0 means no budget (the operator's policy).
func (p *Policy) Budget() uint64 { return p.budget }

// taskEnv is the CEL environment of task rules: the rules' environment with
// the parser's nesting and size bounded and the cost of the functions whose
// time grows with a string they read charged by its length (taskCost).
var taskEnv = sync.OnceValues(func() (*cel.Env, error) {
	base, err := celEnv()
	if err != nil {
		return nil, err
	}
	env, err := base.Extend(
		cel.ParserRecursionLimit(MaxTaskNesting),
		cel.ParserExpressionSizeLimit(MaxTaskExprBytes),
		// Patterns computed at run time (constant ones are checked before
		// they are compiled: regexTooLarge).
		cel.RegexProgramSizeLimit(MaxTaskRegexProgram),
		cel.CostModel(
			// Quoting, formatting and parsing a timestamp spend tens of ns
			// a byte (the error of a bad timestamp quotes its input): a unit
			// a byte read or written.
			cost.Overload("strings_quote", cost.EvalCost(cost.Sum(cost.Const(cost.CallCost), cost.Length(cost.Arg(0))))),
			cost.Overload("string_to_timestamp", cost.EvalCost(cost.Sum(cost.Const(cost.CallCost), cost.Length(cost.Arg(0))))),
			cost.MemberOverload("string_format", cost.EvalCost(cost.Sum(cost.Const(cost.CallCost), cost.Length(cost.Target()), cost.Length(cost.Result())))),
			// A match: CEL's own charge, plus compiling the pattern when
			// it is not a constant (about 1 µs and a unit a byte).
			cost.Overload("matches", cost.EvalCost(cost.Sum(
				cost.Mul(cost.Scale(cost.Sum(cost.Arg(0), cost.Const(1)), cost.StringTraversalCostFactor), cost.Scale(cost.Arg(1), cost.RegexStringLengthCostFactor)),
				cost.Const(regexCompileCharge), cost.Arg(1)))),
			cost.MemberOverload("matches_string", cost.EvalCost(cost.Sum(
				cost.Mul(cost.Scale(cost.Sum(cost.Target(), cost.Const(1)), cost.StringTraversalCostFactor), cost.Scale(cost.Arg(0), cost.RegexStringLengthCostFactor)),
				cost.Const(regexCompileCharge), cost.Arg(0)))),
		),
	)
	if err != nil {
		return nil, err
	}
	// See newCELEnv: fill the checker's error catalog before concurrent use.
	_, _ = env.Compile("undeclared_reference_fills_the_checker_catalog")
	return env, nil
})

// taskCost is the cost.Estimator (static) and cost.ActualCostEstimator
// (runtime) of task rules. As an Estimator it gives the sizes of the
// variables for a nominal packet. For both, it charges the functions that
// CEL counts as one unit whatever their input but whose time grows with the
// strings they are given — size(s), comparisons, conversions from string,
// and the cost tracker itself, which counts the code points of a string
// argument — at least a unit per ten bytes of their string arguments, as
// CEL charges a string scan. Other functions keep CEL's own cost.
type taskCost struct {
	window uint64 // the estimate's size of window
}

// linearOverloads are the standard overloads charged by taskCost.
var linearOverloads = map[string]bool{
	"size_string": true, "string_size": true, "size_bytes": true, "bytes_size": true,
	"equals": true, "not_equals": true, "in_list": true, "in_map": true,
	"less_string": true, "less_equals_string": true, "greater_string": true, "greater_equals_string": true,
	"less_bytes": true, "less_equals_bytes": true, "greater_bytes": true, "greater_equals_bytes": true,
	"string_to_int64": true, "string_to_uint64": true, "string_to_double": true, "string_to_bool": true,
	"string_to_duration": true, "string_to_bytes": true, "bytes_to_string": true,
}

// EstimateSize implements cost.Estimator.
func (c taskCost) EstimateSize(n cost.AstNode) *cost.SizeEstimate {
	path := n.Path()
	if len(path) == 0 {
		return nil
	}
	var sz cost.SizeEstimate
	switch path[0] {
	case "text", "tool_args_json", "tool_args":
		sz = cost.RangedSizeEstimate(0, nominalPacketBytes)
	case "window":
		sz = cost.RangedSizeEstimate(0, c.window)
	case "kind", "stage", "tool_name", "tenant", "planner", "task_id":
		sz = cost.RangedSizeEstimate(0, shortFieldBytes)
	case "labels":
		if len(path) > 1 {
			sz = cost.RangedSizeEstimate(0, shortFieldBytes)
		} else {
			field := cost.RangedSizeEstimate(0, shortFieldBytes)
			sz = cost.MapSizeEstimate(cost.RangedSizeEstimate(0, maxLabelsEstimate), field, field)
		}
	default:
		return nil
	}
	return &sz
}

// EstimateCallCost implements cost.Estimator.
func (c taskCost) EstimateCallCost(_, overloadID string, target *cost.AstNode, args []cost.AstNode) *cost.CallEstimate {
	if !linearOverloads[overloadID] {
		return nil
	}
	var bytes cost.SizeEstimate
	var seen bool
	add := func(n cost.AstNode) {
		if n == nil || !stringLike(n.Type()) {
			return
		}
		seen = true
		bytes = bytes.Add(cost.EstimateSize(c, n))
	}
	if target != nil {
		add(*target)
	}
	for _, a := range args {
		add(a)
	}
	if !seen {
		return nil
	}
	est := bytes.MultiplyByCostFactor(cost.StringCostFactor).Add(cost.FixedCostEstimate(cost.CallCost))
	return cost.NewCallEstimate(est, nil)
}

// stringLike: the argument may be a string or bytes (dyn may).
func stringLike(t *types.Type) bool {
	if t == nil {
		return false
	}
	switch t.Kind() {
	case types.StringKind, types.BytesKind, types.DynKind, types.AnyKind:
		return true
	}
	return false
}

// CallCost implements cost.ActualCostEstimator: for the overloads above,
// a unit per ten bytes of string arguments (CEL's own charge for the others).
func (taskCost) CallCost(_, overloadID string, args []ref.Val, _ ref.Val) *uint64 {
	if !linearOverloads[overloadID] {
		return nil
	}
	var n uint64
	var seen bool
	for _, a := range args {
		switch v := a.(type) {
		case types.String:
			n += uint64(len(v))
			seen = true
		case types.Bytes:
			n += uint64(len(v))
			seen = true
		}
	}
	if !seen {
		return nil
	}
	c := cost.CallCost + uint64(math.Ceil(float64(n)*cost.StringCostFactor))
	return &c
}

// ruleEstimate is a rule's static cost for a nominal packet: its CEL
// estimate (capped by its cost limit, which ends an evaluation) plus the
// charge per evaluation.
func ruleEstimate(env *cel.Env, ast *cel.Ast, window uint64, costLimit uint64) (uint64, error) {
	est, err := env.EstimateCost(ast, taskCost{window: window})
	if err != nil {
		return 0, err
	}
	return cost.SafeAdd(min(est.Max, costLimit), TaskRuleCharge), nil
}

// phraseCharge is what scanning n bytes for one phrase costs.
func phraseCharge(n int) uint64 { return 1 + uint64(n)/phraseBytesPerUnit }

// checkEstimate refuses a policy whose rules' estimated cost for a nominal
// packet is over its budget, naming the costliest rules.
func checkEstimate(p *Policy, ests map[string]uint64, b *bounds) error {
	if b.packetBudget == 0 || p.estimate <= b.estimateBudget {
		return nil
	}
	ids := make([]string, 0, len(ests))
	for id := range ests {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool {
		if ests[ids[i]] != ests[ids[j]] {
			return ests[ids[i]] > ests[ids[j]]
		}
		return ids[i] < ids[j]
	})
	var top []string
	for _, id := range ids[:min(3, len(ids))] {
		top = append(top, fmt.Sprintf("%s: %d", id, ests[id]))
	}
	return fmt.Errorf("policy too expensive: estimated cost %d per packet > budget %d (costliest rules: %s; "+
		"a rule counts at most its cost_limit: guard costly conditions with cheap ones, or lower cost_limit)",
		p.estimate, b.estimateBudget, strings.Join(top, ", "))
}

// regexSize is the summed program size of the constant patterns of a rule's
// matches() calls, estimated from their syntax tree without compiling them
// (compiling is what takes time).
func regexSize(a *cel.Ast) int {
	total := 0
	ast.PostOrderVisit(a.NativeRep().Expr(), ast.NewExprVisitor(func(e ast.Expr) {
		if e.Kind() != ast.CallKind || e.AsCall().FunctionName() != "matches" {
			return
		}
		c := e.AsCall()
		args := c.Args()
		var pat ast.Expr
		switch {
		case c.IsMemberFunction() && len(args) == 1:
			pat = args[0]
		case !c.IsMemberFunction() && len(args) == 2:
			pat = args[1]
		default:
			return
		}
		if pat.Kind() != ast.LiteralKind {
			return
		}
		s, ok := pat.AsLiteral().(types.String)
		if !ok {
			return
		}
		re, err := syntax.Parse(string(s), syntax.Perl)
		if err != nil {
			return // CEL reports it
		}
		total = satAdd(total, progSize(re))
	}))
	return total
}

const sizeCap = 1 << 30

func satAdd(a, b int) int { return min(a+b, sizeCap) }

func satMul(a, b int) int {
	if a != 0 && b > sizeCap/a {
		return sizeCap
	}
	return min(a*b, sizeCap)
}

// progSize is about the number of instructions re compiles to (an upper
// bound of regexp/syntax's: a repeat is its body that many times).
func progSize(re *syntax.Regexp) int {
	sub := 0
	for _, s := range re.Sub {
		sub = satAdd(sub, progSize(s))
	}
	switch re.Op {
	case syntax.OpLiteral:
		return max(len(re.Rune), 1)
	case syntax.OpCapture:
		return satAdd(sub, 2)
	case syntax.OpStar, syntax.OpPlus, syntax.OpQuest:
		return satAdd(sub, 1)
	case syntax.OpRepeat:
		n := re.Max
		if n < 0 {
			n = re.Min + 1
		}
		return satMul(max(n, 1), sub)
	case syntax.OpConcat, syntax.OpAlternate:
		return satAdd(sub, len(re.Sub))
	}
	return satAdd(sub, 1)
}

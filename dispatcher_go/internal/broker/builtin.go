package broker

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"
	_ "time/tzdata" // time_now must know IANA zones even in a scratch container

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Limits of the built-in tools.
const (
	maxSleep         = 60 * time.Second
	maxExpression    = 1024
	calcCostLimit    = 10_000
	calcInterruptAll = 100
)

type builtinTool struct {
	spec *dispatchv1.ToolSpec
	run  builtinFunc
	// instant: small, bounded work and no waiting (see Broker.Instant).
	instant bool
}

func (b *Broker) builtins() []builtinTool {
	tools := []builtinTool{
		{
			spec: &dispatchv1.ToolSpec{
				Name:        "calculator",
				Description: "Evaluates an arithmetic expression: numbers, + - * / %, parentheses. Division is exact unless % is used (then all numbers are integers).",
				ParametersJsonSchema: fmt.Sprintf(`{"type":"object","properties":{"expression":{"type":"string","minLength":1,"maxLength":%d,`+
					`"description":"e.g. (1 + 2) * 3.5"}},"required":["expression"],"additionalProperties":false}`, maxExpression),
			},
			run: b.calc.run,
		},
		{
			spec: &dispatchv1.ToolSpec{
				Name:                 "time_now",
				Description:          "Returns the current time in an IANA time zone (default UTC).",
				ParametersJsonSchema: `{"type":"object","properties":{"timezone":{"type":"string","maxLength":64,"description":"IANA name, e.g. Europe/Paris"}},"additionalProperties":false}`,
			},
			// Not instant: time.LoadLocation may read a zone file.
			run: timeNow,
		},
		{
			spec: &dispatchv1.ToolSpec{
				Name:        "sleep",
				Description: "Waits the given number of milliseconds (at most 60000); a stop cancels it.",
				ParametersJsonSchema: fmt.Sprintf(`{"type":"object","properties":{"ms":{"type":"integer","minimum":0,"maximum":%d}},`+
					`"required":["ms"],"additionalProperties":false}`, maxSleep.Milliseconds()),
				TimeoutMs: maxSleep.Milliseconds() + 1000,
			},
			run: sleep,
		},
		{
			spec: &dispatchv1.ToolSpec{
				Name:                 "echo",
				Description:          "Returns its arguments unchanged.",
				ParametersJsonSchema: `{"type":"object"}`,
			},
			run:     echo,
			instant: true,
		},
	}
	// Built-ins change nothing but time: a call lost in a session hand-over
	// is issued again (docs/protocol.md, "Session hand-over").
	for _, bt := range tools {
		bt.spec.Idempotent = true
	}
	return tools
}

func jsonResult(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", execFailed("encode result: %v", err)
	}
	return string(b), nil
}

func timeNow(_ context.Context, args map[string]any, _ string) (string, error) {
	tz, _ := args["timezone"].(string)
	if tz == "" {
		tz = "UTC"
	}
	loc, err := time.LoadLocation(tz)
	if err != nil || tz == "Local" {
		// "Local" would reveal the host's zone; it is not an IANA name.
		return "", invalidArgs("unknown time zone %q", tz)
	}
	now := time.Now().In(loc)
	return jsonResult(map[string]any{
		"timezone": tz,
		"time":     now.Format(time.RFC3339Nano),
		"unix_ms":  now.UnixMilli(),
	})
}

func sleep(ctx context.Context, args map[string]any, _ string) (string, error) {
	n, ok := args["ms"].(json.Number)
	if !ok {
		return "", invalidArgs("ms must be an integer")
	}
	ms, err := n.Int64()
	if err != nil || ms < 0 || ms > maxSleep.Milliseconds() {
		return "", invalidArgs("ms must be an integer between 0 and %d", maxSleep.Milliseconds())
	}
	t := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
		return jsonResult(map[string]any{"slept_ms": ms})
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

func echo(_ context.Context, args map[string]any, raw string) (string, error) {
	if strings.TrimSpace(raw) == "" {
		return "{}", nil
	}
	return raw, nil
}

// calculator evaluates arithmetic with CEL, the policy language of the
// dispatcher: no eval of planner text, a cost limit on every evaluation.
type calculator struct {
	env *cel.Env
}

func newCalculator() (*calculator, error) {
	env, err := cel.NewEnv()
	if err != nil {
		return nil, err
	}
	return &calculator{env: env}, nil
}

func (c *calculator) run(ctx context.Context, args map[string]any, _ string) (string, error) {
	expr, _ := args["expression"].(string)
	src, err := arithmetic(expr)
	if err != nil {
		return "", err
	}
	ast, iss := c.env.Compile(src)
	if iss.Err() != nil {
		return "", invalidArgs("not an arithmetic expression")
	}
	if t := ast.OutputType(); t != cel.IntType && t != cel.DoubleType {
		return "", invalidArgs("not an arithmetic expression")
	}
	prg, err := c.env.Program(ast, cel.CostLimit(calcCostLimit), cel.InterruptCheckFrequency(calcInterruptAll))
	if err != nil {
		return "", execFailed("cannot evaluate: %v", err)
	}
	out, _, err := prg.ContextEval(ctx, cel.NoVars())
	if err != nil {
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		return "", execFailed("evaluation failed: %v", err)
	}
	var result any
	switch v := out.(type) {
	case types.Int:
		result = int64(v)
	case types.Double:
		f := float64(v)
		if math.IsInf(f, 0) || math.IsNaN(f) {
			return "", execFailed("result is not a finite number (division by zero?)")
		}
		result = f
	default:
		return "", execFailed("result is not a number")
	}
	return jsonResult(map[string]any{"expression": expr, "result": result})
}

// arithmetic whitelists an expression (numbers, + - * / %, parentheses,
// spaces) and rewrites it for CEL. Integer literals become doubles so that
// 7/2 is 3.5 and 1 + 2.5 type-checks; with % (integers only in CEL) literals
// stay integers. Anything else is refused before CEL sees it.
func arithmetic(expr string) (string, error) {
	if len(expr) == 0 || len(expr) > maxExpression {
		return "", invalidArgs("expression must be 1..%d characters", maxExpression)
	}
	modulo := strings.ContainsRune(expr, '%')
	var b strings.Builder
	b.Grow(len(expr) + 16)
	for i := 0; i < len(expr); {
		ch := expr[i]
		switch {
		case ch == ' ' || ch == '\t' || ch == '\n':
			b.WriteByte(ch)
			i++
		case strings.IndexByte("+-*/%()", ch) >= 0:
			b.WriteByte(ch)
			i++
		case ch >= '0' && ch <= '9' || ch == '.':
			j, isFloat := scanNumber(expr, i)
			lit := expr[i:j]
			if lit == "." {
				return "", invalidArgs("malformed number at position %d", i)
			}
			if strings.HasPrefix(lit, ".") {
				lit = "0" + lit
			}
			if strings.HasSuffix(lit, ".") {
				lit += "0"
			}
			if isFloat && modulo {
				return "", invalidArgs("%% needs integer operands")
			}
			b.WriteString(lit)
			if !isFloat && !modulo {
				b.WriteString(".0")
			}
			i = j
		default:
			return "", invalidArgs("unsupported character %q at position %d", ch, i)
		}
	}
	return b.String(), nil
}

// scanNumber returns the end of the number starting at i and whether it has
// a fraction or an exponent.
func scanNumber(s string, i int) (end int, isFloat bool) {
	digits := func() {
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
		}
	}
	digits()
	if i < len(s) && s[i] == '.' {
		isFloat = true
		i++
		digits()
	}
	if i < len(s) && (s[i] == 'e' || s[i] == 'E') {
		j := i + 1
		if j < len(s) && (s[j] == '+' || s[j] == '-') {
			j++
		}
		if j < len(s) && s[j] >= '0' && s[j] <= '9' {
			isFloat = true
			i = j
			digits()
		}
	}
	return i, isFloat
}

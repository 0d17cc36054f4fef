package policy

import (
	"context"
	"errors"
	"math"
	"strings"
	"testing"
)

// TestSpendingThatCannotBeComparedStops: a session's cost of NaN (a buggy
// commander, a price file with "nan") compares false with everything, so a
// "cost > max_cost" check lets it through; the limit must stop the session
// instead. Likewise tokens that overflow int64 when summed.
func TestSpendingThatCannotBeComparedStops(t *testing.T) {
	t.Parallel()
	p := mustCompile(t, "limits: {max_cost: 1.0, max_tokens: 100}\n")
	for name, st := range map[string]State{
		"cost NaN":        {Cost: math.NaN()},
		"cost +Inf":       {Cost: math.Inf(1)},
		"tokens overflow": {InputTokens: math.MaxInt64, OutputTokens: math.MaxInt64},
	} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			d := NewSession(&staticSource{p: p}, nil).Evaluate(context.Background(), Packet{Kind: KindUsage}, st)
			if d.Action != Stop || d.StopCode != budget || !strings.HasPrefix(d.RuleID, "limit.max_") {
				t.Fatalf("got %s %q %v (%s), want a budget stop", d.Action, d.RuleID, d.StopCode, d.Reason)
			}
		})
	}
}

// TestLimitsMustBeFinite: a limit of .nan or .inf is no limit at all (NaN
// compares false, Inf is never reached); it is refused at compile time.
func TestLimitsMustBeFinite(t *testing.T) {
	t.Parallel()
	for _, src := range []string{
		"limits: {max_cost: .nan}\n",
		"limits: {max_cost: .inf}\n",
		"limits: {max_cost: -.inf}\n",
	} {
		if _, err := Compile([]byte(src)); !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "finite") {
			t.Errorf("%q: error %v, want ErrInvalid saying limits must be finite", src, err)
		}
	}
}

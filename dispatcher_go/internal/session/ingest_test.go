package session

import (
	"math"
	"strings"
	"testing"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// TestCheckUsage: every number of a commander's usage is checked at
// ingest: NaN, ±Inf, negative and absurdly large values are refused with
// the field named; real usage passes.
func TestCheckUsage(t *testing.T) {
	for _, u := range []*dispatchv1.Usage{
		{},
		{InputTokens: 120_000, OutputTokens: 4096, Cost: 0.37, Steps: 1, Currency: "USD", Model: "m"},
		{InputTokens: maxUsageTokens, OutputTokens: maxUsageTokens, Cost: maxUsageCost, Steps: maxUsageSteps},
	} {
		if err := checkUsage(u); err != nil {
			t.Errorf("%v refused: %v", u, err)
		}
	}
	for want, u := range map[string]*dispatchv1.Usage{
		"cost is NaN":      {Cost: math.NaN()},
		"cost is +Inf":     {Cost: math.Inf(1)},
		"cost is -Inf":     {Cost: math.Inf(-1)},
		"cost -1 is":       {Cost: -1},
		"cost 2e+09 is":    {Cost: 2e9},
		"input_tokens -1":  {InputTokens: -1},
		"output_tokens -5": {OutputTokens: -5},
		"output_tokens 9":  {OutputTokens: math.MaxInt64},
		"steps -1":         {Steps: -1},
		"steps 2147483647": {Steps: math.MaxInt32},
	} {
		if err := checkUsage(u); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%v: error %v, want one saying %q", u, err, want)
		}
	}
}

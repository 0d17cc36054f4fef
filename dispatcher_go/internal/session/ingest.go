package session

import (
	"fmt"
	"math"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Bounds of one Usage packet. They are far above anything real (a model
// turn is at most millions of tokens) and keep a session's running sums
// from overflowing however many packets it sends.
const (
	maxUsageTokens = 1 << 40 // per field and packet (about 10^12)
	maxUsageSteps  = 1 << 20
	maxUsageCost   = 1e9 // in the packet's currency
)

// checkUsage is nil when every number of u is one the dispatcher can count
// and store, and otherwise says which is not. Protobuf guarantees the
// strings (UTF-8); nothing guarantees the numbers: a buggy commander or a
// price file with "inf" sends NaN, ±Inf or negative values, which would
// slip past a max_cost limit (NaN compares false), and which the store
// cannot encode (JSON has no NaN).
func checkUsage(u *dispatchv1.Usage) error {
	switch c := u.GetCost(); {
	case math.IsNaN(c):
		return fmt.Errorf("cost is NaN")
	case math.IsInf(c, 0):
		return fmt.Errorf("cost is %v", c)
	case c < 0:
		return fmt.Errorf("cost %v is negative", c)
	case c > maxUsageCost:
		return fmt.Errorf("cost %v is over %g", c, maxUsageCost)
	}
	for _, f := range []struct {
		name string
		v    int64
		max  int64
	}{
		{"input_tokens", u.GetInputTokens(), maxUsageTokens},
		{"output_tokens", u.GetOutputTokens(), maxUsageTokens},
		{"steps", int64(u.GetSteps()), maxUsageSteps},
	} {
		if f.v < 0 {
			return fmt.Errorf("%s %d is negative", f.name, f.v)
		}
		if f.v > f.max {
			return fmt.Errorf("%s %d is over %d", f.name, f.v, f.max)
		}
	}
	return nil
}

package policy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// testSpec is one inline test case of a policy file: packets evaluated in
// order on a fresh session; every packet but the last must be allowed, the
// last must get expect.
type testSpec struct {
	Name    string       `yaml:"name"`
	State   stateSpec    `yaml:"state"`
	Packets []packetSpec `yaml:"packets"`
	Expect  expectSpec   `yaml:"expect"`
}

type packetSpec struct {
	Kind  string         `yaml:"kind"`
	Text  string         `yaml:"text"`
	Stage string         `yaml:"stage"`
	Tool  string         `yaml:"tool"`
	Args  map[string]any `yaml:"args"`
	// ArgsJSON is the raw arguments (e.g. not valid JSON); overrides args.
	ArgsJSON *string `yaml:"args_json"`
}

type stateSpec struct {
	TaskID       string            `yaml:"task_id"`
	Planner      string            `yaml:"planner"`
	Tenant       string            `yaml:"tenant"`
	Labels       map[string]string `yaml:"labels"`
	InputTokens  int64             `yaml:"input_tokens"`
	OutputTokens int64             `yaml:"output_tokens"`
	Cost         float64           `yaml:"cost"`
	Steps        int64             `yaml:"steps"`
	Elapsed      duration          `yaml:"elapsed"`
	ToolCalls    int64             `yaml:"tool_calls"`
}

type expectSpec struct {
	Action string `yaml:"action"`
	Rule   string `yaml:"rule"`
}

// staticSource serves one policy, for tests.
type staticSource struct {
	p     *Policy
	stats Stats
}

func (s *staticSource) Current() *Policy { return s.p }
func (s *staticSource) Stats() *Stats    { return &s.stats }

// Packet converts a test packet.
func (ps *packetSpec) packet() (Packet, error) {
	p := Packet{Kind: ps.Kind, Text: ps.Text, Stage: ps.Stage, ToolName: ps.Tool}
	if kindBit(ps.Kind) == 0 {
		return p, fmt.Errorf("packet kind %q is not one of %v", ps.Kind, kinds)
	}
	switch {
	case ps.ArgsJSON != nil:
		p.ToolArgsJSON = *ps.ArgsJSON
	case ps.Args != nil:
		b, err := json.Marshal(ps.Args)
		if err != nil {
			return p, fmt.Errorf("args: %v", err)
		}
		p.ToolArgsJSON = string(b)
	case ps.Kind == KindToolCall:
		p.ToolArgsJSON = "{}"
	}
	return p, nil
}

func (ss *stateSpec) state() State {
	return State{
		TaskID: ss.TaskID, Planner: ss.Planner, Tenant: ss.Tenant, Labels: ss.Labels,
		InputTokens: ss.InputTokens, OutputTokens: ss.OutputTokens, Cost: ss.Cost, Steps: ss.Steps,
		Elapsed: time.Duration(ss.Elapsed), ToolCalls: ss.ToolCalls,
	}
}

// runTests runs a policy's inline test cases against it. With a budget
// (> 0), the tests together may spend at most that much (CEL cost units,
// counted as for the policy's packet budget); past it they stop with an
// error.
func runTests(p *Policy, tests []testSpec, budget uint64) error {
	// What the tests decide must not depend on how busy the machine is:
	// they run without the wall-clock backstop (timeLimit), bounded by the
	// budget alone. With it, a process stalled for 100 ms on a test packet
	// (a loaded machine, a container's CPU quota) refused a policy that
	// compiles elsewhere, and a restart under load failed a requeued task
	// whose stored policy then "does not compile". Packets of a running
	// task keep the backstop.
	untimed := *p
	untimed.timeLimit = 0
	p = &untimed
	var errs []error
	var spent uint64
	for i, tc := range tests {
		name := tc.Name
		if name == "" {
			name = fmt.Sprintf("#%d", i+1)
		}
		if err := runTest(p, &tc, &spent, budget); err != nil {
			errs = append(errs, fmt.Errorf("test %q: %w", name, err))
			if errors.Is(err, errTestsTooCostly) {
				break
			}
		}
	}
	return errors.Join(errs...)
}

var errTestsTooCostly = errors.New("the tests are too expensive")

func runTest(p *Policy, tc *testSpec, spent *uint64, budget uint64) error {
	want, ok := parseAction(tc.Expect.Action)
	if !ok {
		return fmt.Errorf("expect.action %q is not allow, hold, deny or stop", tc.Expect.Action)
	}
	if len(tc.Packets) == 0 {
		return errors.New("no packets")
	}
	s := NewSession(&staticSource{p: p}, nil)
	st := tc.State.state()
	ctx := context.Background()
	for i := range tc.Packets {
		pkt, err := tc.Packets[i].packet()
		if err != nil {
			return fmt.Errorf("packet %d: %v", i+1, err)
		}
		d := s.Evaluate(ctx, pkt, st)
		if *spent += s.spent; budget > 0 && *spent > budget {
			return fmt.Errorf("%w: cost %d > budget %d for all tests", errTestsTooCostly, *spent, budget)
		}
		s.spent = 0
		last := i == len(tc.Packets)-1
		if !last {
			if d.Action != Allow {
				return fmt.Errorf("packet %d: got %s by %s before the last packet", i+1, d.Action, d.RuleID)
			}
			continue
		}
		if d.Action != want || (tc.Expect.Rule != "" && d.RuleID != tc.Expect.Rule) {
			return fmt.Errorf("got %s by %q (%s), want %s by %q", d.Action, d.RuleID, d.Reason, want, tc.Expect.Rule)
		}
	}
	return nil
}

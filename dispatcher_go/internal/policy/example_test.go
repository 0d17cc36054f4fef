package policy_test

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/agentdispatch/dispatcher/internal/policy"
)

// A policy file is compiled once, and checked against its own tests; a
// file with a mistake is refused with an error that says where.
func ExampleCompile() {
	p, err := policy.Compile([]byte(`
rules:
  - id: no-rm
    when: tool_name == "shell" && tool_args.cmd.contains("rm -rf")
    action: deny
    reason: destructive shell command
tests:
  - name: rm -rf is denied
    packets: [{kind: tool_call, tool: shell, args: {cmd: "rm -rf /"}}]
    expect: {action: deny, rule: no-rm}
`))
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Println("rules:", p.NumRules())

	_, err = policy.Compile([]byte(`rules: [{id: broken, when: 'tool_name ==', action: stop}]`))
	fmt.Println("invalid:", errors.Is(err, policy.ErrInvalid))
	// Output:
	// rules: 1
	// invalid: true
}

// An Engine holds the policy in force; each session evaluates its packets
// one by one, so a phrase split across chunks is still caught.
func ExampleSession_Evaluate() {
	engine := policy.NewEngine(nil)
	if _, err := engine.Load([]byte(`
rules:
  - id: no-launch-codes
    phrases: ["launch codes"]
    action: stop
  - id: no-rm
    when: tool_name == "shell" && tool_args.cmd.contains("rm -rf")
    action: deny
`)); err != nil {
		fmt.Println(err)
		return
	}
	session := policy.NewSession(engine, nil)
	for _, pkt := range []policy.Packet{
		{Kind: policy.KindToolCall, ToolName: "shell", ToolArgsJSON: `{"cmd":"ls"}`},
		{Kind: policy.KindToolCall, ToolName: "shell", ToolArgsJSON: `{"cmd":"rm -rf /"}`},
		{Kind: policy.KindContent, Text: "the launch"},
		{Kind: policy.KindContent, Text: " codes are"},
	} {
		d := session.Evaluate(context.Background(), pkt, policy.State{})
		fmt.Println(strings.TrimSpace(d.Action.String() + " " + d.RuleID))
	}
	// Output:
	// allow
	// deny no-rm
	// allow
	// stop no-launch-codes
}

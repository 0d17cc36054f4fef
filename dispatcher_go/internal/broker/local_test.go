package broker

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

func TestLocalProvider(t *testing.T) {
	b := newBroker(t, time.Second)
	run := func(ctx context.Context, c Call) (string, error) {
		switch c.ArgumentsJSON {
		case `{"x":"down"}`:
			return "", Failure(dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE, "restarting")
		case `{"x":"wait"}`:
			<-ctx.Done()
			return "", ctx.Err()
		}
		return `{"got":` + c.ArgumentsJSON + `}`, nil
	}
	specs := []*dispatchv1.ToolSpec{
		{Name: "loc.a", ParametersJsonSchema: `{"type":"object","properties":{"x":{"type":"string"}},"required":["x"]}`, TimeoutMs: 50},
		{Name: "calculator"},                           // a built-in's name: left out
		{Name: "loc.bad", ParametersJsonSchema: `[1]`}, // not a schema: left out
	}
	names, err := b.SetLocalTools("loc", specs, run)
	if !slices.Equal(names, []string{"loc.a"}) || !errors.Is(err, ErrToolExists) || !errors.Is(err, ErrInvalidTool) {
		t.Fatalf("SetLocalTools = %v, %v", names, err)
	}
	all, execs := b.Tools()
	if i := slices.IndexFunc(all, func(s *dispatchv1.ToolSpec) bool { return s.GetName() == "loc.a" }); i < 0 || execs[i] != "loc" {
		t.Fatalf("loc.a not listed with executor loc: %v %v", all, execs)
	}
	ctx := context.Background()
	if r := b.Call(ctx, Call{ToolName: "loc.a", ArgumentsJSON: `{"x":"y"}`}); r.Result.GetResultJson() != `{"got":{"x":"y"}}` || r.Executor != "loc" {
		t.Errorf("call: %+v", r)
	}
	if r := b.Call(ctx, Call{ToolName: "loc.a", ArgumentsJSON: `{}`}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_INVALID_ARGUMENTS {
		t.Errorf("schema: %+v", r)
	}
	if r := b.Call(ctx, Call{ToolName: "loc.a", ArgumentsJSON: `{"x":"down"}`}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_PROVIDER_UNAVAILABLE {
		t.Errorf("failure: %+v", r)
	}
	if r := b.Call(ctx, Call{ToolName: "loc.a", ArgumentsJSON: `{"x":"wait"}`}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT {
		t.Errorf("timeout: %+v", r)
	}
	// Replaced, then removed.
	if names, err := b.SetLocalTools("loc", []*dispatchv1.ToolSpec{{Name: "loc.b"}}, run); err != nil || !slices.Equal(names, []string{"loc.b"}) {
		t.Fatalf("replace: %v %v", names, err)
	}
	if r := b.Call(ctx, Call{ToolName: "loc.a"}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL {
		t.Errorf("a replaced tool: %+v", r)
	}
	b.RemoveLocal("loc")
	if r := b.Call(ctx, Call{ToolName: "loc.b"}); r.Result.GetError().GetCode() != dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL {
		t.Errorf("a removed tool: %+v", r)
	}
	if _, err := b.SetLocalTools(ExecutorBuiltin, nil, run); err == nil {
		t.Error("the id builtin accepted")
	}
}

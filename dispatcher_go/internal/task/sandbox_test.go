package task

import (
	"slices"
	"testing"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestSandboxInUseIsShownKeptForContinuationAndStored(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	prev, _ := m.Submit(Spec{Instruction: "open a terminal", Sandbox: &agentpb.Sandbox{ShapeName: "local-1024x768"}})
	q.take(prev)
	if got := prev.Info().Sandbox.GetShapeName(); got != "local-1024x768" {
		t.Fatalf("before any report the client's sandbox is shown, got %q", got)
	}
	prev.SetSandboxInUse(&agentpb.Sandbox{}, true) // no id: ignored
	if prev.ContinuedSandbox() != nil {
		t.Fatal("an empty report was recorded")
	}
	reported := &agentpb.Sandbox{Id: "SBX-1"}
	prev.SetSandboxInUse(reported, true)
	reported.Id = "changed" // the task holds its own copy
	if got := prev.Info().Sandbox.GetId(); got != "SBX-1" {
		t.Fatalf("Info().Sandbox = %q", got)
	}
	prev.Finish(agentpb.TaskStatus_SUCCESS, "ok", "done")

	next, err := m.Submit(Spec{Instruction: "type in it", PreviousTaskID: prev.ID()})
	if err != nil {
		t.Fatal(err)
	}
	if next.Sandbox().GetId() != "SBX-1" {
		t.Fatalf("continuing task's sandbox %v", next.Sandbox())
	}
	own, _ := m.Submit(Spec{Instruction: "x", PreviousTaskID: prev.ID(), Sandbox: &agentpb.Sandbox{Id: "SBX-own"}})
	if own.Sandbox().GetId() != "SBX-own" {
		t.Fatalf("own sandbox replaced: %v", own.Sandbox())
	}

	// Destroyed at the end of its task: shown, not handed on.
	gone, _ := m.Submit(Spec{Instruction: "throwaway", DestroySandbox: true})
	q.take(gone)
	gone.SetSandboxInUse(&agentpb.Sandbox{Id: "SBX-gone"}, false)
	gone.Finish(agentpb.TaskStatus_SUCCESS, "ok", "")
	if gone.Info().Sandbox.GetId() != "SBX-gone" || gone.ContinuedSandbox() != nil {
		t.Fatalf("destroyed sandbox: info %v, continued %v", gone.Info().Sandbox, gone.ContinuedSandbox())
	}
	after, _ := m.Submit(Spec{Instruction: "again", PreviousTaskID: gone.ID()})
	if after.Sandbox() != nil {
		t.Fatalf("a destroyed sandbox was handed on: %v", after.Sandbox())
	}
}

func TestSandboxIDsAreWhatTheTaskWasGiven(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	none, _ := m.Submit(Spec{Instruction: "no sandbox yet"})
	q.take(none)
	if ids := none.SandboxIDs(); len(ids) != 0 {
		t.Fatalf("a task given nothing has %v", ids)
	}
	none.SetSandboxInUse(&agentpb.Sandbox{Id: "SBX-made"}, true)
	if ids := none.SandboxIDs(); !slices.Equal(ids, []string{"SBX-made"}) {
		t.Fatalf("after its session reported one: %v", ids)
	}
	none.Finish(agentpb.TaskStatus_SUCCESS, "ok", "")

	// The client's sandbox; the continued one; and both with a report.
	own, _ := m.Submit(Spec{Instruction: "x", Sandbox: &agentpb.Sandbox{Id: "SBX-own"}})
	q.take(own)
	own.SetSandboxInUse(&agentpb.Sandbox{Id: "SBX-own"}, true)
	if ids := own.SandboxIDs(); !slices.Equal(ids, []string{"SBX-own"}) {
		t.Fatalf("the client's sandbox, reported: %v", ids)
	}
	next, _ := m.Submit(Spec{Instruction: "go on", PreviousTaskID: none.ID()})
	if ids := next.SandboxIDs(); !slices.Equal(ids, []string{"SBX-made"}) {
		t.Fatalf("the continued sandbox: %v", ids)
	}
	q.take(next)
	next.SetSandboxInUse(&agentpb.Sandbox{Id: "SBX-other"}, false)
	if ids := next.SandboxIDs(); !slices.Equal(ids, []string{"SBX-made", "SBX-other"}) {
		t.Fatalf("continued and reported: %v", ids)
	}
}

package task

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// A chain of 50 continued tasks with large answers: the history each start
// carries stays under the byte and turn bounds, newest turns kept (issue
// 12, class 5). Without the bound the 50th start carried ~10 MB.
func TestContinuationHistoryStaysBounded(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	prevID := ""
	for i := range 50 {
		next, err := m.Submit(Spec{Instruction: fmt.Sprintf("step %d", i), PreviousTaskID: prevID})
		if err != nil {
			t.Fatalf("submit %d: %v", i, err)
		}
		q.take(next)
		next.Finish(agentpb.TaskStatus_SUCCESS, "ok", fmt.Sprintf("answer %d ", i)+strings.Repeat("答", 70_000)) // ~210 KB
		prevID = next.ID()
	}
	final, err := m.Submit(Spec{Instruction: "the 51st", PreviousTaskID: prevID})
	if err != nil {
		t.Fatal(err)
	}
	h := final.History()
	start := &dispatchv1.StartSession{TaskId: final.ID(), Instruction: final.Instruction(), History: h}
	if n := proto.Size(start); n > MaxHistoryBytes+64<<10 {
		t.Fatalf("start of %d bytes, want about %d at most", n, MaxHistoryBytes)
	}
	if len(h) == 0 || len(h) > MaxHistoryTurns {
		t.Fatalf("%d turns", len(h))
	}
	if got := h[len(h)-1].GetContent(); !strings.HasPrefix(got, "answer 49 ") {
		t.Fatalf("newest turn dropped: last is %.20q", got)
	}
	if got := h[len(h)-2].GetContent(); got != "step 49" {
		t.Fatalf("turn before the last answer %.20q", got)
	}
}

func TestBoundHistoryCutsAnOversizedTurnAtACharacter(t *testing.T) {
	h := []*dispatchv1.ConversationTurn{
		{Role: "user", Content: "old"},
		{Role: "assistant", Content: strings.Repeat("答", 100)}, // 300 bytes
	}
	got := boundHistory(h, 100, 10)
	if len(got) != 1 || len(got[0].GetContent()) > 100-len("assistant") || !utf8.ValidString(got[0].GetContent()) {
		t.Fatalf("got %d turns, %q", len(got), got[0].GetContent())
	}
	got = boundHistory(h, 1000, 1)
	if len(got) != 1 || got[0].GetRole() != "assistant" {
		t.Fatalf("turn bound: %v", got)
	}
	if got := boundHistory(h, 1000, 10); len(got) != 2 {
		t.Fatalf("within bounds, got %d turns", len(got))
	}
}

// The history gets what the instruction and config leave of MaxStartBytes;
// an instruction over it alone is refused at submit.
func TestStartBudgetSharedWithTheInstruction(t *testing.T) {
	m, q := newManager(t, ManagerOptions{})
	prev, err := m.Submit(Spec{Instruction: "first"})
	if err != nil {
		t.Fatal(err)
	}
	q.take(prev)
	prev.Finish(agentpb.TaskStatus_SUCCESS, "ok", strings.Repeat("a", 900_000))
	long := strings.Repeat("b", MaxStartBytes-500_000)
	next, err := m.Submit(Spec{Instruction: long, PreviousTaskID: prev.ID()})
	if err != nil {
		t.Fatal(err)
	}
	start := &dispatchv1.StartSession{Instruction: next.Instruction(), Config: next.Config(), History: next.History()}
	if n := proto.Size(start); n > MaxStartBytes+1024 {
		t.Fatalf("start of %d bytes over %d", n, MaxStartBytes)
	}
	if _, err := m.Submit(Spec{Instruction: strings.Repeat("c", MaxStartBytes+1)}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("an instruction over the start budget: %v", err)
	}
}

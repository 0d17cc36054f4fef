package dispatcher

import (
	"context"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// tokenSink records the fencing token of the log of each event persisted
// (and commits nothing: Persist runs under the log's lock).
type tokenSink struct{ tokens []int64 }

func (s *tokenSink) WaitRoom(<-chan struct{}) {}
func (s *tokenSink) Persist(c eventlog.Committer, _ string, _ *dispatchv1.TaskEvent) {
	s.tokens = append(s.tokens, eventlog.TokenOf(c))
}
func (s *tokenSink) ReadStored(context.Context, string, uint64, int) ([]*dispatchv1.TaskEvent, error) {
	return nil, nil
}

// A fleet copy's fencing token reaches the durable log through the metrics
// wrapper (observedLog.Unwrap): without it every event of the copy would
// carry no token and the fenced store would refuse it.
func TestObservedLogPassesTheFencingTokenOn(t *testing.T) {
	sink := &tokenSink{}
	logs := observe(eventlog.NewDurable(eventlog.Limits{}, sink), func(*dispatchv1.TaskEvent) {})
	l, err := logs.(task.Reopener).Restore("t1", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if !eventlog.SetToken(l, 7) {
		t.Fatal("SetToken did not reach the durable log through the observer")
	}
	if _, err := l.Append(&dispatchv1.TaskEvent{}, eventlog.Control); err != nil {
		t.Fatal(err)
	}
	if len(sink.tokens) != 1 || sink.tokens[0] != 7 {
		t.Fatalf("persisted with tokens %v, want [7]", sink.tokens)
	}
}

package fleet

import (
	"errors"
	"fmt"
	"testing"

	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// A command's error crosses replicas as its text and its class: the text
// comes back as the owner wrote it (no second "task not found: " in front,
// none in front of a held call's "not held"), and errors.Is still tells the
// class, so the API maps it to the same status as on a single node.
func TestCommandErrorsKeepTheirTextAndClassAcrossReplicas(t *testing.T) {
	for _, class := range []error{task.ErrNotFound, task.ErrNotRunning, task.ErrInvalidArgument, store.ErrUnavailable} {
		sent := fmt.Errorf("%w: t-1", class)
		got := kindErr(errKind(sent), sent.Error())
		if got.Error() != sent.Error() {
			t.Errorf("%v: text %q, sent %q", class, got, sent)
		}
		if !errors.Is(got, class) {
			t.Errorf("%v: %q is not of its class", class, got)
		}
	}
	got := kindErr(errKind(errors.New("boom")), "boom")
	if got.Error() != "boom" || errors.Is(got, task.ErrNotFound) {
		t.Errorf("an unclassed error: %v", got)
	}
}

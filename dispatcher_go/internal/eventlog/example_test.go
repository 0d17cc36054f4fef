package eventlog_test

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// A task's events are appended to its log and numbered 1, 2, 3...; a
// reader follows the log by cursor (the seq of the last event it has), at
// its own pace, until the terminal event.
func Example() {
	store := eventlog.NewMemory(eventlog.DefaultLimits)
	log, err := store.Create("task-1")
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, text := range []string{"Hello", ", ", "world"} {
		ev := &dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: text}}}
		if _, err := log.Append(ev, eventlog.Capped|eventlog.Fenceable); err != nil {
			fmt.Println(err)
			return
		}
	}
	// The terminal event closes the log to appends.
	_, _ = log.Seal(&dispatchv1.TaskEvent{Kind: &dispatchv1.TaskEvent_Result{Result: &dispatchv1.FinalResult{
		Outcome: dispatchv1.SessionOutcome_SESSION_OUTCOME_SUCCESS, Result: "Hello, world",
	}}})

	// Read in batches of two from cursor 1 (a client that reconnects
	// after having seen event 1 goes on from there).
	ctx := context.Background()
	batch := make([]*dispatchv1.TaskEvent, 0, 2)
	cursor := uint64(1)
	for {
		evs, err := log.Read(ctx, cursor, batch)
		for _, ev := range evs {
			if c := ev.GetContent(); c != nil {
				fmt.Printf("%d content %q\n", ev.GetSeq(), c.GetText())
			} else {
				fmt.Printf("%d result %q\n", ev.GetSeq(), ev.GetResult().GetResult())
			}
			cursor = ev.GetSeq()
		}
		if errors.Is(err, io.EOF) {
			fmt.Println("end of log after", cursor)
			break
		}
		if err != nil {
			fmt.Println(err)
			return
		}
	}
	// Output:
	// 2 content ", "
	// 3 content "world"
	// 4 result "Hello, world"
	// end of log after 4
}

package a2a

import (
	"encoding/base64"
	"testing"

	"github.com/a2aproject/a2a-go/v2/a2a"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// ListTasks is ordered by last update, newest first (A2A v1.0 §3.1.4, a
// MUST), not by creation: a task created first but updated last comes
// first. Filters apply before paging; totalSize counts every match; pages
// follow each other through the token without overlap.
func TestListTasksOrderedByLastUpdate(t *testing.T) {
	ctx, g, tr := stack(t)
	c := testutil.Connect(t, ctx, g.Conn, "planner:chat") // one slot
	send := func(s string) a2a.TaskID {
		t.Helper()
		res, err := tr.SendMessage(ctx, v1, &a2a.SendMessageRequest{Message: text(s), Config: &a2a.SendMessageConfig{ReturnImmediately: true}})
		if err != nil {
			t.Fatal(err)
		}
		return res.(*a2a.Task).ID
	}
	older := send("first")
	sid, _ := c.Start()
	newer := send("second") // pending: the only slot runs the first
	c.Send(testutil.Up(sid, &dispatchv1.ContentChunk{Text: "update"}))
	testutil.WaitFor(t, testutil.Wait, func() bool {
		got, err := tr.GetTask(ctx, v1, &a2a.GetTaskRequest{ID: older})
		return err == nil && len(got.Artifacts) > 0
	}, "the first task's update is logged")

	all, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Tasks) != 2 || all.Tasks[0].ID != older || all.Tasks[1].ID != newer {
		t.Fatalf("want [%s %s] (last updated first), got %v", older, newer, ids(all.Tasks))
	}
	if !all.Tasks[0].Status.Timestamp.After(*all.Tasks[1].Status.Timestamp) {
		t.Fatalf("timestamps not descending: %v, %v", all.Tasks[0].Status.Timestamp, all.Tasks[1].Status.Timestamp)
	}
	if all.TotalSize != 2 || all.NextPageToken != "" || all.PageSize != 2 {
		t.Fatalf("totalSize %d, pageSize %d, nextPageToken %q", all.TotalSize, all.PageSize, all.NextPageToken)
	}
	// An empty list has pageSize 0 (the page's size, as the A2A TCK reads it).
	none, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{ContextID: "no-such-context"})
	if err != nil || len(none.Tasks) != 0 || none.PageSize != 0 || none.TotalSize != 0 {
		t.Fatalf("empty list: %+v %v", none, err)
	}

	// Paged one at a time: the same order, totalSize of all matches.
	p1, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{PageSize: 1})
	if err != nil || len(p1.Tasks) != 1 || p1.Tasks[0].ID != older || p1.TotalSize != 2 || p1.NextPageToken == "" {
		t.Fatalf("page 1: %+v %v", p1, err)
	}
	p2, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{PageSize: 1, PageToken: p1.NextPageToken})
	if err != nil || len(p2.Tasks) != 1 || p2.Tasks[0].ID != newer || p2.NextPageToken != "" {
		t.Fatalf("page 2: %+v %v", p2, err)
	}

	// statusTimestampAfter is inclusive (>=): the newest update itself matches.
	at := *all.Tasks[0].Status.Timestamp
	since, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{StatusTimestampAfter: &at})
	if err != nil || len(since.Tasks) != 1 || since.Tasks[0].ID != older || since.TotalSize != 1 {
		t.Fatalf("statusTimestampAfter %v: %+v %v", at, since, err)
	}
	// A status filter counts only its matches.
	working, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{Status: a2a.TaskStateSubmitted})
	if err != nil || len(working.Tasks) != 1 || working.Tasks[0].ID != newer || working.TotalSize != 1 {
		t.Fatalf("status SUBMITTED: %+v %v", working, err)
	}
	if _, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{PageToken: "not a token"}); err == nil {
		t.Fatal("an invalid page token was accepted")
	}
	if _, err := tr.ListTasks(ctx, v1, &a2a.ListTasksRequest{PageToken: base64.RawURLEncoding.EncodeToString([]byte{0, 0, 0, 0, 0, 0, 0, 9, 'a', 0})}); err == nil {
		t.Fatal("a page token whose id has a NUL byte was accepted")
	}
}

func ids(ts []*a2a.Task) []a2a.TaskID {
	out := make([]a2a.TaskID, len(ts))
	for i, t := range ts {
		out[i] = t.ID
	}
	return out
}

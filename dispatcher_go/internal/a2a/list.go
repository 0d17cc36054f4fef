package a2a

import (
	"bytes"
	"cmp"
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"slices"
	"time"
	"unicode/utf8"

	"github.com/a2aproject/a2a-go/v2/a2a"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// listScan bounds the tasks one ListTasks call orders: the newest created
// ones, and every task that has not ended (those are in memory, bounded
// by the queue and the slots). The native list is ordered by creation;
// A2A wants the most recently updated first, so the A2A page is cut from
// this window, ordered here. A task created before the newest listScan
// that ended since is not listed (totalSize counts the window).
const (
	listScan     = 1000
	listScanPage = 500
)

// candidate is a task of the window and its last update time (the key
// the list is ordered by, newest first, then by id).
type candidate struct {
	t  *dispatchv1.Task
	at time.Time
}

// ListTasks implements a2asrv.RequestHandler. Tasks are ordered by their
// last update, newest first (the spec's MUST), filtered by contextId,
// status and statusTimestampAfter (inclusive) before paging; totalSize is
// the number that match; the page token is the place (update time, id)
// of the page's last task.
func (h *handler) ListTasks(ctx context.Context, req *a2a.ListTasksRequest) (*a2a.ListTasksResponse, error) {
	if err := checkVersion(ctx); err != nil {
		return nil, err
	}
	size := req.PageSize
	switch {
	case size < 0 || size > maxPageSize:
		return nil, a2a.NewError(a2a.ErrInvalidParams, fmt.Sprintf("pageSize must be 1..%d", maxPageSize))
	case size == 0:
		size = defaultPageSize
	}
	if req.HistoryLength != nil && *req.HistoryLength < 0 {
		return nil, a2a.NewError(a2a.ErrInvalidParams, "historyLength must not be negative")
	}
	statuses, err := ourStatuses(req.Status)
	if err != nil {
		return nil, err
	}
	cursor, err := decodeListToken(req.PageToken)
	if err != nil {
		return nil, err
	}
	cands, err := h.window(ctx, statuses, req.ContextID)
	if err != nil {
		return nil, err
	}
	// Newest update first; the id breaks ties so that pages do not overlap.
	slices.SortFunc(cands, func(a, b candidate) int {
		if c := b.at.Compare(a.at); c != 0 {
			return c
		}
		return cmp.Compare(b.t.GetTaskId(), a.t.GetTaskId())
	})
	hl := req.HistoryLength
	if hl == nil {
		zero := 0
		hl = &zero
	}
	// A state our status does not tell (working or input-required,
	// failed or rejected) needs the task's events.
	exact := req.Status == a2a.TaskStateWorking || req.Status == a2a.TaskStateInputRequired ||
		req.Status == a2a.TaskStateFailed || req.Status == a2a.TaskStateRejected
	out := &a2a.ListTasksResponse{Tasks: []*a2a.Task{}}
	var last candidate
	more := false
	for _, c := range cands {
		if req.StatusTimestampAfter != nil && c.at.Before(*req.StatusTimestampAfter) {
			continue
		}
		full := len(out.Tasks) == size
		past := cursor == nil || cursor.after(c)
		if !exact && (full || !past) {
			out.TotalSize++ // counted, not shown
			more = more || (full && past)
			continue
		}
		p, err := h.follow(ctx, c.t, 0, nil, func(*projector) bool { return false }, nil)
		if err != nil {
			return nil, err
		}
		if req.Status != a2a.TaskStateUnspecified && p.state != req.Status {
			continue
		}
		out.TotalSize++
		if full || !past {
			more = more || (full && past)
			continue
		}
		out.Tasks = append(out.Tasks, p.snapshot(hl, req.IncludeArtifacts))
		last = c
	}
	if more {
		out.NextPageToken = encodeListToken(last)
	}
	// "The page size used for this response": the tasks it holds, as the
	// A2A TCK reads it (0 for an empty list), not the size asked for.
	out.PageSize = len(out.Tasks)
	return out, nil
}

// window is the tasks ListTasks orders: every task not ended and the
// newest created listScan, in statuses (all if empty) and contextID (any
// if empty), each with its last update time.
func (h *handler) window(ctx context.Context, statuses []agentpb.TaskStatus, contextID string) ([]candidate, error) {
	seen := map[string]bool{}
	var out []candidate
	add := func(t *dispatchv1.Task) error {
		if seen[t.GetTaskId()] || (contextID != "" && contextOf(t) != contextID) {
			return nil
		}
		seen[t.GetTaskId()] = true
		at, err := h.lastUpdate(ctx, t)
		if err != nil {
			return err
		}
		out = append(out, candidate{t: t, at: at})
		return nil
	}
	live := []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING}
	if len(statuses) > 0 {
		live = slices.DeleteFunc(slices.Clone(live), func(s agentpb.TaskStatus) bool { return !slices.Contains(statuses, s) })
	}
	scans := [][]agentpb.TaskStatus{statuses}
	if len(live) > 0 && !slices.Equal(live, statuses) {
		scans = append(scans, live)
	}
	for _, st := range scans {
		token := ""
		for n := 0; n < listScan; {
			resp, err := h.b.ListTasks(ctx, &dispatchv1.ListTasksRequest{Statuses: st, PageSize: listScanPage, PageToken: token})
			if err != nil {
				return nil, toA2A(err)
			}
			for _, t := range resp.GetTasks() {
				if err := add(t); err != nil {
					return nil, err
				}
			}
			n += len(resp.GetTasks())
			if token = resp.GetNextPageToken(); token == "" || len(resp.GetTasks()) == 0 {
				break
			}
		}
	}
	return out, nil
}

// lastUpdate is the time of t's newest event (the status timestamp its
// snapshot shows): its end for an ended task, else the time of the event
// at its last seq (one event read, from memory).
func (h *handler) lastUpdate(ctx context.Context, t *dispatchv1.Task) (time.Time, error) {
	if e := t.GetEndedAt(); e != nil && e.IsValid() && !e.AsTime().IsZero() && t.GetStatus() != agentpb.TaskStatus_PENDING && t.GetStatus() != agentpb.TaskStatus_RUNNING {
		return e.AsTime(), nil
	}
	at := t.GetCreatedAt().AsTime()
	if s := t.GetStartedAt(); s != nil && s.AsTime().After(at) {
		at = s.AsTime()
	}
	last := t.GetLastSeq()
	if last == 0 {
		return at, nil
	}
	stopped := false
	err := h.b.Watch(ctx, t.GetTaskId(), last-1, func(ev *dispatchv1.TaskEvent) error {
		if ev.GetTime() != nil {
			at = ev.GetTime().AsTime()
		}
		stopped = true
		return errReplayed
	})
	if err != nil && !stopped && ctx.Err() != nil {
		return at, toA2A(ctx.Err())
	}
	// Another failure (the task ended and was evicted meanwhile): its
	// start or creation is the best we know.
	return at, nil
}

// listCursor is the place of the last task of the previous page.
type listCursor struct {
	at time.Time
	id string
}

// after reports whether c comes after the cursor in the list's order.
func (k *listCursor) after(c candidate) bool {
	if d := c.at.Compare(k.at); d != 0 {
		return d < 0
	}
	return c.t.GetTaskId() < k.id
}

// A2A page tokens: the last task's update time (Unix nanoseconds, 8
// bytes) then its id, base64url; opaque to clients.
func encodeListToken(c candidate) string {
	b := make([]byte, 8, 8+len(c.t.GetTaskId()))
	binary.BigEndian.PutUint64(b, uint64(c.at.UnixNano()))
	return base64.RawURLEncoding.EncodeToString(append(b, c.t.GetTaskId()...))
}

func decodeListToken(s string) (*listCursor, error) {
	if s == "" {
		return nil, nil
	}
	b, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil || len(b) <= 8 || len(b) > 8+256 || !utf8.Valid(b[8:]) || bytes.IndexByte(b[8:], 0) >= 0 {
		return nil, a2a.NewError(a2a.ErrInvalidParams, "invalid pageToken")
	}
	return &listCursor{at: time.Unix(0, int64(binary.BigEndian.Uint64(b))), id: string(b[8:])}, nil
}

package a2a

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/a2aproject/a2a-go/v2/a2a"
	"github.com/a2aproject/a2a-go/v2/a2asrv"
	"go.uber.org/goleak"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func task() *dispatchv1.Task {
	return &dispatchv1.Task{TaskId: "t1", Instruction: "do it", CreatedAt: timestamppb.Now(),
		Labels: map[string]string{contextLabel: "ctx-1"}}
}

// feed numbers events 1, 2, ... and applies them.
func feed(p *projector, kinds ...any) [][]a2a.Event {
	var out [][]a2a.Event
	for i, k := range kinds {
		ev := &dispatchv1.TaskEvent{TaskId: "t1", Seq: uint64(i + 1), Time: timestamppb.Now()}
		switch k := k.(type) {
		case *dispatchv1.TaskState:
			ev.Kind = &dispatchv1.TaskEvent_State{State: k}
		case *dispatchv1.ContentChunk:
			ev.Kind = &dispatchv1.TaskEvent_Content{Content: k}
		case *dispatchv1.PolicyDecision:
			ev.Kind = &dispatchv1.TaskEvent_Policy{Policy: k}
		case *dispatchv1.StageChange:
			ev.Kind = &dispatchv1.TaskEvent_Stage{Stage: k}
		case *dispatchv1.UserInput:
			ev.Kind = &dispatchv1.TaskEvent_UserInput{UserInput: k}
		case *dispatchv1.StopSignal:
			ev.Kind = &dispatchv1.TaskEvent_Stop{Stop: k}
		case *dispatchv1.Artifact:
			ev.Kind = &dispatchv1.TaskEvent_Artifact{Artifact: k}
		}
		out = append(out, p.apply(ev))
	}
	return out
}

func TestContentBecomesAppendedArtifactChunks(t *testing.T) {
	p := newProjector(task())
	out := feed(p,
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_PENDING},
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING},
		&dispatchv1.ContentChunk{Text: "Hel"},
		&dispatchv1.ContentChunk{Text: "lo", IsFinish: true},
		&dispatchv1.ContentChunk{Text: "Again", IsFinish: true},
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_SUCCESS},
	)
	a1 := out[2][0].(*a2a.TaskArtifactUpdateEvent)
	a2 := out[3][0].(*a2a.TaskArtifactUpdateEvent)
	b := out[4][0].(*a2a.TaskArtifactUpdateEvent)
	if a1.Artifact.ID != "answer-1" || a1.Append || a1.LastChunk || !a2.Append || !a2.LastChunk || a2.Artifact.ID != "answer-1" {
		t.Fatalf("first answer chunks: %+v %+v", a1, a2)
	}
	if b.Artifact.ID != "answer-2" || b.Append || !b.LastChunk {
		t.Fatalf("second answer: %+v", b)
	}
	if a1.Metadata[SeqKey] != uint64(3) {
		t.Fatalf("seq metadata: %v", a1.Metadata)
	}
	snap := p.snapshot(nil, true)
	if snap.Status.State != a2a.TaskStateCompleted || len(snap.Artifacts) != 2 || snap.Artifacts[0].Parts[0].Text() != "Hello" {
		t.Fatalf("snapshot: %+v", snap)
	}
	if snap.ContextID != "ctx-1" || snap.History[0].Parts[0].Text() != "do it" {
		t.Fatalf("context or history: %+v", snap)
	}
	if h := 0; p.snapshot(&h, false).History != nil || p.snapshot(&h, false).Artifacts != nil {
		t.Fatal("historyLength 0 / no artifacts must omit them")
	}
}

func TestHoldAndCallUserAreInputRequired(t *testing.T) {
	p := newProjector(task())
	out := feed(p,
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING},
		&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_HOLD, CallId: "c1", ToolName: "computer.click", Reason: "approve first"},
		&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_ALLOW, CallId: "c1", HoldOutcome: dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED},
		&dispatchv1.StageChange{Stage: "call_user", Message: "password?"},
		&dispatchv1.UserInput{MessageId: "m1", Text: "hunter2"},
	)
	st := func(i int) *a2a.TaskStatusUpdateEvent { return out[i][0].(*a2a.TaskStatusUpdateEvent) }
	if st(1).Status.State != a2a.TaskStateInputRequired || !strings.Contains(st(1).Status.Message.Parts[0].Text(), "computer.click") {
		t.Fatalf("hold: %+v", st(1))
	}
	if st(2).Status.State != a2a.TaskStateWorking {
		t.Fatalf("after approval: %+v", st(2))
	}
	if st(3).Status.State != a2a.TaskStateInputRequired || st(3).Status.Message.Parts[0].Text() != "password?" {
		t.Fatalf("call_user: %+v", st(3))
	}
	if st(4).Status.State != a2a.TaskStateWorking || len(p.history) != 2 {
		t.Fatalf("after the answer: %+v", st(4))
	}
}

func TestPolicyStopEndsRejected(t *testing.T) {
	p := newProjector(task())
	out := feed(p,
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING},
		&dispatchv1.PolicyDecision{Action: dispatchv1.PolicyAction_POLICY_ACTION_STOP, RuleId: "r"},
		&dispatchv1.StopSignal{Code: dispatchv1.StopCode_STOP_CODE_POLICY},
		&dispatchv1.TaskState{Status: agentpb.TaskStatus_FAILURE, Message: "stopped by policy"},
	)
	if s := out[3][0].(*a2a.TaskStatusUpdateEvent).Status.State; s != a2a.TaskStateRejected {
		t.Fatalf("state %s", s)
	}
	q := newProjector(task())
	out = feed(q, &dispatchv1.TaskState{Status: agentpb.TaskStatus_FAILURE})
	if s := out[0][0].(*a2a.TaskStatusUpdateEvent).Status.State; s != a2a.TaskStateFailed {
		t.Fatalf("plain failure: %s", s)
	}
}

func TestScreenshotIsAFilePart(t *testing.T) {
	p := newProjector(task())
	out := feed(p, &dispatchv1.Artifact{Kind: "screenshot", MimeType: "image/png", Data: []byte{1, 2, 3}})
	ev := out[0][0].(*a2a.TaskArtifactUpdateEvent)
	part := ev.Artifact.Parts[0]
	if string(part.Raw()) != "\x01\x02\x03" || part.MediaType != "image/png" || part.Filename != "screenshot-1.png" || !ev.LastChunk {
		t.Fatalf("part: %+v", part)
	}
}

func TestCardAndAuth(t *testing.T) {
	s := New(nil, Options{ClientToken: "tok", Version: "v9", GRPCAddr: "[::]:7000",
		Planners: func() []string { return []string{"planner:gui", "planner:chat"} }})
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://example.test:8088/.well-known/agent-card.json", nil))
	var card map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &card); err != nil {
		t.Fatal(err)
	}
	ifaces := card["supportedInterfaces"].([]any)
	if len(ifaces) != 2 || ifaces[0].(map[string]any)["url"] != "http://example.test:8088/a2a" || ifaces[1].(map[string]any)["url"] != "example.test:7000" {
		t.Fatalf("interfaces: %v", ifaces)
	}
	if card["securitySchemes"] == nil || card["securityRequirements"] == nil {
		t.Fatalf("bearer scheme missing: %s", rec.Body)
	}
	skills := card["skills"].([]any)
	if len(skills) != 2 || skills[0].(map[string]any)["id"] != "chat" {
		t.Fatalf("skills: %v", skills)
	}
	// /a2a without the token: 401 before anything runs.
	rec = httptest.NewRecorder()
	s.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "http://example.test:8088/a2a", strings.NewReader(`{}`)))
	if rec.Code != http.StatusUnauthorized || rec.Header().Get("WWW-Authenticate") == "" {
		t.Fatalf("no token: %d", rec.Code)
	}
}

func TestVersionCheck(t *testing.T) {
	for v, ok := range map[string]bool{"": true, "1.0": true, "1.1": true, "0.3": false, "2.0": false} {
		ctx, _ := a2asrv.NewCallContext(context.Background(), a2asrv.NewServiceParams(map[string][]string{"A2A-Version": {v}}))
		if err := checkVersion(ctx); (err == nil) != ok {
			t.Errorf("version %q: %v", v, err)
		}
	}
}

func TestErrorsMapToA2A(t *testing.T) {
	cases := map[codes.Code]error{
		codes.NotFound:           a2a.ErrTaskNotFound,
		codes.InvalidArgument:    a2a.ErrInvalidParams,
		codes.FailedPrecondition: a2a.ErrUnsupportedOperation,
		codes.Internal:           a2a.ErrInternalError,
	}
	for c, want := range cases {
		got := toA2A(status.Error(c, "x"))
		var ae *a2a.Error
		if !asA2A(got, &ae) || ae.Err != want {
			t.Errorf("%s → %v, want %v", c, got, want)
		}
	}
}

func asA2A(err error, target **a2a.Error) bool {
	ae, ok := err.(*a2a.Error)
	*target = ae
	return ok
}

func TestFixCodeUsesTheSpecTable(t *testing.T) {
	st, _ := status.New(codes.Unimplemented, "no").WithDetails(&errdetails.ErrorInfo{Reason: "UNSUPPORTED_OPERATION", Domain: "a2a-protocol.org"})
	got := status.Convert(fixCode(st.Err()))
	if got.Code() != codes.FailedPrecondition || len(got.Details()) != 1 {
		t.Fatalf("got %v", got)
	}
	nf := status.Error(codes.NotFound, "x")
	if status.Code(fixCode(nf)) != codes.NotFound {
		t.Fatal("NotFound changed")
	}
}

func TestSnapshotKeepsTheNewestFiles(t *testing.T) {
	p := newProjector(task())
	var kinds []any
	for range 5 {
		kinds = append(kinds, &dispatchv1.Artifact{Kind: "screenshot", MimeType: "image/png", Data: []byte{1}})
	}
	kinds = append(kinds, &dispatchv1.ContentChunk{Text: "done", IsFinish: true})
	feed(p, kinds...)
	snap := p.snapshot(nil, true)
	var ids []string
	for _, a := range snap.Artifacts {
		ids = append(ids, string(a.ID))
	}
	if strings.Join(ids, ",") != "screenshot-3,screenshot-4,screenshot-5,answer-1" {
		t.Fatalf("artifacts: %v", ids)
	}
}

func TestBodyIsBounded(t *testing.T) {
	s := New(nil, Options{})
	big := `{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"messageId":"m","role":"ROLE_USER","parts":[{"text":"` +
		strings.Repeat("x", maxBodyBytes) + `"}]}}}`
	req := httptest.NewRequest(http.MethodPost, "http://127.0.0.1/a2a", strings.NewReader(big))
	req.Header.Set("A2A-Version", "1.0")
	rec := httptest.NewRecorder()
	s.ServeHTTP(rec, req)
	var resp struct {
		Error struct{ Code int } `json:"error"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil || resp.Error.Code == 0 {
		t.Fatalf("an oversized body must be refused: %s", rec.Body.String()[:min(200, rec.Body.Len())])
	}
}

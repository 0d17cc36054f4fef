package api

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// Tokens of the tenant tests: two tenants, an admin in the file and one by
// flag, team-a's own commander token and the shared one.
const (
	tokA        = "token-of-team-a"
	tokB        = "token-of-team-b"
	tokOps      = "token-of-ops"
	tokAdmin    = "the-admin-token"
	tokCmdA     = "commander-of-team-a"
	tokCmdShare = "shared-commander-token"
)

// tenantsFile writes a tenants file for the tokens above.
func tenantsFile(t *testing.T) string {
	t.Helper()
	src := "tenants:\n" +
		"  - name: team-a\n    tokens: [\"" + tenant.HashToken(tokA).String() + "\"]\n    commander_tokens: [\"" + tenant.HashToken(tokCmdA).String() + "\"]\n" +
		"  - name: team-b\n    tokens: [\"" + tenant.HashToken(tokB).String() + "\"]\n" +
		"  - name: ops\n    admin: true\n    tokens: [\"" + tenant.HashToken(tokOps).String() + "\"]\n"
	path := filepath.Join(t.TempDir(), "tenants.yaml")
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// tenantHarness serves a dispatcher with the tenants above and a policy
// that holds every echo call for approval.
func tenantHarness(t *testing.T) (*harness, context.Context) {
	t.Helper()
	policy := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, policy, "rules:\n  - {id: hold-echo, when: tool_name == \"echo\", action: hold, hold_timeout: 30s}\n")
	return newHarness(t, dispatcher.Config{
		Auth:   dispatcher.Auth{AdminToken: tokAdmin, CommanderToken: tokCmdShare, TenantsFile: tenantsFile(t)},
		Policy: dispatcher.Policy{File: policy},
	})
}

func submitAs(t *testing.T, h *harness, ctx context.Context, req *dispatchv1.SubmitTaskRequest) string {
	t.Helper()
	r, err := h.tasks.SubmitTask(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	return r.GetTaskId()
}

// listIDs is every task id ctx's caller lists, following the pages.
func listIDs(t *testing.T, h *harness, ctx context.Context) map[string]*dispatchv1.Task {
	t.Helper()
	out := map[string]*dispatchv1.Task{}
	req := &dispatchv1.ListTasksRequest{PageSize: 1}
	for {
		page, err := h.tasks.ListTasks(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		for _, tk := range page.GetTasks() {
			out[tk.GetTaskId()] = tk
		}
		if page.GetNextPageToken() == "" {
			return out
		}
		req.PageToken = page.GetNextPageToken()
	}
}

// notFoundEverywhere checks that ctx's caller meets task id on every client
// call exactly as it meets an id that does not exist.
func notFoundEverywhere(t *testing.T, h *harness, ctx context.Context, id string) {
	t.Helper()
	for _, tid := range []string{id, "no-such-task"} {
		_, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: tid})
		wantCode(t, err, codes.NotFound)
		w, err := h.tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: tid})
		if err == nil {
			_, err = w.Recv()
		}
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.CancelTask(ctx, &dispatchv1.CancelTaskRequest{TaskId: tid})
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.Interject(ctx, &dispatchv1.InterjectRequest{TaskId: tid, Text: "psst"})
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.ApproveToolCall(ctx, &dispatchv1.ApproveToolCallRequest{TaskId: tid, CallId: "e1", Approve: true})
		wantCode(t, err, codes.NotFound)
		_, err = h.tasks.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{Instruction: "go on", PreviousTaskId: tid})
		wantCode(t, err, codes.NotFound)
		// Seed 000.
		_, err = h.agent.RunAgentInstructionAsync(ctx, &agentpb.RunAgentInstructionRequest{Instruction: "go on", PreviousTaskId: &tid})
		wantCode(t, err, codes.NotFound)
		s, err := h.agent.GetAgentTaskStream(ctx, &agentpb.GetAgentTaskStreamRequest{TaskId: tid})
		if err == nil {
			_, err = s.Recv()
		}
		wantCode(t, err, codes.NotFound)
		q, err := h.agent.QueryTaskStatus(ctx, &agentpb.QueryTaskStatusRequest{TaskId: tid})
		if err != nil || q.GetStatus() != agentpb.TaskStatus_NOT_FOUND || q.GetResult() != "" {
			t.Fatalf("QueryTaskStatus(%s): %v %v", tid, q, err)
		}
		c, err := h.agent.CancelTask(ctx, &agentpb.CancelTaskRequest{TaskId: tid})
		if err != nil || c.GetSuccess() || c.GetMessage() != "task not found" {
			t.Fatalf("seed CancelTask(%s): %v %v", tid, c, err)
		}
		_, err = h.agent.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: tid})
		wantCode(t, err, codes.NotFound)
	}
}

// TestTenantsSeeOnlyTheirOwnTasks: two tenants and an admin on both client
// APIs. A tenant gets NOT_FOUND for the other's task on every call —
// exactly as for a task that does not exist — lists only its own, cannot
// continue the other's; the admin sees and acts on everything and is shown
// each task's tenant. Each tenant's task runs on its own commander.
func TestTenantsSeeOnlyTheirOwnTasks(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	ctxA, ctxB := bearer(ctx, tokA), bearer(ctx, tokB)
	ctxOps, ctxAdmin := bearer(ctx, tokOps), bearer(ctx, tokAdmin)

	// team-a's commander (its own token), team-b's (the shared token,
	// serving team-b by its hello).
	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	cmdB := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	cmdB.Hello(&dispatchv1.Hello{CommanderId: "cmd-b", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}})

	idA := submitAs(t, h, ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "a's work"})
	sidA, _ := cmdA.Start()
	idB := submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "b's work"})
	cmdB.Start()

	// a's task holds a call for approval, so that approve has something.
	cmdA.Send(testutil.Up(sidA, &dispatchv1.ToolCallRequest{CallId: "e1", ToolName: "echo", ArgumentsJson: `{"v":1}`}))
	waitHeld(t, h, ctxA, idA, "e1")

	// team-b meets a's task as one that does not exist, on every call.
	notFoundEverywhere(t, h, ctxB, idA)
	notFoundEverywhere(t, h, ctxA, idB)
	if got := listIDs(t, h, ctxB); len(got) != 1 || got[idB] == nil {
		t.Fatalf("team-b lists %v", got)
	}
	if got := listIDs(t, h, ctxA); len(got) != 1 || got[idA] == nil || got[idA].GetTenant() != "" {
		t.Fatalf("team-a lists %v (its tenant is shown to admins only)", got)
	}
	// The default tenant (no token of a tenant: here, none at all) is refused.
	_, err := h.tasks.ListTasks(ctx, &dispatchv1.ListTasksRequest{})
	wantCode(t, err, codes.Unauthenticated)

	// b's cancel did nothing: a's task still runs and its call is held.
	if tk, err := h.tasks.GetTask(ctxA, &dispatchv1.GetTaskRequest{TaskId: idA}); err != nil || tk.GetTask().GetStatus() != agentpb.TaskStatus_RUNNING {
		t.Fatalf("team-a's task after team-b's calls: %v %v", tk, err)
	}
	// Its owner acts on it.
	ap, err := h.tasks.ApproveToolCall(ctxA, &dispatchv1.ApproveToolCallRequest{TaskId: idA, CallId: "e1", Approve: true})
	if err != nil || ap.GetOutcome() != dispatchv1.HoldOutcome_HOLD_OUTCOME_APPROVED {
		t.Fatalf("owner's approve: %v %v", ap, err)
	}
	if r := cmdA.RecvUntil(isToolResult).GetToolResult(); r.GetCallId() != "e1" {
		t.Fatalf("result %v", r)
	}
	if _, err := h.tasks.Interject(ctxA, &dispatchv1.InterjectRequest{TaskId: idA, Text: "also this"}); err != nil {
		t.Fatalf("owner's interject: %v", err)
	}
	if _, err := h.agent.GetCommonConfig(ctxA, &agentpb.GetCommonConfigRequest{Id: idA}); err != nil {
		t.Fatalf("owner's config: %v", err)
	}
	cmdA.Send(testutil.Up(sidA, testutil.Success("done")))
	waitStatusAs(t, h, ctxA, idA, agentpb.TaskStatus_SUCCESS)

	// Both admins see both tasks, with their tenants.
	for name, actx := range map[string]context.Context{"file admin": ctxOps, "--admin-token": ctxAdmin} {
		got := listIDs(t, h, actx)
		if len(got) != 2 || got[idA].GetTenant() != "team-a" || got[idB].GetTenant() != "team-b" {
			t.Fatalf("%s lists %v", name, got)
		}
		if tk, err := h.tasks.GetTask(actx, &dispatchv1.GetTaskRequest{TaskId: idB}); err != nil || tk.GetTask().GetTenant() != "team-b" {
			t.Fatalf("%s GetTask: %v %v", name, tk, err)
		}
	}

	// The owner continues its task (on its commander, as team-a's).
	contA := submitAs(t, h, ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "go on", PreviousTaskId: idA})
	next, err := cmdA.NextSession(ctx)
	if err != nil || len(next.Start.GetHistory()) == 0 {
		t.Fatalf("the continuation did not start on team-a's commander with its history: %v %v", next, err)
	}
	// An admin's continuation of a's task is a's too: a sees it, b does not.
	contAdmin := submitAs(t, h, ctxAdmin, &dispatchv1.SubmitTaskRequest{Instruction: "admin goes on", PreviousTaskId: idA})
	for _, id := range []string{contA, contAdmin} {
		if tk, err := h.tasks.GetTask(ctxAdmin, &dispatchv1.GetTaskRequest{TaskId: id}); err != nil || tk.GetTask().GetTenant() != "team-a" {
			t.Fatalf("continuation %s: %v %v", id, tk, err)
		}
		if _, err := h.tasks.GetTask(ctxA, &dispatchv1.GetTaskRequest{TaskId: id}); err != nil {
			t.Fatalf("team-a cannot see continuation %s: %v", id, err)
		}
	}
	notFoundEverywhere(t, h, ctxB, contAdmin)

	// The admin acts on b's task.
	c, err := h.tasks.CancelTask(ctxOps, &dispatchv1.CancelTaskRequest{TaskId: idB})
	if err != nil || c.GetStatus() == agentpb.TaskStatus_RUNNING && !c.GetCancelled() {
		t.Fatalf("admin cancel: %v %v", c, err)
	}
	if p := cmdB.RecvUntil(isStop); p.GetStop() == nil {
		t.Fatal("team-b's commander got no stop")
	}

	// The global config applies to every tenant: only an admin changes it.
	_, err = h.agent.SetGlobalCommonConfig(ctxA, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}})
	wantCode(t, err, codes.PermissionDenied)
	_, err = h.agent.SetGlobalCommonLLMConfig(ctxB, &agentpb.SetGlobalCommonLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "mine"}})
	wantCode(t, err, codes.PermissionDenied)
	if _, err := h.agent.SetGlobalCommonConfig(ctxAdmin, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}}); err != nil {
		t.Fatalf("admin config: %v", err)
	}
}

// waitHeld waits, as ctx's caller, for the policy to hold call callID of
// task id.
func waitHeld(t *testing.T, h *harness, ctx context.Context, id, callID string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, testutil.Wait)
	defer cancel()
	w, err := h.tasks.WatchTask(wctx, &dispatchv1.WatchTaskRequest{TaskId: id})
	if err != nil {
		t.Fatal(err)
	}
	for {
		r, err := w.Recv()
		if err != nil {
			t.Fatalf("call %s not held: %v", callID, err)
		}
		if p := r.GetEvent().GetPolicy(); p.GetCallId() == callID && p.GetAction() == dispatchv1.PolicyAction_POLICY_ACTION_HOLD {
			return
		}
	}
}

func waitStatusAs(t *testing.T, h *harness, ctx context.Context, id string, want agentpb.TaskStatus) {
	t.Helper()
	testutil.WaitFor(t, testutil.Wait, func() bool {
		tk, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
		return err == nil && tk.GetTask().GetStatus() == want
	}, "task %s to be %s", id, want)
}

// TestTenantCommanders: a commander with a tenant's own token serves that
// tenant only (a hello naming another is refused) and cannot serve tools
// to every tenant; tasks wait for a commander that serves their tenant.
func TestTenantCommanders(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	ctxA, ctxB := bearer(ctx, tokA), bearer(ctx, tokB)

	bad := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	bad.Send(testutil.Up("", &dispatchv1.Hello{CommanderId: "x", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}}))
	wantCode(t, bad.Ended(), codes.FailedPrecondition)
	p, err := h.tools.Connect(bearer(ctx, tokCmdA))
	if err == nil {
		_, err = p.Recv()
	}
	wantCode(t, err, codes.Unauthenticated)
	// A client token is no commander token.
	wrong := testutil.OpenChat(t, ctxA, h.conn)
	wantCode(t, wrong.Ended(), codes.Unauthenticated)

	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	idB := submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "b's"})
	cmdA.NoRecv(100 * time.Millisecond) // not team-b's commander
	idA := submitAs(t, h, ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "a's"})
	if _, start := cmdA.Start(); start.GetInstruction() != "a's" {
		t.Fatalf("team-a's commander got %q", start.GetInstruction())
	}
	// An unrestricted commander (shared token, no tenants named) takes b's.
	open := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	open.Hello(&dispatchv1.Hello{CommanderId: "any", Capabilities: []string{"planner:chat"}})
	if _, start := open.Start(); start.GetInstruction() != "b's" {
		t.Fatalf("the unrestricted commander got %q", start.GetInstruction())
	}
	for id, ctx := range map[string]context.Context{idA: ctxA, idB: ctxB} {
		tk, err := h.tasks.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
		if err != nil || tk.GetTask().GetStatus() != agentpb.TaskStatus_RUNNING {
			t.Fatalf("%s: %v %v", id, tk, err)
		}
	}
	if got := listIDs(t, h, ctxA); len(got) != 1 || got[idA] == nil {
		t.Fatalf("team-a lists %v", got)
	}
}

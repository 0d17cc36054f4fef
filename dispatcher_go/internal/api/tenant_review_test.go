package api

import (
	"os"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// TestAgentInfoCountsTheCallersSlots: GetAgentInfo's maxConcurrentTasks is
// the number of slots that may run the caller's tasks (its tenant's own and
// those serving every tenant), so that a tenant learns nothing of another
// tenant's commanders; an admin counts every slot.
func TestAgentInfoCountsTheCallersSlots(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	for i := range 2 {
		cmdB := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
		cmdB.Hello(&dispatchv1.Hello{CommanderId: "cmd-b" + string(rune('0'+i)), Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}})
	}
	open := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	open.Hello(&dispatchv1.Hello{CommanderId: "any", Capabilities: []string{"planner:chat"}})
	testutil.WaitFor(t, testutil.Wait, func() bool { return h.d.Scheduler().SlotCount() == 4 }, "4 slots")

	for name, want := range map[string]int32{tokA: 2, tokB: 3, tokOps: 4, tokAdmin: 4} {
		info, err := h.agent.GetAgentInfo(bearer(ctx, name), &agentpb.GetAgentInfoRequest{})
		if err != nil || info.GetMaxConcurrentTasks() != want {
			t.Errorf("%s: maxConcurrentTasks %d (%v), want %d", name, info.GetMaxConcurrentTasks(), err, want)
		}
	}
}

// TestForeignSandboxIsNotFound: a client may not name, as its task's
// sandbox, a sandbox that another tenant's task was given or reported in
// use: the commander's sandbox tools would let the task drive it (it is
// "given"). It is answered as a previous task that does not exist. The
// owner, and an admin, may name it.
func TestForeignSandboxIsNotFound(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	ctxA, ctxB, ctxAdmin := bearer(ctx, tokA), bearer(ctx, tokB), bearer(ctx, tokAdmin)
	cmdB := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	cmdB.Hello(&dispatchv1.Hello{CommanderId: "cmd-b", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}})

	submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "b's", Sandbox: &agentpb.Sandbox{Id: "SBX-given-to-b"}})
	sid, _ := cmdB.Start()
	cmdB.Send(testutil.Up(sid, &dispatchv1.SandboxInUse{Sandbox: &agentpb.Sandbox{Id: "SBX-made-by-b"}, Kept: true}))
	testutil.WaitFor(t, testutil.Wait, func() bool {
		tasks := listIDs(t, h, ctxB)
		for _, tk := range tasks {
			if tk.GetSandbox().GetId() == "SBX-made-by-b" {
				return true
			}
		}
		return false
	}, "b's sandbox in use")

	for _, sb := range []string{"SBX-given-to-b", "SBX-made-by-b"} {
		_, err := h.tasks.SubmitTask(ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "drive it", Sandbox: &agentpb.Sandbox{Id: sb}})
		wantCode(t, err, codes.NotFound)
		_, err = h.agent.RunAgentInstructionAsync(ctxA, &agentpb.RunAgentInstructionRequest{Instruction: "drive it", Sandbox: &agentpb.Sandbox{Id: sb}})
		wantCode(t, err, codes.NotFound)
		// An admin may; its task on b's sandbox is b's (as a continuation
		// of b's task is), so that b still may too.
		id := submitAs(t, h, ctxAdmin, &dispatchv1.SubmitTaskRequest{Instruction: "admin's", Sandbox: &agentpb.Sandbox{Id: sb}})
		if tk, err := h.tasks.GetTask(ctxB, &dispatchv1.GetTaskRequest{TaskId: id}); err != nil {
			t.Fatalf("the admin's task on b's sandbox is not b's: %v %v", tk, err)
		}
		submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "again", Sandbox: &agentpb.Sandbox{Id: sb}})
	}
	// A sandbox no task of another tenant has is the client's to name.
	if _, err := h.tasks.SubmitTask(ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "mine", Sandbox: &agentpb.Sandbox{Id: "SBX-a"}}); err != nil {
		t.Fatal(err)
	}
}

// TestDefaultTenantMayNotConfigureOthers: with a tenants file, the plain
// client token is one tenant among others (the default one): the global
// config, which every tenant's tasks run with, is an admin's alone.
func TestDefaultTenantMayNotConfigureOthers(t *testing.T) {
	t.Parallel()
	const tokDefault = "the-default-tenants-token"
	h, ctx := newHarness(t, dispatcher.Config{
		Auth: dispatcher.Auth{ClientToken: tokDefault, AdminToken: tokAdmin, CommanderToken: tokCmdShare, TenantsFile: tenantsFile(t)},
	})
	ctxDef := bearer(ctx, tokDefault)
	_, err := h.agent.SetGlobalCommonConfig(ctxDef, &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}})
	wantCode(t, err, codes.PermissionDenied)
	_, err = h.agent.SetGlobalGroundingLLMConfig(ctxDef, &agentpb.SetGlobalGroundingLLMConfigRequest{LlmConfig: &agentpb.LLMConfig{ModelName: "x"}})
	wantCode(t, err, codes.PermissionDenied)
	if _, err := h.agent.SetGlobalCommonConfig(bearer(ctx, tokAdmin), &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}}); err != nil {
		t.Fatal(err)
	}

	// Without a tenants file the client token is the only tenant: it may.
	h1, ctx1 := newHarness(t, dispatcher.Config{Auth: dispatcher.Auth{ClientToken: tokDefault, CommanderToken: tokCmdShare}})
	if _, err := h1.agent.SetGlobalCommonConfig(bearer(ctx1, tokDefault), &agentpb.SetGlobalCommonConfigRequest{CommonConfig: &agentpb.CommonConfig{}}); err != nil {
		t.Fatal(err)
	}
}

// TestUnknownMethodsNeedAToken: a method of no service the interceptor
// knows is refused without a token rather than let through (only health
// and reflection are open), so that a service added later, or a path that
// routes oddly, is never served without auth.
func TestUnknownMethodsNeedAToken(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	for _, m := range []string{"/some.New/Method", "lybic.agent.Agent/GetAgentInfo", "//lybic.agent.Agent/GetAgentInfo"} {
		if _, err := New(h.d).authorize(ctx, m); err == nil {
			t.Errorf("%s: let through without a token", m)
		}
	}
	for _, m := range []string{"/grpc.health.v1.Health/Check", "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"} {
		if _, err := New(h.d).authorize(ctx, m); err != nil {
			t.Errorf("%s: %v", m, err)
		}
	}
}

// TestRevokedTokenEndsItsStreams: a token that a tenants file reload takes
// away (or gives to another tenant) ends the streams it opened — a client's
// watch, a tenant commander's ChatStream — with UNAUTHENTICATED, not only
// its new calls; a stream whose token still means the same goes on.
func TestRevokedTokenEndsItsStreams(t *testing.T) {
	t.Parallel()
	path := tenantsFile(t)
	h, ctx := newHarness(t, dispatcher.Config{Auth: dispatcher.Auth{AdminToken: tokAdmin, CommanderToken: tokCmdShare, TenantsFile: path}})
	ctxA, ctxB := bearer(ctx, tokA), bearer(ctx, tokB)
	// a's task runs on a shared commander (its token stays), so that it
	// does not end when team-a's own, idle commander is cut off.
	cmdS := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	cmdS.Hello(&dispatchv1.Hello{CommanderId: "cmd-s", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-a"}})
	cmdB := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	cmdB.Hello(&dispatchv1.Hello{CommanderId: "cmd-b", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}})
	idA := submitAs(t, h, ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "a's"})
	cmdS.Start()
	idB := submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "b's"})
	sidB, _ := cmdB.Start()
	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	watchA, err := h.tasks.WatchTask(ctxA, &dispatchv1.WatchTaskRequest{TaskId: idA})
	if err != nil {
		t.Fatal(err)
	}
	watchB, err := h.tasks.WatchTask(ctxB, &dispatchv1.WatchTaskRequest{TaskId: idB})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []dispatchv1.TaskService_WatchTaskClient{watchA, watchB} {
		if _, err := w.Recv(); err != nil { // the history's first event: the stream is up
			t.Fatal(err)
		}
	}

	// team-a's tokens leave the file; team-b's stay.
	src := "tenants:\n  - name: team-b\n    tokens: [\"" + tenant.HashToken(tokB).String() + "\"]\n"
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := h.d.Auth().Reload(); err != nil {
		t.Fatal(err)
	}
	for {
		_, err := watchA.Recv()
		if err != nil {
			wantCode(t, err, codes.Unauthenticated)
			break
		}
	}
	wantCode(t, cmdA.Ended(), codes.Unauthenticated)
	_, err = h.tasks.GetTask(ctxA, &dispatchv1.GetTaskRequest{TaskId: idA})
	wantCode(t, err, codes.Unauthenticated)

	// team-b's watch and commander go on to the end of its task.
	cmdB.Send(testutil.Up(sidB, testutil.Success("done")))
	for {
		r, err := watchB.Recv()
		if err != nil {
			t.Fatalf("team-b's watch ended before its task: %v", err)
		}
		if r.GetEvent().GetState().GetStatus() == agentpb.TaskStatus_SUCCESS {
			break
		}
	}
}

// TestInvocationNamesTheTenant: a tool provider serves every tenant's
// tasks; the invocation says whose task calls (Invocation.tenant), so that
// a provider that keeps anything across tasks (the workspace's files)
// keeps each tenant's apart.
func TestInvocationNamesTheTenant(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	prov, err := h.tools.Connect(bearer(ctx, tokCmdShare))
	if err != nil {
		t.Fatal(err)
	}
	if err := prov.Send(&dispatchv1.ConnectRequest{Msg: &dispatchv1.ConnectRequest_Hello{Hello: &dispatchv1.ProviderHello{
		ProviderId: "ws", Tools: []*dispatchv1.ToolSpec{{Name: "ws.read", ParametersJsonSchema: `{"type":"object"}`}},
	}}}); err != nil {
		t.Fatal(err)
	}
	if w, err := prov.Recv(); err != nil || w.GetWelcome() == nil {
		t.Fatalf("welcome %v %v", w, err)
	}
	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	submitAs(t, h, bearer(ctx, tokA), &dispatchv1.SubmitTaskRequest{Instruction: "a's"})
	sid, _ := cmdA.Start()
	cmdA.Send(testutil.Up(sid, &dispatchv1.ToolCallRequest{CallId: "r1", ToolName: "ws.read", ArgumentsJson: `{}`}))
	inv, err := prov.Recv()
	if err != nil || inv.GetInvoke().GetTenant() != "team-a" {
		t.Fatalf("invocation %v %v, want tenant team-a", inv, err)
	}
}

// TestCommanderCannotClaimAnotherTenantsSandbox: a tenant's own commander
// reports the sandbox its session uses (SandboxInUse); the dispatcher then
// names it to the sandbox provider as one the task may act on. A report of
// a sandbox another tenant's task has is refused (ack REJECTED) and not
// recorded, so that a tenant's commander cannot hand its tasks the other
// tenant's desktop.
func TestCommanderCannotClaimAnotherTenantsSandbox(t *testing.T) {
	t.Parallel()
	h, ctx := tenantHarness(t)
	ctxA, ctxB := bearer(ctx, tokA), bearer(ctx, tokB)
	cmdB := testutil.OpenChat(t, bearer(ctx, tokCmdShare), h.conn)
	cmdB.Hello(&dispatchv1.Hello{CommanderId: "cmd-b", Capabilities: []string{"planner:chat"}, Tenants: []string{"team-b"}})
	submitAs(t, h, ctxB, &dispatchv1.SubmitTaskRequest{Instruction: "b's", Sandbox: &agentpb.Sandbox{Id: "SBX-b"}})
	cmdB.Start()

	cmdA := testutil.OpenChat(t, bearer(ctx, tokCmdA), h.conn)
	cmdA.Hello(&dispatchv1.Hello{CommanderId: "cmd-a", Capabilities: []string{"planner:chat"}})
	idA := submitAs(t, h, ctxA, &dispatchv1.SubmitTaskRequest{Instruction: "a's"})
	sid, _ := cmdA.Start()
	cmdA.Send(testutil.Up(sid, &dispatchv1.SandboxInUse{Sandbox: &agentpb.Sandbox{Id: "SBX-b"}, Kept: true}))
	ack := cmdA.RecvUntil(func(p *dispatchv1.DownstreamPacket) bool { return p.GetAck() != nil }).GetAck()
	if ack.GetKind() != dispatchv1.AckKind_ACK_KIND_REJECTED {
		t.Fatalf("claim of b's sandbox: %v, want REJECTED", ack)
	}
	if tk, err := h.tasks.GetTask(ctxA, &dispatchv1.GetTaskRequest{TaskId: idA}); err != nil || tk.GetTask().GetSandbox() != nil {
		t.Fatalf("a's task after the claim: %v %v", tk, err)
	}
	// Its own, new sandbox is recorded.
	cmdA.Send(testutil.Up(sid, &dispatchv1.SandboxInUse{Sandbox: &agentpb.Sandbox{Id: "SBX-a"}, Kept: true}))
	testutil.WaitFor(t, testutil.Wait, func() bool {
		tk, err := h.tasks.GetTask(ctxA, &dispatchv1.GetTaskRequest{TaskId: idA})
		return err == nil && tk.GetTask().GetSandbox().GetId() == "SBX-a"
	}, "a's own sandbox recorded")
}

package taskstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
)

// storedBody is a finished task's body as the dispatcher has always stored
// it (the stored format: old databases must keep loading).
const storedBody = `{
	"instruction": "open a terminal", "planner": "chat", "message": "done", "result": "opened",
	"startedAt": 1700000001000000, "commanderId": "cmd-1", "sessionId": "ses-1",
	"previousTaskId": "prev-1", "labels": {"team": "qa"}, "required": ["gpu"],
	"sandbox": {"shapeName": "local-1024x768"}, "destroySandbox": true,
	"usedSandbox": {"id": "SBX-1"}, "sandboxKept": true, "timeoutMs": 60000,
	"stats": {"Steps": 2, "InputTokens": 30, "OutputTokens": 40, "Cost": 0.5, "Currency": "USD"},
	"history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
	"config": {"id": "global", "steps": 5, "stageModelConfig": {"actionGeneratorModel": {"modelName": "gpt"}}},
	"lastSeq": 3, "requeues": 1
}`

// A record in the stored format is read back field by field, and writing
// the task again gives the same body.
func TestStoredFormatReadsAndWritesTheSame(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	created := time.UnixMicro(1700000000000000)
	ended := time.UnixMicro(1700000002000000)
	rec := store.TaskRecord{ID: "task-1", Status: int32(agentpb.TaskStatus_SUCCESS), CreatedAt: created, EndedAt: ended, Body: []byte(storedBody)}
	if err := st.Apply(ctx, store.Batch{Tasks: []store.TaskRecord{rec}}); err != nil {
		t.Fatal(err)
	}
	m, _, w := durableManager(t, st)
	tk, err := m.Get("task-1")
	if err != nil {
		t.Fatal(err)
	}
	info := tk.Info()
	if !info.CreatedAt.Equal(created) || !info.StartedAt.Equal(time.UnixMicro(1700000001000000)) || !info.EndedAt.Equal(ended) {
		t.Fatalf("times %v %v %v", info.CreatedAt, info.StartedAt, info.EndedAt)
	}
	info.CreatedAt, info.StartedAt, info.EndedAt = time.Time{}, time.Time{}, time.Time{}
	want := task.Info{Summary: task.Summary{
		ID: "task-1", Instruction: "open a terminal", Planner: "chat", Status: agentpb.TaskStatus_SUCCESS,
		Message: "done", Result: "opened", CommanderID: "cmd-1", SessionID: "ses-1", Labels: map[string]string{"team": "qa"},
		Stats:   task.Stats{Steps: 2, InputTokens: 30, OutputTokens: 40, Cost: 0.5, Currency: "USD"},
		LastSeq: 3, PreviousTaskID: "prev-1",
	}, Sandbox: info.Sandbox}
	if !reflect.DeepEqual(info, want) || info.Sandbox.GetId() != "SBX-1" {
		t.Fatalf("read back\n%+v\nwant\n%+v", info, want)
	}
	if tk.ContinuedSandbox().GetId() != "SBX-1" || tk.Sandbox().GetShapeName() != "local-1024x768" || !tk.DestroySandbox() ||
		tk.Timeout() != time.Minute || tk.Requeues() != 1 || tk.RequiredCapabilities()[0] != "gpu" || len(tk.History()) != 2 ||
		tk.Config().GetSteps() != 5 || tk.Config().GetStageModelConfig().GetActionGeneratorModel().GetModelName() != "gpt" {
		t.Fatalf("task read back: %+v", tk)
	}
	// Listed (the same decoder) as it is got.
	infos, _, err := m.List(ctx, nil, 10, nil)
	if err != nil || len(infos) != 1 || infos[0].Sandbox.GetId() != "SBX-1" || infos[0].Result != "opened" || infos[0].LastSeq != 3 {
		t.Fatalf("listed %+v %v", infos, err)
	}

	// Written again (a snapshot of the task read back), the body is the same.
	ts, err := taskstore.New(taskstore.Options{Store: st, Writer: w})
	if err != nil {
		t.Fatal(err)
	}
	snap := task.Snapshot{
		Summary: task.Summary{
			ID: "task-1", Instruction: "open a terminal", Planner: "chat", Status: agentpb.TaskStatus_SUCCESS,
			Message: "done", Result: "opened", CreatedAt: created, StartedAt: time.UnixMicro(1700000001000000), EndedAt: ended,
			CommanderID: "cmd-1", SessionID: "ses-1", PreviousTaskID: "prev-1", Labels: map[string]string{"team": "qa"},
			Stats:   task.Stats{Steps: 2, InputTokens: 30, OutputTokens: 40, Cost: 0.5, Currency: "USD"},
			LastSeq: 3,
		},
		Required: []string{"gpu"}, Sandbox: &agentpb.Sandbox{ShapeName: "local-1024x768"}, DestroySandbox: true,
		UsedSandbox: &agentpb.Sandbox{Id: "SBX-1"}, SandboxKept: true, Timeout: time.Minute,
		History: []*dispatchv1.ConversationTurn{{Role: "user", Content: "hi"}, {Role: "assistant", Content: "hello"}},
		Config: &agentpb.CommonConfig{Id: "global", Steps: proto.Int32(5), StageModelConfig: &agentpb.StageModelConfig{
			ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "gpt", ApiKey: proto.String("****abcd")}}},
		Requeues: 1,
	}
	ts.Save(&snap)
	if err := ts.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	back, err := st.GetTask(ctx, "task-1")
	if err != nil {
		t.Fatal(err)
	}
	var got, exp map[string]any
	if err := json.Unmarshal(back.Body, &got); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(storedBody), &exp); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, exp) {
		t.Fatalf("written body\n%s\nwant\n%s", back.Body, storedBody)
	}
}

// A task that may still run keeps its secrets only sealed: the stored
// config has none, and without the key nothing brings them back.
func TestSecretsAreStoredSealedOnly(t *testing.T) {
	ctx := context.Background()
	st := openSQLite(t)
	m1, _, w1 := durableManager(t, st)
	running := &agentpb.CommonConfig{StageModelConfig: &agentpb.StageModelConfig{
		ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "gpt", ApiKey: proto.String("sk-task-secret-9876")}}}
	tk, err := m1.Submit(task.Spec{Instruction: "x", RunningConfig: running})
	if err != nil {
		t.Fatal(err)
	}
	if err := w1.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rec, err := st.GetTask(ctx, tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Config       json.RawMessage `json:"config"`
		SealedConfig []byte          `json:"sealedConfig"`
	}
	if err := json.Unmarshal(rec.Body, &body); err != nil {
		t.Fatal(err)
	}
	if len(body.SealedConfig) == 0 || !bytes.Contains(body.Config, []byte(`"gpt"`)) || bytes.Contains(rec.Body, []byte("sk-task-secret")) {
		t.Fatalf("stored body %s", rec.Body)
	}
	w1.Close()

	// With the key, the requeued task has its secret for the commander.
	m2, _, _ := durableManager(t, st)
	if _, err := m2.Restore(ctx); err != nil {
		t.Fatal(err)
	}
	back, err := m2.Get(tk.ID())
	if err != nil {
		t.Fatal(err)
	}
	if k := back.Config().GetStageModelConfig().GetActionGeneratorModel().GetApiKey(); k != "sk-task-secret-9876" {
		t.Fatalf("api key after restart %q", k)
	}
}

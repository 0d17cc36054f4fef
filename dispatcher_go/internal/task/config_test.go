package task

import (
	"testing"

	"google.golang.org/protobuf/proto"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

func TestResolveMergesFieldByFieldForOneTaskOnly(t *testing.T) {
	s := NewConfigStore(&agentpb.CommonConfig{
		Backend: proto.String("lybic"),
		Mode:    agentpb.InstanceMode_FAST,
		Steps:   proto.Int32(40),
		StageModelConfig: &agentpb.StageModelConfig{
			GroundingModel:       &agentpb.LLMConfig{ModelName: "ground"},
			ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "act", ApiKey: proto.String("sk-global-key1")},
		},
	})
	running := &agentpb.CommonConfig{
		Steps: proto.Int32(5),
		StageModelConfig: &agentpb.StageModelConfig{
			ActionGeneratorModel: &agentpb.LLMConfig{ApiKey: proto.String("sk-task-key-22")},
		},
	}
	r := s.Resolve(running)
	if r.GetSteps() != 5 || r.GetBackend() != "lybic" || r.GetMode() != agentpb.InstanceMode_FAST {
		t.Fatalf("scalars: %v", r)
	}
	if r.GetStageModelConfig().GetGroundingModel().GetModelName() != "ground" {
		t.Fatal("untouched stage model lost")
	}
	act := r.GetStageModelConfig().GetActionGeneratorModel()
	if act.GetModelName() != "act" || act.GetApiKey() != "sk-task-key-22" {
		t.Fatalf("nested merge: %v", act)
	}
	g := s.Global()
	if g.GetSteps() != 40 || g.GetStageModelConfig().GetActionGeneratorModel().GetApiKey() != "sk-global-key1" {
		t.Fatal("running config leaked into the global config")
	}
	if r.GetId() != GlobalConfigID {
		t.Fatalf("id %q", r.GetId())
	}
}

func TestSetStageModels(t *testing.T) {
	s := NewConfigStore(nil)
	s.SetStageModel(ActionGeneratorModel, &agentpb.LLMConfig{ModelName: "claude"})
	s.SetStageModel(GroundingModel, &agentpb.LLMConfig{ModelName: "ui-tars"})
	got := s.SetStageModel(EmbeddingModel, &agentpb.LLMConfig{ModelName: "emb", ApiKey: proto.String("sk-embedding-0001")})
	if got.GetApiKey() != "sk-embedding-0001" {
		t.Fatal("stored config must keep its secret (callers mask)")
	}
	smc := s.Global().GetStageModelConfig()
	if smc.GetActionGeneratorModel().GetModelName() != "claude" || smc.GetGroundingModel().GetModelName() != "ui-tars" || smc.GetEmbeddingModel().GetModelName() != "emb" {
		t.Fatalf("stage models: %v", smc)
	}
	id := s.SetGlobal(&agentpb.CommonConfig{Id: "prod", Steps: proto.Int32(1)})
	if id != "prod" || s.GlobalID() != "prod" || s.Global().GetStageModelConfig() != nil {
		t.Fatal("SetGlobal must replace the whole config")
	}
}

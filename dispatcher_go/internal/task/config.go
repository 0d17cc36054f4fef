package task

import (
	"sync"

	"google.golang.org/protobuf/proto"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// GlobalConfigID is the id of the global config when the client gives none.
const GlobalConfigID = "global"

// DefaultTaskTimeout applies when neither the request nor the config sets one
// (seed 000: taskTimeout defaults to 3600 s).
const DefaultTaskTimeout = 3600

// StageModel names the stage model a Set…LLMConfig call replaces.
type StageModel int

// The stage models the seed-000 setters address.
const (
	// ActionGeneratorModel is set by SetGlobalCommonLLMConfig.
	ActionGeneratorModel StageModel = iota
	// GroundingModel is set by SetGlobalGroundingLLMConfig.
	GroundingModel
	// EmbeddingModel is set by SetGlobalEmbeddingLLMConfig.
	EmbeddingModel
)

// ConfigStore holds the global CommonConfig. It keeps secrets (commanders
// need them); everything handed to clients goes through secret.Mask.
type ConfigStore struct {
	mu     sync.RWMutex
	global *agentpb.CommonConfig
	// onChange, when set, persists each new global config (under mu, so
	// that writes are in the order of the changes).
	onChange func(*agentpb.CommonConfig)
}

// set replaces the global config without persisting it (restore).
func (s *ConfigStore) set(c *agentpb.CommonConfig) {
	c = proto.Clone(c).(*agentpb.CommonConfig)
	if c.GetId() == "" {
		c.Id = GlobalConfigID
	}
	s.mu.Lock()
	s.global = c
	s.mu.Unlock()
}

// NewConfigStore starts with initial (nil: an empty config with id "global").
func NewConfigStore(initial *agentpb.CommonConfig) *ConfigStore {
	if initial == nil {
		initial = &agentpb.CommonConfig{}
	}
	c := proto.Clone(initial).(*agentpb.CommonConfig)
	if c.GetId() == "" {
		c.Id = GlobalConfigID
	}
	return &ConfigStore{global: c}
}

// Global returns a copy of the global config with secrets. Internal use only.
func (s *ConfigStore) Global() *agentpb.CommonConfig {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return proto.Clone(s.global).(*agentpb.CommonConfig)
}

// GlobalID is the id of the global config.
func (s *ConfigStore) GlobalID() string {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.global.GetId()
}

// SetGlobal replaces the global config and returns its id.
func (s *ConfigStore) SetGlobal(cfg *agentpb.CommonConfig) string {
	c := proto.Clone(cfg).(*agentpb.CommonConfig)
	if c.GetId() == "" {
		c.Id = GlobalConfigID
	}
	s.mu.Lock()
	s.global = c
	if s.onChange != nil {
		s.onChange(c)
	}
	s.mu.Unlock()
	return c.GetId()
}

// SetStageModel replaces one stage model of the global config and returns
// the stored LLMConfig (with its secret; the caller masks it).
func (s *ConfigStore) SetStageModel(which StageModel, llm *agentpb.LLMConfig) *agentpb.LLMConfig {
	c := proto.Clone(llm).(*agentpb.LLMConfig)
	s.mu.Lock()
	defer s.mu.Unlock()
	// Copy on write: readers may hold the old global (Global clones, but
	// keep the invariant that s.global is never mutated in place).
	g := proto.Clone(s.global).(*agentpb.CommonConfig)
	if g.StageModelConfig == nil {
		g.StageModelConfig = &agentpb.StageModelConfig{}
	}
	switch which {
	case ActionGeneratorModel:
		g.StageModelConfig.ActionGeneratorModel = c
	case GroundingModel:
		g.StageModelConfig.GroundingModel = c
	case EmbeddingModel:
		g.StageModelConfig.EmbeddingModel = c
	}
	s.global = g
	if s.onChange != nil {
		s.onChange(g)
	}
	return proto.Clone(c).(*agentpb.LLMConfig)
}

// Resolve returns the config a task runs with: a clone of the global config
// with running merged over it field by field (proto.Merge: set scalars and
// optional fields replace, messages merge recursively). The global config is
// untouched, so the override applies to that task only.
func (s *ConfigStore) Resolve(running *agentpb.CommonConfig) *agentpb.CommonConfig {
	c := s.Global()
	if running != nil {
		proto.Merge(c, running)
	}
	return c
}

// Replace replaces the global config without persisting it: a fleet
// replica takes the config another replica stored.
func (s *ConfigStore) Replace(c *agentpb.CommonConfig) { s.set(c) }

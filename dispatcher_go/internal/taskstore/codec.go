package taskstore

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/secret"
	"github.com/agentdispatch/dispatcher/internal/store"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// body is the stored form of a task besides the record's columns. Its JSON
// is the stored format: old databases must keep loading.
type body struct {
	Instruction    string            `json:"instruction"`
	Planner        string            `json:"planner"`
	Message        string            `json:"message,omitempty"`
	Result         string            `json:"result,omitempty"`
	StartedAt      int64             `json:"startedAt,omitempty"`
	CommanderID    string            `json:"commanderId,omitempty"`
	SessionID      string            `json:"sessionId,omitempty"`
	PreviousTaskID string            `json:"previousTaskId,omitempty"`
	Tenant         string            `json:"tenant,omitempty"` // absent: the default tenant
	Labels         map[string]string `json:"labels,omitempty"`
	Required       []string          `json:"required,omitempty"`
	Sandbox        json.RawMessage   `json:"sandbox,omitempty"`
	DestroySandbox bool              `json:"destroySandbox,omitempty"`
	UsedSandbox    json.RawMessage   `json:"usedSandbox,omitempty"`
	SandboxKept    bool              `json:"sandboxKept,omitempty"`
	TimeoutMS      int64             `json:"timeoutMs,omitempty"`
	Stats          task.Stats        `json:"stats"`
	History        []turn            `json:"history,omitempty"`
	// UserSystemPrompt is the client's addition to the planner's prompt.
	UserSystemPrompt string          `json:"userSystemPrompt,omitempty"`
	Config           json.RawMessage `json:"config,omitempty"`
	SealedConfig     []byte          `json:"sealedConfig,omitempty"`
	LastSeq          uint64          `json:"lastSeq,omitempty"`
	Requeues         int             `json:"requeues,omitempty"`
	Attempt          int64           `json:"attempt,omitempty"`
	// Stop is the stop decided for the running session: a session that
	// re-attaches after a restart is stopped again.
	Stop *stopBody `json:"stop,omitempty"`
	// PolicyYAML is the task's own policy: a requeued task must not run
	// looser than it was submitted.
	PolicyYAML string `json:"policyYaml,omitempty"`
}

type stopBody struct {
	Reason string `json:"reason,omitempty"`
	Code   int32  `json:"code,omitempty"`
	RuleID string `json:"ruleId,omitempty"`
}

type turn struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// encode is snap's stored form.
func (s *Store) encode(snap *task.Snapshot) store.TaskRecord {
	b := body{
		Instruction: snap.Instruction, Planner: snap.Planner, Message: snap.Message, Result: snap.Result,
		StartedAt: store.Micros(snap.StartedAt), CommanderID: snap.CommanderID, SessionID: snap.SessionID,
		PreviousTaskID: snap.PreviousTaskID, Tenant: snap.Tenant, Labels: snap.Labels, Required: snap.Required,
		DestroySandbox: snap.DestroySandbox, TimeoutMS: snap.Timeout.Milliseconds(), Stats: snap.Stats,
		LastSeq: snap.LastSeq, Requeues: snap.Requeues, Attempt: snap.Attempt, UserSystemPrompt: snap.UserSystemPrompt,
	}
	if snap.Policy != nil {
		b.PolicyYAML = string(snap.Policy.Source())
	}
	if st := snap.Stop; st != nil && !task.Terminal(snap.Status) {
		b.Stop = &stopBody{Reason: st.GetReason(), Code: int32(st.GetCode()), RuleID: st.GetRuleId()}
	}
	for _, h := range snap.History {
		b.History = append(b.History, turn{Role: h.GetRole(), Content: h.GetContent()})
	}
	if snap.Sandbox != nil {
		b.Sandbox, _ = protojson.Marshal(secret.Strip(snap.Sandbox))
	}
	if snap.UsedSandbox != nil {
		b.UsedSandbox, _ = protojson.Marshal(snap.UsedSandbox)
		b.SandboxKept = snap.SandboxKept
	}
	if snap.Config != nil {
		b.Config, _ = protojson.Marshal(secret.Strip(snap.Config))
		// Only a task that may still run needs its secrets.
		if !task.Terminal(snap.Status) {
			b.SealedConfig = s.sealer.Seal(snap.Config, snap.ID)
		}
	}
	if c := b.Stats.Cost; math.IsNaN(c) || math.IsInf(c, 0) {
		// JSON has no NaN or Inf: the record could not be encoded at all.
		// The session refuses such a usage at ingest, so this is a bug
		// elsewhere; the cost is stored as unknown rather than the task
		// not at all.
		s.log.Error("task cost is not a finite number; stored as 0", "task_id", snap.ID, "cost", c)
		b.Stats.Cost = 0
	}
	data, err := json.Marshal(&b)
	if err != nil {
		// A nil body: the store writer sets the record aside and the task
		// is failed (store.WriterOptions.OnRejected).
		s.log.Error("task record not encodable", "task_id", snap.ID, "error", err)
		data = nil
	}
	return store.TaskRecord{ID: snap.ID, Status: int32(snap.Status), CreatedAt: snap.CreatedAt, EndedAt: snap.EndedAt, Body: data, Token: snap.FenceToken}
}

// ErrUnreadable marks a stored task record whose body does not decode:
// reading it again fails the same way (unlike a failed read of the
// store). The fleet ends such a task after a few claims that failed so.
var ErrUnreadable = errors.New("stored body does not decode")

// decode reads a stored record: the one decoder of the format. Listing
// stops here; a task brought back to life goes on with load.
func decode(rec store.TaskRecord) (task.Snapshot, *body, error) {
	var b body
	if err := json.Unmarshal(rec.Body, &b); err != nil {
		return task.Snapshot{}, nil, fmt.Errorf("task %s: %w: %w", rec.ID, ErrUnreadable, err)
	}
	snap := task.Snapshot{
		Summary: task.Summary{
			ID: rec.ID, Instruction: b.Instruction, Planner: b.Planner,
			Labels: b.Labels, PreviousTaskID: b.PreviousTaskID, Tenant: b.Tenant, CreatedAt: rec.CreatedAt,
			Status: agentpb.TaskStatus(rec.Status), Message: b.Message, Result: b.Result,
			StartedAt: store.FromMicros(b.StartedAt), EndedAt: rec.EndedAt,
			CommanderID: b.CommanderID, SessionID: b.SessionID, Stats: b.Stats,
			LastSeq: b.LastSeq,
		},
		Required: b.Required, DestroySandbox: b.DestroySandbox,
		Timeout: time.Duration(b.TimeoutMS) * time.Millisecond, Requeues: b.Requeues, Attempt: b.Attempt,
		UserSystemPrompt: b.UserSystemPrompt,
	}
	for _, h := range b.History {
		snap.History = append(snap.History, &dispatchv1.ConversationTurn{Role: h.Role, Content: h.Content})
	}
	if st := b.Stop; st != nil {
		snap.Stop = &dispatchv1.StopSignal{Reason: st.Reason, Code: dispatchv1.StopCode(st.Code), RuleId: st.RuleID}
	}
	if len(b.Sandbox) > 0 {
		sb := &agentpb.Sandbox{}
		if protojson.Unmarshal(b.Sandbox, sb) == nil {
			snap.Sandbox = sb
		}
	}
	if len(b.UsedSandbox) > 0 {
		sb := &agentpb.Sandbox{}
		if protojson.Unmarshal(b.UsedSandbox, sb) == nil {
			snap.UsedSandbox, snap.SandboxKept = sb, b.SandboxKept
		}
	}
	return snap, &b, nil
}

// load is decode plus what only a task brought back to life needs: its
// config (the sealed copy if it opens, else the stripped one; masked once
// the task ended) and its own policy, compiled again.
func (s *Store) load(rec store.TaskRecord) (task.Snapshot, error) {
	snap, b, err := decode(rec)
	if err != nil {
		return snap, err
	}
	if b.PolicyYAML != "" {
		// A compile error is kept, not fatal here: a finished task only
		// shows its state, and a requeued one is failed rather than run
		// without it.
		snap.Policy, snap.PolicyErr = policy.CompileTask([]byte(b.PolicyYAML))
	}
	if c := (&agentpb.CommonConfig{}); s.sealer.Open(b.SealedConfig, rec.ID, c) {
		snap.Config = c
	} else if len(b.Config) > 0 {
		c := &agentpb.CommonConfig{}
		if protojson.Unmarshal(b.Config, c) == nil {
			snap.Config = c
		}
	}
	if task.Terminal(snap.Status) && snap.Config != nil {
		snap.Config = secret.Mask(snap.Config)
	}
	return snap, nil
}

// configDoc is the stored global config.
type configDoc struct {
	Config json.RawMessage `json:"config"`
	Sealed []byte          `json:"sealed,omitempty"`
}

func (s *Store) encodeConfig(c *agentpb.CommonConfig) []byte {
	d := configDoc{Sealed: s.sealer.Seal(c, task.GlobalConfigID)}
	d.Config, _ = protojson.Marshal(secret.Strip(c))
	out, _ := json.Marshal(&d)
	return out
}

func (s *Store) decodeConfig(data []byte) *agentpb.CommonConfig {
	var d configDoc
	if json.Unmarshal(data, &d) != nil {
		return nil
	}
	if c := (&agentpb.CommonConfig{}); s.sealer.Open(d.Sealed, task.GlobalConfigID, c) {
		return c
	}
	c := &agentpb.CommonConfig{}
	if protojson.Unmarshal(d.Config, c) != nil {
		return nil
	}
	return c
}

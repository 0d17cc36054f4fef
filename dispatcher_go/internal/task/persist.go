package task

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/store"
)

// RestartFailureMessage is the message of a task that was running when the
// dispatcher stopped without draining (crash, kill -9): its commander's
// session is gone with the process, so the task cannot have finished.
const RestartFailureMessage = "dispatcher restarted while the task was running; its session was lost"

// requeuedMessage is the state message of a pending task queued again.
const requeuedMessage = "queued again after a dispatcher restart"

// persister writes task records through the store's batching Writer. Secrets
// never reach it in plain text: the stored config has every secret field
// emptied, and, while the task may still run (it needs them), a copy with
// secrets sealed with AES-256-GCM when a key is configured.
type persister struct {
	st   store.Store
	w    *store.Writer
	logs *eventlog.Durable
	aead cipher.AEAD // nil: secrets are dropped, not kept
}

func newPersister(st store.Store, w *store.Writer, logs *eventlog.Durable, secretKey []byte) (*persister, error) {
	p := &persister{st: st, w: w, logs: logs}
	if len(secretKey) > 0 {
		k := sha256.Sum256(secretKey)
		block, err := aes.NewCipher(k[:])
		if err != nil {
			return nil, err
		}
		if p.aead, err = cipher.NewGCM(block); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func (p *persister) seal(m proto.Message, aad string) []byte {
	if p.aead == nil {
		return nil
	}
	plain, err := proto.Marshal(m)
	if err != nil {
		return nil
	}
	nonce := make([]byte, p.aead.NonceSize(), p.aead.NonceSize()+len(plain)+p.aead.Overhead())
	_, _ = rand.Read(nonce)
	return p.aead.Seal(nonce, nonce, plain, []byte(aad))
}

// open decrypts a sealed config; nil if there is none or it cannot be
// opened (no key, another key): the caller falls back to the stripped copy.
func (p *persister) open(sealed []byte, aad string) *agentpb.CommonConfig {
	if p.aead == nil || len(sealed) < p.aead.NonceSize() {
		return nil
	}
	n := p.aead.NonceSize()
	plain, err := p.aead.Open(nil, sealed[:n], sealed[n:], []byte(aad))
	if err != nil {
		return nil
	}
	c := &agentpb.CommonConfig{}
	if proto.Unmarshal(plain, c) != nil {
		return nil
	}
	return c
}

// StripSecrets returns a copy of m with every secret field (see Mask)
// emptied: what may be written to disk.
func StripSecrets[M proto.Message](m M) M {
	c := proto.Clone(m).(M)
	stripMessage(c.ProtoReflect())
	return c
}

func stripMessage(m protoreflect.Message) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Kind() == protoreflect.StringKind && !fd.IsList() && !fd.IsMap() && isSecretField(fd):
			m.Clear(fd)
		case fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap():
			stripMessage(v.Message())
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			l := v.List()
			for i := range l.Len() {
				stripMessage(l.Get(i).Message())
			}
		}
		return true
	})
}

// taskBody is the stored form of a task besides the record's columns.
type taskBody struct {
	Instruction    string            `json:"instruction"`
	Planner        string            `json:"planner"`
	Message        string            `json:"message,omitempty"`
	Result         string            `json:"result,omitempty"`
	StartedAt      int64             `json:"startedAt,omitempty"`
	CommanderID    string            `json:"commanderId,omitempty"`
	SessionID      string            `json:"sessionId,omitempty"`
	PreviousTaskID string            `json:"previousTaskId,omitempty"`
	Labels         map[string]string `json:"labels,omitempty"`
	Required       []string          `json:"required,omitempty"`
	Sandbox        json.RawMessage   `json:"sandbox,omitempty"`
	DestroySandbox bool              `json:"destroySandbox,omitempty"`
	UsedSandbox    json.RawMessage   `json:"usedSandbox,omitempty"`
	SandboxKept    bool              `json:"sandboxKept,omitempty"`
	TimeoutMS      int64             `json:"timeoutMs,omitempty"`
	Stats          Stats             `json:"stats"`
	History        []turn            `json:"history,omitempty"`
	Config         json.RawMessage   `json:"config,omitempty"`
	SealedConfig   []byte            `json:"sealedConfig,omitempty"`
	LastSeq        uint64            `json:"lastSeq,omitempty"`
	Requeues       int               `json:"requeues,omitempty"`
	// PolicyYAML is the task's own policy: a requeued task must not run
	// looser than it was submitted.
	PolicyYAML string `json:"policyYaml,omitempty"`
}

type turn struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// recordLocked is t's stored form. Caller holds t.mu.
func (t *Task) recordLocked() store.TaskRecord {
	b := taskBody{
		Instruction: t.instruction, Planner: t.planner, Message: t.message, Result: t.result,
		StartedAt: store.Micros(t.startedAt), CommanderID: t.commanderID, SessionID: t.sessionID,
		PreviousTaskID: t.previousTaskID, Labels: t.labels, Required: t.required,
		DestroySandbox: t.destroySandbox, TimeoutMS: t.timeout.Milliseconds(), Stats: t.stats,
		LastSeq: t.log.LastSeq(), Requeues: t.requeues,
	}
	if t.policy != nil {
		b.PolicyYAML = string(t.policy.Source())
	}
	for _, h := range t.history {
		b.History = append(b.History, turn{Role: h.GetRole(), Content: h.GetContent()})
	}
	if t.sandbox != nil {
		b.Sandbox, _ = protojson.Marshal(StripSecrets(t.sandbox))
	}
	if t.usedSandbox != nil {
		b.UsedSandbox, _ = protojson.Marshal(t.usedSandbox)
		b.SandboxKept = t.sandboxKept
	}
	if t.config != nil {
		b.Config, _ = protojson.Marshal(StripSecrets(t.config))
		// Only a task that may still run needs its secrets.
		if !Terminal(t.status) {
			b.SealedConfig = t.persist.seal(t.config, t.id)
		}
	}
	body, _ := json.Marshal(&b)
	return store.TaskRecord{ID: t.id, Status: int32(t.status), CreatedAt: t.createdAt, EndedAt: t.endedAt, Body: body}
}

// saveLocked queues t's record behind its events. Caller holds t.mu (so
// records are queued in the order of the changes they show).
func (t *Task) saveLocked() {
	if t.persist != nil {
		t.persist.w.SaveTask(t.recordLocked())
	}
}

// fromRecord rebuilds a task from its record; its log is attached by the caller.
func (m *Manager) fromRecord(rec store.TaskRecord) (*Task, *taskBody, error) {
	var b taskBody
	if err := json.Unmarshal(rec.Body, &b); err != nil {
		return nil, nil, fmt.Errorf("task %s: stored body: %w", rec.ID, err)
	}
	t := &Task{
		id: rec.ID, instruction: b.Instruction, planner: b.Planner, required: b.Required,
		labels: b.Labels, destroySandbox: b.DestroySandbox, previousTaskID: b.PreviousTaskID,
		timeout: time.Duration(b.TimeoutMS) * time.Millisecond, createdAt: rec.CreatedAt,
		done: make(chan struct{}), onFinish: m.reg.finishedTask, persist: m.persist,
		status: agentpb.TaskStatus(rec.Status), message: b.Message, result: b.Result,
		startedAt: store.FromMicros(b.StartedAt), endedAt: rec.EndedAt,
		commanderID: b.CommanderID, sessionID: b.SessionID, stats: b.Stats,
		requeues: b.Requeues, closed: &m.closed,
	}
	for _, h := range b.History {
		t.history = append(t.history, &dispatchv1.ConversationTurn{Role: h.Role, Content: h.Content})
	}
	if b.PolicyYAML != "" {
		pol, err := policy.Compile([]byte(b.PolicyYAML))
		if err != nil {
			// Kept, not fatal here: a finished task only shows its state,
			// and a requeued one is failed rather than run without it.
			t.policyErr = err
		}
		t.policy = pol
	}
	if len(b.Sandbox) > 0 {
		sb := &agentpb.Sandbox{}
		if protojson.Unmarshal(b.Sandbox, sb) == nil {
			t.sandbox = sb
		}
	}
	if len(b.UsedSandbox) > 0 {
		sb := &agentpb.Sandbox{}
		if protojson.Unmarshal(b.UsedSandbox, sb) == nil {
			t.usedSandbox, t.sandboxKept = sb, b.SandboxKept
		}
	}
	if c := m.persist.open(b.SealedConfig, rec.ID); c != nil {
		t.config = c
	} else if len(b.Config) > 0 {
		c := &agentpb.CommonConfig{}
		if protojson.Unmarshal(b.Config, c) == nil {
			t.config = c
		}
	}
	if Terminal(t.status) {
		close(t.done)
		if t.config != nil {
			t.config = Mask(t.config)
		}
	}
	return t, &b, nil
}

// loadStored returns the finished task id from the store (not kept in
// memory), or nil.
func (m *Manager) loadStored(id string) *Task {
	if m.persist == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := m.persist.st.GetTask(ctx, id)
	if err == nil && !Terminal(agentpb.TaskStatus(rec.Status)) {
		// Live tasks are always in memory, so this one ended and was
		// evicted (a small --max-tasks-kept under load) before the writer
		// stored its final record and events: let it catch up.
		if err = m.persist.w.FlushWhileHealthy(ctx); err == nil {
			rec, err = m.persist.st.GetTask(ctx, id)
		}
	}
	if err != nil {
		if !errors.Is(err, store.ErrNotFound) {
			m.log.Warn("store read failed", "task_id", id, "error", err)
		}
		return nil
	}
	if !Terminal(agentpb.TaskStatus(rec.Status)) {
		return nil
	}
	t, b, err := m.fromRecord(rec)
	if err != nil {
		m.log.Warn("stored task unreadable", "task_id", id, "error", err)
		return nil
	}
	t.log = m.persist.logs.Stored(id, b.LastSeq)
	return t
}

// RestoreReport says what Restore found.
type RestoreReport struct {
	// Loaded is the number of finished tasks loaded into memory.
	Loaded int
	// Requeued tasks were PENDING and are queued again.
	Requeued int
	// Failed tasks were RUNNING and are now FAILURE (RestartFailureMessage).
	Failed int
	// Finished tasks had ended but their record had not caught up with
	// their terminal event; they take the status the event shows.
	Finished int
}

// Restore brings the state of the previous run back after a restart: the
// global config; tasks that were queued are queued again; tasks that were
// running are FAILURE with RestartFailureMessage (their sessions died with
// the process, so counting them as running would be a lie, and only tasks
// that really run occupy a slot); the newest finished tasks are loaded as
// they were. What a task's status was is judged by its last durable event,
// which is also the last thing any watcher saw. Call it once, after
// SetQueue and before serving.
func (m *Manager) Restore(ctx context.Context) (RestoreReport, error) {
	var rep RestoreReport
	if m.persist == nil {
		return rep, nil
	}
	st := m.persist.st
	if data, err := st.GetConfig(ctx, GlobalConfigID); err == nil {
		if c := m.decodeConfig(data); c != nil {
			m.configs.set(c)
		}
	} else if !errors.Is(err, store.ErrNotFound) {
		return rep, fmt.Errorf("restore global config: %w", err)
	}
	live, err := st.ListTasks(ctx, []int32{int32(agentpb.TaskStatus_PENDING), int32(agentpb.TaskStatus_RUNNING)}, 0)
	if err != nil {
		return rep, fmt.Errorf("restore tasks: %w", err)
	}
	done, err := st.ListTasks(ctx, []int32{int32(agentpb.TaskStatus_SUCCESS), int32(agentpb.TaskStatus_FAILURE), int32(agentpb.TaskStatus_CANCELLED)}, m.reg.maxKept)
	if err != nil {
		return rep, fmt.Errorf("restore tasks: %w", err)
	}
	all := append(live, done...)
	slices.SortStableFunc(all, func(a, b store.TaskRecord) int { return a.CreatedAt.Compare(b.CreatedAt) })
	var requeue []*Task
	for _, rec := range all {
		t, b, err := m.fromRecord(rec)
		if err != nil {
			m.log.Warn("skipping unreadable stored task", "task_id", rec.ID, "error", err)
			continue
		}
		if Terminal(t.status) {
			t.log = m.persist.logs.Stored(t.id, b.LastSeq)
			m.reg.add(t)
			m.reg.finishedTask(t)
			rep.Loaded++
			continue
		}
		last, lastEv, err := m.lastEvent(ctx, t.id)
		if err != nil {
			return rep, err
		}
		switch s := lastEv.GetState().GetStatus(); {
		case lastEv != nil && Terminal(s):
			// Ended; only the record lagged.
			t.status, t.message = s, lastEv.GetState().GetMessage()
			if t.endedAt = lastEv.GetTime().AsTime(); t.endedAt.IsZero() {
				t.endedAt = time.Now()
			}
			m.finishRestored(ctx, t, last, nil)
			rep.Finished++
		case lastEv == nil || s == agentpb.TaskStatus_PENDING:
			// Nobody ever saw it start: queue it again.
			t.status, t.message, t.startedAt, t.commanderID, t.sessionID = agentpb.TaskStatus_PENDING, requeuedMessage, time.Time{}, "", ""
			log, err := m.persist.logs.Restore(t.id, last, false)
			if err != nil {
				return rep, err
			}
			t.log = log
			requeue = append(requeue, t)
		default:
			t.status, t.message, t.endedAt = agentpb.TaskStatus_FAILURE, RestartFailureMessage, time.Now()
			ev := &dispatchv1.TaskEvent{TaskId: t.id, Seq: last + 1, Time: timestamppb.New(t.endedAt),
				Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: t.status, Message: t.message}}}
			if err := m.finishRestored(ctx, t, last+1, ev); err != nil {
				return rep, err
			}
			rep.Failed++
		}
	}
	for _, t := range requeue {
		m.reg.add(t)
		t.mu.Lock()
		_, _ = t.log.Append(t.stateEvent(), eventlog.Control)
		t.saveLocked()
		t.mu.Unlock()
		if t.policyErr != nil {
			t.Finish(agentpb.TaskStatus_FAILURE, "its own policy does not compile after the dispatcher restart: "+t.policyErr.Error(), "")
			continue
		}
		if err := m.queue.Enqueue(t); err != nil {
			t.Finish(agentpb.TaskStatus_FAILURE, "could not be queued again after a dispatcher restart: "+err.Error(), "")
			continue
		}
		rep.Requeued++
	}
	if err := m.persist.w.Flush(ctx); err != nil {
		return rep, fmt.Errorf("restore: %w", err)
	}
	m.log.Info("state restored", "loaded", rep.Loaded, "requeued", rep.Requeued, "failed_running", rep.Failed, "finished", rep.Finished)
	return rep, nil
}

// lastEvent returns the seq and content of taskID's newest stored event.
func (m *Manager) lastEvent(ctx context.Context, taskID string) (uint64, *dispatchv1.TaskEvent, error) {
	last, err := m.persist.st.LastSeq(ctx, taskID)
	if err != nil || last == 0 {
		return 0, nil, err
	}
	evs, err := m.persist.w.ReadStored(ctx, taskID, last-1, 1)
	if err != nil || len(evs) == 0 {
		return last, nil, err
	}
	return last, evs[0], nil
}

// finishRestored writes a terminal task (and ev, its terminal event, if not
// stored yet) synchronously and registers it as finished.
func (m *Manager) finishRestored(ctx context.Context, t *Task, lastSeq uint64, ev *dispatchv1.TaskEvent) error {
	t.log = m.persist.logs.Stored(t.id, lastSeq)
	if t.config != nil {
		t.config = Mask(t.config)
	}
	close(t.done)
	var b store.Batch
	if ev != nil {
		data, err := proto.Marshal(ev)
		if err != nil {
			return err
		}
		b.Events = []store.Event{{TaskID: t.id, Seq: ev.GetSeq(), Data: data}}
	}
	t.mu.Lock()
	b.Tasks = []store.TaskRecord{t.recordLocked()}
	t.mu.Unlock()
	if err := m.persist.st.Apply(ctx, b); err != nil {
		return fmt.Errorf("restore task %s: %w", t.id, err)
	}
	m.reg.add(t)
	m.reg.finishedTask(t)
	return nil
}

// configDoc is the stored global config.
type configDoc struct {
	Config json.RawMessage `json:"config"`
	Sealed []byte          `json:"sealed,omitempty"`
}

func (m *Manager) encodeConfig(c *agentpb.CommonConfig) []byte {
	d := configDoc{Sealed: m.persist.seal(c, GlobalConfigID)}
	d.Config, _ = protojson.Marshal(StripSecrets(c))
	out, _ := json.Marshal(&d)
	return out
}

func (m *Manager) decodeConfig(data []byte) *agentpb.CommonConfig {
	var d configDoc
	if json.Unmarshal(data, &d) != nil {
		return nil
	}
	if c := m.persist.open(d.Sealed, GlobalConfigID); c != nil {
		return c
	}
	c := &agentpb.CommonConfig{}
	if protojson.Unmarshal(d.Config, c) != nil {
		return nil
	}
	return c
}

// saveGlobal writes the global config (called by the ConfigStore on change).
func (m *Manager) saveGlobal(c *agentpb.CommonConfig) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m.persist.st.PutConfig(ctx, GlobalConfigID, m.encodeConfig(c)); err != nil {
		m.log.Error("global config not stored", "error", err)
	}
}

// RunRetention removes, every interval until ctx ends, the tasks that ended
// more than maxAge ago and their events. maxAge <= 0 keeps everything.
func RunRetention(ctx context.Context, st store.Store, maxAge, interval time.Duration, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}) {
	if maxAge <= 0 || st == nil {
		return
	}
	if interval <= 0 {
		interval = min(maxAge/10, time.Hour)
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		n, err := st.DeleteEndedBefore(ctx, time.Now().Add(-maxAge))
		switch {
		case err != nil && ctx.Err() == nil:
			log.Warn("retention failed", "error", err)
		case n > 0:
			log.Info("retention removed old tasks", "tasks", n, "max_age", maxAge)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// Persistence makes a Manager's tasks durable.
type Persistence struct {
	// Store is where tasks, events and configs are kept.
	Store store.Store
	// Writer batches writes to Store; the caller closes it after Shutdown.
	Writer *store.Writer
	// Logs must also be the event-log Store given to NewManager.
	Logs *eventlog.Durable
	// SecretKey, when set, encrypts (AES-256-GCM, key = SHA-256 of it) the
	// secrets that pending and running tasks and the global config need
	// after a restart; without it they are not stored at all.
	SecretKey []byte
}

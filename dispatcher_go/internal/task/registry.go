package task

import (
	"container/list"
	"slices"
	"sync"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// DefaultMaxTasksKept is how many finished tasks stay in memory by default.
const DefaultMaxTasksKept = 10_000

// Registry indexes the known tasks by id and by creation order, and evicts
// the oldest finished tasks beyond maxKept so that memory stays bounded.
// Pending and running tasks are never evicted. Its lock is taken per task
// lifecycle step and per lookup, never per streamed packet.
type Registry struct {
	maxKept int
	onEvict func(*Task)

	mu       sync.RWMutex
	byID     map[string]*entry
	order    *list.List // of *Task, oldest first
	finished *list.List // of *Task, in finish order
	nextSeq  uint64
}

type entry struct {
	t        *Task
	orderEl  *list.Element
	finishEl *list.Element
}

// NewRegistry keeps at most maxKept finished tasks (<= 0: the default);
// onEvict is called, outside the lock, for each task evicted.
func NewRegistry(maxKept int, onEvict func(*Task)) *Registry {
	if maxKept <= 0 {
		maxKept = DefaultMaxTasksKept
	}
	return &Registry{
		maxKept:  maxKept,
		onEvict:  onEvict,
		byID:     make(map[string]*entry),
		order:    list.New(),
		finished: list.New(),
	}
}

// add registers t and gives it its creation sequence number.
func (r *Registry) add(t *Task) {
	r.mu.Lock()
	r.nextSeq++
	t.createSeq = r.nextSeq
	e := &entry{t: t}
	e.orderEl = r.order.PushBack(t)
	r.byID[t.id] = e
	r.mu.Unlock()
}

// sandboxTenants are the tenants of the tasks in memory that were given
// sandbox id or reported it in use (Task.SandboxIDs), each once.
func (r *Registry) sandboxTenants(id string) []string {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []string
	for _, e := range r.byID {
		if !slices.Contains(out, e.t.tenant) && slices.Contains(e.t.SandboxIDs(), id) {
			out = append(out, e.t.tenant)
		}
	}
	return out
}

// remove forgets t entirely (a submission that the queue refused).
// False if the registry does not hold t (another copy of its task, or none).
func (r *Registry) remove(t *Task) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.byID[t.id]
	if !ok || e.t != t {
		return false
	}
	r.order.Remove(e.orderEl)
	if e.finishEl != nil {
		r.finished.Remove(e.finishEl)
	}
	delete(r.byID, t.id)
	return true
}

// finishedTask records that t ended and evicts beyond maxKept.
func (r *Registry) finishedTask(t *Task) {
	var evicted []*Task
	r.mu.Lock()
	if e, ok := r.byID[t.id]; ok && e.t == t && e.finishEl == nil {
		e.finishEl = r.finished.PushBack(t)
	}
	for r.finished.Len() > r.maxKept {
		old := r.finished.Remove(r.finished.Front()).(*Task)
		if e, ok := r.byID[old.id]; ok {
			r.order.Remove(e.orderEl)
			delete(r.byID, old.id)
		}
		evicted = append(evicted, old)
	}
	r.mu.Unlock()
	if r.onEvict != nil {
		for _, old := range evicted {
			r.onEvict(old)
		}
	}
}

// Get returns the task with id, or nil.
func (r *Registry) Get(id string) *Task {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if e, ok := r.byID[id]; ok {
		return e.t
	}
	return nil
}

// Len is the number of tasks known.
func (r *Registry) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.byID)
}

// Active returns the tasks that have not ended yet.
func (r *Registry) Active() []*Task {
	r.mu.RLock()
	defer r.mu.RUnlock()
	var out []*Task
	for el := r.order.Back(); el != nil; el = el.Prev() {
		t := el.Value.(*Task)
		if !Terminal(t.Status()) {
			out = append(out, t)
		}
	}
	return out
}

// List returns up to limit tasks created before the task with creation
// sequence before (0: from the newest), newest first, whose status is in
// statuses (empty: any). next is the sequence to pass for the following
// page, 0 when there is none.
func (r *Registry) List(statuses []agentpb.TaskStatus, limit int, before uint64) (tasks []*Task, next uint64) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	for el := r.order.Back(); el != nil; el = el.Prev() {
		t := el.Value.(*Task)
		if before != 0 && t.createSeq >= before {
			continue
		}
		if len(statuses) > 0 && !containsStatus(statuses, t.Status()) {
			continue
		}
		if len(tasks) == limit {
			return tasks, tasks[len(tasks)-1].createSeq
		}
		tasks = append(tasks, t)
	}
	return tasks, 0
}

func containsStatus(ss []agentpb.TaskStatus, s agentpb.TaskStatus) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}

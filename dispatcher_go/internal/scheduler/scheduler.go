// Package scheduler matches pending tasks with idle commander slots.
//
// A task needs an idle slot whose hello capabilities contain
// "planner:<planner>" and every one of the task's required capabilities,
// and that serves the task's tenant (a slot that names no tenant serves
// every tenant).
// While none is free the task waits in a bounded FIFO queue; when its
// tenant's share of the queue is full (the bound applies to each tenant, so
// that one tenant's waiting tasks never refuse another's), Enqueue fails
// with ErrQueueFull (the API answers RESOURCE_EXHAUSTED). Scheduling happens per task and per slot state change,
// never per streamed packet, so one mutex is enough here.
//
// The scheduler only decides which task goes to which slot; it never starts
// a task under its lock (Slot.Deliver runs after it, see Scheduler), so a
// slow start cannot stall cancels, submissions or listings. It must not
// know how a slot runs a task, nor wait for anything.
package scheduler

import (
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/agentdispatch/dispatcher/internal/task"
)

// ErrQueueFull means the bounded task queue has no room for another task of
// the task's tenant.
var ErrQueueFull = errors.New("task queue is full")

// PlannerCapability is the capability a slot declares to run planner p.
func PlannerCapability(p string) string { return "planner:" + p }

// Slot is one commander slot as the scheduler sees it.
type Slot interface {
	// HasCapability reports whether the slot's hello declared c. The set
	// must not change after AddSlot.
	HasCapability(c string) bool
	// PlannerCapabilities lists the slot's "planner:…" capabilities.
	PlannerCapabilities() []string
	// ServesTenant reports whether the slot may run a task of tenant ("" is
	// the default tenant). The answer must not change after AddSlot.
	ServesTenant(tenant string) bool
	// Deliver starts t on the slot. The scheduler has handed t to the slot
	// (t is out of the queue, the slot is busy) and calls Deliver after
	// releasing its lock, so Deliver may call back into the scheduler; it
	// must still be quick (it runs on the goroutine of whoever freed the
	// slot or submitted the task) and must not wait for the store or the
	// network. A Deliver may come after RemoveSlot (the hand-out was
	// earlier): a slot that is going away must answer SlotGone.
	Deliver(t *task.Task) Delivery
}

// Delivery is what Slot.Deliver did with a task.
type Delivery int

const (
	// Started: the slot runs the task.
	Started Delivery = iota
	// SlotGone: the slot is going away and did not touch the task (still
	// PENDING). The scheduler drops the slot and places the task again, in
	// its old place in the queue.
	SlotGone
	// TaskGone: the task is no longer PENDING (a cancel or the drain ended
	// it during the hand-over); the slot is still free. The scheduler
	// forgets the task and gives the slot the next one it can run.
	TaskGone
)

// Stats is a snapshot of the scheduler.
type Stats struct {
	Slots  int
	Idle   int
	Queued int
}

// Scheduler is a bounded queue plus the set of slots. Safe for concurrent use.
//
// Hand-over: under its lock the scheduler only decides (which task goes to
// which slot: the task leaves the queue, the slot turns busy); the start
// itself (Slot.Deliver, which records the task's state change) runs after
// the lock is released, so no lock of the scheduler is ever held while a
// task is started. Between the two the task is in neither the queue nor a
// running session. What can meet it there:
//   - Remove (a cancel, the drain) does not find it and returns false. The
//     caller then sees the task PENDING without a runner and ends it itself
//     (task.Manager.Cancel and Shutdown do); Task.Start and Task.Finish are
//     ordered by the task's own lock, so either the start wins (the task
//     runs and the caller stops it as a running task) or the end wins (the
//     start fails, Deliver answers TaskGone and the slot takes the next
//     task).
//   - The slot's stream ends: Deliver answers SlotGone and the task goes
//     back to its place in the queue (or to another idle slot). A task that
//     ended meanwhile is not put back (and a caller that ended it after a
//     failed Remove removes it again, see task.Manager.Cancel).
//   - RemoveSlot: the slot is dropped at once; its Deliver answers SlotGone
//     (its stream's context ended before RemoveSlot was called), or, if it
//     checked just before, it started the task and its own teardown ends
//     that session (session.slot orders Deliver against its teardown).
type Scheduler struct {
	maxQueue int

	mu    sync.Mutex
	queue []queued // FIFO by seq, maxQueue per tenant (plus tasks given back)
	// perTenant counts the queued tasks of each tenant: the bound applies
	// to each, so that one tenant's waiting tasks never refuse another's.
	perTenant map[string]int
	nextSeq   uint64            // admission order of Enqueue
	slots     map[Slot]bool     // registered slots → idle
	idle      map[string][]Slot // planner capability → idle slots, longest idle first
	// onIdle, when set, is called (outside the lock) after a slot turned
	// idle: a fleet replica then reads the bus for work (see SetOnIdle).
	onIdle func()
}

// SetOnIdle sets f, called without the scheduler's lock each time a slot
// registers or turns idle with no queued task for it. f must be quick (it
// runs on the goroutine that freed the slot).
func (s *Scheduler) SetOnIdle(f func()) {
	s.mu.Lock()
	s.onIdle = f
	s.mu.Unlock()
}

// CanRun reports whether an idle slot could start a task of planner that
// requires the capabilities required now.
func (s *Scheduler) CanRun(planner string, required []string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sl := range s.idle[PlannerCapability(planner)] {
		ok := true
		for _, c := range required {
			if !sl.HasCapability(c) {
				ok = false
				break
			}
		}
		if ok {
			return true
		}
	}
	return false
}

// notifyIdle calls the onIdle hook, if any, outside the lock.
func (s *Scheduler) notifyIdle() {
	s.mu.Lock()
	f := s.onIdle
	s.mu.Unlock()
	if f != nil {
		f()
	}
}

// queued is a task and its place in the line: seq is the order of its
// admission (Enqueue), 0 for a task put back by Requeue (it goes first).
type queued struct {
	t   *task.Task
	seq uint64
	// since is when the task joined the queue (Enqueue, Requeue).
	since time.Time
}

// handout is a decision taken under the lock: start q.t on sl (nil: none).
type handout struct {
	q  queued
	sl Slot
}

// New returns a scheduler whose queue holds at most maxQueue tasks of each
// tenant.
func New(maxQueue int) *Scheduler {
	if maxQueue <= 0 {
		maxQueue = 1024
	}
	return &Scheduler{
		maxQueue:  maxQueue,
		slots:     make(map[Slot]bool),
		perTenant: make(map[string]int),
		idle:      make(map[string][]Slot),
	}
}

// Enqueue starts t on a matching idle slot, or queues it. It implements
// task.Queue. The queue bound applies here, at admission: a task handed to
// a slot that dies during the hand-over goes back to the queue even if it
// is full (it was admitted).
func (s *Scheduler) Enqueue(t *task.Task) error {
	s.mu.Lock()
	sl := s.findIdleLocked(t)
	if sl == nil && s.perTenant[t.Tenant()] >= s.maxQueue {
		s.mu.Unlock()
		return ErrQueueFull
	}
	s.nextSeq++
	q := queued{t: t, seq: s.nextSeq, since: time.Now()}
	if sl == nil {
		s.queue = append(s.queue, q)
		s.perTenant[t.Tenant()]++
		s.mu.Unlock()
		return nil
	}
	s.takeLocked(sl)
	s.mu.Unlock()
	s.deliver(handout{q, sl})
	return nil
}

// Requeue puts back t, a task whose slot died before the commander heard of
// it. reset, called under the scheduler's lock, moves t back to PENDING (see
// task.Task.Requeue); if it fails nothing else happens and its error is
// returned. Otherwise t goes to a matching idle slot at once, or to the head
// of the queue: it keeps its place as the oldest, and the queue bound does
// not apply (t was admitted already). Because reset and the placement happen
// under one lock, a concurrent Remove (a cancel, the drain) either finds t
// queued, or sees it before it was reset, or finds it in a hand-over (see
// Scheduler).
func (s *Scheduler) Requeue(t *task.Task, reset func() error) error {
	s.mu.Lock()
	if err := reset(); err != nil {
		s.mu.Unlock()
		return err
	}
	h := s.placeLocked(queued{t: t, since: time.Now()})
	s.mu.Unlock()
	s.deliver(h)
	return nil
}

// Remove takes t out of the queue. It implements task.Queue. It returns
// false for a task that is not queued: running, ended, or being handed to a
// slot (see Scheduler).
func (s *Scheduler) Remove(t *task.Task) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := slices.IndexFunc(s.queue, func(q queued) bool { return q.t == t })
	if i < 0 {
		return false
	}
	s.queue = slices.Delete(s.queue, i, i+1)
	s.unqueuedLocked(t)
	return true
}

// TakeUnserved takes out of the queue, and returns, the tasks that have
// waited at least wait and that no connected slot, idle or busy, can run:
// only a commander that is not there could ever start them. The caller
// ends them (the queue timeout); a slot connecting meanwhile can no longer
// be handed one, as they are out of the queue.
func (s *Scheduler) TakeUnserved(now time.Time, wait time.Duration) []*task.Task {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*task.Task
	s.queue = slices.DeleteFunc(s.queue, func(q queued) bool {
		if now.Sub(q.since) < wait {
			return false
		}
		for sl := range s.slots {
			if matches(sl, q.t) {
				return false
			}
		}
		out = append(out, q.t)
		return true
	})
	return out
}

// AddSlot registers an idle slot and gives it a queued task if one matches.
func (s *Scheduler) AddSlot(sl Slot) {
	s.mu.Lock()
	if _, ok := s.slots[sl]; ok {
		s.mu.Unlock()
		return
	}
	s.slots[sl] = false
	h := s.idleLocked(sl)
	s.mu.Unlock()
	s.deliver(h)
	if h.sl == nil {
		s.notifyIdle()
	}
}

// AddBusySlot registers a slot that already runs a task: a session
// re-attached after a hand-over (internal/session). It turns idle with
// Release, when that session ends.
func (s *Scheduler) AddBusySlot(sl Slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.slots[sl]; !ok {
		s.slots[sl] = false
	}
}

// Release marks a registered slot idle again (its session ended) and gives
// it the oldest queued task it can run.
func (s *Scheduler) Release(sl Slot) {
	s.mu.Lock()
	if idle, ok := s.slots[sl]; !ok || idle {
		s.mu.Unlock()
		return
	}
	h := s.idleLocked(sl)
	s.mu.Unlock()
	s.deliver(h)
	if h.sl == nil {
		s.notifyIdle()
	}
}

// RemoveSlot unregisters a slot (its stream ended). After it returns the
// slot is handed no new task; a hand-out decided before may still reach its
// Deliver (see Slot).
func (s *Scheduler) RemoveSlot(sl Slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dropLocked(sl)
}

// SlotCount is the number of connected slots (GetAgentInfo.maxConcurrentTasks).
func (s *Scheduler) SlotCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.slots)
}

// Planners lists the distinct planner capabilities of the connected slots
// ("planner:chat", ...), sorted: what the A2A agent card offers as skills.
func (s *Scheduler) Planners() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	seen := map[string]bool{}
	var out []string
	for sl := range s.slots {
		for _, p := range sl.PlannerCapabilities() {
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	slices.Sort(out)
	return out
}

// TenantSlots counts the connected slots by the tenants they serve: open
// serve every tenant, per[name] serve name among others (a slot serving
// two tenants counts for each). A slot that does not list its tenants
// (no Tenants method) counts as open. What a fleet replica publishes so
// that GetAgentInfo on any replica counts the caller's slots fleet-wide.
func (s *Scheduler) TenantSlots() (open int, per map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	per = map[string]int{}
	for sl := range s.slots {
		tl, ok := sl.(interface{ Tenants() []string })
		if !ok || len(tl.Tenants()) == 0 {
			open++
			continue
		}
		for _, t := range tl.Tenants() {
			per[t]++
		}
	}
	return open, per
}

// SlotsServing is the number of connected slots that may run a task of
// tenant (those serving it or every tenant); all counts every slot (an
// admin's GetAgentInfo). A tenant so learns nothing of the slots that serve
// only other tenants.
func (s *Scheduler) SlotsServing(tenant string, all bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if all {
		return len(s.slots)
	}
	n := 0
	for sl := range s.slots {
		if sl.ServesTenant(tenant) {
			n++
		}
	}
	return n
}

// Stats returns a snapshot. Tasks being handed to a slot count as neither
// queued nor idle.
func (s *Scheduler) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Slots: len(s.slots), Queued: len(s.queue)}
	for _, idle := range s.slots {
		if idle {
			st.Idle++
		}
	}
	return st
}

// deliver carries out h without the lock, and whatever its outcome leads
// to: a slot that died is dropped and its task placed again, a slot whose
// task is gone takes the next one. It returns once a slot started a task or
// nothing is left to hand out. Each round either starts a task, drops a
// slot or takes a task out of the scheduler, so it ends.
func (s *Scheduler) deliver(h handout) {
	for h.sl != nil {
		switch h.sl.Deliver(h.q.t) {
		case Started:
			return
		case SlotGone:
			s.mu.Lock()
			s.dropLocked(h.sl)
			// Looked at under the lock: a caller that ends the task after a
			// failed Remove removes it again (task.Manager.Cancel), and that
			// Remove must come after this placement to find the task.
			if task.Terminal(h.q.t.Status()) {
				h = handout{} // ended during the hand-over: nothing to put back
			} else {
				h = s.placeLocked(h.q)
			}
			s.mu.Unlock()
		default: // TaskGone
			s.mu.Lock()
			h = s.idleLocked(h.sl)
			s.mu.Unlock()
		}
	}
}

// placeLocked hands q to the longest-idle slot that can run it, or puts it
// in the queue at its place (by seq: a task given back keeps the place it
// had; one requeued goes first).
func (s *Scheduler) placeLocked(q queued) handout {
	if sl := s.findIdleLocked(q.t); sl != nil {
		s.takeLocked(sl)
		return handout{q, sl}
	}
	i, _ := slices.BinarySearchFunc(s.queue, q.seq, func(e queued, seq uint64) int {
		if e.seq < seq {
			return -1
		}
		return 1 // before any entry of the same seq: requeued tasks go first
	})
	s.queue = slices.Insert(s.queue, i, q)
	s.perTenant[q.t.Tenant()]++
	return handout{}
}

// unqueuedLocked counts t, just taken out of the queue, out of its
// tenant's share.
func (s *Scheduler) unqueuedLocked(t *task.Task) {
	if n := s.perTenant[t.Tenant()]; n > 1 {
		s.perTenant[t.Tenant()] = n - 1
	} else {
		delete(s.perTenant, t.Tenant())
	}
}

// idleLocked hands sl, a registered slot that is not idle, the first queued
// task it matches, or files it as idle. A slot removed meanwhile gets
// nothing.
func (s *Scheduler) idleLocked(sl Slot) handout {
	if idle, ok := s.slots[sl]; !ok || idle {
		return handout{}
	}
	for i, q := range s.queue {
		if matches(sl, q.t) {
			s.queue = slices.Delete(s.queue, i, i+1)
			s.unqueuedLocked(q.t)
			return handout{q, sl}
		}
	}
	s.slots[sl] = true
	for _, c := range sl.PlannerCapabilities() {
		s.idle[c] = append(s.idle[c], sl)
	}
	return handout{}
}

// findIdleLocked returns the longest-idle slot that can run t.
func (s *Scheduler) findIdleLocked(t *task.Task) Slot {
	for _, sl := range s.idle[PlannerCapability(t.Planner())] {
		if matches(sl, t) {
			return sl
		}
	}
	return nil
}

// takeLocked marks sl busy and removes it from the idle lists.
func (s *Scheduler) takeLocked(sl Slot) {
	s.slots[sl] = false
	s.unidleLocked(sl)
}

func (s *Scheduler) dropLocked(sl Slot) {
	if _, ok := s.slots[sl]; !ok {
		return
	}
	delete(s.slots, sl)
	s.unidleLocked(sl)
}

func (s *Scheduler) unidleLocked(sl Slot) {
	for _, c := range sl.PlannerCapabilities() {
		list := s.idle[c]
		if i := slices.Index(list, sl); i >= 0 {
			list = slices.Delete(list, i, i+1)
			if len(list) == 0 {
				delete(s.idle, c)
			} else {
				s.idle[c] = list
			}
		}
	}
}

func matches(sl Slot, t *task.Task) bool {
	if !sl.HasCapability(PlannerCapability(t.Planner())) || !sl.ServesTenant(t.Tenant()) {
		return false
	}
	for _, c := range t.RequiredCapabilities() {
		if !sl.HasCapability(c) {
			return false
		}
	}
	return true
}

// Package scheduler matches pending tasks with idle commander slots.
//
// A task needs an idle slot whose hello capabilities contain
// "planner:<planner>" and every one of the task's required capabilities.
// While none is free the task waits in a bounded FIFO queue; when the queue
// is full, Enqueue fails with ErrQueueFull (the API answers
// RESOURCE_EXHAUSTED). Scheduling happens per task and per slot state change,
// never per streamed packet, so one mutex is enough here.
package scheduler

import (
	"errors"
	"slices"
	"sync"

	"github.com/agentdispatch/dispatcher/internal/task"
)

// ErrQueueFull means the bounded task queue has no room.
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
	// Deliver starts t on the slot. It is called with the scheduler's lock
	// held, so it must neither block nor call back into the scheduler. It
	// returns false when the slot is gone; t is then still PENDING.
	Deliver(t *task.Task) bool
}

// Stats is a snapshot of the scheduler.
type Stats struct {
	Slots  int
	Idle   int
	Queued int
}

// Scheduler is a bounded queue plus the set of slots. Safe for concurrent use.
type Scheduler struct {
	maxQueue int

	mu    sync.Mutex
	queue []*task.Task      // FIFO, len <= maxQueue
	slots map[Slot]bool     // registered slots → idle
	idle  map[string][]Slot // planner capability → idle slots, longest idle first
}

// New returns a scheduler whose queue holds at most maxQueue tasks.
func New(maxQueue int) *Scheduler {
	if maxQueue <= 0 {
		maxQueue = 1024
	}
	return &Scheduler{
		maxQueue: maxQueue,
		slots:    make(map[Slot]bool),
		idle:     make(map[string][]Slot),
	}
}

// Enqueue starts t on a matching idle slot, or queues it. It implements
// task.Queue.
func (s *Scheduler) Enqueue(t *task.Task) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deliverLocked(t) {
		return nil
	}
	if len(s.queue) >= s.maxQueue {
		return ErrQueueFull
	}
	s.queue = append(s.queue, t)
	return nil
}

// Requeue puts back t, a task whose slot died before the commander heard of
// it. reset, called under the scheduler's lock, moves t back to PENDING (see
// task.Task.Requeue); if it fails nothing else happens and its error is
// returned. Otherwise t goes to a matching idle slot at once, or to the head
// of the queue: it keeps its place as the oldest, and the queue bound does
// not apply (t was admitted already). Because reset and the insertion happen
// under one lock, a concurrent Remove (a cancel, the drain) either finds t
// queued or sees it before it was reset.
func (s *Scheduler) Requeue(t *task.Task, reset func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := reset(); err != nil {
		return err
	}
	if !s.deliverLocked(t) {
		s.queue = slices.Insert(s.queue, 0, t)
	}
	return nil
}

// deliverLocked starts t on a matching idle slot, if there is one; slots
// that died meanwhile are dropped and the next one is tried.
func (s *Scheduler) deliverLocked(t *task.Task) bool {
	for {
		sl := s.findIdleLocked(t)
		if sl == nil {
			return false
		}
		s.takeLocked(sl)
		if sl.Deliver(t) {
			return true
		}
		s.dropLocked(sl) // the slot died; try another
	}
}

// Remove takes t out of the queue. It implements task.Queue.
func (s *Scheduler) Remove(t *task.Task) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := slices.Index(s.queue, t)
	if i < 0 {
		return false
	}
	s.queue = slices.Delete(s.queue, i, i+1)
	return true
}

// AddSlot registers an idle slot and gives it a queued task if one matches.
func (s *Scheduler) AddSlot(sl Slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.slots[sl]; ok {
		return
	}
	s.slots[sl] = false
	s.idleLocked(sl)
}

// Release marks a registered slot idle again (its session ended) and gives
// it the oldest queued task it can run.
func (s *Scheduler) Release(sl Slot) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if idle, ok := s.slots[sl]; !ok || idle {
		return
	}
	s.idleLocked(sl)
}

// RemoveSlot unregisters a slot (its stream ended). After it returns the
// scheduler never calls the slot's Deliver again.
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

// Stats returns a snapshot.
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

// idleLocked gives sl the first queued task it matches, or files it as idle.
func (s *Scheduler) idleLocked(sl Slot) {
	for i := 0; i < len(s.queue); i++ {
		t := s.queue[i]
		if !matches(sl, t) {
			continue
		}
		s.queue = slices.Delete(s.queue, i, i+1)
		s.slots[sl] = false
		if sl.Deliver(t) {
			return
		}
		// The slot died while being handed the task: the task keeps its
		// place at the head of the line.
		s.queue = slices.Insert(s.queue, i, t)
		s.dropLocked(sl)
		return
	}
	s.slots[sl] = true
	for _, c := range sl.PlannerCapabilities() {
		s.idle[c] = append(s.idle[c], sl)
	}
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
	if !sl.HasCapability(PlannerCapability(t.Planner())) {
		return false
	}
	for _, c := range t.RequiredCapabilities() {
		if !sl.HasCapability(c) {
			return false
		}
	}
	return true
}

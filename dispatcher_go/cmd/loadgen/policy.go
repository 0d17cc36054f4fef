package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/benchkit"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// The policy scenario: N sessions stream content at --rate against a
// dispatcher started with a policy file whose phrase rule (--policy-rule)
// forbids --phrase. A share of the tasks (--poison) emit the phrase split
// across two content packets at a random moment (--stop-min..--stop-max
// after their first packet); the rest never do and must end SUCCESS.
//
// Measured per poisoned task: the simulated commander's send of the packet
// that completes the phrase → the stop it receives (one clock), → the stop
// event a watcher receives, → the `stopped` the dispatcher records (event
// time; same machine, so the wall clocks agree); and on the dispatcher's
// clock alone, its policy decision → the commander's stopped recorded.
// Checked: no content or thought reaches a watcher after the decision, the
// watcher never sees the phrase, it sees exactly the packets before the
// completing one, the decision and the stop name the rule, the task ends
// FAILURE, and no clean task is stopped.

// policyStats gathers the policy scenario's measurements from all lanes.
type policyStats struct {
	offendToStopRecv      *benchkit.Recorder // commander sends the completing packet → commander receives stop
	offendToWatcherStop   *benchkit.Recorder // … → a watcher receives the stop event
	offendToStoppedEvent  *benchkit.Recorder // … → dispatcher records stopped (event time)
	decisionToStopped     *benchkit.Recorder // PolicyDecision event → stopped event (dispatcher clock)
	stopRecvToStoppedSent *benchkit.Recorder // commander: stop received → stopped sent

	tasks, poisoned, stopped, clean                      atomic.Int64
	contentAfterStop, phraseSeen, wrongPrefix, wrongRule atomic.Int64
	notFailed, cleanStopped, missingStopped, noStopRecv  atomic.Int64
	leaked                                               atomic.Int64
}

func runPolicy(ctx context.Context, o *options, e *env) (*result, error) {
	params := o.taskParams()
	params["phrase_window"] = fmt.Sprintf("%s..%s", o.stopMin, o.stopMax)
	params["poison"] = o.poison
	params["phrase"] = o.phrase
	params["rule"] = o.policyRule
	params["leak_after_stop"] = o.leakAfterStop
	res := newResult("policy", params)

	rate := o.rate
	if rate <= 0 {
		return nil, fmt.Errorf("the policy scenario needs --rate > 0")
	}
	// Clean tasks end a little after the latest poisoned moment.
	cleanPackets := int64(rate*(o.stopMax+500*time.Millisecond).Seconds()) + 2
	rg, err := openRig(ctx, o, e, "policy", sessionPlan{
		rate: rate, packetBytes: o.packetBytes, maxSession: o.stopMax + 30*time.Second,
		leakAfterStop: o.leakAfterStop, phrase: o.phrase, maxPackets: cleanPackets,
	}, o.connsFor(o.sessions))
	defer rg.close()
	if err != nil {
		return nil, err
	}
	st := &policyStats{
		offendToStopRecv: benchkit.NewRecorder(0), offendToWatcherStop: benchkit.NewRecorder(0),
		offendToStoppedEvent: benchkit.NewRecorder(0), decisionToStopped: benchkit.NewRecorder(0),
		stopRecvToStoppedSent: benchkit.NewRecorder(0),
	}
	elapsed := rg.runLanes(ctx, o, func(rng *rand.Rand, lane, n int) error {
		return policyOne(ctx, o, rg, st, rng, lane, n)
	})

	res.latency("offending packet sent → commander got stop", st.offendToStopRecv.Summary())
	res.latency("offending packet sent → watcher got stop", st.offendToWatcherStop.Summary())
	res.latency("offending packet sent → stopped recorded", st.offendToStoppedEvent.Summary())
	res.latency("policy decision → stopped recorded", st.decisionToStopped.Summary())
	res.latency("commander: stop → stopped sent", st.stopRecvToStoppedSent.Summary())
	res.value("tasks", float64(st.tasks.Load()), "")
	res.value("tasks with the phrase", float64(st.poisoned.Load()), "")
	res.value("tasks stopped by the rule", float64(st.stopped.Load()), "")
	res.value("clean tasks", float64(st.clean.Load()), "")
	res.value("policy stops per second", float64(st.stopped.Load())/elapsed.Seconds(), "/s")
	res.value("upstream packets evaluated", float64(rg.f.sent.Load()), "")
	res.value("content sent after stop (must be dropped)", float64(st.leaked.Load()), "packets")
	res.value("REJECTED acks", float64(rg.f.rejected.Load()), "")

	res.check("no content after stop", st.contentAfterStop.Load() == 0,
		"%d content/thought events reached a watcher after the policy decision", st.contentAfterStop.Load())
	res.check("phrase never reached a watcher", st.phraseSeen.Load() == 0,
		"%d tasks whose watched content contains the phrase", st.phraseSeen.Load())
	res.check("watchers got every packet before the offending one", st.wrongPrefix.Load() == 0,
		"%d tasks with a different number of content events before the stop", st.wrongPrefix.Load())
	res.check("every phrase stopped its task (FAILURE, rule named)", st.notFailed.Load() == 0 && st.wrongRule.Load() == 0,
		"%d poisoned tasks not ended FAILURE by a policy stop, %d with a wrong rule/code", st.notFailed.Load(), st.wrongRule.Load())
	res.check("no clean task stopped", st.cleanStopped.Load() == 0,
		"%d tasks without the phrase were stopped or failed", st.cleanStopped.Load())
	res.check("stopped recorded, stop received", st.missingStopped.Load() == 0 && st.noStopRecv.Load() == 0,
		"%d without a stopped event, %d whose commander never saw a stop", st.missingStopped.Load(), st.noStopRecv.Load())
	rg.check(res)
	res.check("at least one policy stop measured", st.stopped.Load() > 0, "%d", st.stopped.Load())
	return res, nil
}

// policyOne submits one task (poisoned or clean), watches it to its end and
// records what the policy did.
func policyOne(ctx context.Context, o *options, rg *rig, st *policyStats, rng *rand.Rand, lane, n int) error {
	pool, f := rg.pool, rg.f
	var poisonAt int64
	if rng.Float64() < o.poison {
		lo := int64(o.rate * o.stopMin.Seconds())
		hi := int64(o.rate * o.stopMax.Seconds())
		poisonAt = max(lo, 1)
		if hi > poisonAt {
			poisonAt += rng.Int64N(hi - poisonAt + 1)
		}
	}
	var labels map[string]string
	if poisonAt > 0 {
		labels = map[string]string{poisonLabel: strconv.FormatInt(poisonAt, 10)}
	}
	id, err := pool.submit(ctx, lane, n, labels)
	if err != nil {
		return err
	}
	st.tasks.Add(1)

	var (
		text            strings.Builder
		contentsBefore  int64
		decision        *dispatchv1.PolicyDecision
		decisionAt      time.Time // dispatcher clock
		stop            *dispatchv1.StopSignal
		watcherStopAt   time.Time // loadgen clock
		stoppedAt       time.Time // dispatcher clock
		finalMsg        string
		policyDecisions int
	)
	w, err := watch(ctx, pool.tasks(), id, pool.watchBatch, func(ev *dispatchv1.TaskEvent, at time.Time) {
		switch k := ev.GetKind().(type) {
		case *dispatchv1.TaskEvent_Content:
			if decision != nil || stop != nil {
				st.contentAfterStop.Add(1)
			} else {
				contentsBefore++
			}
			text.WriteString(k.Content.GetText())
		case *dispatchv1.TaskEvent_Thought:
			if decision != nil || stop != nil {
				st.contentAfterStop.Add(1)
			}
		case *dispatchv1.TaskEvent_Policy:
			policyDecisions++
			if decision == nil {
				decision, decisionAt = k.Policy, ev.GetTime().AsTime()
			}
		case *dispatchv1.TaskEvent_Stop:
			if stop == nil {
				stop, watcherStopAt = k.Stop, at
			}
		case *dispatchv1.TaskEvent_Stopped:
			stoppedAt = ev.GetTime().AsTime()
		case *dispatchv1.TaskEvent_State:
			finalMsg = k.State.GetMessage()
		}
	})
	rg.gaps.Add(w.gaps)
	if err != nil {
		return err
	}
	if strings.Contains(strings.ToLower(text.String()), strings.ToLower(o.phrase)) {
		st.phraseSeen.Add(1)
	}
	if poisonAt == 0 {
		st.clean.Add(1)
		if w.status != agentpb.TaskStatus_SUCCESS || policyDecisions > 0 || stop != nil {
			st.cleanStopped.Add(1)
			return fmt.Errorf("clean task %s ended %s (%s) with %d policy decisions", id, w.status, finalMsg, policyDecisions)
		}
		return nil
	}

	st.poisoned.Add(1)
	if w.status != agentpb.TaskStatus_FAILURE || decision == nil || stop == nil {
		st.notFailed.Add(1)
		return fmt.Errorf("poisoned task %s ended %s (%s); decision %v, stop %v", id, w.status, finalMsg, decision, stop)
	}
	if decision.GetAction() != dispatchv1.PolicyAction_POLICY_ACTION_STOP || decision.GetRuleId() != o.policyRule ||
		stop.GetCode() != dispatchv1.StopCode_STOP_CODE_POLICY || stop.GetRuleId() != o.policyRule {
		st.wrongRule.Add(1)
		return fmt.Errorf("task %s: decision %v, stop %v; want STOP by rule %s", id, decision, stop, o.policyRule)
	}
	st.stopped.Add(1)
	// The packets before the completing one (0..poisonAt-1) are all shown.
	if contentsBefore != poisonAt {
		st.wrongPrefix.Add(1)
	}
	tr, ok := f.trace(id)
	if !ok || tr.offendSent.IsZero() {
		return fmt.Errorf("task %s: the commander has no record of the offending packet", id)
	}
	if tr.stopRecv.IsZero() {
		st.noStopRecv.Add(1)
	} else {
		st.offendToStopRecv.Add(tr.stopRecv.Sub(tr.offendSent))
		if !tr.stoppedSent.IsZero() {
			st.stopRecvToStoppedSent.Add(tr.stoppedSent.Sub(tr.stopRecv))
		}
	}
	st.offendToWatcherStop.Add(watcherStopAt.Sub(tr.offendSent))
	st.leaked.Add(tr.leaked)
	if stoppedAt.IsZero() {
		st.missingStopped.Add(1)
	} else {
		st.offendToStoppedEvent.Add(stoppedAt.Sub(tr.offendSent))
		st.decisionToStopped.Add(stoppedAt.Sub(decisionAt))
	}
	return nil
}

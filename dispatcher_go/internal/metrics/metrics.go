// Package metrics exports the dispatcher's metrics in the Prometheus format:
// the gRPC server metrics of go-grpc-middleware (grpc_server_started_total,
// grpc_server_msg_received_total, grpc_server_handling_seconds, …), task
// events as they are recorded (events by kind, tool call durations, policy
// decisions, tasks ended), and gauges and counters read from the
// dispatcher's components at scrape time (tasks by status, queue depth,
// slots, stop latency, policy evaluations).
//
// Label values are bounded: tool names only for tools that exist (an
// unknown tool is "(unknown)"), event kinds from internal/events, statuses,
// codes and actions from enums (protoenum.Name). Rule ids are not labels:
// a task's own policy could name any number of them.
package metrics

import (
	"net/http"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/events"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/session"
	"github.com/agentdispatch/dispatcher/internal/task"
)

const namespace = "dispatcher"

// toolBuckets span a fast built-in (sub-millisecond) to a slow GUI action
// or a held call (minutes).
var toolBuckets = []float64{0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300}

// Metrics holds the dispatcher's collectors and its registry.
type Metrics struct {
	reg        *prometheus.Registry
	grpc       *grpcprom.ServerMetrics
	events     *prometheus.CounterVec
	toolCalls  *prometheus.HistogramVec
	tasksEnded *prometheus.CounterVec
	submitted  prometheus.Counter
	decisions  *prometheus.CounterVec
}

// New returns metrics on a fresh registry (with the Go runtime and
// process collectors).
func New() *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		grpc: grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(
			grpcprom.WithHistogramBuckets([]float64{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120, 600, 3600}))),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "task_events_total",
			Help: "Task events recorded, by kind (rate() of it is events per second).",
		}, []string{"kind"}),
		toolCalls: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "tool_call_duration_seconds",
			Help:    "Tool call durations by tool and outcome (ok or the error code, e.g. timeout, denied).",
			Buckets: toolBuckets,
		}, []string{"tool", "outcome"}),
		tasksEnded: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "tasks_ended_total",
			Help: "Tasks that reached a terminal status, by status.",
		}, []string{"status"}),
		submitted: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: namespace, Name: "tasks_submitted_total",
			Help: "Tasks accepted for queueing.",
		}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "policy_decisions_total",
			Help: "Policy decisions recorded as task events, by action (stop, deny, hold, allow) and hold outcome (none, approved, rejected, timed_out, cancelled).",
		}, []string{"action", "outcome"}),
	}
	m.reg.MustRegister(m.grpc, m.events, m.toolCalls, m.tasksEnded, m.submitted, m.decisions,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is the registry the handler serves (tests and extra collectors).
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ServerOptions are the gRPC interceptors that count every call and
// message. Put them before the auth interceptors so that refused calls
// are counted too.
func (m *Metrics) ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.ChainUnaryInterceptor(m.grpc.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(m.grpc.StreamServerInterceptor()),
	}
}

// InitializeGRPC pre-creates the per-method series of gs's services (at
// zero), after every service is registered.
func (m *Metrics) InitializeGRPC(gs *grpc.Server) { m.grpc.InitializeMetrics(gs) }

// Handler serves /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
}

// ObserveEvent counts one recorded task event. It is called on the
// recording path, so it only bumps counters.
func (m *Metrics) ObserveEvent(ev *dispatchv1.TaskEvent) {
	m.events.WithLabelValues(events.Label(ev)).Inc()
	switch events.Of(ev) {
	case events.State:
		switch s := ev.GetState().GetStatus(); {
		case task.Terminal(s):
			m.tasksEnded.WithLabelValues(protoenum.Name(s)).Inc()
		case s == agentpb.TaskStatus_PENDING && ev.GetSeq() == 1:
			m.submitted.Inc()
		}
	case events.ToolResult:
		res := ev.GetToolResult().GetResult()
		outcome, tool := "ok", res.GetToolName()
		if e := res.GetError(); e != nil {
			outcome = protoenum.Name(e.GetCode())
			if e.GetCode() == dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNKNOWN_TOOL {
				tool = "(unknown)"
			}
		}
		m.toolCalls.WithLabelValues(tool, outcome).Observe(float64(ev.GetToolResult().GetDurationMs()) / 1000)
	case events.Policy:
		pd := ev.GetPolicy()
		outcome := "none"
		if o := pd.GetHoldOutcome(); o != dispatchv1.HoldOutcome_HOLD_OUTCOME_UNSPECIFIED {
			outcome = protoenum.Name(o)
		}
		m.decisions.WithLabelValues(protoenum.Name(pd.GetAction()), outcome).Inc()
	}
}

// Sources are the components read at scrape time.
type Sources struct {
	Tasks     *task.Manager
	Scheduler *scheduler.Scheduler
	Sessions  *session.Server
	Policy    *policy.Engine
}

// Watch registers a collector that reads src at every scrape.
func (m *Metrics) Watch(src Sources) { m.reg.MustRegister(&stateCollector{src: src}) }

var (
	descTasks       = prometheus.NewDesc(namespace+"_tasks", "Tasks held in memory, by status.", []string{"status"}, nil)
	descQueue       = prometheus.NewDesc(namespace+"_queue_depth", "Pending tasks waiting for a slot.", nil, nil)
	descSlots       = prometheus.NewDesc(namespace+"_slots", "Connected commander slots (ChatStreams).", nil, nil)
	descSlotsIdle   = prometheus.NewDesc(namespace+"_slots_idle", "Connected slots without a task.", nil, nil)
	descStopLatency = prometheus.NewDesc(namespace+"_stop_latency_seconds", "Time from a stop decision to the commander's terminal packet.", nil, nil)
	descStops       = prometheus.NewDesc(namespace+"_stops_total", "Stops by what became of them: decided, acked (terminal packet within the grace), aborted (stream ended after the grace).", []string{"result"}, nil)
	descDropped     = prometheus.NewDesc(namespace+"_dropped_after_stop_total", "Planner output received after a stop and not forwarded.", nil, nil)
	descDeniedStop  = prometheus.NewDesc(namespace+"_tool_calls_denied_after_stop_total", "Tool calls refused because their session was stopped.", nil, nil)
	descPolicyEval  = prometheus.NewDesc(namespace+"_policy_evaluations_total", "Packets evaluated against the policies.", nil, nil)
	descPolicyErr   = prometheus.NewDesc(namespace+"_policy_evaluation_errors_total", "Rule evaluations that failed (and so fired, unless on_error: ignore).", nil, nil)
	descPolicyLoad  = prometheus.NewDesc(namespace+"_policy_reloads_total", "Policy file reloads after the first load, by result.", []string{"result"}, nil)
)

// stateCollector reads the components' own counters at scrape time.
type stateCollector struct{ src Sources }

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descTasks, descQueue, descSlots, descSlotsIdle, descStopLatency, descStops, descDropped, descDeniedStop, descPolicyEval, descPolicyErr, descPolicyLoad} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	if mgr := c.src.Tasks; mgr != nil {
		counts := map[agentpb.TaskStatus]int{}
		reg := mgr.Registry()
		tasks, _ := reg.List(nil, reg.Len()+1, 0)
		for _, t := range tasks {
			counts[t.Status()]++
		}
		for _, s := range []agentpb.TaskStatus{agentpb.TaskStatus_PENDING, agentpb.TaskStatus_RUNNING, agentpb.TaskStatus_SUCCESS, agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_CANCELLED} {
			ch <- prometheus.MustNewConstMetric(descTasks, prometheus.GaugeValue, float64(counts[s]), protoenum.Name(s))
		}
	}
	if sc := c.src.Scheduler; sc != nil {
		st := sc.Stats()
		ch <- prometheus.MustNewConstMetric(descQueue, prometheus.GaugeValue, float64(st.Queued))
		ch <- prometheus.MustNewConstMetric(descSlots, prometheus.GaugeValue, float64(st.Slots))
		ch <- prometheus.MustNewConstMetric(descSlotsIdle, prometheus.GaugeValue, float64(st.Idle))
	}
	if ss := c.src.Sessions; ss != nil {
		st := ss.Stats()
		snap := st.StopLatency.Snapshot()
		buckets := make(map[float64]uint64, len(snap.Bounds))
		var cum uint64
		for i, b := range snap.Bounds {
			cum += uint64(snap.Counts[i])
			buckets[b.Seconds()] = cum
		}
		ch <- prometheus.MustNewConstHistogram(descStopLatency, uint64(snap.Count), snap.Sum.Seconds(), buckets)
		ch <- prometheus.MustNewConstMetric(descStops, prometheus.CounterValue, float64(st.StopsDecided.Load()), "decided")
		ch <- prometheus.MustNewConstMetric(descStops, prometheus.CounterValue, float64(st.StopsAcked.Load()), "acked")
		ch <- prometheus.MustNewConstMetric(descStops, prometheus.CounterValue, float64(st.StopsAborted.Load()), "aborted")
		ch <- prometheus.MustNewConstMetric(descDropped, prometheus.CounterValue, float64(st.DroppedAfterStop.Load()))
		ch <- prometheus.MustNewConstMetric(descDeniedStop, prometheus.CounterValue, float64(st.DeniedAfterStop.Load()))
	}
	if pe := c.src.Policy; pe != nil {
		st := pe.Stats()
		ch <- prometheus.MustNewConstMetric(descPolicyEval, prometheus.CounterValue, float64(st.Evaluations.Load()))
		ch <- prometheus.MustNewConstMetric(descPolicyErr, prometheus.CounterValue, float64(st.Errors.Load()))
		ch <- prometheus.MustNewConstMetric(descPolicyLoad, prometheus.CounterValue, float64(st.Reloads.Load()), "ok")
		ch <- prometheus.MustNewConstMetric(descPolicyLoad, prometheus.CounterValue, float64(st.ReloadFailures.Load()), "failed")
	}
}

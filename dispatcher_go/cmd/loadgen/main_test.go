package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// runAgainstToy runs loadgen with args against an in-memory toy dispatcher
// and returns its exit status and its parsed --json result.
func runAgainstToy(t *testing.T, toy *toyDispatcher, args ...string) (int, result, string) {
	t.Helper()
	g := testutil.ServeGRPC(t, func(srv *grpc.Server) {
		dispatchv1.RegisterTaskServiceServer(srv, toy)
		dispatchv1.RegisterAgentInteractionServer(srv, toy)
		agentpb.RegisterAgentServer(srv, toyAgent{d: toy})
	})
	var stdout, stderr bytes.Buffer
	e := &env{stdout: &stdout, stderr: &stderr, dialOptions: []grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return g.Listener().DialContext(ctx) }),
	}}
	code := realMain(t.Context(), append([]string{"--addr", "127.0.0.1:1", "--json"}, args...), e)
	var res result
	if stdout.Len() > 0 {
		if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
			t.Fatalf("bad JSON %q: %v", stdout.String(), err)
		}
	}
	return code, res, stderr.String()
}

func lat(r result, name string) map[string]any {
	for _, l := range r.Latencies {
		if l.Name == name {
			return l.Summary
		}
	}
	return nil
}

func val(r result, name string) float64 {
	for _, v := range r.Values {
		if v.Name == name {
			return v.Value
		}
	}
	return -1
}

func TestStopScenarioAgainstToy(t *testing.T) {
	code, res, log := runAgainstToy(t, newToy(), "--scenario", "stop", "--sessions", "4", "--duration", "600ms",
		"--stop-min", "20ms", "--stop-max", "80ms", "--rate", "200")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	s := lat(res, "cancel call → commander got stop")
	if s == nil || s["n"].(float64) < 4 {
		t.Fatalf("too few stops measured: %v\n%s", s, log)
	}
	// At least the 3 deliberate ones per stop; a few more are sent while the
	// stop travels from the receive loop to the sender.
	if got, want := val(res, "content sent after stop (must be dropped)"), 3*val(res, "tasks cancelled"); got < want {
		t.Fatalf("leaked %v packets, want at least %v", got, want)
	}
	for _, name := range []string{"cancel call → stopped recorded", "stop decision → stopped recorded", "commander: stop → stopped sent"} {
		if l := lat(res, name); l == nil || l["n"] != s["n"] {
			t.Errorf("%s: %v", name, l)
		}
	}
	t.Log(log)
	if !strings.Contains(log, "scenario stop:") || !strings.Contains(log, "p99=") {
		t.Fatalf("human summary missing:\n%s", log)
	}
}

// TestStopScenarioWithCreditAgainstToy: with a credit window the packets
// are numbered and a session that has used its credit waits (the toy
// never acknowledges) until its stop, which it then answers at once; the
// deliberate leaks and the stopped still go out, past the window.
func TestStopScenarioWithCreditAgainstToy(t *testing.T) {
	code, res, log := runAgainstToy(t, newToy(), "--scenario", "stop", "--sessions", "4", "--duration", "600ms",
		"--stop-min", "20ms", "--stop-max", "80ms", "--rate", "400", "--credit", "4")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	n := val(res, "tasks cancelled")
	if n < 4 {
		t.Fatalf("too few stops: %v\n%s", n, log)
	}
	// 4 packets of credit (the toy acknowledges none), then 3 leaks.
	if got := val(res, "content packets sent by commanders"); got <= 0 {
		t.Fatalf("content rate %v", got)
	}
	// Exactly the deliberate ones, but for a packet handed to the writer in
	// the instant the stop arrived: the receiver timestamps the stop while
	// the session's select may still take the writer's side (both ready),
	// and that packet is, truly, sent after the stop was received — at
	// most one per stop (failed 1 in ~100 loaded runs as 127 vs 126).
	if got := val(res, "content sent after stop (must be dropped)"); got < 3*n || got > 4*n {
		t.Fatalf("leaked %v packets, want %v (the deliberate ones) plus at most one in flight per stop", got, 3*n)
	}
	if q := val(res, "content queued ahead of stopped, max"); q > 4+3 {
		t.Fatalf("%v packets queued ahead of a stopped, credit 4 + 3 leaks", q)
	}
}

func TestStopScenarioCatchesContentAfterStop(t *testing.T) {
	toy := newToy()
	toy.leakAfterStop = true
	code, res, log := runAgainstToy(t, toy, "--scenario", "stop", "--sessions", "2", "--duration", "300ms",
		"--stop-min", "10ms", "--stop-max", "30ms", "--rate", "200")
	if code != 1 || res.OK {
		t.Fatalf("a dispatcher that forwards content after a stop passed: exit %d\n%s", code, log)
	}
	failed := false
	for _, c := range res.Checks {
		if c.Name == "no content after stop" && !c.Pass {
			failed = true
		}
	}
	if !failed {
		t.Fatalf("check not failed: %+v", res.Checks)
	}
}

// With --seed 1 the first task of lanes 0-3 is poisoned and lane 4's is
// clean (each lane draws from a source of its own), so the checks below
// hold even when the machine is so slow that each lane runs one task only.
func TestPolicyScenarioAgainstToy(t *testing.T) {
	toy := newToy()
	toy.phrase = "launch codes"
	code, res, log := runAgainstToy(t, toy, "--scenario", "policy", "--sessions", "5", "--seed", "1", "--duration", "600ms",
		"--stop-min", "20ms", "--stop-max", "80ms", "--rate", "200", "--poison", "0.7")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	s := lat(res, "offending packet sent → commander got stop")
	if s == nil || s["n"].(float64) < 4 || s["n"].(float64) != val(res, "tasks stopped by the rule") {
		t.Fatalf("too few policy stops measured: %v\n%s", s, log)
	}
	if val(res, "clean tasks") < 1 {
		t.Fatalf("no clean task ran:\n%s", log)
	}
	for _, name := range []string{"offending packet sent → stopped recorded", "policy decision → stopped recorded",
		"offending packet sent → watcher got stop", "commander: stop → stopped sent"} {
		if l := lat(res, name); l == nil || l["n"] != s["n"] {
			t.Errorf("%s: %v", name, l)
		}
	}
}

func TestPolicyScenarioCatchesThePhraseReachingWatchers(t *testing.T) {
	toy := newToy()
	toy.phrase, toy.leakPhrase = "launch codes", true
	code, res, log := runAgainstToy(t, toy, "--scenario", "policy", "--sessions", "2", "--duration", "300ms",
		"--stop-min", "10ms", "--stop-max", "30ms", "--rate", "200", "--poison", "1")
	if code != 1 || res.OK {
		t.Fatalf("a dispatcher that forwards the completing chunk passed: exit %d\n%s", code, log)
	}
	failed := map[string]bool{}
	for _, c := range res.Checks {
		if !c.Pass {
			failed[c.Name] = true
		}
	}
	if !failed["phrase never reached a watcher"] || !failed["no content after stop"] {
		t.Fatalf("checks not failed: %+v", res.Checks)
	}
}

func TestRelayScenarioAgainstToy(t *testing.T) {
	code, res, log := runAgainstToy(t, newToy(), "--scenario", "relay", "--sessions", "3", "--duration", "700ms",
		"--warmup", "100ms", "--rate", "100", "--watchers", "2")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	wantRelaySamples(t, res, log, 2)
	if a := res.Params["arrivals"]; a != arrivalsPoisson {
		t.Fatalf("arrivals param %v, want the relay default %s", a, arrivalsPoisson)
	}
	if v := val(res, "loadgen CPU per packet"); v <= 0 {
		t.Fatalf("loadgen CPU per packet %v\n%s", v, log)
	}
}

// wantRelaySamples: the relay measured the packets its sessions sent in
// the 0.6 s window, each once per watcher (fewer near the window's end: a
// packet sent then arrives after it, the more so the slower the machine).
// The rate the sessions reach is not the test's: a -race build on a busy
// machine sent 75 of the offered 300 packets/s (the test wanted 200 of
// about 360 samples, and got 55).
func wantRelaySamples(t *testing.T, res result, log string, watchers int) {
	t.Helper()
	s := lat(res, "emit → watcher receives")
	sent := val(res, "content packets sent by commanders") * 0.6
	if s == nil || sent < 10 || s["n"].(float64) < sent*float64(watchers)/3 {
		t.Fatalf("samples: %v for %.0f packets sent, %d watchers\n%s", s, sent, watchers, log)
	}
}

// --arrivals burst: the old in-step pacing still streams and says so.
func TestRelayScenarioBurstArrivalsAgainstToy(t *testing.T) {
	code, res, log := runAgainstToy(t, newToy(), "--scenario", "relay", "--sessions", "3", "--duration", "700ms",
		"--warmup", "100ms", "--rate", "100", "--arrivals", "burst")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	wantRelaySamples(t, res, log, 1)
	if a := res.Params["arrivals"]; a != arrivalsBurst {
		t.Fatalf("arrivals param %v, want %s", a, arrivalsBurst)
	}
}

// With --watch-batch 0 the watchers read one event per response (event),
// as from a dispatcher older than max_batch; the other scenarios read events.
func TestThroughputScenarioAgainstToy(t *testing.T) {
	toy, code, res, log := runStreamed(t, func(*toyDispatcher) {}, "--scenario", "throughput", "--sessions", "2", "--duration", "500ms",
		"--warmup", "100ms", "--packet-bytes", "64", "--watch-batch", "0")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	checkLogged(t, toy, res, 100*time.Millisecond, 500*time.Millisecond, log)
}

// minStreamed is the content packets a streaming run against the toy must
// have streamed for its checks to say something (runStreamed).
const minStreamed = 10

// runStreamed is runAgainstToy on a new toy (set up by setup) for a run
// that streams, repeated (3 runs at most) while the run streamed fewer than
// minStreamed content packets in all: a starved -race build at load ~30 on
// 2 cores streamed 1 in a 500 ms run, whose checks then pass vacuously. A
// loadgen that does not stream falls short every time.
func runStreamed(t *testing.T, setup func(*toyDispatcher), args ...string) (*toyDispatcher, int, result, string) {
	t.Helper()
	const attempts = 3
	for attempt := 1; ; attempt++ {
		toy := newToy()
		setup(toy)
		code, res, log := runAgainstToy(t, toy, args...)
		if code != 0 || !res.OK {
			return toy, code, res, log
		}
		evs, err := toy.events(testutil.Context(t, testutil.Wait))
		if err != nil {
			t.Fatal(err)
		}
		contents := 0
		for _, ev := range evs {
			if ev.GetContent() != nil {
				contents++
			}
		}
		if contents >= minStreamed {
			return toy, code, res, log
		}
		if attempt == attempts {
			t.Fatalf("%d content packets streamed (in each of %d runs)\n%s", contents, attempts, log)
		}
		t.Logf("run %d streamed %d content packets; running again", attempt, contents)
	}
}

// checkLogged checks a watched throughput run's "events logged by the
// dispatcher" against the toy's own log. The run counts the events stamped
// inside its window, began+warmup .. began+duration, where began lies
// between the toy's last hello ack and its first submission (runStart):
// every event stamped in [first+warmup, hello+duration) is inside it, none
// outside [hello+warmup, first+duration) is. The rate a starved -race build
// reaches is for make bench, not this test (100 events/s failed most runs
// at load ~30 on 2 cores with every check of the run passing).
func checkLogged(t *testing.T, toy *toyDispatcher, res result, warmup, duration time.Duration, log string) {
	t.Helper()
	evs, err := toy.events(testutil.Context(t, testutil.Wait))
	if err != nil {
		t.Fatal(err)
	}
	hello, first := toy.runStart()
	var contents, lo, hi int
	for _, ev := range evs {
		if ev.GetContent() != nil {
			contents++
		}
		at := ev.GetTime().AsTime()
		if !at.Before(first.Add(warmup)) && at.Before(hello.Add(duration)) {
			lo++
		}
		if !at.Before(hello.Add(warmup)) && at.Before(first.Add(duration)) {
			hi++
		}
	}
	v := val(res, "events logged by the dispatcher")
	logged := int(math.Round(v * (duration - warmup).Seconds()))
	t.Logf("%d events logged in the window, %d to %d by the toy's log; %d contents in all", logged, lo, hi, contents)
	if v < 0 || logged < lo || logged > hi {
		t.Fatalf("%v/s logged: %d events in the window, the toy's log says %d to %d\n%s", v, logged, lo, hi, log)
	}
}

// TestUpBatchAgainstToy: with --up-batch a flooding session's waiting
// packets reach a dispatcher that announces batches as UpstreamBatch
// messages of at most what it announced (the toy ends the stream on a
// longer one), and every event is still logged; a dispatcher that announces
// none gets no batch.
func TestUpBatchAgainstToy(t *testing.T) {
	for _, announced := range []uint32{8, 0} {
		toy, code, res, log := runStreamed(t, func(toy *toyDispatcher) { toy.maxUpBatch = announced },
			"--scenario", "throughput", "--sessions", "2", "--duration", "500ms", "--warmup", "100ms", "--packet-bytes", "64", "--up-batch", "64")
		if code != 0 || !res.OK {
			t.Fatalf("announced %d: exit %d\n%s", announced, code, log)
		}
		checkLogged(t, toy, res, 100*time.Millisecond, 500*time.Millisecond, fmt.Sprintf("announced %d\n%s", announced, log))
		if got := toy.upBatches.Load(); (got > 0) != (announced > 0) {
			t.Fatalf("announced %d: %d batches received", announced, got)
		}
	}
}

// TestStopScenarioWithUpBatchAgainstToy: the stop scenario's checks hold
// with batches (the stopped and the deliberate leaks may ride in one).
func TestStopScenarioWithUpBatchAgainstToy(t *testing.T) {
	toy := newToy()
	toy.maxUpBatch = 16
	code, res, log := runAgainstToy(t, toy, "--scenario", "stop", "--sessions", "4", "--duration", "600ms",
		"--stop-min", "20ms", "--stop-max", "80ms", "--rate", "0", "--up-batch", "16")
	if code != 0 || !res.OK {
		t.Fatalf("exit %d\n%s", code, log)
	}
	if n := val(res, "tasks cancelled"); n < 4 {
		t.Fatalf("too few stops: %v\n%s", n, log)
	}
	if toy.upBatches.Load() == 0 {
		t.Fatalf("no batch in a flood\n%s", log)
	}
}

func TestIdleScenarioAgainstToy(t *testing.T) {
	if testing.Short() {
		t.Skip("holds slots for 2s")
	}
	code, res, log := runAgainstToy(t, newToy(), "--scenario", "idle", "--sessions", "50", "--duration", "100ms",
		"--streams-per-conn", "10")
	if code != 0 || !res.OK || val(res, "slots opened (hello acked)") != 50 {
		t.Fatalf("exit %d\n%s", code, log)
	}
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"--scenario", "nope"}, {"--addr", "10.0.0.1:50051"}, {"--addr", "example.com:1"},
		{"--sessions", "0"}, {"--warmup", "20s", "--duration", "10s"}, {"extra"},
		{"--scenario", "policy", "--rate", "0"}, {"--scenario", "policy", "--phrase", "xX"}, {"--poison", "1.5"},
		{"--watch-batch", "-1"},
	} {
		var stderr bytes.Buffer
		if code := realMain(t.Context(), args, &env{stdout: &stderr, stderr: &stderr}); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
	o, err := parseFlags([]string{"--scenario", "stop", "--addr", "[::1]:5"}, &bytes.Buffer{})
	if err != nil || o.rate != 50 {
		t.Fatalf("stop defaults: %+v %v", o, err)
	}
	o, _ = parseFlags([]string{"--scenario", "throughput", "--addr", "localhost:5"}, &bytes.Buffer{})
	if o.rate != 0 {
		t.Fatalf("throughput floods by default, rate %v", o.rate)
	}
}

func TestReport(t *testing.T) {
	a := newResult("relay", map[string]any{"sessions": 10})
	a.value("events delivered to watchers", 1234.5, "/s")
	b := newResult("stop", map[string]any{"sessions": 5})
	b.check("no content after stop", false, "2 events")
	var in, out bytes.Buffer
	_ = a.printJSON(&in)
	_ = b.printJSON(&in)
	ok, err := report(&in, &out)
	if err != nil || ok {
		t.Fatalf("ok=%v err=%v", ok, err)
	}
	for _, want := range []string{"relay@10", "1,234", "checks FAILED", "stop@5: no content after stop: 2 events"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}

// TestThroughputRotatesTasksWithoutWatchers: a lane whose task nobody
// watches still notices it ended and submits the next, and the events
// logged are estimated from the tasks' spans. To rotate, a lane's first task
// must end within the run: with --task-packets 50, 600 ms was not enough at
// load ~30 on 2 cores (-race; 3 runs in a row saw 2 tasks, the commanders
// sending 35-110 packets/s), so the tasks are of 5 packets, and a run that
// fell short is repeated, each time 3 times as long: lanes that do not
// rotate fall short every time.
func TestThroughputRotatesTasksWithoutWatchers(t *testing.T) {
	const warmup = 100 * time.Millisecond
	duration := 600 * time.Millisecond
	const attempts = 3
	for attempt := 1; ; attempt++ {
		toy := newToy()
		code, res, log := runAgainstToy(t, toy, "--scenario", "throughput", "--sessions", "2", "--duration", duration.String(),
			"--warmup", warmup.String(), "--watchers", "0", "--task-packets", "5")
		if code != 0 || !res.OK {
			t.Fatalf("exit %d\n%s", code, log)
		}
		if n := val(res, "tasks"); n < 4 {
			if attempt == attempts {
				t.Fatalf("only %v tasks in a %v run: sessions did not rotate\n%s", n, duration, log)
			}
			t.Logf("run %d: only %v tasks in %v; running 3 times as long\n%s", attempt, n, duration, log)
			duration *= 3
			continue
		}
		checkEstimate(t, toy, res, warmup, duration, log)
		return
	}
}

// checkEstimate checks an unwatched throughput run's estimate of the events
// logged in its window (each task's events, times the share of its
// started..ended span inside the window) against the same estimate from the
// toy's own tasks, for the narrowest and the widest window the run can have
// had (see checkLogged), one event either way for rounding.
func checkEstimate(t *testing.T, toy *toyDispatcher, res result, warmup, duration time.Duration, log string) {
	t.Helper()
	if _, err := toy.events(testutil.Context(t, testutil.Wait)); err != nil {
		t.Fatal(err) // every task ended
	}
	hello, first := toy.runStart()
	estimate := func(from, to time.Time) float64 {
		toy.mu.Lock()
		defer toy.mu.Unlock()
		var sum float64
		for _, tk := range toy.tasks {
			tk.mu.Lock()
			started, ended, n := tk.started.AsTime(), tk.ended.AsTime(), tk.feed.Len()
			tk.mu.Unlock()
			span := ended.Sub(started)
			if overlap := minTime(ended, to).Sub(maxTime(started, from)); span > 0 && overlap > 0 {
				sum += float64(n) * float64(overlap) / float64(span)
			}
		}
		return sum
	}
	lo := estimate(first.Add(warmup), hello.Add(duration)) - 1
	hi := estimate(hello.Add(warmup), first.Add(duration)) + 1
	v := val(res, "events logged by the dispatcher")
	logged := v * (duration - warmup).Seconds()
	t.Logf("%.1f events logged in the window (estimated), %.1f to %.1f by the toy's tasks", logged, lo, hi)
	if v < 0 || logged < lo || logged > hi {
		t.Fatalf("%v/s logged: %.1f events in the window, the toy's tasks say %.1f to %.1f\n%s", v, logged, lo, hi, log)
	}
}

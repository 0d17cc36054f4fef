// Command loadgen is the benchmark load generator. It runs as its own
// process against a real dispatcher and plays both sides: simulated
// commanders (ChatStream slots offering "planner:bench" that stream content
// packets stamped with their emit time) and simulated clients (SubmitTask
// with planner "bench", WatchTask, CancelTask).
//
//	loadgen --addr 127.0.0.1:50051 --scenario stop --sessions 50 --duration 20s
//	loadgen --scenario relay --sessions 100 --rate 20
//	loadgen --scenario throughput --sessions 8 --duration 15s --dispatcher-pid 1234
//	loadgen --scenario idle --sessions 2000 --dispatcher-pid 1234
//	loadgen report results.jsonl      # a table from --json lines
//
// Scenarios:
//
//	stop        N sessions stream; each is cancelled at a random moment.
//	            CancelTask call → commander gets the stop → dispatcher records
//	            stopped; and no content reaches a watcher after the stop event.
//	            Also the stop's legs (decision → commander got stop, commander
//	            sent stopped → recorded) and the content queued ahead of stopped.
//	relay       N sessions stream at --rate; commander emit → watcher receives.
//	            (--arrivals as for tools: Poisson by default, burst = the
//	            old pacing where every session emits in the same millisecond).
//	throughput  N sessions flood (--rate 0); upstream packets/s the dispatcher
//	            accepts and events/s its watchers get, per dispatcher CPU-second.
//	idle        N idle slots (hello only, with KeepAlive); dispatcher RSS per slot.
//	tools       N sessions calling tools back to back (--rate 0) or paced
//	            (--arrivals: Poisson by default, or spread, or the old
//	            phase-locked burst): tool_call → tool_result round trip for
//	            the built-in echo and for bench_echo, served by loadgen as a
//	            tool provider.
//	policy      N sessions stream at --rate against a dispatcher whose policy
//	            file has a phrase rule (--policy-rule) for --phrase; a share
//	            (--poison) emit the phrase split across two packets at a
//	            random moment. Completing packet sent → commander got stop
//	            → stopped recorded; nothing after the stop reaches watchers.
//
// Everything is bounded: loops end by count or time, a hard --timeout caps the
// run, and traffic goes only to the given loopback address. The exit status
// is 1 when a check fails (e.g. content after a stop), 2 on bad usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
)

// options are the command-line settings of one run.
type options struct {
	addr           string
	token          string
	clientToken    string
	scenario       string
	sessions       int
	duration       time.Duration
	warmup         time.Duration
	rate           float64
	packetBytes    int
	json           bool
	dispatcherPID  int
	streamsPerConn int
	watchers       int
	watchBatch     int
	seed           uint64
	stopMin        time.Duration
	stopMax        time.Duration
	leakAfterStop  int
	credit         int
	upBatch        int
	// providerIdempotent declares the provider's bench_echo idempotent
	// (tools): then the dispatcher invokes it at once; else only once the
	// call's event is durable.
	providerIdempotent bool
	taskPackets        int64
	keepalive          time.Duration
	timeout            time.Duration
	cpuProfile         string
	label              string
	phrase             string
	policyRule         string
	poison             float64
	arrivals           string
}

// scenarios maps --scenario to its run function and its default --rate.
var scenarios = map[string]struct {
	run         func(context.Context, *options, *env) (*result, error)
	defaultRate float64
}{
	"stop":       {runStop, 50},
	"relay":      {runRelay, 20},
	"throughput": {runThroughput, 0},
	"idle":       {runIdle, 0},
	"tools":      {runTools, 0},
	"policy":     {runPolicy, 50},
}

// env is the process around a run, replaceable in tests.
type env struct {
	stdout, stderr io.Writer
	dialOptions    []grpc.DialOption
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := realMain(ctx, os.Args[1:], &env{stdout: os.Stdout, stderr: os.Stderr})
	stop()
	os.Exit(code)
}

func realMain(ctx context.Context, args []string, e *env) int {
	if len(args) > 0 && args[0] == "report" {
		return runReport(args[1:], e)
	}
	o, err := parseFlags(args, e.stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(e.stderr, "loadgen:", err)
		}
		return 2
	}
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			fmt.Fprintln(e.stderr, "loadgen:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(e.stderr, "loadgen:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	res, err := scenarios[o.scenario].run(ctx, o, e)
	if err != nil {
		fmt.Fprintf(e.stderr, "loadgen: scenario %s: %v\n", o.scenario, err)
		return 1
	}
	res.Label = o.label
	if o.json {
		res.print(e.stderr)
		if err := res.printJSON(e.stdout); err != nil {
			fmt.Fprintln(e.stderr, "loadgen:", err)
			return 1
		}
	} else {
		res.print(e.stdout)
	}
	if !res.OK {
		return 1
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.addr, "addr", envOr("DISPATCHER_ADDR", "127.0.0.1:50051"), "dispatcher address (loopback only; env DISPATCHER_ADDR)")
	fs.StringVar(&o.token, "token", os.Getenv("DISPATCHER_COMMANDER_TOKEN"), "commander token (env DISPATCHER_COMMANDER_TOKEN)")
	fs.StringVar(&o.clientToken, "client-token", os.Getenv("DISPATCHER_CLIENT_TOKEN"), "client token (env DISPATCHER_CLIENT_TOKEN)")
	fs.StringVar(&o.scenario, "scenario", "relay", "stop | relay | throughput | idle | tools | policy")
	fs.IntVar(&o.sessions, "sessions", 10, "concurrent sessions (idle: slots)")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "how long the load runs (idle: how long the slots are held)")
	fs.DurationVar(&o.warmup, "warmup", -1, "relay/throughput: the first part of the run is not counted (default: duration/5, at most 2s)")
	fs.Float64Var(&o.rate, "rate", -1, "content packets per second per session; 0 floods (default: stop 50, relay 20, throughput 0, tools 0, policy 50)")
	fs.IntVar(&o.packetBytes, "packet-bytes", 32, "bytes of text per content packet")
	fs.BoolVar(&o.json, "json", false, "print the result as one JSON line on stdout (the human summary goes to stderr)")
	fs.IntVar(&o.dispatcherPID, "dispatcher-pid", 0, "pid of the dispatcher, to read its RSS and CPU time from /proc")
	fs.IntVar(&o.streamsPerConn, "streams-per-conn", 16, "ChatStreams (and watchers) per gRPC connection, like slots per commander process")
	fs.IntVar(&o.watchers, "watchers", 1, "relay/throughput: WatchTask subscribers per task")
	fs.IntVar(&o.watchBatch, "watch-batch", 256, "WatchTaskRequest.max_batch of every watcher: up to this many events per response when it is behind (0 = one event per response)")
	fs.Uint64Var(&o.seed, "seed", 1, "seed of the random stop moments (tools, relay: of the Poisson arrivals)")
	fs.StringVar(&o.arrivals, "arrivals", "", "tools and relay, paced (--rate > 0): when each session calls (relay: emits): poisson (default; exponential gaps, mean 1/rate, each session its own), spread (each slot its own fixed phase, evenly over the period) or burst (every session on the same grid from its task's start: all sessions call in the same millisecond, the pacing before December 2026)")
	fs.DurationVar(&o.stopMin, "stop-min", 200*time.Millisecond, "stop: earliest cancel after the first content event (policy: earliest phrase)")
	fs.DurationVar(&o.stopMax, "stop-max", 2*time.Second, "stop: latest cancel after the first content event (policy: latest phrase)")
	fs.StringVar(&o.phrase, "phrase", "launch codes", "policy: the forbidden phrase of the dispatcher's policy file")
	fs.StringVar(&o.policyRule, "policy-rule", "bench-phrase", "policy: the id of the rule that forbids --phrase")
	fs.Float64Var(&o.poison, "poison", 0.5, "policy: share of the tasks that emit the phrase (0..1)")
	fs.IntVar(&o.credit, "credit", 0, "stop: the commanders' credit window: number the packets and keep at most this many content packets unacknowledged, so that a stopped queues behind at most that many (stop-flood: 64); 0 = none: a flood fills the stream's flow-control window, as before")
	fs.BoolVar(&o.providerIdempotent, "provider-idempotent", true, "tools: declare the provider's bench_echo idempotent (it only echoes), so the dispatcher invokes it at once; false: as a tool that acts on the world, invoked only once its tool_call event is durable (adds about the store's flush interval plus a commit)")
	fs.IntVar(&o.upBatch, "up-batch", 0, "stop/relay/throughput/tools: the commanders send the packets they find waiting (handed over while a Send was under way) as one UpstreamBatch of at most this many (and what the dispatcher's hello ack announces), a lone packet alone; 0 = one packet per message, as before")
	fs.IntVar(&o.leakAfterStop, "leak-after-stop", 3, "stop: content packets each planner still sends after the stop (the dispatcher must drop them)")
	fs.Int64Var(&o.taskPackets, "task-packets", -1, "relay/throughput/tools: a session ends after this many packets (tools: calls) and its lane submits the next task; 0 = no limit (default: relay 0, throughput and tools 20000)")
	fs.DurationVar(&o.keepalive, "keepalive", 10*time.Second, "commander connections' KeepAlive ping interval, each ping answered within 3 s (0 = off); grpc-go raises any interval under 10 s to 10 s (internal.KeepaliveMinPingTime), so loadgen cannot ping every 6 s as the Python commander does (commander/_connection.py KEEPALIVE_OPTIONS)")
	fs.StringVar(&o.label, "label", "", "name of this run in `loadgen report` (default SCENARIO@SESSIONS)")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write loadgen's own CPU profile here (to show the load generator is not the bottleneck)")
	fs.DurationVar(&o.timeout, "timeout", 0, "hard limit of the whole run (default: duration + 2m)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: loadgen [flags]   |   loadgen report FILE...")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	sc, ok := scenarios[o.scenario]
	if !ok {
		return nil, fmt.Errorf("unknown --scenario %q (stop, relay, throughput, idle, tools, policy)", o.scenario)
	}
	if o.rate < 0 {
		o.rate = sc.defaultRate
	}
	switch {
	case o.sessions < 1 || o.sessions > 100000:
		return nil, errors.New("--sessions must be in 1..100000")
	case o.duration <= 0 || o.duration > time.Hour:
		return nil, errors.New("--duration must be in (0, 1h]")
	case o.warmup >= o.duration:
		return nil, errors.New("--warmup must be shorter than --duration")
	case o.packetBytes < 1 || o.packetBytes > 1<<20:
		return nil, errors.New("--packet-bytes must be in 1..1048576")
	case o.streamsPerConn < 1:
		return nil, errors.New("--streams-per-conn must be at least 1")
	case o.watchers < 0 || o.watchers > 100:
		return nil, errors.New("--watchers must be in 0..100")
	case o.watchBatch < 0 || o.watchBatch > 1<<16:
		return nil, errors.New("--watch-batch must be in 0..65536")
	case o.stopMin < 0 || o.stopMax < o.stopMin:
		return nil, errors.New("need 0 <= --stop-min <= --stop-max")
	case o.credit < 0:
		return nil, errors.New("--credit must be >= 0")
	case o.upBatch < 0:
		return nil, errors.New("--up-batch must be >= 0")
	case o.leakAfterStop < 0 || o.leakAfterStop > 1000:
		return nil, errors.New("--leak-after-stop must be in 0..1000")
	case o.poison < 0 || o.poison > 1:
		return nil, errors.New("--poison must be in 0..1")
	case o.scenario == "policy" && len(o.phrase) < 2:
		return nil, errors.New("--phrase must have at least 2 bytes (it is sent in two halves)")
	case o.scenario == "policy" && o.rate <= 0:
		return nil, errors.New("the policy scenario needs --rate > 0")
	case o.scenario == "policy" && strings.Trim(strings.ToLower(o.phrase), "x") == "":
		return nil, errors.New("--phrase must not be made of the filler text")
	case o.arrivals != "" && o.scenario != "tools" && o.scenario != "relay":
		return nil, errors.New("--arrivals applies to the tools and relay scenarios only")
	}
	if (o.scenario == "tools" || o.scenario == "relay") && o.arrivals == "" {
		o.arrivals = arrivalsPoisson
	}
	if err := checkArrivals(o.arrivals); o.arrivals != "" && err != nil {
		return nil, err
	}
	if o.taskPackets < 0 {
		o.taskPackets = 0
		if o.scenario == "throughput" || o.scenario == "tools" {
			// Well below the dispatcher's per-task log bound (100 000 events,
			// 64 MiB), so a flood is many tasks rather than one refused one.
			o.taskPackets = min(20000, int64(16<<20/o.packetBytes))
		}
	}
	if o.warmup < 0 {
		o.warmup = min(o.duration/5, 2*time.Second)
	}
	if o.timeout == 0 {
		o.timeout = o.duration + o.stopMax + 2*time.Minute
	}
	if err := checkLoopback(o.addr); err != nil {
		return nil, err
	}
	return o, nil
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// checkLoopback refuses any address that is not this machine: a load
// generator must not be pointed at someone else's server by mistake.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("--addr %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("--addr %q: only loopback addresses are allowed", addr)
}

// bearer attaches a token to every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: the benchmark runs on loopback.
func (bearer) RequireTransportSecurity() bool { return false }

// dialN opens n separate connections (each its own TCP connection, like n
// commander or client processes).
func dialN(o *options, e *env, n int, token string, withKeepalive bool) ([]*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(8 << 20)),
	}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(token)))
	}
	if withKeepalive && o.keepalive > 0 {
		opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{
			Time: o.keepalive, Timeout: 3 * time.Second, PermitWithoutStream: true,
		}))
	}
	if connTrace != nil {
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			return connTrace.Wrap(c), nil
		}))
	}
	opts = append(opts, e.dialOptions...)
	conns := make([]*grpc.ClientConn, 0, n)
	for range n {
		c, err := grpc.NewClient(o.addr, opts...)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		c.Connect()
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []*grpc.ClientConn) {
	for _, c := range conns {
		c.Close()
	}
}

// connsFor is how many connections carry n streams.
func (o *options) connsFor(n int) int { return (n + o.streamsPerConn - 1) / o.streamsPerConn }

// baseParams are the parameters every scenario prints.
func (o *options) baseParams() map[string]any {
	return map[string]any{
		"sessions": o.sessions, "duration": o.duration.String(), "addr": o.addr,
		"streams_per_conn": o.streamsPerConn, "watch_batch": o.watchBatch,
	}
}

func runReport(args []string, e *env) int {
	if len(args) == 0 {
		fmt.Fprintln(e.stderr, "usage: loadgen report FILE... (JSON lines from --json; - for stdin)")
		return 2
	}
	var readers []io.Reader
	for _, name := range args {
		if name == "-" {
			readers = append(readers, os.Stdin)
			continue
		}
		f, err := os.Open(name)
		if err != nil {
			fmt.Fprintln(e.stderr, "loadgen report:", err)
			return 1
		}
		defer f.Close()
		readers = append(readers, f)
	}
	ok, err := report(io.MultiReader(readers...), e.stdout)
	if err != nil {
		fmt.Fprintln(e.stderr, "loadgen report:", err)
		return 1
	}
	if !ok {
		return 1
	}
	return 0
}

// isCanceled reports whether err is a cancellation (context or gRPC status).
func isCanceled(err error) bool {
	return errors.Is(err, context.Canceled) || status.Code(err) == codes.Canceled
}

// joinErrs is errors.Join that keeps the message on one line.
func joinErrs(errs []error) string {
	var parts []string
	for _, err := range errs {
		parts = append(parts, err.Error())
	}
	return strings.Join(parts, "; ")
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/protoenum"
)

// describe renders an error for a person: a gRPC status as "CODE: message".
func describe(err error) string {
	if s, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", s.Code(), s.Message())
	}
	return err.Error()
}

func (c *cli) tasks() (dispatchv1.TaskServiceClient, error) {
	conn, err := c.dial()
	if err != nil {
		return nil, err
	}
	return dispatchv1.NewTaskServiceClient(conn), nil
}

// callCtx bounds one non-streaming call.
func (c *cli) callCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, c.rpcTimeout)
}

// call makes one non-streaming TaskService call, rpc (a method expression
// such as dispatchv1.TaskServiceClient.GetTask), bounded by --rpc-timeout.
func call[Req, Resp any](ctx context.Context, c *cli, rpc func(dispatchv1.TaskServiceClient, context.Context, Req, ...grpc.CallOption) (Resp, error), req Req) (Resp, error) {
	tasks, err := c.tasks()
	if err != nil {
		var none Resp
		return none, err
	}
	cctx, cancel := c.callCtx(ctx)
	defer cancel()
	return rpc(tasks, cctx, req)
}

// printJSON prints m as one line of JSON.
func (c *cli) printJSON(m proto.Message) {
	b, _ := protojson.Marshal(m)
	fmt.Fprintln(c.stdout, string(b))
}

// table is a writer that aligns tab-separated columns on c.stdout; Flush it.
func (c *cli) table() *tabwriter.Writer {
	return tabwriter.NewWriter(c.stdout, 0, 4, 2, ' ', 0)
}

// --- submit and run ---

// taskFlags are the flags that describe a task, shared by run and submit.
type taskFlags struct {
	planner, model, baseURL, apiKey, previous string
	timeout                                   time.Duration
	labels, requires                          listFlag
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func (tf *taskFlags) register(c *cli, name string) *flag.FlagSet {
	fs := c.flagSet(name)
	fs.StringVar(&tf.planner, "planner", "", "planner to run (empty = the dispatcher's default, chat)")
	fs.StringVar(&tf.model, "model", "", "model name for the action generator (runningConfig.stageModelConfig.actionGeneratorModel)")
	fs.StringVar(&tf.baseURL, "base-url", "", "OpenAI-compatible endpoint of that model")
	fs.StringVar(&tf.apiKey, "api-key", "", "API key of that model (masked when read back)")
	fs.StringVar(&tf.previous, "previous", "", "continue the conversation of this task id")
	fs.DurationVar(&tf.timeout, "timeout", 0, "wall-clock limit of the task (0 = the config's taskTimeout)")
	fs.Var(&tf.labels, "label", "label KEY=VALUE (repeatable)")
	fs.Var(&tf.requires, "require", "capability the commander slot must have (repeatable)")
	return fs
}

// request builds the SubmitTaskRequest the flags describe.
func (tf *taskFlags) request(instruction string) (*dispatchv1.SubmitTaskRequest, error) {
	req := &dispatchv1.SubmitTaskRequest{
		Instruction:          instruction,
		Planner:              tf.planner,
		PreviousTaskId:       tf.previous,
		RequiredCapabilities: tf.requires,
	}
	if tf.timeout < 0 {
		return nil, errors.New("--timeout must not be negative")
	}
	if tf.timeout > 0 {
		req.TimeoutSeconds = int32(max(1, (tf.timeout+time.Second-1)/time.Second))
	}
	for _, kv := range tf.labels {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("--label %q: want KEY=VALUE", kv)
		}
		if req.Labels == nil {
			req.Labels = map[string]string{}
		}
		req.Labels[k] = v
	}
	if tf.model != "" || tf.baseURL != "" || tf.apiKey != "" {
		llm := &agentpb.LLMConfig{ModelName: tf.model}
		if tf.baseURL != "" {
			llm.ApiEndpoint = proto.String(tf.baseURL)
		}
		if tf.apiKey != "" {
			llm.ApiKey = proto.String(tf.apiKey)
		}
		req.RunningConfig = &agentpb.CommonConfig{
			StageModelConfig: &agentpb.StageModelConfig{ActionGeneratorModel: llm},
		}
	}
	return req, nil
}

// submit parses a command line of fs (tf's flags and the command's own;
// one argument, the instruction) and submits the task it describes. When
// it fails it has said why, and exit is the status to exit with.
func (c *cli) submit(ctx context.Context, fs *flag.FlagSet, tf *taskFlags, args []string) (id string, exit int, ok bool) {
	pos, ok := c.parse(fs, args, 1, `"instruction"`)
	if !ok {
		return "", exitUsage, false
	}
	req, err := tf.request(pos[0])
	if err != nil {
		fmt.Fprintf(c.stderr, "dispatchctl %s: %v\n", fs.Name(), err)
		return "", exitUsage, false
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.SubmitTask, req)
	if err != nil {
		return "", c.fail(err), false
	}
	return resp.GetTaskId(), exitOK, true
}

func (c *cli) cmdSubmit(ctx context.Context, args []string) int {
	var tf taskFlags
	id, exit, ok := c.submit(ctx, tf.register(c, "submit"), &tf, args)
	if ok {
		fmt.Fprintln(c.stdout, id)
	}
	return exit
}

func (c *cli) cmdRun(ctx context.Context, args []string) int {
	var tf taskFlags
	fs := tf.register(c, "run")
	cancelAfter := fs.Duration("cancel-after", 0, "cancel the task this long after submitting it")
	asJSON := fs.Bool("json", false, "print each event as one JSON line instead of rendering it")
	id, exit, ok := c.submit(ctx, fs, &tf, args)
	if !ok {
		return exit
	}
	c.notice("task %s submitted", id)
	var timer <-chan time.Time
	if *cancelAfter > 0 {
		t := time.NewTimer(*cancelAfter)
		defer t.Stop()
		timer = t.C
	}
	return c.follow(ctx, id, 0, *asJSON, timer)
}

func (c *cli) cmdWatch(ctx context.Context, args []string) int {
	fs := c.flagSet("watch")
	after := fs.Uint64("after-seq", 0, "resume after this event sequence number")
	asJSON := fs.Bool("json", false, "print each event as one JSON line instead of rendering it")
	pos, ok := c.parse(fs, args, 1, "TASK_ID")
	if !ok {
		return exitUsage
	}
	return c.follow(ctx, pos[0], *after, *asJSON, nil)
}

// notice prints an operational message on stderr, apart from the stream.
func (c *cli) notice(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	if c.color {
		msg = styleDim + msg + styleReset
	}
	fmt.Fprintln(c.stderr, "dispatchctl: "+msg)
}

// follow streams a task's events until it ends, then prints its summary.
// Ctrl-C (or cancelAt firing) cancels the task; the stream goes on until the
// dispatcher reports the end. A second Ctrl-C quits at once.
func (c *cli) follow(ctx context.Context, id string, afterSeq uint64, asJSON bool, cancelAt <-chan time.Time) int {
	tasks, err := c.tasks()
	if err != nil {
		return c.fail(err)
	}
	ctx, stopWatching := context.WithCancel(ctx)
	defer stopWatching()
	r := &renderer{w: c.stdout, color: c.color}
	notice := func(format string, args ...any) { r.aside(func() { c.notice(format, args...) }) }
	interrupted := make(chan struct{})
	go func() {
		cancelled := false
		for {
			select {
			case <-ctx.Done():
				return
			case <-c.interrupts:
				if cancelled {
					close(interrupted)
					stopWatching()
					return
				}
				cancelled = true
				notice("cancelling task %s (Ctrl-C again to quit)", id)
				go c.cancelTask(ctx, tasks, id, "cancelled from dispatchctl (Ctrl-C)", notice)
			case <-cancelAt:
				cancelAt = nil
				if !cancelled {
					cancelled = true
					notice("cancelling task %s (--cancel-after)", id)
					go c.cancelTask(ctx, tasks, id, "cancelled from dispatchctl (--cancel-after)", notice)
				}
			}
		}
	}()

	last, err := c.watch(ctx, tasks, id, afterSeq, func(ev *dispatchv1.TaskEvent) {
		if asJSON {
			c.printJSON(ev)
			return
		}
		r.event(ev)
	}, notice)
	select {
	case <-interrupted:
		notice("interrupted; task %s may still be running", id)
		return exitInterrupted
	default:
	}
	if err != nil && !errors.Is(err, errStreamEnded) {
		r.close()
		return c.fail(err)
	}
	cctx, cancel := c.callCtx(context.WithoutCancel(ctx))
	defer cancel()
	resp, gerr := tasks.GetTask(cctx, &dispatchv1.GetTaskRequest{TaskId: id})
	if gerr != nil {
		r.close()
		return c.fail(fmt.Errorf("task ended (%s), but GetTask failed: %w", last, gerr))
	}
	task := resp.GetTask()
	if err != nil && !terminal(task.GetStatus()) {
		r.close()
		return c.fail(fmt.Errorf("%w (task is %s)", err, task.GetStatus()))
	}
	if asJSON {
		c.printJSON(task)
	} else {
		r.summary(task)
	}
	return exitFor(task.GetStatus())
}

func (c *cli) cancelTask(ctx context.Context, tasks dispatchv1.TaskServiceClient, id, reason string, notice func(string, ...any)) {
	cctx, cancel := c.callCtx(ctx)
	defer cancel()
	resp, err := tasks.CancelTask(cctx, &dispatchv1.CancelTaskRequest{TaskId: id, Reason: reason})
	switch {
	case err != nil:
		notice("cancel failed: %s", describe(err))
	case !resp.GetCancelled():
		notice("not cancelled (%s)%s", resp.GetStatus(), suffix(": ", resp.GetMessage()))
	}
}

// errStreamEnded says WatchTask ended without a terminal event.
var errStreamEnded = errors.New("the event stream ended before the task did")

// exitFor maps a terminal status to the exit status.
func exitFor(s agentpb.TaskStatus) int {
	switch s {
	case agentpb.TaskStatus_SUCCESS:
		return exitOK
	case agentpb.TaskStatus_CANCELLED:
		return exitCancelled
	default:
		return exitFailure
	}
}

// terminal reports whether a state event ends the task.
func terminal(s agentpb.TaskStatus) bool {
	return s == agentpb.TaskStatus_SUCCESS || s == agentpb.TaskStatus_FAILURE || s == agentpb.TaskStatus_CANCELLED
}

// watchBatch is WatchTaskRequest.max_batch of watch: a watcher that is
// behind (a long history, a fast task) gets up to this many events per
// response.
const watchBatch = 256

// watch reads WatchTask until the terminal state event, resuming after the
// last seen seq when the connection drops (a few times, with backoff). It
// returns the terminal status.
func (c *cli) watch(ctx context.Context, tasks dispatchv1.TaskServiceClient, id string, after uint64, each func(*dispatchv1.TaskEvent), notice func(string, ...any)) (agentpb.TaskStatus, error) {
	const maxRetries = 5
	retries := 0
	var one [1]*dispatchv1.TaskEvent
	for {
		stream, err := tasks.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: id, AfterSeq: after, MaxBatch: watchBatch})
		if err == nil {
			for {
				var resp *dispatchv1.WatchTaskResponse
				resp, err = stream.Recv()
				if err != nil {
					break
				}
				evs := resp.GetEvents()
				if ev := resp.GetEvent(); ev != nil || len(evs) == 0 {
					one[0] = ev // a dispatcher older than max_batch
					evs = one[:]
				}
				for _, ev := range evs {
					if ev.GetSeq() <= after && after > 0 {
						continue // never show an event twice across a resume
					}
					after = ev.GetSeq()
					retries = 0
					each(ev)
					if st := ev.GetState(); st != nil && terminal(st.GetStatus()) {
						return st.GetStatus(), nil
					}
				}
			}
		}
		if errors.Is(err, io.EOF) {
			// Nothing after `after` and no terminal event: the task had
			// already ended with `after` its last seq, or the server cut the
			// stream; the caller asks GetTask which. (A resume past an ended
			// task's last seq is OUT_OF_RANGE, returned below.)
			return 0, errStreamEnded
		}
		if ctx.Err() != nil {
			return 0, ctx.Err()
		}
		if status.Code(err) != codes.Unavailable || retries >= maxRetries {
			return 0, err
		}
		retries++
		notice("event stream lost (%s); resuming after seq %d", describe(err), after)
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(time.Duration(100<<retries) * time.Millisecond):
		}
	}
}

// --- status, cancel, list, tools, info ---

func (c *cli) cmdStatus(ctx context.Context, args []string) int {
	fs := c.flagSet("status")
	asJSON := fs.Bool("json", false, "print the task as JSON")
	pos, ok := c.parse(fs, args, 1, "TASK_ID")
	if !ok {
		return exitUsage
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.GetTask, &dispatchv1.GetTaskRequest{TaskId: pos[0]})
	if err != nil {
		return c.fail(err)
	}
	t := resp.GetTask()
	if *asJSON {
		c.printJSON(t)
		return exitOK
	}
	tw := c.table()
	row := func(k, v string) {
		if v != "" {
			fmt.Fprintf(tw, "%s:\t%s\n", k, v)
		}
	}
	row("task", t.GetTaskId())
	row("status", t.GetStatus().String())
	row("message", t.GetMessage())
	row("instruction", shorten(t.GetInstruction(), 200))
	row("tenant", t.GetTenant()) // shown to an admin's token only
	row("planner", t.GetPlanner())
	row("commander", t.GetCommanderId())
	row("created", stamp(t.GetCreatedAt().AsTime(), t.GetCreatedAt() != nil))
	row("started", stamp(t.GetStartedAt().AsTime(), t.GetStartedAt() != nil))
	row("ended", stamp(t.GetEndedAt().AsTime(), t.GetEndedAt() != nil))
	row("events", fmt.Sprint(t.GetLastSeq()))
	if s := t.GetStatistics(); s != nil {
		row("statistics", statsLine(s))
	}
	row("result", t.GetResult())
	tw.Flush()
	return exitOK
}

func stamp(t time.Time, ok bool) string {
	if !ok {
		return ""
	}
	return t.Local().Format("2006-01-02 15:04:05.000")
}

func (c *cli) cmdCancel(ctx context.Context, args []string) int {
	fs := c.flagSet("cancel")
	reason := fs.String("reason", "cancelled from dispatchctl", "why, recorded with the stop")
	pos, ok := c.parse(fs, args, 1, "TASK_ID")
	if !ok {
		return exitUsage
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.CancelTask, &dispatchv1.CancelTaskRequest{TaskId: pos[0], Reason: *reason})
	if err != nil {
		return c.fail(err)
	}
	if !resp.GetCancelled() {
		fmt.Fprintf(c.stdout, "not cancelled: task is %s%s\n", resp.GetStatus(), suffix(" — ", resp.GetMessage()))
		return exitFailure
	}
	fmt.Fprintf(c.stdout, "cancelled: task is %s%s\n", resp.GetStatus(), suffix(" — ", resp.GetMessage()))
	return exitOK
}

// cmdApprove resolves a tool call held by a policy (ApproveToolCall):
// approve runs it, --reject refuses it (DENIED).
func (c *cli) cmdApprove(ctx context.Context, args []string) int {
	fs := c.flagSet("approve")
	reject := fs.Bool("reject", false, "refuse the call instead (it is answered DENIED)")
	reason := fs.String("reason", "", "why, recorded with the resolution")
	pos, ok := c.parse(fs, args, 2, "TASK_ID CALL_ID")
	if !ok {
		return exitUsage
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.ApproveToolCall, &dispatchv1.ApproveToolCallRequest{
		TaskId: pos[0], CallId: pos[1], Approve: !*reject, Reason: *reason,
	})
	if err != nil {
		return c.fail(err)
	}
	outcome := protoenum.Name(resp.GetOutcome())
	fmt.Fprintf(c.stdout, "%s: call %s of task %s (event %d)\n", outcome, pos[1], pos[0], resp.GetSeq())
	return exitOK
}

func (c *cli) cmdList(ctx context.Context, args []string) int {
	fs := c.flagSet("list")
	statuses := fs.String("status", "", "only these statuses, comma-separated (e.g. RUNNING,PENDING)")
	limit := fs.Int("limit", 50, "at most this many tasks (max 1000)")
	page := fs.String("page-token", "", "continue from a previous listing")
	if _, ok := c.parse(fs, args, 0, ""); !ok {
		return exitUsage
	}
	req := &dispatchv1.ListTasksRequest{PageSize: int32(*limit), PageToken: *page}
	for s := range strings.SplitSeq(*statuses, ",") {
		if s = strings.ToUpper(strings.TrimSpace(s)); s == "" {
			continue
		}
		v, ok := agentpb.TaskStatus_value[s]
		if !ok {
			fmt.Fprintf(c.stderr, "dispatchctl list: unknown status %q\n", s)
			return exitUsage
		}
		req.Statuses = append(req.Statuses, agentpb.TaskStatus(v))
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.ListTasks, req)
	if err != nil {
		return c.fail(err)
	}
	tw := c.table()
	fmt.Fprintln(tw, "TASK\tSTATUS\tPLANNER\tCREATED\tINSTRUCTION")
	for _, t := range resp.GetTasks() {
		instr := oneLine(shorten(t.GetInstruction(), 60))
		if tn := t.GetTenant(); tn != "" { // an admin's listing names each task's tenant
			instr = "[" + tn + "] " + instr
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", t.GetTaskId(), t.GetStatus(), t.GetPlanner(),
			stamp(t.GetCreatedAt().AsTime(), t.GetCreatedAt() != nil), instr)
	}
	tw.Flush()
	if tok := resp.GetNextPageToken(); tok != "" {
		fmt.Fprintf(c.stderr, "more: dispatchctl list --page-token %s\n", tok)
	}
	return exitOK
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func (c *cli) cmdTools(ctx context.Context, args []string) int {
	fs := c.flagSet("tools")
	schemas := fs.Bool("schema", false, "also print each tool's JSON Schema")
	if _, ok := c.parse(fs, args, 0, ""); !ok {
		return exitUsage
	}
	resp, err := call(ctx, c, dispatchv1.TaskServiceClient.ListTools, &dispatchv1.ListToolsRequest{})
	if err != nil {
		return c.fail(err)
	}
	tw := c.table()
	fmt.Fprintln(tw, "TOOL\tEXECUTOR\tSIDE EFFECTS\tTIMEOUT\tDESCRIPTION")
	for i, t := range resp.GetTools() {
		executor := ""
		if i < len(resp.GetExecutors()) {
			executor = resp.GetExecutors()[i]
		}
		timeout := "default"
		if t.GetTimeoutMs() > 0 {
			timeout = (time.Duration(t.GetTimeoutMs()) * time.Millisecond).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%v\t%s\t%s\n", t.GetName(), executor, t.GetSideEffects(), timeout, oneLine(shorten(t.GetDescription(), 80)))
		if *schemas {
			fmt.Fprintf(tw, "\t\t\t\t%s\n", oneLine(t.GetParametersJsonSchema()))
		}
	}
	tw.Flush()
	return exitOK
}

func (c *cli) cmdInfo(ctx context.Context, args []string) int {
	fs := c.flagSet("info")
	minSlots := fs.Int("min-slots", 0, "exit 1 unless at least this many commander slots are connected (a readiness probe)")
	if _, ok := c.parse(fs, args, 0, ""); !ok {
		return exitUsage
	}
	conn, err := c.dial()
	if err != nil {
		return c.fail(err)
	}
	cctx, cancel := c.callCtx(ctx)
	defer cancel()
	info, err := agentpb.NewAgentClient(conn).GetAgentInfo(cctx, &agentpb.GetAgentInfoRequest{})
	if err != nil {
		return c.fail(err)
	}
	health := "unknown"
	if h, err := grpc_health_v1.NewHealthClient(conn).Check(cctx, &grpc_health_v1.HealthCheckRequest{}); err == nil {
		health = h.GetStatus().String()
	} else {
		health = "unknown (" + describe(err) + ")"
	}
	tw := c.table()
	fmt.Fprintf(tw, "address:\t%s\n", c.addr)
	fmt.Fprintf(tw, "version:\t%s\n", info.GetVersion())
	fmt.Fprintf(tw, "slots:\t%d\n", info.GetMaxConcurrentTasks())
	fmt.Fprintf(tw, "log level:\t%s\n", info.GetLogLevel())
	if info.Domain != nil {
		fmt.Fprintf(tw, "domain:\t%s\n", info.GetDomain())
	}
	fmt.Fprintf(tw, "health:\t%s\n", health)
	tw.Flush()
	if int(info.GetMaxConcurrentTasks()) < *minSlots {
		fmt.Fprintf(c.stderr, "dispatchctl info: %d slot(s) connected, want at least %d\n", info.GetMaxConcurrentTasks(), *minSlots)
		return exitFailure
	}
	return exitOK
}

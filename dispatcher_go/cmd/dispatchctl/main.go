// Command dispatchctl is the dispatcher's command-line client.
//
//	dispatchctl run "What is 17 * 23? Use the calculator."
//	dispatchctl run --cancel-after 2s --model smollm2 --base-url http://127.0.0.1:8080/v1 "Write a poem"
//	dispatchctl submit "instruction"          # prints the task id
//	dispatchctl watch TASK_ID [--after-seq N]
//	dispatchctl status TASK_ID | cancel TASK_ID | list | tools | info
//	dispatchctl approve TASK_ID CALL_ID [--reject] [--reason R]   # a call held by a policy
//
// Connection flags, accepted before or after the subcommand: --addr
// (DISPATCHER_ADDR, default 127.0.0.1:50051), --token
// (DISPATCHER_CLIENT_TOKEN), --tls-ca (DISPATCHER_TLS_CA).
//
// run and watch print the live stream; Ctrl-C once cancels the task and keeps
// printing until it ends, twice quits at once. Exit status: 0 SUCCESS,
// 1 FAILURE or an error, 2 bad usage, 3 CANCELLED, 130 interrupted.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

// Exit statuses.
const (
	exitOK          = 0
	exitFailure     = 1
	exitUsage       = 2
	exitCancelled   = 3
	exitInterrupted = 130
)

// env is everything the CLI takes from its process, so tests can supply it.
type env struct {
	stdout, stderr io.Writer
	getenv         func(string) string
	// interrupts delivers Ctrl-C.
	interrupts <-chan os.Signal
	// color enables ANSI styles (stdout is a terminal).
	color bool
	// dialOptions are added to every connection (tests dial in memory).
	dialOptions []grpc.DialOption
}

// cli is one invocation: its connection settings and its output.
type cli struct {
	env
	addr, token, tlsCA string
	rpcTimeout         time.Duration
	conn               *grpc.ClientConn
}

func main() {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt)
	e := env{
		stdout: os.Stdout, stderr: os.Stderr, getenv: os.Getenv, interrupts: sigs,
		color: isTerminal(os.Stdout) && os.Getenv("NO_COLOR") == "" && os.Getenv("TERM") != "dumb",
	}
	os.Exit(realMain(context.Background(), os.Args[1:], e))
}

// isTerminal reports whether f is a character device (a terminal), without
// a dependency on x/term.
func isTerminal(f *os.File) bool {
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

const usage = `usage: dispatchctl [--addr HOST:PORT] [--token T] [--tls-ca FILE] COMMAND [flags] [args]

commands:
  run "instruction"         submit, stream the task live, print status and statistics
  submit "instruction"      submit and print the task id
  watch TASK_ID             stream a task's events (--after-seq N to resume)
  status TASK_ID            show a task's state, result and statistics
  cancel TASK_ID            stop a pending or running task
  approve TASK_ID CALL_ID   run a tool call a policy holds (--reject refuses it)
  list                      list tasks, newest first
  tools                     list the tools planners can call
  info                      show the dispatcher's version, slots and health

Run 'dispatchctl COMMAND -h' for a command's flags.
`

// commands maps each subcommand to its implementation.
var commands = map[string]func(*cli, context.Context, []string) int{
	"run":     (*cli).cmdRun,
	"submit":  (*cli).cmdSubmit,
	"watch":   (*cli).cmdWatch,
	"status":  (*cli).cmdStatus,
	"cancel":  (*cli).cmdCancel,
	"approve": (*cli).cmdApprove,
	"list":    (*cli).cmdList,
	"tools":   (*cli).cmdTools,
	"info":    (*cli).cmdInfo,
}

func realMain(ctx context.Context, args []string, e env) int {
	c := &cli{env: e}
	fs := c.flagSet("dispatchctl")
	fs.Usage = func() { fmt.Fprint(e.stderr, usage) }
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() == 0 {
		fmt.Fprint(e.stderr, usage)
		return exitUsage
	}
	name := fs.Arg(0)
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(e.stderr, "dispatchctl: unknown command %q\n\n%s", name, usage)
		return exitUsage
	}
	// Traces as the dispatcher's (OTEL_TRACES_EXPORTER=otlp; off by
	// default): the command is the root span, so the task's spans in the
	// dispatcher and the commander join its trace.
	tracing, err := telemetry.Setup(ctx, "dispatchctl", "", e.getenv)
	if err != nil {
		fmt.Fprintln(e.stderr, "dispatchctl:", err)
		return exitUsage
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = tracing.Shutdown(sctx)
	}()
	c.dialOptions = append(c.dialOptions, tracing.DialOptions()...)
	ctx, span := telemetry.Tracer().Start(ctx, "dispatchctl "+name)
	defer span.End()
	if tracing.Enabled() {
		fmt.Fprintf(e.stderr, "trace_id %s\n", span.SpanContext().TraceID())
	}
	defer func() {
		if c.conn != nil {
			c.conn.Close()
		}
	}()
	return cmd(c, ctx, fs.Args()[1:])
}

// flagSet returns a FlagSet that already holds the connection flags, so they
// may come before or after the subcommand.
func (c *cli) flagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(c.stderr)
	def := func(cur, envName, fallback string) string {
		if cur != "" {
			return cur
		}
		if v := c.getenv(envName); v != "" {
			return v
		}
		return fallback
	}
	fs.StringVar(&c.addr, "addr", def(c.addr, "DISPATCHER_ADDR", "127.0.0.1:50051"), "dispatcher address (env DISPATCHER_ADDR)")
	fs.StringVar(&c.token, "token", def(c.token, "DISPATCHER_CLIENT_TOKEN", ""), "client token (env DISPATCHER_CLIENT_TOKEN)")
	fs.StringVar(&c.tlsCA, "tls-ca", def(c.tlsCA, "DISPATCHER_TLS_CA", ""), "CA certificate (PEM) to verify the dispatcher's TLS; empty = plaintext (env DISPATCHER_TLS_CA)")
	if c.rpcTimeout == 0 {
		c.rpcTimeout = 10 * time.Second
	}
	fs.DurationVar(&c.rpcTimeout, "rpc-timeout", c.rpcTimeout, "deadline of each non-streaming call")
	return fs
}

// parse parses a subcommand's flags and returns its positional arguments,
// which must be nargs; ok is false after a usage error (already reported).
func (c *cli) parse(fs *flag.FlagSet, args []string, nargs int, argName string) (pos []string, ok bool) {
	fs.Usage = func() {
		fmt.Fprintf(c.stderr, "usage: dispatchctl %s [flags]%s\n", fs.Name(), suffix(" ", argName))
		fs.PrintDefaults()
	}
	// Flags may follow the positional argument too: parse, take one, parse on.
	for {
		if err := fs.Parse(args); err != nil {
			return nil, false
		}
		if fs.NArg() == 0 {
			break
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(pos) != nargs {
		fmt.Fprintf(c.stderr, "dispatchctl %s: want %d argument(s) (%s), got %d\n", fs.Name(), nargs, argName, len(pos))
		fs.Usage()
		return nil, false
	}
	return pos, true
}

// bearer attaches the client token to every call.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false: loopback deployments run plaintext.
func (bearer) RequireTransportSecurity() bool { return false }

// dial connects lazily (grpc.NewClient does not block).
func (c *cli) dial() (*grpc.ClientConn, error) {
	if c.conn != nil {
		return c.conn, nil
	}
	opts := append([]grpc.DialOption{}, c.dialOptions...)
	if c.tlsCA != "" {
		creds, err := credentials.NewClientTLSFromFile(c.tlsCA, "")
		if err != nil {
			return nil, fmt.Errorf("--tls-ca: %w", err)
		}
		opts = append(opts, grpc.WithTransportCredentials(creds))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if c.token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(c.token)))
	}
	conn, err := grpc.NewClient(c.addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", c.addr, err)
	}
	c.conn = conn
	return conn, nil
}

// fail reports err and returns the failure status.
func (c *cli) fail(err error) int {
	fmt.Fprintln(c.stderr, "dispatchctl:", describe(err))
	return exitFailure
}

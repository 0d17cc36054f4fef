// Command scriptedllm is a scripted OpenAI-compatible model server: a test
// double for latency tests and benchmarks. It streams chat completions at a
// set token rate and records, for every stream, when it started, whether the
// client closed it or it completed, and how many chunks it sent (GET /stats).
//
//	scriptedllm --listen 127.0.0.1:0 --addr-file /tmp/llm.addr --tokens-per-sec 50 --tokens 200
//
// Endpoints: POST /v1/chat/completions (stream or not), GET /v1/models,
// GET /stats, GET|POST /stats/reset, GET /healthz.
//
// A script (--script FILE, a JSON list of {reasoning, content, tool_calls})
// replays a fixed trajectory: a request gets entry k when its conversation
// already holds k assistant messages; past the end, generated text.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/agentdispatch/dispatcher/internal/addrfile"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "scriptedllm:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		listen   = flag.String("listen", "127.0.0.1:0", "address to listen on (port 0 picks a free one)")
		addrFile = flag.String("addr-file", "", "write the real listen address to this file once serving")
		script   = flag.String("script", "", "JSON file of scripted responses (see package doc)")
		cfg      config
	)
	flag.StringVar(&cfg.Model, "model", "scripted", "model id reported by /v1/models")
	flag.Float64Var(&cfg.TokensPerSec, "tokens-per-sec", 50, "token rate of every response; 0 = as fast as possible")
	flag.IntVar(&cfg.Tokens, "tokens", 64, "content tokens of a generated (unscripted) response")
	flag.IntVar(&cfg.ReasoningTokens, "reasoning-tokens", 0, "reasoning_content tokens before the content of a generated response")
	flag.DurationVar(&cfg.FirstTokenDelay, "first-token-delay", 0, "wait before the first token")
	flag.IntVar(&cfg.ContextTokens, "context-tokens", 0, "context window in tokens (4 bytes each); a longer prompt is answered as llama-cpp-python does (empty stream / 400); 0: none")
	flag.IntVar(&cfg.MaxRecords, "max-records", 10000, "stream records kept for /stats (oldest dropped)")
	flag.Parse()
	if flag.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %v", flag.Args())
	}
	if cfg.TokensPerSec < 0 || cfg.Tokens < 0 || cfg.ReasoningTokens < 0 {
		return errors.New("--tokens-per-sec, --tokens and --reasoning-tokens must not be negative")
	}
	if *script != "" {
		var err error
		if cfg.Script, err = loadScript(*script); err != nil {
			return err
		}
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: newServer(cfg).handler(), ReadHeaderTimeout: 10 * time.Second}
	if *addrFile != "" {
		if err := addrfile.Write(*addrFile, ln.Addr().String()); err != nil {
			ln.Close()
			return err
		}
	}
	slog.Info("scriptedllm serving", "addr", ln.Addr().String(), "tokens_per_sec", cfg.TokensPerSec,
		"tokens", cfg.Tokens, "script_turns", len(cfg.Script))

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	// Streams in flight get a short grace, then are cut.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		_ = srv.Close()
	}
	return nil
}

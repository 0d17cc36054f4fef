package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/telemetry"
)

// errProviderGone fails calls whose provider disconnected.
var errProviderGone = errors.New("tool provider disconnected")

// senderExitWait bounds how long ServeProvider waits for its sender goroutine
// after the stream is over. The sender leaves at once unless it is blocked in
// Send on a provider that stopped reading; that Send ends when the RPC ends,
// which is when ServeProvider returns, so waiting longer would deadlock.
const senderExitWait = 250 * time.Millisecond

// ProviderStream is the server side of ToolProviderService.Connect.
type ProviderStream interface {
	Send(*dispatchv1.ConnectResponse) error
	Recv() (*dispatchv1.ConnectRequest, error)
}

// provider is one connected provider stream.
type provider struct {
	id  string
	out chan *dispatchv1.ConnectResponse // bounded; one sender drains it
	// done is closed when the stream ends: waiters fail with
	// PROVIDER_UNAVAILABLE and senders stop queueing.
	done chan struct{}

	mu      sync.Mutex
	pending map[string]chan *dispatchv1.InvocationResult
}

// ServeProvider runs one Connect stream until it ends: hello → welcome →
// invocations and results. It returns nil when the provider closed the
// stream, ErrProtocol / ErrInvalidTool / ErrToolExists for a bad
// registration, or the stream's or ctx's error.
func (b *Broker) ServeProvider(ctx context.Context, stream ProviderStream) error {
	first, err := stream.Recv()
	if err != nil {
		return err
	}
	hello := first.GetHello()
	if hello == nil {
		return fmt.Errorf("%w: the first message must be hello", ErrProtocol)
	}
	p, tools, err := b.newProvider(hello)
	if err != nil {
		return err
	}
	// Welcome goes into the queue before the tools are visible, so it is
	// the first thing the provider reads.
	names := make([]string, len(tools))
	for i, t := range tools {
		names[i] = t.spec.GetName()
	}
	p.out <- &dispatchv1.ConnectResponse{Msg: &dispatchv1.ConnectResponse_Welcome{Welcome: &dispatchv1.Welcome{
		RegisteredTools: names, MaxMessageBytes: int64(b.opts.MaxResultBytes),
	}}}
	if err := b.register(p, tools); err != nil {
		return err
	}
	b.log.Info("tool provider connected", "provider_id", p.id, "tools", names)

	ctx, cancel := context.WithCancelCause(ctx)
	senderDone := make(chan struct{})
	go func() {
		defer close(senderDone)
		p.sendLoop(ctx, stream, cancel)
	}()
	recvDone := make(chan error, 1)
	go func() { recvDone <- b.recvLoop(ctx, p, stream) }()

	var result error
	select {
	case err := <-recvDone:
		if !errors.Is(err, io.EOF) {
			result = err
		}
	case <-ctx.Done():
		result = context.Cause(ctx)
	}
	cancel(result)
	b.unregister(p)
	close(p.done)
	t := time.NewTimer(senderExitWait)
	select {
	case <-senderDone:
	case <-t.C:
	}
	t.Stop()
	b.log.Info("tool provider disconnected", "provider_id", p.id)
	return result
}

func (b *Broker) newProvider(h *dispatchv1.ProviderHello) (*provider, []*tool, error) {
	if h.GetProviderId() == "" || len(h.GetProviderId()) > maxToolName {
		return nil, nil, fmt.Errorf("%w: provider_id must be 1..%d characters", ErrProtocol, maxToolName)
	}
	if len(h.GetTools()) > maxToolsPerHello {
		return nil, nil, fmt.Errorf("%w: at most %d tools per provider", ErrInvalidTool, maxToolsPerHello)
	}
	p := &provider{
		id:      h.GetProviderId(),
		out:     make(chan *dispatchv1.ConnectResponse, b.opts.ProviderQueue),
		done:    make(chan struct{}),
		pending: make(map[string]chan *dispatchv1.InvocationResult),
	}
	tools := make([]*tool, 0, len(h.GetTools()))
	seen := make(map[string]bool, len(h.GetTools()))
	for _, spec := range h.GetTools() {
		if seen[spec.GetName()] {
			return nil, nil, fmt.Errorf("%w: tool %q declared twice", ErrInvalidTool, spec.GetName())
		}
		seen[spec.GetName()] = true
		t, err := b.compileTool(spec)
		if err != nil {
			return nil, nil, err
		}
		t.provider = p
		tools = append(tools, t)
	}
	return p, tools, nil
}

// register adds all of p's tools or none.
func (b *Broker) register(p *provider, tools []*tool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.providers[p.id]; ok {
		return fmt.Errorf("%w: provider %q is already connected", ErrToolExists, p.id)
	}
	for _, t := range tools {
		if old, ok := b.tools[t.spec.GetName()]; ok {
			return fmt.Errorf("%w: tool %q is served by %s", ErrToolExists, t.spec.GetName(), old.executor())
		}
	}
	b.providers[p.id] = p
	for _, t := range tools {
		b.tools[t.spec.GetName()] = t
	}
	b.rebuildLocked()
	return nil
}

func (b *Broker) unregister(p *provider) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.providers[p.id] != p {
		return
	}
	delete(b.providers, p.id)
	for name, t := range b.tools {
		if t.provider == p {
			delete(b.tools, name)
		}
	}
	b.rebuildLocked()
}

// recvLoop reads results until the stream ends.
func (b *Broker) recvLoop(ctx context.Context, p *provider, stream ProviderStream) error {
	for {
		msg, err := stream.Recv()
		if err != nil {
			return err
		}
		switch m := msg.GetMsg().(type) {
		case *dispatchv1.ConnectRequest_Result:
			if n := proto.Size(msg); n > b.opts.MaxResultBytes {
				// Accepted by the transport (up to twice the limit) but
				// over ours: that call fails, the stream goes on.
				b.log.Warn("tool result over the limit", "provider_id", p.id, "bytes", n, "limit", b.opts.MaxResultBytes)
				m.Result = TooLargeResult(m.Result.GetInvocationId(), n, b.opts.MaxResultBytes)
			}
			if p.deliver(m.Result) {
				continue
			}
			rej := &dispatchv1.ConnectResponse{Msg: &dispatchv1.ConnectResponse_Rejected{Rejected: &dispatchv1.Rejected{
				InvocationId: m.Result.GetInvocationId(),
				Detail:       "unknown or finished invocation",
			}}}
			// Blocking with ctx: a provider that floods bad results is
			// paced by its own reading.
			select {
			case p.out <- rej:
			case <-ctx.Done():
				return context.Cause(ctx)
			}
		case *dispatchv1.ConnectRequest_Hello:
			return fmt.Errorf("%w: second hello", ErrProtocol)
		default:
			return fmt.Errorf("%w: message without payload", ErrProtocol)
		}
	}
}

// sendLoop is the stream's only sender.
func (p *provider) sendLoop(ctx context.Context, stream ProviderStream, cancel context.CancelCauseFunc) {
	for {
		select {
		case m := <-p.out:
			if err := stream.Send(m); err != nil {
				cancel(err)
				return
			}
		case <-ctx.Done():
			return
		}
	}
}

// deliver hands a result to its waiting call; false if none waits.
func (p *provider) deliver(r *dispatchv1.InvocationResult) bool {
	p.mu.Lock()
	ch, ok := p.pending[r.GetInvocationId()]
	if ok {
		delete(p.pending, r.GetInvocationId())
	}
	p.mu.Unlock()
	if ok {
		ch <- r // buffered 1, and only one deliver can find it
	}
	return ok
}

// invoke sends an invocation and waits for its result, ctx or the provider's
// end. On ctx's end the provider is told to cancel.
func (p *provider) invoke(ctx context.Context, id string, c Call, timeout time.Duration) (string, error) {
	ch := make(chan *dispatchv1.InvocationResult, 1)
	p.mu.Lock()
	p.pending[id] = ch
	p.mu.Unlock()
	delivered := false // deliver removed the entry: no second lock
	defer func() {
		if !delivered {
			p.mu.Lock()
			delete(p.pending, id)
			p.mu.Unlock()
		}
	}()

	inv := &dispatchv1.ConnectResponse{Msg: &dispatchv1.ConnectResponse_Invoke{Invoke: &dispatchv1.Invocation{
		InvocationId:  id,
		ToolName:      c.ToolName,
		ArgumentsJson: c.ArgumentsJSON,
		TaskId:        c.TaskID,
		SessionId:     c.SessionID,
		Deadline:      timestamppb.New(time.Now().Add(timeout)),
		CallId:        c.CallID,
		TraceContext:  telemetry.Inject(ctx),
		SandboxIds:    c.SandboxIDs,
		Tenant:        c.Tenant,
	}}}
	select {
	case p.out <- inv:
	case <-ctx.Done():
		return "", ctx.Err() // never sent: nothing to cancel
	case <-p.done:
		return "", errProviderGone
	}
	select {
	case r := <-ch:
		delivered = true
		return resultOf(r)
	case <-ctx.Done():
		p.cancelInvocation(ctx, id)
		return "", ctx.Err()
	case <-p.done:
		return "", errProviderGone
	}
}

// cancelInvocation tells the provider to give up an invocation. Best effort: when the
// provider's queue is full the cancel is not queued (the late result will be
// rejected as unknown), because a caller must not wait on a stuck provider.
func (p *provider) cancelInvocation(ctx context.Context, id string) {
	reason := "cancelled"
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		reason = "timeout"
	}
	msg := &dispatchv1.ConnectResponse{Msg: &dispatchv1.ConnectResponse_Cancel{Cancel: &dispatchv1.CancelInvocation{
		InvocationId: id, Reason: reason,
	}}}
	select {
	case p.out <- msg:
	default:
	}
}

// TooLargeResult is the error result that replaces a result of n bytes over
// limit.
func TooLargeResult(invocationID string, n, limit int) *dispatchv1.InvocationResult {
	return &dispatchv1.InvocationResult{InvocationId: invocationID, Error: &dispatchv1.ToolError{
		Code:    dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED,
		Message: fmt.Sprintf("result of %d bytes exceeds the limit of %d bytes", n, limit),
	}}
}

func resultOf(r *dispatchv1.InvocationResult) (string, error) {
	if e := r.GetError(); e != nil {
		code := e.GetCode()
		if code == dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_UNSPECIFIED {
			code = dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_EXECUTION_FAILED
		}
		return "", &toolError{code: code, msg: e.GetMessage()}
	}
	out := r.GetResultJson()
	if out == "" {
		return "null", nil
	}
	if !json.Valid([]byte(out)) {
		return "", execFailed("the provider returned a result that is not JSON")
	}
	return out, nil
}

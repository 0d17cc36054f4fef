package broker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
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
	pending map[string]*pendingCall
	// wakeAt is when expireLoop next looks for calls past their deadline
	// (zero: no call waits); invoke moves it earlier through rearm.
	wakeAt time.Time
	rearm  chan struct{} // capacity 1
	// closed is set (under mu) once the stream is over and the calls
	// started by Go have been failed: start fails at once after it.
	closed bool
}

// pendingCall is an invocation waiting for its result. Its deadline is
// kept by the provider's expireLoop, not by a timer of its own: a
// context.WithTimeout per call (a timer, a context, its registration with
// the caller's context) was the largest part of the broker's CPU per
// provider call in the tools scenario.
//
// A call waits in one of two ways: invoke's goroutine on ch, or, for a
// call started by Broker.Go, nobody: finish is called instead, once, by
// whoever removes the entry (see complete).
type pendingCall struct {
	ch       chan *dispatchv1.InvocationResult // invoke: buffered 1; one sender: whoever removes the entry
	finish   func(out string, err error)       // start: called once, by whoever removes the entry
	stop     func() bool                       // start: unregisters its context.AfterFunc
	deadline time.Time
	timeout  time.Duration
	// order (start): invokeQueued once the invocation is queued,
	// cancelWanted if its context ended or its deadline passed before that
	// (then it is never queued, unless queue had passed its check) — whichever comes
	// second sends the cancel, so it always follows the invocation, once.
	order atomic.Int32
}

const (
	invokeQueued int32 = 1
	cancelWanted int32 = 2
)

// complete hands r to the call; the caller removed pc from pending, and
// does not hold p.mu when pc is a started one (finish runs the session's
// recording).
func (pc *pendingCall) complete(r *dispatchv1.InvocationResult) {
	if pc.ch != nil {
		pc.ch <- r // buffered 1, and only the one who removed the entry sends
		return
	}
	pc.stop()
	pc.finish(resultOf(r))
}

// recvHello receives a stream's first message within Options.HelloTimeout.
// The receive runs in a goroutine of its own when there is a timeout: a
// provider stream cannot be aborted from outside its RPC, so when the
// timeout comes first ServeProvider returns, which ends the RPC, and with
// it that receive.
func (b *Broker) recvHello(ctx context.Context, stream ProviderStream) (*dispatchv1.ConnectRequest, error) {
	d := b.opts.HelloTimeout
	if d <= 0 {
		return stream.Recv()
	}
	type received struct {
		m   *dispatchv1.ConnectRequest
		err error
	}
	got := make(chan received, 1)
	go func() {
		m, err := stream.Recv()
		got <- received{m, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-got:
		return r.m, r.err
	case <-t.C:
		return nil, fmt.Errorf("%w (%s)", ErrHelloTimeout, d)
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

// timeoutResult is what a call gets when its deadline passes.
func timeoutResult(id string, timeout time.Duration) *dispatchv1.InvocationResult {
	return &dispatchv1.InvocationResult{InvocationId: id, Error: &dispatchv1.ToolError{
		Code: dispatchv1.ToolErrorCode_TOOL_ERROR_CODE_TIMEOUT, Message: fmt.Sprintf("no result within %s", timeout)}}
}

// ServeProvider runs one Connect stream until it ends: hello → welcome →
// invocations and results. It returns nil when the provider closed the
// stream, ErrProtocol / ErrInvalidTool / ErrToolExists for a bad
// registration, ErrHelloTimeout for a stream that sent no hello in time,
// or the stream's or ctx's error.
func (b *Broker) ServeProvider(ctx context.Context, stream ProviderStream) error {
	first, err := b.recvHello(ctx, stream)
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
	expireDone := make(chan struct{})
	go func() {
		defer close(expireDone)
		p.expireLoop(ctx)
	}()

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
	<-expireDone // it leaves with ctx and never blocks
	p.failStarted()
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
		pending: make(map[string]*pendingCall),
		rearm:   make(chan struct{}, 1),
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
	pc, ok := p.pending[r.GetInvocationId()]
	if ok {
		delete(p.pending, r.GetInvocationId())
	}
	p.mu.Unlock()
	if ok {
		pc.complete(r)
	}
	return ok
}

// remove takes id's entry out of pending; nil if it is not there (the call
// was completed already).
func (p *provider) remove(id string) *pendingCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	pc, ok := p.pending[id]
	if !ok {
		return nil
	}
	delete(p.pending, id)
	return pc
}

// failStarted fails the calls started by Broker.Go that still wait, once
// the stream is over (invoke's callers see p.done), and makes start fail
// from now on.
func (p *provider) failStarted() {
	var gone []*pendingCall
	p.mu.Lock()
	p.closed = true
	for id, pc := range p.pending {
		if pc.finish != nil {
			delete(p.pending, id)
			gone = append(gone, pc)
		}
	}
	p.mu.Unlock()
	for _, pc := range gone {
		pc.stop()
		pc.finish("", errProviderGone)
	}
}

// expireLoop fails the calls whose deadline passed with TIMEOUT (and tells
// the provider to cancel them), until ctx ends. It sleeps until the
// earliest deadline: under a steady load that is one wake-up per timeout
// period, not a timer per call.
func (p *provider) expireLoop(ctx context.Context) {
	t := time.NewTimer(time.Hour)
	t.Stop() // Go 1.23 timers: Stop and Reset need no draining
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			p.expire(time.Now())
		case <-p.rearm:
		}
		p.mu.Lock()
		next := p.wakeAt
		p.mu.Unlock()
		t.Stop()
		if !next.IsZero() {
			t.Reset(time.Until(next))
		}
	}
}

// expire fails the pending calls whose deadline is not after now and sets
// wakeAt to the earliest deadline left.
func (p *provider) expire(now time.Time) {
	var late []string          // told to cancel
	var started []*pendingCall // completed outside the lock
	p.mu.Lock()
	var next time.Time
	for id, pc := range p.pending {
		if !pc.deadline.After(now) {
			delete(p.pending, id)
			if pc.ch != nil {
				pc.complete(timeoutResult(id, pc.timeout))
			} else {
				started = append(started, pc)
				if pc.order.CompareAndSwap(0, cancelWanted) {
					// Not queued yet (held for durability, or waiting for
					// room): never queued now, or, if queue passed its
					// check already, the cancel follows the invocation.
					continue
				}
			}
			late = append(late, id)
			continue
		}
		if next.IsZero() || pc.deadline.Before(next) {
			next = pc.deadline
		}
	}
	p.wakeAt = next
	p.mu.Unlock()
	for _, id := range late {
		p.cancelInvocation(id, "timeout")
	}
	for _, pc := range started {
		pc.complete(timeoutResult("", pc.timeout))
	}
}

// track adds pc to pending as id and moves expireLoop's wake-up earlier if
// pc's deadline is the earliest; false if the stream is over.
func (p *provider) track(id string, pc *pendingCall, register func()) bool {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return false
	}
	p.pending[id] = pc
	if register != nil {
		register()
	}
	rearm := p.wakeAt.IsZero() || pc.deadline.Before(p.wakeAt)
	if rearm {
		p.wakeAt = pc.deadline
	}
	p.mu.Unlock()
	if rearm {
		select {
		case p.rearm <- struct{}{}:
		default: // one is pending already; expireLoop reads wakeAt after it
		}
	}
	return true
}

// start is invoke without a waiting goroutine (Broker.Go): it queues the
// invocation and returns; finish gets the outcome, once, from whoever
// completes the call: the receiver (a result), expireLoop (TIMEOUT), ctx's
// end (the provider is told to cancel), or the stream's end
// (errProviderGone; also at once if it is over already). When the queue is
// full a goroutine waits for room, as invoke would.
//
// hold, when set, holds the invocation back (Call.Recorded): start calls
// it with the function that queues the invocation, to be called once (on
// any goroutine; it does not block). Meanwhile the call is pending like
// any other — its deadline runs, a stop completes it CANCELLED — and one
// completed before the release is never invoked.
func (p *provider) start(ctx context.Context, id string, c Call, timeout time.Duration, hold func(release func()), finish func(string, error)) {
	deadline := time.Now().Add(timeout)
	pc := &pendingCall{finish: finish, deadline: deadline, timeout: timeout}
	inv := invocation(ctx, id, c, deadline)
	ok := p.track(id, pc, func() {
		// Under p.mu, so that pc.stop is set before anyone can remove pc.
		pc.stop = context.AfterFunc(ctx, func() {
			if p.remove(id) != nil {
				if !pc.order.CompareAndSwap(0, cancelWanted) {
					p.cancelInvocation(id, "cancelled") // the invocation is out
				}
				finish("", ctx.Err())
			}
		})
	})
	if !ok {
		finish("", errProviderGone)
		return
	}
	if hold != nil {
		hold(func() {
			// A stop cancels ctx before its AfterFunc completes the call,
			// so a stop that came first is seen here: never invoked.
			if ctx.Err() != nil || !p.isPending(id) {
				return // completed (stopped, timed out, provider gone)
			}
			p.queue(ctx, id, pc, inv, deadline)
		})
		return
	}
	p.queue(ctx, id, pc, inv, deadline)
}

// isPending reports whether call id still waits for its result.
func (p *provider) isPending(id string) bool {
	p.mu.Lock()
	_, ok := p.pending[id]
	p.mu.Unlock()
	return ok
}

// queue queues inv, the invocation of pc (start), without blocking: when
// the queue is full a goroutine waits for room until the call's deadline.
func (p *provider) queue(ctx context.Context, id string, pc *pendingCall, inv *dispatchv1.ConnectResponse, deadline time.Time) {
	// sent sends the cancel the AfterFunc left for after inv (a provider
	// ignores a cancel of an id it does not know yet, so a cancel before
	// the invocation would let it run a stopped call).
	sent := func() {
		if !pc.order.CompareAndSwap(0, invokeQueued) {
			p.cancelInvocation(id, "cancelled")
		}
	}
	if pc.order.Load() == cancelWanted {
		return // stopped or timed out before it was queued: never sent
	}
	select {
	case p.out <- inv:
		sent()
		return
	default:
	}
	go func() {
		// Rare (a provider that does not keep up): a timer of its own.
		if ctx.Err() != nil || pc.order.Load() == cancelWanted {
			return // the AfterFunc or expire completes it; never send it
		}
		t := time.NewTimer(time.Until(deadline))
		defer t.Stop()
		select {
		case p.out <- inv:
			sent()
		case <-t.C: // expireLoop completes the call
		case <-ctx.Done(): // the AfterFunc completes it
		case <-p.done: // failStarted completes it
		}
	}()
}

// invoke sends an invocation and waits for its result, its deadline
// (timeout from now: a TIMEOUT error, see expireLoop), ctx or the
// provider's end. On ctx's end the provider is told to cancel.
func (p *provider) invoke(ctx context.Context, id string, c Call, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	pc := &pendingCall{ch: make(chan *dispatchv1.InvocationResult, 1), deadline: deadline, timeout: timeout}
	if !p.track(id, pc, nil) {
		return "", errProviderGone
	}
	delivered := false // deliver removed the entry: no second lock
	defer func() {
		if !delivered {
			p.mu.Lock()
			delete(p.pending, id)
			p.mu.Unlock()
		}
	}()

	inv := invocation(ctx, id, c, deadline)
	select {
	case p.out <- inv:
	case r := <-pc.ch: // its deadline passed while the queue was full: never sent
		delivered = true
		return resultOf(r)
	case <-ctx.Done():
		return "", ctx.Err() // never sent: nothing to cancel
	case <-p.done:
		return "", errProviderGone
	}
	select {
	case r := <-pc.ch:
		delivered = true
		return resultOf(r)
	case <-ctx.Done():
		reason := "cancelled"
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			reason = "timeout"
		}
		p.cancelInvocation(id, reason)
		return "", ctx.Err()
	case <-p.done:
		return "", errProviderGone
	}
}

// invocation is the message that asks the provider to run c.
func invocation(ctx context.Context, id string, c Call, deadline time.Time) *dispatchv1.ConnectResponse {
	return &dispatchv1.ConnectResponse{Msg: &dispatchv1.ConnectResponse_Invoke{Invoke: &dispatchv1.Invocation{
		InvocationId:  id,
		ToolName:      c.ToolName,
		ArgumentsJson: c.ArgumentsJSON,
		TaskId:        c.TaskID,
		SessionId:     c.SessionID,
		Deadline:      timestamppb.New(deadline),
		CallId:        c.CallID,
		TraceContext:  telemetry.Inject(ctx),
		SandboxIds:    c.SandboxIDs,
		Tenant:        c.Tenant,
	}}}
}

// cancelInvocation tells the provider to give up an invocation. Best effort: when the
// provider's queue is full the cancel is not queued (the late result will be
// rejected as unknown), because a caller must not wait on a stuck provider.
func (p *provider) cancelInvocation(id, reason string) {
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

// Package session runs commander ChatStreams. One stream is one slot: a
// hello, then any number of sessions one after the other, each running one
// task (docs/protocol.md is the spec).
//
// Per stream there is exactly one receiver — the RPC's own goroutine when
// the stream can be aborted (WithAbort), else one of its own; it handles
// each upstream packet inline, so upstream is paced by HTTP/2 flow control —
// and at most one sender, a goroutine that exists only while packets wait
// in the slot's outbox (it drains it, stop lane first, and ends). An idle
// slot is one goroutine. Stops, deadlines, cancels and interjections come
// from other goroutines and meet the stream only through the outbox and a
// few atomics: no global lock sits on the per-packet path.
//
// The stop guarantee is enforced here, not trusted to the commander: the
// stop decision fences the task's event log, so no thought or content of the
// session is recorded (or reaches any client) after it, and tool calls
// arriving after it are refused with DENIED.
//
// With Options.HandOver a session outlives its stream (handover.go): its
// packets are numbered and acknowledged once durable, a hello may re-attach
// a task that waits for its session, and a drain tells commanders to move
// instead of stopping their sessions. It must not decide which dispatcher
// owns a task (a task.Claimer does) nor keep a task RUNNING by itself (the
// task's hand-over window ends it).
package session

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/agentdispatch/dispatcher/internal/broker"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/scheduler"
	"github.com/agentdispatch/dispatcher/internal/tenant"
	"golang.org/x/time/rate"
)

// Errors that end a ChatStream; the API layer maps them to gRPC codes.
var (
	// ErrProtocol means the commander broke the protocol (no hello first,
	// second hello): FAILED_PRECONDITION.
	ErrProtocol = errors.New("commander protocol violation")
	// ErrStopNotAcknowledged means no stopped arrived within the stop
	// grace: ABORTED.
	ErrStopNotAcknowledged = errors.New("stop not acknowledged within the grace period")
	// ErrShutdown means the dispatcher is shutting down: UNAVAILABLE.
	ErrShutdown = errors.New("dispatcher shutting down")
	// ErrHelloTimeout means the commander sent no hello within
	// Options.HelloTimeout of opening its stream: DEADLINE_EXCEEDED.
	ErrHelloTimeout = errors.New("no hello received within the hello timeout")
)

// senderExitWait bounds how long Serve waits for a sender goroutine still
// running. It leaves at once unless blocked in Send on a commander that
// stopped reading; without WithAbort that Send returns only when the RPC
// ends, i.e. when Serve returns. It also bounds how long recvAside waits
// for the receive loop's own error.
const senderExitWait = 250 * time.Millisecond

// Limits on a hello.
const (
	maxCapabilities = 256
	maxHelloField   = 256
)

// Stream is the server side of AgentInteraction.ChatStream.
type Stream interface {
	Context() context.Context
	Send(*dispatchv1.DownstreamPacket) error
	Recv() (*dispatchv1.UpstreamPacket, error)
}

// Options configure a Server.
type Options struct {
	// StopGrace is how long a stopped session may take to send stopped
	// before its stream is aborted. No default is applied here (the
	// dispatcher's is internal/dispatcher's): 0 is no grace, the stream is
	// aborted as soon as the stop is sent.
	StopGrace time.Duration
	// OutboxSize bounds the downstream packets waiting per slot (default 64).
	OutboxSize int
	// MaxToolCalls bounds a session's tool calls in flight (default 32);
	// more are refused with DENIED.
	MaxToolCalls int
	// Policy evaluates every upstream packet of a running session (nil: no
	// policy; every packet is allowed).
	Policy *policy.Engine
	// MaxMessageBytes is the largest upstream packet a session accepts
	// (0: no check here). The transport accepts up to twice the limit
	// (internal/api), so a larger packet reaches this check instead of
	// ending the stream: its session is stopped with the reason
	// (STOP_CODE_POLICY, rule limit.max_message_bytes) and the slot's other
	// traffic goes on.
	MaxMessageBytes int
	// HandOver lets sessions survive their stream (handover.go): a hello
	// may re-attach a task waiting for its session (Reattacher), and after
	// Drain's move a session whose stream ends is detached, not ended.
	HandOver bool
	// LinkLossWindow (with HandOver) is how long a session whose stream
	// broke without the session ending (a network cut, a reset, a link
	// found dead by keepalive, a commander that died) waits for its
	// commander to re-attach it before its task ends FAILURE
	// (task.LinkLostExpiredMessage). 0: such a session ends with its
	// stream, FAILURE "commander connection lost: …".
	LinkLossWindow time.Duration
	// Reattacher finds the task a re-attaching session continues (the
	// task manager).
	Reattacher Reattacher
	// Flush makes what the sessions recorded durable; the acker calls it
	// before it acknowledges upstream packets (nil: nothing to wait for).
	Flush func(context.Context) error
	// AckInterval is how often upstream packets are acknowledged
	// (DefaultAckInterval).
	AckInterval time.Duration
	// HelloTimeout ends a stream whose first packet (the hello) has not
	// arrived this long after it opened, with ErrHelloTimeout (0: no
	// limit; the dispatcher's default is internal/dispatcher's
	// DefaultHelloTimeout). Without it a stream that never says hello is
	// held until its client closes it.
	HelloTimeout time.Duration
	// Logger receives session logs; nil discards.
	Logger *slog.Logger
}

// Server runs ChatStreams against a scheduler and a broker.
type Server struct {
	opts   Options
	sched  *scheduler.Scheduler
	broker *broker.Broker
	log    *slog.Logger
	stats  Stats

	base       context.Context
	cancelBase context.CancelFunc
	slotSeq    atomic.Uint64

	// draining: Drain began; no new stream, no new start.
	draining atomic.Bool
	slotsMu  sync.Mutex
	slots    map[*slot]struct{}

	// The acker (handover.go): the running sessions it acknowledges.
	ackMu   sync.Mutex
	runs    map[*run]struct{}
	ackerOn bool

	// Refusals for now (handover.go): one Warn line per laterLogEvery,
	// the rest at Debug, counted in laterQuiet.
	laterWarn  rate.Sometimes
	laterQuiet atomic.Int64
}

// NewServer returns a Server.
func NewServer(sched *scheduler.Scheduler, b *broker.Broker, opts Options) *Server {
	if opts.OutboxSize <= 0 {
		opts.OutboxSize = 64
	}
	if opts.MaxToolCalls <= 0 {
		opts.MaxToolCalls = 32
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	base, cancel := context.WithCancel(context.Background())
	return &Server{opts: opts, sched: sched, broker: b, log: opts.Logger, base: base, cancelBase: cancel,
		laterWarn: rate.Sometimes{Interval: laterLogEvery}}
}

// Stats returns the live counters.
func (s *Server) Stats() *Stats { return &s.stats }

// Shutdown ends every stream (UNAVAILABLE). Running sessions should have
// been stopped before (task.Manager.Shutdown); any left fail.
func (s *Server) Shutdown() {
	s.cancelBase()
	s.slotsMu.Lock()
	for sl := range s.slots {
		sl.cancel(ErrShutdown)
	}
	s.slotsMu.Unlock()
}

// WithAbort returns ctx, a ChatStream's context, carrying abort: a function
// that ends the stream with the gRPC status of cause, ending a Recv or Send
// blocked on it (a stream's end as the end of its RPC would be, but from
// outside the RPC's goroutine). With it, Serve receives in the RPC's own
// goroutine and an idle slot costs that goroutine only; without it Serve
// needs a second goroutine, to return when the slot ends from the
// dispatcher's side while the first waits in Recv. The API layer sets it
// (internal/api, chatstream.go).
func WithAbort(ctx context.Context, abort func(cause error)) context.Context {
	return context.WithValue(ctx, abortKey{}, abort)
}

type abortKey struct{}

func abortFrom(ctx context.Context) func(error) {
	f, _ := ctx.Value(abortKey{}).(func(error))
	return f
}

// Serve runs one ChatStream until it ends. It returns nil when the commander
// closed the stream, or the error that ended it.
//
// Goroutines: the caller's receives (when the stream carries WithAbort's
// abort; else a second one does), and a sender runs only while packets wait
// in the outbox (outbox.go). Stops, deadlines and the rest reach the stream
// through the outbox. When the slot ends from the dispatcher's side (a
// cancel with a cause: shutdown, stop not acknowledged, a failed Send, a
// revoked token) it is ended, then its stream aborted with that cause, by
// a goroutine of its own (cancelAndAbort, endAside).
func (s *Server) Serve(stream Stream) error {
	ctx, cancel := context.WithCancelCause(stream.Context())
	defer cancel(nil)
	abort := abortFrom(stream.Context())

	if s.draining.Load() || s.base.Err() != nil {
		return ErrShutdown
	}
	first, err := s.recvHello(ctx, stream, abort)
	if err != nil {
		return err
	}
	sl, err := s.openSlot(ctx, cancel, abort, stream, first)
	if err != nil {
		return err
	}
	sl.out.release(func() { sl.sendLoop(stream) })
	if abort == nil {
		err = sl.recvAside(ctx, stream)
		s.endSlot(sl, err)
	} else {
		rerr := sl.recvLoop(stream)
		if sl.claimEnd() {
			// The receive side ended the stream (the commander closed it
			// or broke the protocol, the transport ended it).
			err = endCause(ctx, rerr)
			s.endSlot(sl, err)
		} else {
			err = context.Cause(ctx) // endAside ended the slot
		}
	}
	sl.log.Info("commander slot disconnected", "reason", describeEnd(err))
	if errors.Is(err, io.EOF) {
		return nil
	}
	return err
}

// openSlot makes the slot of a stream whose first packet is first, acks
// its hello (or re-attach) and registers it. It is a function of its own,
// not part of Serve, for the stack: its frame (hello, re-attach, log
// arguments) is gone before Serve waits in the slot's receive loop, which
// an idle slot does for its whole life, and the hello's decode happened
// before it. Serve's frame stays small; 8 KiB of stack fit an idle slot
// with room to spare (see internal/api's chatStream).
func (s *Server) openSlot(ctx context.Context, cancel context.CancelCauseFunc, abort func(error), stream Stream, first *dispatchv1.UpstreamPacket) (*slot, error) {
	hello := first.GetHello()
	if hello == nil {
		return nil, fmt.Errorf("%w: the first packet must be hello", ErrProtocol)
	}
	if err := validHello(hello); err != nil {
		return nil, err
	}
	tenants, err := servedTenants(tenant.CommanderFromContext(ctx), hello.GetTenants())
	if err != nil {
		return nil, err
	}
	sl := newSlot(s, ctx, cancel, hello, fmt.Sprintf("slot-%d", s.slotSeq.Add(1)))
	sl.tenants = tenants
	if abort != nil {
		sl.abort, sl.cancel = abort, sl.cancelAndAbort
	}
	var resumed *run
	if ra := hello.GetReattach(); ra != nil {
		// The ack goes out here, before the outbox starts a sender: it must
		// be the commander's first packet, ahead of a stop decided for the
		// session right after it re-attached (the stop lane goes first).
		r, info, rerr := sl.reattach(ra)
		if rerr != nil && !refusedForGood(rerr) {
			// Undecided: no ack; the stream ends UNAVAILABLE and the
			// commander tries again (ErrReattachLater).
			s.logReattachLater(sl.log, ra, rerr)
			return nil, reattachLater(rerr)
		}
		if rerr != nil {
			sl.log.Info("re-attach refused", "task_id", ra.GetTaskId(), "session_id", ra.GetSessionId(), "reason", rerr.Error())
		}
		if err := stream.Send(reattachAck(sl.id, r, info, rerr)); err != nil {
			if r != nil {
				sl.closeCurrent(err)
			}
			return nil, err
		}
		resumed = r
		if r != nil && info.Stop != nil {
			r.restop(info.Stop)
		}
	} else {
		sl.out.pushControl(&dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Ack{Ack: &dispatchv1.Ack{
			Kind: dispatchv1.AckKind_ACK_KIND_HELLO, SlotId: sl.id, MaxUpstreamBatch: MaxUpstreamBatch,
		}}})
	}

	// Registered before the ack can go out: a commander that has its ack
	// is counted in GetAgentInfo and may get a start right after it. An
	// end decided meanwhile (Shutdown finds the slot in s.slots) waits in
	// endAside until the slot is registered everywhere it unregisters it.
	sl.endMu.Lock()
	s.stats.Slots.Add(1)
	s.addSlot(sl)
	if resumed != nil {
		s.sched.AddBusySlot(sl)
	} else {
		s.sched.AddSlot(sl)
	}
	sl.endMu.Unlock()
	// Written by a goroutine of its own: slog's JSON encoding takes ~4.7 KiB
	// of stack, which on top of grpc's ~2.4 KiB under Serve would double
	// this goroutine's stack to 16 KiB for the whole life of the slot (a
	// stack shrinks only to four times what it uses; idle, ~3.5 KiB).
	version, caps, reattached := hello.GetVersion(), hello.GetCapabilities(), resumed != nil
	go sl.log.Info("commander slot connected", "version", version, "capabilities", caps, "tenants", tenants, "reattached", reattached)

	return sl, nil
}

// cancelAndAbort is the cancel of a slot whose stream has an abort: it
// cancels the slot's context and, for the dispatcher's own causes, has
// endAside end the slot and its stream (Serve's goroutine waits in Recv).
func (sl *slot) cancelAndAbort(cause error) {
	sl.cancelCtx(cause)
	if cause != nil && !errors.Is(cause, context.Canceled) {
		go sl.endAside()
	}
}

// endAside ends the slot, then aborts its stream with the cause its context
// ended with — in that order, as when Serve returns: a commander told why
// its stream ended finds its session already dealt with (detached for a
// hand-over, requeued, ended). When the transport ended the stream
// (context.Canceled) Recv returns by itself and Serve ends the slot, with
// Recv's error at hand (endCause). A revoked token is internal/api's to
// abort (the slot's context ends from above then).
func (sl *slot) endAside() {
	cause := context.Cause(sl.ctx)
	if errors.Is(cause, context.Canceled) {
		return
	}
	sl.endMu.Lock()
	defer sl.endMu.Unlock()
	if sl.endClaimed {
		return
	}
	sl.endClaimed = true
	sl.srv.endSlot(sl, cause)
	sl.abort(cause)
}

// claimEnd reports whether the caller ends the slot (endAside did not);
// once endAside holds the claim it returns only when endAside is done.
func (sl *slot) claimEnd() bool {
	sl.endMu.Lock()
	defer sl.endMu.Unlock()
	mine := !sl.endClaimed
	sl.endClaimed = true
	return mine
}

// endSlot ends slot sl for err: it takes no new task, its running session
// is ended (or detached, or requeued: closeCurrent), its tool calls and its
// sender are waited for.
func (s *Server) endSlot(sl *slot, err error) {
	sl.cancelCtx(err)
	s.sched.RemoveSlot(sl)
	s.removeSlot(sl)
	s.stats.Slots.Add(-1)
	sl.out.close()
	sl.closeCurrent(err)
	sl.waitTools()
	if gone := sl.out.senderGone(); gone != nil {
		t := time.NewTimer(senderExitWait)
		select {
		case <-gone:
		case <-t.C:
		}
		t.Stop()
	}
}

// endCause is why a stream whose receive loop returned rerr ended: the
// cause ctx (the slot's) ended with, if it did — except that when the
// transport ended the stream (context.Canceled) because a packet could not
// be decoded (protobuf refuses a string that is not UTF-8), Recv's error
// says why the session ends, where "cancelled" would not.
func endCause(ctx context.Context, rerr error) error {
	if ctx.Err() == nil {
		return rerr
	}
	if cause := context.Cause(ctx); !errors.Is(cause, context.Canceled) || !undecodable(rerr) {
		return cause
	}
	return rerr
}

// recvAside runs the receive loop in a goroutine of its own, for a stream
// without WithAbort's abort: Serve then waits for it or for the end of ctx,
// whichever comes first (the loop ends when the RPC ends, after Serve).
func (sl *slot) recvAside(ctx context.Context, stream Stream) error {
	recvDone := make(chan error, 1)
	go func() { recvDone <- sl.recvLoop(stream) }()
	select {
	case err := <-recvDone:
		return endCause(ctx, err)
	case <-ctx.Done():
	}
	if !errors.Is(context.Cause(ctx), context.Canceled) {
		return context.Cause(ctx)
	}
	// The transport ended the stream: Recv returns at once, maybe with
	// the reason (see endCause).
	t := time.NewTimer(senderExitWait)
	defer t.Stop()
	select {
	case rerr := <-recvDone:
		return endCause(ctx, rerr)
	case <-t.C:
		return context.Cause(ctx)
	}
}

func (s *Server) addSlot(sl *slot) {
	s.slotsMu.Lock()
	if s.slots == nil {
		s.slots = make(map[*slot]struct{})
	}
	s.slots[sl] = struct{}{}
	if s.base.Err() != nil {
		// Shutdown has cancelled the slots it found; not this one.
		sl.cancel(ErrShutdown)
	}
	moving := s.draining.Load()
	s.slotsMu.Unlock()
	if moving && s.opts.HandOver {
		// Connected while Drain sent its moves: this one moves too.
		sl.moving.Store(true)
		sl.out.pushControl(&dispatchv1.DownstreamPacket{Signal: &dispatchv1.DownstreamPacket_Move{Move: &dispatchv1.Move{Reason: "dispatcher draining"}}})
	}
}

func (s *Server) removeSlot(sl *slot) {
	s.slotsMu.Lock()
	delete(s.slots, sl)
	s.slotsMu.Unlock()
}

// recvHello receives a stream's first packet, within Options.HelloTimeout.
// With abort, a timer aborts the stream (its Recv returns); without, the
// receive runs in a goroutine of its own, left to end with the RPC when the
// timeout comes first (Serve then returns, which ends the RPC).
func (s *Server) recvHello(ctx context.Context, stream Stream, abort func(error)) (*dispatchv1.UpstreamPacket, error) {
	d := s.opts.HelloTimeout
	if d <= 0 {
		return stream.Recv()
	}
	if abort == nil {
		return recvHelloAside(ctx, stream, d)
	}
	// The hello is decoded under this frame: it stays small (see openSlot).
	t := time.AfterFunc(d, func() { abort(helloTimeout(d)) })
	first, err := stream.Recv()
	if !t.Stop() {
		// The timer fired: the stream is aborted, whatever Recv got.
		return nil, helloTimeout(d)
	}
	return first, err
}

// helloTimeout is the error of a stream that sent no hello within d.
func helloTimeout(d time.Duration) error {
	return fmt.Errorf("%w (%s)", ErrHelloTimeout, d)
}

// recvHelloAside is recvHello for a stream without an abort: the receive
// runs in a goroutine of its own, left to end with the RPC when the
// timeout comes first.
func recvHelloAside(ctx context.Context, stream Stream, d time.Duration) (*dispatchv1.UpstreamPacket, error) {
	type received struct {
		p   *dispatchv1.UpstreamPacket
		err error
	}
	got := make(chan received, 1)
	go func() {
		p, err := stream.Recv()
		got <- received{p, err}
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case r := <-got:
		return r.p, r.err
	case <-t.C:
		return nil, helloTimeout(d)
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	}
}

func validHello(h *dispatchv1.Hello) error {
	if len(h.GetCommanderId()) > maxHelloField || len(h.GetVersion()) > maxHelloField {
		return fmt.Errorf("%w: hello fields too long", ErrProtocol)
	}
	if len(h.GetCapabilities()) > maxCapabilities || len(h.GetLabels()) > maxCapabilities {
		return fmt.Errorf("%w: too many capabilities or labels (max %d)", ErrProtocol, maxCapabilities)
	}
	for _, c := range h.GetCapabilities() {
		if c == "" || len(c) > maxHelloField {
			return fmt.Errorf("%w: capability empty or too long", ErrProtocol)
		}
	}
	if len(h.GetTenants()) > maxCapabilities {
		return fmt.Errorf("%w: too many tenants (max %d)", ErrProtocol, maxCapabilities)
	}
	for _, t := range h.GetTenants() {
		if !tenant.ValidName(t) {
			return fmt.Errorf("%w: tenant %q is not a tenant name", ErrProtocol, t)
		}
	}
	return nil
}

// servedTenants are the tenants a slot serves (nil: every tenant): those
// its hello names, unless the commander authenticated with one tenant's own
// commander token — then that tenant only, and a hello naming another is
// refused (the commander is misconfigured; it must not guess).
func servedTenants(c tenant.Commander, named []string) ([]string, error) {
	if !c.Restricted {
		return named, nil
	}
	for _, t := range named {
		if t != c.Tenant {
			return nil, fmt.Errorf("%w: this commander's token serves tenant %q only, its hello names %q", ErrProtocol, c.Tenant, t)
		}
	}
	return []string{c.Tenant}, nil
}

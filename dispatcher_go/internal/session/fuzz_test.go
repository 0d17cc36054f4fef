package session

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/agentdispatch/dispatcher/internal/eventlog"
	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/policy"
	"github.com/agentdispatch/dispatcher/internal/task"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// The fuzz input is a sequence of frames, each a protobuf field of the
// frame's kind whose bytes are one dispatchv1.UpstreamPacket: the field
// number says which session id the packet carries.
const (
	frameOwn   = 1 // the fuzzed session's id
	frameAsIs  = 2 // whatever id the packet has
	frameOther = 3 // the id of the other slot's session (must be refused)

	maxFrames = 32
)

func frame(num protowire.Number, p *dispatchv1.UpstreamPacket) []byte {
	b, err := proto.Marshal(p)
	if err != nil {
		panic(err)
	}
	return protowire.AppendBytes(protowire.AppendTag(nil, num, protowire.BytesType), b)
}

type fuzzFrame struct {
	num protowire.Number
	pkt *dispatchv1.UpstreamPacket
}

// decodeFrames reads up to maxFrames frames; anything that does not decode
// is skipped (the gRPC layer would refuse it before the session saw it).
func decodeFrames(data []byte) []fuzzFrame {
	var out []fuzzFrame
	for len(data) > 0 && len(out) < maxFrames {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return out
		}
		data = data[n:]
		if typ != protowire.BytesType {
			m := protowire.ConsumeFieldValue(num, typ, data)
			if m < 0 {
				return out
			}
			data = data[m:]
			continue
		}
		v, m := protowire.ConsumeBytes(data)
		if m < 0 {
			return out
		}
		data = data[m:]
		if num < frameOwn || num > frameOther {
			continue
		}
		p := &dispatchv1.UpstreamPacket{}
		if proto.Unmarshal(v, p) != nil {
			continue
		}
		out = append(out, fuzzFrame{num: num, pkt: p})
	}
	return out
}

// fuzzPeer plays a commander whose packets are fuzzed: a goroutine reads
// everything the dispatcher sends, answers every stop with stopped (as a
// well-behaved commander would, so that a stop ends the session), hands
// starts and rejected acks to the test.
type fuzzPeer struct {
	*commander
	starts   chan *dispatchv1.DownstreamPacket
	rejected chan string // session ids of REJECTED acks
	drained  chan struct{}
}

func (e *env) fuzzPeer(t *testing.T, caps ...string) *fuzzPeer {
	t.Helper()
	c := e.open(t, 64)
	p := &fuzzPeer{commander: c, starts: make(chan *dispatchv1.DownstreamPacket, 8),
		rejected: make(chan string, 256), drained: make(chan struct{})}
	c.send(testutil.Hello("fuzz-"+caps[0], caps...))
	if a := c.recv().GetAck(); a.GetKind() != dispatchv1.AckKind_ACK_KIND_HELLO {
		t.Fatalf("hello ack: %v", a)
	}
	go func() {
		defer close(p.drained)
		for {
			select {
			case <-c.served:
				return
			case pkt := <-c.Out:
				switch {
				case pkt.GetStart() != nil:
					select {
					case p.starts <- pkt:
					default:
						t.Errorf("more starts than the test expects: %v", pkt)
					}
				case pkt.GetStop() != nil:
					p.up(testutil.Up(pkt.GetSessionId(), &dispatchv1.Stopped{Reason: "stop received"}))
				case pkt.GetAck().GetKind() == dispatchv1.AckKind_ACK_KIND_REJECTED:
					select {
					case p.rejected <- pkt.GetSessionId():
					default: // only the probe's matters; the test reads them all
					}
				}
			}
		}
	}()
	t.Cleanup(func() { testutil.Done(t, p.drained, testutil.Wait, "the fuzz peer's reader to end") })
	return p
}

// up sends p unless the stream has ended; it reports whether it was read.
func (p *fuzzPeer) up(pkt *dispatchv1.UpstreamPacket) bool {
	select {
	case p.In <- pkt:
		return true
	case <-p.served:
		return false
	}
}

func (p *fuzzPeer) ended() bool {
	select {
	case <-p.served:
		return true
	default:
		return false
	}
}

func (p *fuzzPeer) start(t *testing.T) (string, *dispatchv1.StartSession) {
	t.Helper()
	pkt := testutil.Recv(t, p.starts, testutil.Wait, "a start")
	return pkt.GetSessionId(), pkt.GetStart()
}

func randomID(prefix string) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// FuzzSessionPackets: whatever a commander sends after hello and a start,
// the dispatcher does not panic; the fuzzed session either goes on or ends
// with a reason (the stream ends only for a protocol violation); the other
// slot's session is untouched (packets naming it from the wrong stream are
// refused), the fuzzed slot takes the next task if its stream is still up,
// and no goroutine is left behind.
func FuzzSessionPackets(f *testing.F) {
	seeds := [][]*dispatchv1.UpstreamPacket{
		{testutil.Up("", &dispatchv1.ContentChunk{Text: "hello"}), testutil.Up("", testutil.Success("ok"))},
		{testutil.Up("", &dispatchv1.ThoughtChain{StepName: "s", Delta: "d"}), testutil.Up("", &dispatchv1.ToolCallRequest{CallId: "c1", ToolName: "echo", ArgumentsJson: `{"x":1}`})},
		{testutil.Up("", &dispatchv1.ToolCallRequest{CallId: "c1", ToolName: "sleep", ArgumentsJson: `{"seconds":30}`}), testutil.Up("", &dispatchv1.Stopped{Reason: "own"})},
		{testutil.Up("", &dispatchv1.Usage{InputTokens: -1, Cost: -3}), testutil.Up("", &dispatchv1.ErrorSignal{Message: "x"})},
		{testutil.Up("", &dispatchv1.SandboxInUse{}), testutil.Up("", &dispatchv1.Artifact{}), testutil.Up("", &dispatchv1.StageChange{})},
		{testutil.Up("", &dispatchv1.FinalResult{}), testutil.Up("", &dispatchv1.ContentChunk{Text: "late"})},
		{testutil.Up("", &dispatchv1.ContentChunk{Text: "the launch "}), testutil.Up("", &dispatchv1.ContentChunk{Text: "codes"})},
		{testutil.Up("", &dispatchv1.ToolCallRequest{CallId: "g1", ToolName: "computer.click", ArgumentsJson: `{"x":1}`})},
		{testutil.Up("", &dispatchv1.ToolCallRequest{CallId: "s1", ToolName: "shell", ArgumentsJson: `{"cmd":"rm -rf /"}`})},
		{testutil.Up("", &dispatchv1.Usage{InputTokens: 300000, Cost: 9})},
		{testutil.Hello("again")},
		{testutil.Up("", nil)},
	}
	for _, s := range seeds {
		var b []byte
		for _, p := range s {
			b = append(b, frame(frameOwn, p)...)
		}
		f.Add(b)
	}
	// Packets naming the other slot's session, or none.
	f.Add(append(append(frame(frameOther, testutil.Up("", testutil.Success("stolen"))),
		frame(frameOther, testutil.Up("", &dispatchv1.ContentChunk{Text: "injected"}))...),
		frame(frameAsIs, testutil.Up("ses-guess", &dispatchv1.Stopped{}))...))
	// A policy with every kind of rule (holds, denies, stops, limits), so
	// that packets take its paths too.
	pol := policy.NewEngine(nil)
	if _, err := pol.LoadFile("../policy/testdata/example.yaml"); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		frames := decodeFrames(data)
		if len(frames) == 0 {
			return
		}
		// Registered first, so it runs after every other cleanup.
		ignore := goleak.IgnoreCurrent()
		t.Cleanup(func() { goleak.VerifyNone(t, ignore) })

		e := newEnv(t, Options{StopGrace: 2 * time.Second, MaxToolCalls: 4, Policy: pol}, eventlog.Limits{MaxEvents: 64})
		fz := e.fuzzPeer(t, "planner:chat")
		ctl := e.fuzzPeer(t, "planner:gui")
		tk1 := e.submit(t, task.Spec{})
		sid1, _ := fz.start(t)
		tk2 := e.submit(t, task.Spec{Planner: "gui"})
		sid2, _ := ctl.start(t)

		for _, fr := range frames {
			pkt := proto.Clone(fr.pkt).(*dispatchv1.UpstreamPacket)
			switch fr.num {
			case frameOwn:
				pkt.SessionId = sid1
			case frameOther:
				pkt.SessionId = sid2
			}
			if !fz.up(pkt) {
				break
			}
		}
		// A probe: once it is refused, every fuzzed packet was handled and
		// the stream was still up.
		probe := randomID("probe-")
		alive := fz.up(testutil.Up(probe, nil))
		if alive {
			deadline := time.After(testutil.Wait)
		wait:
			for {
				select {
				case sid := <-fz.rejected:
					if sid == probe {
						break wait
					}
				case <-fz.served:
					alive = false
					break wait
				case <-deadline:
					t.Fatal("the probe after the fuzzed packets was never answered")
				}
			}
		}
		if !alive {
			// Only a protocol violation (a second hello) ends a stream.
			testutil.Done(t, fz.served, testutil.Wait, "the fuzzed stream to end")
			if !errors.Is(fz.err, ErrProtocol) && !errors.Is(fz.err, ErrStopNotAcknowledged) {
				t.Fatalf("the fuzzed stream ended with %v", fz.err)
			}
		}
		if !isDone(tk1) {
			if _, err := e.mgr.Cancel(context.Background(), tk1.ID(), "fuzz over", false); err != nil && !errors.Is(err, task.ErrNotRunning) {
				t.Fatalf("cancel: %v", err)
			}
		}
		info := waitDone(t, tk1)
		t.Logf("%d packets; stream up: %v (%v); fuzzed task %v: %q", len(frames), alive, fz.err, info.Status, info.Message)
		if info.Status != agentpb.TaskStatus_SUCCESS && strings.TrimSpace(info.Message) == "" {
			t.Fatalf("task ended %v without a reason", info.Status)
		}

		// The other slot's session is untouched.
		for _, p := range []*dispatchv1.UpstreamPacket{
			testutil.Up(sid2, &dispatchv1.ContentChunk{Text: "control"}),
			testutil.Up(sid2, testutil.Success("control done")),
		} {
			if !ctl.up(p) {
				t.Fatalf("the control stream ended: %v", ctl.err)
			}
		}
		if info := waitDone(t, tk2); info.Status != agentpb.TaskStatus_SUCCESS || info.Result != "control done" {
			t.Fatalf("control task: %+v", info)
		}
		if got := kinds(allEvents(t, tk2)); got != "state:PENDING state:RUNNING content result state:SUCCESS" {
			t.Fatalf("control task events: %s", got)
		}

		// A stream still up takes the next task.
		if alive && !fz.ended() {
			tk3 := e.submit(t, task.Spec{})
			sid3, st := fz.start(t)
			if st.GetTaskId() != tk3.ID() {
				t.Fatalf("next task: start of %s, want %s", st.GetTaskId(), tk3.ID())
			}
			fz.up(testutil.Up(sid3, testutil.Success("next")))
			if info := waitDone(t, tk3); info.Status != agentpb.TaskStatus_SUCCESS {
				t.Fatalf("next task on the fuzzed slot: %+v", info)
			}
		}
		fz.cancel()
		ctl.cancel()
	})
}

func isDone(tk *task.Task) bool {
	select {
	case <-tk.Done():
		return true
	default:
		return false
	}
}

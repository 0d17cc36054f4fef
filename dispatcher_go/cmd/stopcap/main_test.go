//go:build linux

package main

import (
	"slices"
	"syscall"
	"testing"
	"unsafe"

	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Packets as loadgen's stop scenario writes them, several in one segment:
// each stop and stopped is matched to its own session, not a neighbour's.
func TestMatchFindsEachPacketsSession(t *testing.T) {
	const a, b, c = "ses-aaaaaaaaaaaaaaaaaaaaaaaa", "ses-bbbbbbbbbbbbbbbbbbbbbbbb", "ses-cccccccccccccccccccccccc"
	var seg []byte
	seg = append(seg, marshal(t, &dispatchv1.UpstreamPacket{SessionId: a, Payload: &dispatchv1.UpstreamPacket_Content{
		Content: &dispatchv1.ContentChunk{Text: "xxxxxxxxxxxxxxxx"}}})...)
	seg = append(seg, marshal(t, &dispatchv1.UpstreamPacket{SessionId: b, Timestamp: 1796602665131274, Payload: &dispatchv1.UpstreamPacket_Stopped{
		Stopped: &dispatchv1.Stopped{Reason: "bench planner cancelled: loadgen stop scenario", FinalUsage: &dispatchv1.Usage{OutputTokens: 7}}}})...)
	seg = append(seg, marshal(t, &dispatchv1.DownstreamPacket{SessionId: c, Signal: &dispatchv1.DownstreamPacket_Stop{
		Stop: &dispatchv1.StopSignal{Reason: "loadgen stop scenario", Code: dispatchv1.StopCode_STOP_CODE_CLIENT_CANCEL}}})...)
	got := match(seg)
	want := []hit{{"stopped", b}, {"stop", c}}
	if !slices.Equal(got, want) {
		t.Fatalf("match = %v, want %v", got, want)
	}
	// A watcher's stop event names no session: nothing.
	ev := marshal(t, &dispatchv1.TaskEvent{TaskId: "t1", Kind: &dispatchv1.TaskEvent_Stop{Stop: &dispatchv1.StopSignal{Reason: "loadgen stop scenario"}}})
	if got := match(ev); len(got) != 0 {
		t.Fatalf("a watcher's event matched: %v", got)
	}
}

// A packet with its SO_TIMESTAMPNS gives that time; one without gives
// none, so that its row is marked.
func TestKernelTime(t *testing.T) {
	ts := syscall.Timespec{Sec: 1796602665, Nsec: 131274000}
	oob := make([]byte, syscall.CmsgSpace(int(unsafe.Sizeof(ts))))
	h := (*syscall.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS
	h.SetLen(syscall.CmsgLen(int(unsafe.Sizeof(ts))))
	*(*syscall.Timespec)(unsafe.Pointer(&oob[syscall.CmsgLen(0)])) = ts
	if got, ok := kernelTime(oob); !ok || got != ts.Nano() {
		t.Fatalf("kernelTime = %d, %v; want %d, true", got, ok, ts.Nano())
	}
	if got, ok := kernelTime(nil); ok {
		t.Fatalf("kernelTime(no control message) = %d, true", got)
	}
}

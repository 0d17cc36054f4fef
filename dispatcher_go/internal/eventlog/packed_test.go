package eventlog

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"strings"
	"sync"
	"testing"

	"google.golang.org/protobuf/types/known/timestamppb"

	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

// packed keeps each seq's bytes exactly, whatever their sizes (small ones
// back to back in growing chunks, big ones alone, none for an odd event),
// also after trim.
func TestPackedKeepsEveryEncoding(t *testing.T) {
	var p packed
	want := map[uint64][]byte{}
	odd := content("odd")
	for s := uint64(1); s <= 3000; s++ {
		var data []byte
		switch {
		case s%500 == 3:
			data = nil
		case s%300 == 7:
			data = bytes.Repeat([]byte{byte(s)}, packAlone+1+int(s%5))
		default:
			data = []byte(strings.Repeat(fmt.Sprint(s), int(s%40)+1))
		}
		ev := content(fmt.Sprint(s))
		if data == nil {
			ev = odd
		}
		p.put(s, data, ev)
		want[s] = data
	}
	check := func(when string) {
		for s, w := range want {
			got := p.get(s)
			if !bytes.Equal(got, w) || (w == nil) != (got == nil) || cap(got) != len(got) {
				t.Fatalf("%s: seq %d: %d bytes (cap %d), want %d", when, s, len(got), cap(got), len(w))
			}
			if w == nil {
				if ev, err := p.event(s); err != nil || ev != odd {
					t.Fatalf("%s: odd seq %d: %v, %v", when, s, ev, err)
				}
			}
		}
		if p.get(0) != nil || p.get(3001) != nil {
			t.Fatalf("%s: bytes out of range", when)
		}
	}
	check("filled")
	for _, c := range p.chunks {
		if cap(c) > packChunk && len(c) != cap(c) {
			t.Fatalf("a shared chunk of %d bytes", cap(c))
		}
	}
	p.trim()
	check("trimmed")
	if last := p.chunks[len(p.chunks)-1]; cap(last)-len(last) > len(last)/8 || cap(p.refs)-len(p.refs) > len(p.refs)/8 {
		t.Fatalf("trim left room: chunk %d/%d, refs %d/%d", len(last), cap(last), len(p.refs), cap(p.refs))
	}
}

// memEvents are events of every path an append takes: content and thought
// (the hand encoder), another kind (protobuf), one over packAlone, and one
// protobuf cannot encode (invalid UTF-8: kept as it is).
func memEvents() []*dispatchv1.TaskEvent {
	evs := []*dispatchv1.TaskEvent{
		{TaskId: "t", EmittedAtUs: 7, UpstreamSeq: 3, Kind: &dispatchv1.TaskEvent_Content{Content: &dispatchv1.ContentChunk{Text: "hello", IsFinish: true}}},
		{TaskId: "t", Kind: &dispatchv1.TaskEvent_Thought{Thought: &dispatchv1.ThoughtChain{StepName: "plan", Delta: "d"}}},
		{TaskId: "t", Kind: &dispatchv1.TaskEvent_State{State: &dispatchv1.TaskState{Status: agentpb.TaskStatus_RUNNING, Message: "m"}}},
		content(strings.Repeat("big", packAlone)),
		content("\xff\xfe not UTF-8"),
	}
	for i := range 200 {
		evs = append(evs, content(strings.Repeat("c", i%70)))
	}
	return evs
}

// readAllFrom reads l from seq 0 in batches of batch events until EOF.
func readAllFrom(t *testing.T, l Log, batch int) []*dispatchv1.TaskEvent {
	t.Helper()
	all, err := readUntil(context.Background(), l, nil, batch, -1)
	if err != nil {
		t.Fatal(err)
	}
	return all
}

// readUntil reads l after the events in all, in batches of batch events,
// until EOF or (stop >= 0) until it holds at least stop events. It may
// run in any goroutine (no t.Fatal).
func readUntil(ctx context.Context, l Log, all []*dispatchv1.TaskEvent, batch, stop int) ([]*dispatchv1.TaskEvent, error) {
	var after uint64
	if len(all) > 0 {
		after = all[len(all)-1].GetSeq()
	}
	for stop < 0 || len(all) < stop {
		evs, err := l.Read(ctx, after, make([]*dispatchv1.TaskEvent, 0, batch))
		all = append(all, evs...)
		if len(evs) > 0 {
			after = evs[len(evs)-1].GetSeq()
		}
		if errors.Is(err, io.EOF) {
			return all, nil
		}
		if err != nil {
			return all, fmt.Errorf("read after %d: %w", after, err)
		}
	}
	return all, nil
}

// A finished memory log stays whole while it is among the most recently
// finished (readers get the events appended, as before); pushed out by a
// newer one it lets the messages go and keeps their encodings, and its
// readers still get every event, in order, equal to what was appended
// (decoded), with the same bytes from Encoded — from any seq, in batches
// of any size.
func TestMemoryFinishedLogKeepsEventsAsEncodings(t *testing.T) {
	m := NewMemory(Limits{})
	fill := func(id string) (Log, []*dispatchv1.TaskEvent) {
		l, err := m.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		evs := memEvents()
		for i, ev := range evs[:len(evs)-1] {
			if _, err := l.Append(ev, Capped); err != nil {
				t.Fatalf("append %d: %v", i+1, err)
			}
		}
		if _, err := l.Seal(evs[len(evs)-1]); err != nil {
			t.Fatal(err)
		}
		return l, evs
	}
	a, appended := fill("a")
	want := make([][]byte, len(appended))
	for i, ev := range appended {
		if b, err := proto.Marshal(ev); err == nil {
			want[i] = b // none for the one protobuf refuses
		}
	}
	got := readAllFrom(t, a, 64)
	for i, ev := range got {
		if ev != appended[i] {
			t.Fatalf("retained log: event %d is not the appended message", i+1)
		}
	}
	// Push a out: a bound of 1 byte keeps only the newest log.
	m.retainBytes = 1
	b, _ := fill("b")
	if ml := a.(*memLog); func() bool { ml.mu.RLock(); defer ml.mu.RUnlock(); return ml.events != nil }() {
		t.Fatal("the older finished log still holds its messages")
	}
	if ml := b.(*memLog); func() bool { ml.mu.RLock(); defer ml.mu.RUnlock(); return ml.events != nil }() {
		t.Fatal("the newest finished log let its messages go at once past a bound of 1 byte")
	}
	for _, batch := range []int{1, 7, 64, 1000} {
		got := readAllFrom(t, a, batch)
		if len(got) != len(appended) {
			t.Fatalf("batch %d: read %d events, want %d", batch, len(got), len(appended))
		}
		raws := EncodedOf(a, got, nil)
		for i, ev := range got {
			if ev.GetSeq() != uint64(i+1) || !proto.Equal(ev, appended[i]) {
				t.Fatalf("batch %d: event %d is %v, want %v", batch, i+1, ev, appended[i])
			}
			if !bytes.Equal(raws[i], want[i]) {
				t.Fatalf("batch %d: event %d: bytes %x, want %x", batch, i+1, raws[i], want[i])
			}
		}
	}
	// A reader from the middle.
	evs, err := a.Read(context.Background(), 100, nil)
	if err != nil || len(evs) != defaultBatch || evs[0].GetSeq() != 101 {
		t.Fatalf("read after 100: %d events from %d, %v", len(evs), evs[0].GetSeq(), err)
	}
	if evs, err := a.Read(context.Background(), uint64(len(appended)), nil); !errors.Is(err, io.EOF) || len(evs) != 0 {
		t.Fatalf("read after the last: %d events, %v", len(evs), err)
	}
	if a.LastSeq() != uint64(len(appended)) {
		t.Fatalf("LastSeq %d", a.LastSeq())
	}
	if _, err := a.Append(content("late"), Capped); !errors.Is(err, ErrSealed) {
		t.Fatalf("append to a released log: %v", err)
	}
}

// BenchmarkMemoryFlood appends 64-byte content events to a Memory store
// the way the throughput scenario does, tasks of 20 000 events each,
// every finished task kept (as --max-tasks-kept keeps them): the CPU of
// the appends and of the garbage collector over a heap that keeps the
// finished tasks' events, and the heap held per event kept.
func BenchmarkMemoryFlood(b *testing.B) {
	const perTask = 20_000
	m := NewMemory(Limits{})
	text := []byte(strings.Repeat("x", 64))
	var logs []Log // the tasks kept
	var l Log
	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%perTask == 0 {
			if l != nil {
				if _, err := l.Seal(content("end")); err != nil {
					b.Fatal(err)
				}
			}
			var err error
			if l, err = m.Create(fmt.Sprint("task-", i)); err != nil {
				b.Fatal(err)
			}
			logs = append(logs, l)
		}
		ev := content(string(text)) // the text copied, as the server does
		ev.TaskId = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
		ev.EmittedAtUs, ev.UpstreamSeq = int64(i), uint64(i%perTask+1)
		ev.Time = timestamppb.Now()
		if _, err := l.Append(ev, Capped); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	b.ReportMetric(float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(b.N), "heapB/event")
	runtime.KeepAlive(logs)
}

// A watcher that follows a memory log while it is filled, finished and
// let go (pushed out by the next finished log) gets every event once, in
// order, equal to what was appended: one reading alongside the appends
// (it reads half, waits for the release, reads the rest), one that read
// half after the seal and the rest after the release.
func TestMemoryReaderAcrossRelease(t *testing.T) {
	m := NewMemory(Limits{})
	m.retainBytes = 1
	a, err := m.Create("a")
	if err != nil {
		t.Fatal(err)
	}
	const n = 3000
	texts := make([]string, n)
	for i := range texts {
		texts[i] = strings.Repeat(fmt.Sprint(i), i%9+1)
	}
	type result struct {
		evs []*dispatchv1.TaskEvent
		err error
	}
	got := make(chan result, 1)
	halfway, released := make(chan struct{}), make(chan struct{})
	release := sync.OnceFunc(func() { close(released) })
	ctx, cancel := context.WithCancel(context.Background())
	defer func() { cancel(); release(); <-got }() // on a failure too
	go func() {
		evs, err := readUntil(ctx, a, nil, 7, n/2)
		if err != nil {
			got <- result{evs, err}
			return
		}
		close(halfway)
		<-released
		evs, err = readUntil(ctx, a, evs, 7, -1)
		got <- result{evs, err}
	}()
	for i, text := range texts[:n-1] {
		if _, err := a.Append(content(text), Capped); err != nil {
			t.Fatalf("append %d: %v", i+1, err)
		}
	}
	if _, err := a.Seal(content(texts[n-1])); err != nil {
		t.Fatal(err)
	}
	var half []*dispatchv1.TaskEvent
	for len(half) < n/2 {
		evs, err := a.Read(context.Background(), uint64(len(half)), make([]*dispatchv1.TaskEvent, 0, 100))
		if err != nil {
			t.Fatal(err)
		}
		half = append(half, evs...)
	}
	b, err := m.Create("b")
	if err != nil {
		t.Fatal(err)
	}
	var early result
	select {
	case <-halfway:
	case early = <-got:
		got <- early // for the deferred wait
		t.Fatalf("the reader alongside stopped early: %d events, %v", len(early.evs), early.err)
	}
	if _, err := b.Seal(content("b")); err != nil { // a is let go
		t.Fatal(err)
	}
	if ml := a.(*memLog); func() bool { ml.mu.RLock(); defer ml.mu.RUnlock(); return ml.events != nil }() {
		t.Fatal("a still holds its messages")
	}
	release()
	alongside := <-got
	got <- alongside // for the deferred wait
	if alongside.err != nil {
		t.Fatalf("the reader alongside: %v", alongside.err)
	}
	for {
		evs, err := a.Read(context.Background(), uint64(len(half)), make([]*dispatchv1.TaskEvent, 0, 100))
		half = append(half, evs...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, evs := range [][]*dispatchv1.TaskEvent{alongside.evs, half} {
		if len(evs) != n {
			t.Fatalf("read %d events, want %d", len(evs), n)
		}
		for i, ev := range evs {
			if ev.GetSeq() != uint64(i+1) || ev.GetContent().GetText() != texts[i] {
				t.Fatalf("event %d: seq %d, %q", i+1, ev.GetSeq(), ev.GetContent().GetText())
			}
		}
	}
}

// The retained finished memory logs (their messages and their encodings)
// hold about the bound in heap: the estimate counts the packed bytes and
// refs beside the messages. Tasks of 64-byte content events, each sealed
// and removed at once (as --max-tasks-kept evicts them): what is left is
// what the retainer holds.
func TestMemoryRetainedHeapNearBound(t *testing.T) {
	t.Run("content", func(t *testing.T) { testRetainedHeap(t, false) })
	t.Run("server", func(t *testing.T) { testRetainedHeap(t, true) })
}

func testRetainedHeap(t *testing.T, server bool) {
	const (
		tasks   = 24
		perTask = 5_000
		bound   = 4 << 20
	)
	m := NewMemory(DefaultLimits)
	m.retainBytes = bound
	text := strings.Repeat("x", 64)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range tasks {
		id := fmt.Sprint("task-", i)
		l, err := m.Create(id)
		if err != nil {
			t.Fatal(err)
		}
		for j := range perTask - 1 {
			ev := content(strings.Clone(text))
			if server {
				ev.TaskId = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
				ev.EmittedAtUs, ev.UpstreamSeq = int64(j), uint64(j+1)
				ev.Time = timestamppb.Now()
			}
			if _, err := l.Append(ev, Capped); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := l.Seal(content("end")); err != nil {
			t.Fatal(err)
		}
		m.Remove(id)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	held := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	m.retainMu.Lock()
	estimate, logs := m.retainedBytes, len(m.retained)
	m.retainMu.Unlock()
	t.Logf("%d retained logs: heap %.2f MiB, estimate %.2f MiB, bound %.2f MiB",
		logs, float64(held)/(1<<20), float64(estimate)/(1<<20), float64(bound)/(1<<20))
	if logs == 0 || logs == tasks || estimate > bound {
		t.Fatalf("%d of %d logs retained, estimate %d (bound %d)", logs, tasks, estimate, bound)
	}
	// The estimate within 15% of the heap the retained logs hold, and that
	// heap within 15% of the bound (under it, but for the estimate's error).
	if r := float64(held) / float64(estimate); r < 0.85 || r > 1.15 {
		t.Fatalf("retained logs hold %d bytes, estimated at %d (%.2f×)", held, estimate, r)
	}
	if float64(held) > 1.15*bound {
		t.Fatalf("retained logs hold %d bytes, bound %d", held, bound)
	}
	runtime.KeepAlive(m)
}

// A seq with no bytes and no kept message is an error, not an empty event
// (seq 0, from which a reader would read the log again from its start);
// so is an encoding of another seq than the one read.
func TestPackedMissingOrWrongEventIsAnError(t *testing.T) {
	var p packed
	one, err := proto.Marshal(&dispatchv1.TaskEvent{Seq: 1, Kind: content("a").Kind})
	if err != nil {
		t.Fatal(err)
	}
	p.put(1, one, nil)
	if ev, err := p.event(1); err != nil || ev.GetSeq() != 1 {
		t.Fatalf("event 1: %v, %v", ev, err)
	}
	for _, s := range []uint64{0, 2} {
		if ev, err := p.event(s); err == nil {
			t.Fatalf("event %d: %v and no error", s, ev)
		}
	}
	// A log that let go of its events whose seq 2 holds seq 1's bytes.
	p.put(2, one, nil)
	l := &memLog{packed: &p, base: 2, committed: 2, sealed: true}
	evs, err := l.Read(context.Background(), 0, nil)
	if err == nil || len(evs) != 1 || evs[0].GetSeq() != 1 {
		t.Fatalf("read: %d events, %v", len(evs), err)
	}
	if evs, err := l.Read(context.Background(), 2, nil); !errors.Is(err, io.EOF) || len(evs) != 0 {
		t.Fatalf("read after the last: %d events, %v", len(evs), err)
	}
}

// A chunk is made to fit the event that opens it, whatever its size up
// to packAlone (not made at packFirst, then grown by append), and the
// next chunk doubles from there.
func TestPackedChunkFitsItsFirstEvent(t *testing.T) {
	var p packed
	big := bytes.Repeat([]byte{7}, packAlone-1)
	p.put(1, big, nil)
	p.put(2, []byte("x"), nil)
	if len(p.chunks) != 2 || cap(p.chunks[0]) != len(big) || cap(p.chunks[1]) != 2*len(big) {
		t.Fatalf("%d chunks, the first of %d bytes", len(p.chunks), cap(p.chunks[0]))
	}
	if !bytes.Equal(p.get(1), big) || string(p.get(2)) != "x" {
		t.Fatal("bytes changed")
	}
}

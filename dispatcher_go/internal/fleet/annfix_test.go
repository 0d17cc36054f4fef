package fleet

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// hangPublish is a go-redis hook for a Redis that does not answer: every
// PUBLISH (alone or in a pipeline) waits for its ctx to end.
type hangPublish struct{ sent atomic.Int32 }

func (h *hangPublish) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *hangPublish) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() != "publish" {
			return next(ctx, cmd)
		}
		h.sent.Add(1)
		<-ctx.Done()
		return ctx.Err()
	}
}
func (h *hangPublish) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if cmds[0].Name() != "publish" {
			return next(ctx, cmds)
		}
		h.sent.Add(int32(len(cmds)))
		<-ctx.Done()
		return ctx.Err()
	}
}

// With Redis hung, callers of publish with a 200 ms deadline return near
// it (the batch under context.Background()+opTimeout held 64 of them for
// 2 s), and a message still queued when its caller left is never sent:
// the first caller's message hangs in Redis for 1 s, the 63 queued behind
// it leave at their 200 ms deadline, and nothing of theirs goes out after.
func TestAnnouncementsHonourTheirCallersDeadlineWhenRedisHangs(t *testing.T) {
	rdb, err := newRedis(redisURL(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	h := &hangPublish{}
	rdb.AddHook(h)
	a := &announcer{rdb: rdb, channel: "storm-hang", log: testLogger("hang")}
	var wg sync.WaitGroup
	wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		a.publish(ctx, []byte("first"))
	})
	waitFor(t, "the first message to reach Redis", 5*time.Second, func() bool { return h.sent.Load() == 1 })
	const deadline = 200 * time.Millisecond
	began := time.Now()
	took := make([]time.Duration, stormSize-1)
	for i := range stormSize - 1 {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), deadline)
			defer cancel()
			a.publish(ctx, fmt.Appendf(nil, "%d", i))
			took[i] = time.Since(began)
		})
	}
	wg.Wait()
	worst := slices.Max(took)
	t.Logf("slowest queued caller returned after %v; %d messages reached Redis", worst, h.sent.Load())
	if worst > deadline+600*time.Millisecond {
		t.Fatalf("a caller with a %v deadline returned after %v", deadline, worst)
	}
	waitFor(t, "the announcer to be idle", 5*time.Second, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return !a.busy && len(a.pending) == 0
	})
	if n := h.sent.Load(); n != 1 {
		t.Fatalf("%d messages sent; want the first only (the others' callers left while they were queued)", n)
	}
}

// A caller of publish whose ctx ends while its message is queued returns
// at once and its message is never published; the rest go out.
func TestAnnouncementOfACallerThatLeftWhileQueuedIsNotSent(t *testing.T) {
	rdb, err := newRedis(redisURL(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rdb.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sub := rdb.Subscribe(ctx, "storm-left")
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	hold := &holdFirstPublish{held: make(chan struct{}), release: make(chan struct{})}
	rdb.AddHook(hold)
	a := &announcer{rdb: rdb, channel: "storm-left"}
	var wg sync.WaitGroup
	wg.Go(func() { a.publish(ctx, []byte("0")) })
	<-hold.held
	gone, leave := context.WithCancel(ctx)
	left := make(chan struct{})
	go func() { defer close(left); a.publish(gone, []byte("gone")) }()
	waitFor(t, "the message to be queued", 10*time.Second, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.pending) == 1
	})
	wg.Go(func() { a.publish(ctx, []byte("2")) })
	waitFor(t, "the next to be queued", 10*time.Second, func() bool {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.pending) == 2
	})
	leave()
	select {
	case <-left:
	case <-time.After(5 * time.Second):
		t.Fatal("a caller that left is still held")
	}
	close(hold.release)
	wg.Wait()
	for _, want := range []string{"0", "2"} {
		m, err := sub.ReceiveMessage(ctx)
		if err != nil || m.Payload != want {
			t.Fatalf("got %v %v; want %q (the message of the caller that left is never sent)", m, err, want)
		}
	}
}

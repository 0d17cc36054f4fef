package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
	"github.com/agentdispatch/dispatcher/internal/taskstore"
	"github.com/agentdispatch/dispatcher/internal/testutil"
)

// content is n content chunks "<prefix>-<i> ".
func content(n int, prefix string) []any {
	steps := make([]any, n)
	for i := range n {
		steps[i] = &dispatchv1.ContentChunk{Text: fmt.Sprintf("%s-%d ", prefix, i)}
	}
	return steps
}

// stream waits for c's next session and streams n chunks of content on it.
func stream(ctx context.Context, t *testing.T, c *testutil.Commander, n int) *testutil.Session {
	t.Helper()
	s, err := c.NextSession(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Play(ctx, content(n, s.Start.GetTaskId())...); err != nil {
		t.Fatal(err)
	}
	return s
}

// watched is what one watcher received.
type watched struct {
	mu     sync.Mutex
	events []*dispatchv1.TaskEvent
}

func (w *watched) last() uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.events) == 0 {
		return 0
	}
	return w.events[len(w.events)-1].GetSeq()
}

// watch follows taskID from after until the stream ends (terminal event,
// or the dispatcher dies); it reports whether it saw the end.
func watch(ctx context.Context, tc dispatchv1.TaskServiceClient, taskID string, after uint64, w *watched) (bool, error) {
	st, err := tc.WatchTask(ctx, &dispatchv1.WatchTaskRequest{TaskId: taskID, AfterSeq: after})
	if err != nil {
		return false, err
	}
	_, err = testutil.RecvAll(st, func(r *dispatchv1.WatchTaskResponse) {
		w.mu.Lock()
		w.events = append(w.events, r.GetEvent())
		w.mu.Unlock()
	})
	return err == nil, err
}

// watchEach follows every task of ids from seq from(id), each on a
// goroutine of wg, and reports each watch's end to ended.
func watchEach(ctx context.Context, tc dispatchv1.TaskServiceClient, ids []string, wg *sync.WaitGroup,
	from func(id string) uint64, ended func(id string, ended bool, err error),
) map[string]*watched {
	ws := make(map[string]*watched, len(ids))
	for _, id := range ids {
		w := &watched{}
		ws[id] = w
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok, err := watch(ctx, tc, id, from(id), w)
			ended(id, ok, err)
		}()
	}
	return ws
}

func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	return conn
}

// TestProcessKill9RestoresTruthfulState kills the real dispatcher (SIGKILL)
// with 50 tasks submitted (2 finished, 5 running and streaming, 43 queued),
// starts it again on the same data directory, and checks that every task's
// state is truthful and that watchers resuming by seq neither miss nor
// repeat an event.
func TestProcessKill9RestoresTruthfulState(t *testing.T) {
	dir := t.TempDir()
	kill9Restart(t, []string{"DISPATCHER_DATA_DIR=" + dir, "DISPATCHER_SECRET_KEY=test-key"})
	assertNoPlainSecret(t, dir, "sk-secret-value-1234")
}

// TestProcessKill9RestoresTruthfulStatePostgres is the same against a real
// PostgreSQL (POSTGRES_TEST_DSN, e.g. from scripts/postgres.sh start), chosen
// as seed 000 does: TASK_STORAGE_BACKEND and POSTGRES_CONNECTION_STRING.
func TestProcessKill9RestoresTruthfulStatePostgres(t *testing.T) {
	dsn := os.Getenv("POSTGRES_TEST_DSN")
	if dsn == "" {
		t.Skip("POSTGRES_TEST_DSN is not set: start a server with scripts/postgres.sh start and export the DSN it prints")
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	schema := fmt.Sprintf("kill9_%d", os.Getpid())
	if _, err := conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE; CREATE SCHEMA `+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_, _ = conn.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
		conn.Close(ctx)
	})
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	kill9Restart(t, []string{"TASK_STORAGE_BACKEND=postgres", "POSTGRES_CONNECTION_STRING=" + dsn + sep + "search_path=" + schema, "DISPATCHER_SECRET_KEY=test-key"})
}

func kill9Restart(t *testing.T, dataEnv []string) {
	const (
		total   = 50
		slots   = 5
		chunks  = 20
		doneNow = 2
	)
	// The commanders here are scripted connections that never re-attach:
	// this pins the restart without session hand-over (the running tasks
	// are FAILURE at once). The hand-over is tests/test_handover.py's.
	dataEnv = append(append([]string{}, dataEnv...), "DISPATCHER_HANDOVER_WINDOW=0")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	p1 := startDispatcher(t, dataEnv)
	conn1 := dial(t, p1.addr)
	defer conn1.Close()
	tc1 := dispatchv1.NewTaskServiceClient(conn1)

	var ids []string
	for i := range total {
		r, err := tc1.SubmitTask(ctx, &dispatchv1.SubmitTaskRequest{
			Instruction: fmt.Sprintf("task %d", i),
			RunningConfig: &agentpb.CommonConfig{StageModelConfig: &agentpb.StageModelConfig{
				ActionGeneratorModel: &agentpb.LLMConfig{ModelName: "m", ApiKey: proto.String("sk-secret-value-1234")},
			}},
		})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, r.GetTaskId())
	}
	wctx, stopWatch := context.WithCancel(ctx)
	var wg sync.WaitGroup
	watchers := watchEach(wctx, tc1, ids, &wg, func(string) uint64 { return 0 }, func(string, bool, error) {})

	// 5 slots: the first doneNow finish a task and take the next; all end up
	// streaming one task each.
	kctx, killCommander := context.WithCancel(ctx)
	defer killCommander()
	finished := map[string]bool{}
	running := map[string]bool{}
	for i := range slots {
		c := testutil.Connect(t, kctx, conn1, "planner:chat")
		s := stream(ctx, t, c, chunks)
		if i < doneNow {
			if err := s.Play(ctx, testutil.Success("answer of "+s.Start.GetTaskId())); err != nil {
				t.Fatal(err)
			}
			if err := s.Closed(ctx); err != nil {
				t.Fatal(err)
			}
			finished[s.Start.GetTaskId()] = true
			s = stream(ctx, t, c, chunks)
		}
		running[s.Start.GetTaskId()] = true
	}
	// Wait until the watchers have seen everything sent: what a watcher has
	// seen is durable (the log shows only written events).
	testutil.WaitFor(t, 20*time.Second, func() bool {
		for id := range running {
			if watchers[id].last() < uint64(2+chunks) { // pending, running, chunks
				return false
			}
		}
		for id := range finished {
			if watchers[id].last() < uint64(2+chunks+2) { // + result + SUCCESS
				return false
			}
		}
		return true
	}, "the watchers to see every event sent")

	if err := p1.cmd.Process.Signal(os.Kill); err != nil {
		t.Fatal(err)
	}
	p1.wait(t, 10*time.Second)
	stopWatch()
	testutil.Done(t, testutil.Waited(&wg), testutil.Wait, "the watchers to stop")
	killCommander()

	// The second run keeps only 3 finished tasks in memory: the rest of the
	// previous run's finished tasks are only in the store.
	p2 := startDispatcher(t, append(append([]string{}, dataEnv...), "DISPATCHER_MAX_TASKS_KEPT=3"))
	conn2 := dial(t, p2.addr)
	defer conn2.Close()
	tc2 := dispatchv1.NewTaskServiceClient(conn2)

	// ListTasks shows the previous run's tasks, newest first, with their
	// restored states, whether they are in memory or only in the store.
	newestFirst := make([]string, 0, total)
	for i := len(ids) - 1; i >= 0; i-- {
		newestFirst = append(newestFirst, ids[i])
	}
	byStatus := func(want func(id string) bool) []string {
		var out []string
		for _, id := range newestFirst {
			if want(id) {
				out = append(out, id)
			}
		}
		return out
	}
	isQueued := func(id string) bool { return !finished[id] && !running[id] }
	for _, size := range []int32{7, 1000} {
		assertListed(ctx, t, tc2, nil, size, newestFirst)
		assertListed(ctx, t, tc2, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, size, byStatus(func(id string) bool { return finished[id] }))
		assertListed(ctx, t, tc2, []agentpb.TaskStatus{agentpb.TaskStatus_FAILURE, agentpb.TaskStatus_SUCCESS}, size,
			byStatus(func(id string) bool { return finished[id] || running[id] }))
		assertListed(ctx, t, tc2, []agentpb.TaskStatus{agentpb.TaskStatus_PENDING}, size, byStatus(isQueued))
	}

	// Truthful states, before any commander is connected.
	for _, id := range ids {
		r, err := tc2.GetTask(ctx, &dispatchv1.GetTaskRequest{TaskId: id})
		if err != nil {
			t.Fatalf("GetTask %s after restart: %v", id, err)
		}
		got := r.GetTask()
		switch {
		case finished[id]:
			if got.GetStatus() != agentpb.TaskStatus_SUCCESS || got.GetResult() != "answer of "+id {
				t.Errorf("finished task %s: %v %q", id, got.GetStatus(), got.GetResult())
			}
		case running[id]:
			if got.GetStatus() != agentpb.TaskStatus_FAILURE || got.GetMessage() != taskstore.RestartFailureMessage {
				t.Errorf("running task %s: %v %q", id, got.GetStatus(), got.GetMessage())
			}
		default:
			if got.GetStatus() != agentpb.TaskStatus_PENDING {
				t.Errorf("queued task %s: %v %q", id, got.GetStatus(), got.GetMessage())
			}
		}
	}

	// Resume every watcher from the last seq it saw, with a commander that
	// now runs the queued tasks to the end.
	errs := make(chan error, total)
	resumed := watchEach(ctx, tc2, ids, &wg, func(id string) uint64 { return watchers[id].last() }, func(id string, ended bool, err error) {
		if err != nil || !ended {
			errs <- fmt.Errorf("resumed watch of %s: ended=%v err=%v", id, ended, err)
		}
	})
	cctx, stopCommander := context.WithCancel(ctx)
	const commanders = 8
	served := make(chan error, commanders)
	for range commanders {
		c := testutil.Connect(t, cctx, conn2, "planner:chat")
		go func() {
			served <- c.Serve(cctx, func(st *dispatchv1.StartSession) []any {
				return append(content(3, st.GetTaskId()), testutil.Success("late answer of "+st.GetTaskId()))
			})
		}()
	}
	testutil.Done(t, testutil.Waited(&wg), 30*time.Second, "the resumed watches to end")
	stopCommander()
	for range commanders {
		if err := testutil.Recv(t, served, testutil.Wait, "the commanders to stop"); err != nil {
			t.Error(err)
		}
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	for _, id := range ids {
		before, after := watchers[id].events, resumed[id].events
		all := append(append([]*dispatchv1.TaskEvent{}, before...), after...)
		for i, ev := range all {
			if ev.GetSeq() != uint64(i+1) {
				t.Fatalf("task %s: event %d has seq %d (gap or duplicate across the restart)", id, i+1, ev.GetSeq())
			}
		}
		last := all[len(all)-1].GetState()
		want := agentpb.TaskStatus_SUCCESS
		if running[id] {
			want = agentpb.TaskStatus_FAILURE
		}
		if last.GetStatus() != want {
			t.Errorf("task %s ends with %v, want %v", id, last, want)
		}
		// A fresh watcher from 0 gets exactly the same events.
		fresh := &watched{}
		if ended, err := watch(ctx, tc2, id, 0, fresh); err != nil || !ended {
			t.Fatalf("fresh watch %s: %v", id, err)
		}
		if len(fresh.events) != len(all) {
			t.Fatalf("task %s: fresh watch %d events, resumed %d", id, len(fresh.events), len(all))
		}
		for i := range all {
			if !proto.Equal(all[i], fresh.events[i]) {
				t.Fatalf("task %s seq %d differs: %v vs %v", id, i+1, all[i], fresh.events[i])
			}
		}
	}

	// All ended now, most of them evicted from memory: still listed.
	assertListed(ctx, t, tc2, nil, 9, newestFirst)
	assertListed(ctx, t, tc2, []agentpb.TaskStatus{agentpb.TaskStatus_SUCCESS}, 9, byStatus(func(id string) bool { return !running[id] }))

	// Credentials: masked when read back, never stored in plain text.
	ac := agentpb.NewAgentClient(conn2)
	cfg, err := ac.GetCommonConfig(ctx, &agentpb.GetCommonConfigRequest{Id: ids[0]})
	if err != nil {
		t.Fatal(err)
	}
	if k := cfg.GetStageModelConfig().GetActionGeneratorModel().GetApiKey(); k != "****1234" && k != "" {
		t.Errorf("api key read back as %q", k)
	}
}

// assertListed pages through ListTasks (statuses, pages of size) and checks
// that it lists exactly want, in that order.
func assertListed(ctx context.Context, t *testing.T, tc dispatchv1.TaskServiceClient, statuses []agentpb.TaskStatus, size int32, want []string) {
	t.Helper()
	var got []string
	req := &dispatchv1.ListTasksRequest{Statuses: statuses, PageSize: size}
	for page := 0; ; page++ {
		if page > len(want)+1 {
			t.Fatalf("ListTasks %v: paging does not end", statuses)
		}
		resp, err := tc.ListTasks(ctx, req)
		if err != nil {
			t.Fatalf("ListTasks %v: %v", statuses, err)
		}
		for _, tk := range resp.GetTasks() {
			got = append(got, tk.GetTaskId())
		}
		if resp.GetNextPageToken() == "" {
			break
		}
		req.PageToken = resp.GetNextPageToken()
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("ListTasks %v in pages of %d: %d tasks %v\nwant %d %v", statuses, size, len(got), got, len(want), want)
	}
}

// assertNoPlainSecret checks that no file in dir contains secret.
func assertNoPlainSecret(t *testing.T, dir, secret string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		b, err := os.ReadFile(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		if bytes.Contains(b, []byte(secret)) {
			t.Errorf("%s holds the api key in plain text", e.Name())
		}
	}
}

func TestConfigStorageSeedEnvAndDefaults(t *testing.T) {
	t.Parallel()
	c, err := parseConfig(nil, env(nil), io.Discard)
	if err != nil || c.storage != "sqlite" || c.dataDir != "./.data" || c.retention != 7*24*time.Hour {
		t.Fatalf("defaults: %+v %v", c, err)
	}
	c, err = parseConfig(nil, env(map[string]string{
		"TASK_STORAGE_BACKEND": "postgres", "POSTGRES_CONNECTION_STRING": "postgres://x@h/db",
		"DISPATCHER_SECRET_KEY": "s", "DISPATCHER_DATA_DIR": "/d",
	}), io.Discard)
	if err != nil || c.storage != "postgres" || c.postgresDSN != "postgres://x@h/db" || c.secretKey != "s" || c.dataDir != "/d" {
		t.Fatalf("seed env: %+v %v", c, err)
	}
	// DISPATCHER_ names win over the seed names, flags over both.
	c, err = parseConfig([]string{"--storage-backend", "memory"}, env(map[string]string{
		"TASK_STORAGE_BACKEND": "postgres", "DISPATCHER_STORAGE_BACKEND": "sqlite",
	}), io.Discard)
	if err != nil || c.storage != "memory" {
		t.Fatalf("flag wins: %+v %v", c, err)
	}
	for _, bad := range [][]string{{"--storage-backend", "mysql"}, {"--storage-backend", "postgres"}, {"--retention", "-1s"}} {
		if _, err := parseConfig(bad, env(nil), io.Discard); err == nil {
			t.Errorf("%v accepted", bad)
		}
	}
}

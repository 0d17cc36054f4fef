package fleet

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	agentpb "github.com/agentdispatch/dispatcher/internal/gen/lybic/agent"
)

const (
	waitLease = 2 * time.Second
	waitGrace = time.Second
)

// A replica that starts finds a dead replica's lease expired long ago (as
// every lease is when the whole fleet was down): it leaves the task to its
// session for a lease and the grace before it ends it FAILURE. It swept at
// its first tick, and a commander still reconnecting to the restarted
// fleet found its task ended 0.25 s before its re-attach.
func TestAStartingReplicaSweepsOnlyAfterALeaseAndTheGrace(t *testing.T) {
	d := newDeadTask(t, true)
	waitFor(t, "the dead replica's lease to expire", 10*time.Second, func() bool {
		l, ok, err := d.leases.Lease(d.ctx, d.id)
		return err == nil && ok && l.Expired
	})
	time.Sleep(waitGrace + 200*time.Millisecond) // expired past any grace
	began := time.Now()
	live := startReplicaLeased(t, d.pg, d.url, "live", &testSlot{finish: true}, waitLease, waitGrace, func(*Fleet) {})
	st, msg := d.ended(t, live, 20*time.Second)
	took := time.Since(began)
	if st != agentpb.TaskStatus_FAILURE || !strings.Contains(msg, "stopped renewing the task's lease") {
		t.Fatalf("status %s %q, want FAILURE by the sweep", st, msg)
	}
	if took < waitLease+waitGrace {
		t.Fatalf("swept %v after the replica started; want at least lease + grace (%v)", took, waitLease+waitGrace)
	}
}

// The same once PostgreSQL is back after a failure (here the leases table
// is renamed away for a while): an owner alive renews at its next tick,
// so the sweep waits a lease and the grace again.
func TestSweepWaitsALeaseAndTheGraceAfterPostgreSQLIsBack(t *testing.T) {
	d := newDeadTask(t, true)
	live := startReplicaLeased(t, d.pg, d.url, "live", &testSlot{finish: true}, waitLease, waitGrace, func(*Fleet) {})
	d.exec(t, `ALTER TABLE fleet_leases RENAME TO fleet_leases_away`)
	time.Sleep(waitLease + waitGrace + time.Second) // the replica's own wait is over
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := d.pg.Pool().Exec(ctx, `ALTER TABLE fleet_leases_away RENAME TO fleet_leases`); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	st, _ := d.ended(t, live, 20*time.Second)
	if took := time.Since(back); st != agentpb.TaskStatus_FAILURE || took < waitLease+waitGrace {
		t.Fatalf("status %s %v after the table came back; want FAILURE after lease + grace (%v)", st, took, waitLease+waitGrace)
	}
}

// A sweep that fails now and then (a timeout of an overloaded
// PostgreSQL) is no outage: it does not start the wait again. Every
// failure did, so a replica whose sweep failed once every lease and grace
// never swept.
func TestALoneFailedSweepDoesNotStarveTheSweep(t *testing.T) {
	const lease, grace = 6 * time.Second, time.Second // a renewal tick of 2 s
	d := newDeadTask(t, true)
	var calls atomic.Int64
	began := time.Now()
	live := startReplicaLeased(t, d.pg, d.url, "live", &testSlot{finish: true}, lease, grace, func(f *Fleet) {
		f.hooks.sweepErr = func() error {
			if calls.Add(1)%4 == 0 { // one sweep in 4: every ~4 s, under lease + grace
				return errors.New("timeout")
			}
			return nil
		}
	})
	st, msg := d.ended(t, live, 3*(lease+grace))
	if st != agentpb.TaskStatus_FAILURE || !strings.Contains(msg, "stopped renewing the task's lease") {
		t.Fatalf("status %s %q, want FAILURE by the sweep", st, msg)
	}
	if took := time.Since(began); took < lease+grace {
		t.Fatalf("swept %v after the replica started; want at least lease + grace (%v)", took, lease+grace)
	}
}

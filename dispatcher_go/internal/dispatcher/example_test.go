package dispatcher_test

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"

	"github.com/agentdispatch/dispatcher/internal/api"
	"github.com/agentdispatch/dispatcher/internal/dispatcher"
	"github.com/agentdispatch/dispatcher/internal/task"
)

// Example wires a dispatcher the way cmd/dispatcher does: the composition
// root builds every component from one Config (zero fields take the
// defaults of config.go), the gRPC adapter registers its services on a
// grpc.Server, and Drain ends it. A task submitted with no commander
// connected waits in the queue; the drain fails it.
func Example() {
	d, err := dispatcher.New(dispatcher.Config{Limits: dispatcher.Limits{QueueSize: 8}})
	if err != nil {
		panic(err)
	}
	s := api.New(d)
	gs := grpc.NewServer(s.ServerOptions()...)
	s.Register(gs) // then gs.Serve(listener)

	fmt.Println("stop grace:", d.Config().Tasks.StopGrace, "default planner:", d.Config().Tasks.DefaultPlanner)
	t, err := d.Tasks().Submit(task.Spec{Instruction: "say hello"})
	if err != nil {
		panic(err)
	}
	fmt.Println("submitted:", t.Status())

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	d.Drain(ctx) // no commander came: the queued task fails
	gs.Stop()
	fmt.Println("after drain:", t.Status(), "-", t.Info().Message)
	// Output:
	// stop grace: 2s default planner: chat
	// submitted: PENDING
	// after drain: FAILURE - dispatcher shutting down
}

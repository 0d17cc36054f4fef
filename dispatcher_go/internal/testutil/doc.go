// Package testutil is the dispatcher's test kit: bounded waits instead of
// sleeps (and Async, for a blocking call made beside the test), the one
// builder of upstream packets, an in-memory (bufconn) gRPC harness, a stub
// commander that speaks ChatStream, and Feed, the event log of a fake
// TaskService's task.
//
// It owns only test helpers. It must be imported by _test.go files only
// (TestTestOnlyImportedByTests enforces this), and it must not import any
// dispatcher package but the generated protos: a package under test must be
// able to use it without an import cycle, which is why the gRPC harness takes
// a registrar (func(*grpc.Server)) instead of building a server itself.
//
// Every wait has a deadline and fails the test with a message that says what
// did not happen. Helpers that take a testing.TB call its Fatal methods, so
// they must run on the test's goroutine; the stub commander's Play and Serve
// run anywhere and report errors instead.
package testutil

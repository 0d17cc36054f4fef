package api

// Every response fits what a default gRPC client receives (4 MiB): a task's
// texts are cut for display (the whole answer is in its content events,
// each one a packet under the message limit), and a ListTasks page ends
// early when the next task would take it over maxPageBytes.
const (
	// maxInstructionBytes and maxResultBytes bound a Task's instruction
	// and result; QueryTaskStatus's result is bounded by maxResultBytes too.
	maxInstructionBytes = 1 << 20
	maxResultBytes      = 2 << 20
	// maxPageBytes bounds a ListTasks page (at least one task is listed).
	maxPageBytes = 3 << 20
)

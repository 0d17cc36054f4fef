// Package benchkit is the measuring side of the benchmarks: latency samples
// and their percentiles, and what a process costs (RSS, CPU time) read from
// /proc. It is shared by cmd/loadgen and the tests that check its numbers.
package benchkit

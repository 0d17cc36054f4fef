// Package benchkit is the measuring side of the benchmarks: latency samples
// and their percentiles, and what a process costs (RSS, CPU time) read from
// /proc. It is shared by cmd/loadgen and the tests that check its numbers.
// It only measures and summarises: it must not drive load or decide what a
// result means (cmd/loadgen and scripts/bench.sh do).
package benchkit

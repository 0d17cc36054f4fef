package store

// SetPacingVariants turns the timerfd beside the pacing timer (fine), a
// record after the wait ending it (arrive) and the pacing sleep right
// after a write (ahead) on or off for the Writers
// created next; it returns a func that restores both.
func SetPacingVariants(fine, arrive, ahead bool) (restore func()) {
	old := pacingVariants
	pacingVariants.fine, pacingVariants.arrive, pacingVariants.ahead = fine, arrive, ahead
	return func() { pacingVariants = old }
}

package store

// SetPacingVariants turns a record after the pacing wait ending it
// (arrive) and the pacing sleep right after a write (ahead) on or off for
// the Writers created next; it returns a func that restores both.
func SetPacingVariants(arrive, ahead bool) (restore func()) {
	old := pacingVariants
	pacingVariants.arrive, pacingVariants.ahead = arrive, ahead
	return func() { pacingVariants = old }
}

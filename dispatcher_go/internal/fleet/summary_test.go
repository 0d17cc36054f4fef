package fleet

import "testing"

// TestSummaryServing: a replica's summary counts, for a tenant, the slots
// serving every tenant plus that tenant's own; an older replica's summary
// (no tenant counts) counts all its slots.
func TestSummaryServing(t *testing.T) {
	open := 2
	s := summary{Slots: 5, Open: &open, Tenants: map[string]int{"team-a": 3}}
	if got := s.serving("team-a"); got != 5 {
		t.Fatalf("team-a: %d, want 5", got)
	}
	if got := s.serving("team-b"); got != 2 {
		t.Fatalf("team-b: %d, want 2", got)
	}
	if got := (summary{Slots: 4}).serving("team-b"); got != 4 {
		t.Fatalf("older summary: %d, want 4", got)
	}
}

package httpapi

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
)

// degradedBackend is a backend that accepts no work and says why.
type degradedBackend struct {
	*fakeBackend
	text string
}

func (degradedBackend) Serving(context.Context) bool        { return false }
func (b degradedBackend) HealthText(context.Context) string { return b.text }

// /api/health says what is wrong, not "draining", while what new work
// needs is down (chaos finding D5: Redis or PostgreSQL down read as a
// drain); "draining" stays the drain's (the real dispatcher's drain is
// checked in httpapi_test.go, its text in dispatcher's TestDrain).
func TestHealthSaysWhatIsDown(t *testing.T) {
	for _, text := range []string{"degraded: fleet database unreachable", "degraded: bus unreachable", "draining"} {
		s := httptest.NewServer(New(degradedBackend{&fakeBackend{}, text}, Options{}))
		r, err := http.Get(s.URL + "/api/health")
		if err != nil {
			t.Fatal(err)
		}
		var h map[string]string
		err = json.NewDecoder(r.Body).Decode(&h)
		_ = r.Body.Close()
		s.Close()
		if err != nil || r.StatusCode != http.StatusServiceUnavailable || h["status"] != text {
			t.Fatalf("health: %d %v (%v), want 503 %q", r.StatusCode, h, err, text)
		}
	}
}

// Not serving when asked, serving again by the time HealthText is asked
// (nothing to say): 200 ok, not a 503 with no reason.
func TestHealthIsOKWhenTheBackendHasNothingToSay(t *testing.T) {
	s := httptest.NewServer(New(degradedBackend{&fakeBackend{}, ""}, Options{}))
	defer s.Close()
	r, err := http.Get(s.URL + "/api/health")
	if err != nil {
		t.Fatal(err)
	}
	var h map[string]string
	err = json.NewDecoder(r.Body).Decode(&h)
	_ = r.Body.Close()
	if err != nil || r.StatusCode != http.StatusOK || h["status"] != "ok" {
		t.Fatalf("health: %d %v (%v), want 200 ok", r.StatusCode, h, err)
	}
}

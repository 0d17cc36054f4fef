package dispatcher

import (
	"strings"
	"testing"
)

// One token for both sides is refused: a client could register as a
// commander and receive every task's config (issue 12).
func TestNewRefusesIdenticalTokens(t *testing.T) {
	d, err := New(Config{Auth: Auth{ClientToken: "same", CommanderToken: "same"}})
	if err == nil {
		d.Close()
		t.Fatal("identical tokens accepted")
	}
	if !strings.Contains(err.Error(), "must differ") {
		t.Fatalf("error %v", err)
	}
	for _, a := range []Auth{{}, {ClientToken: "a"}, {CommanderToken: "b"}, {ClientToken: "a", CommanderToken: "b"}} {
		d, err := New(Config{Auth: a})
		if err != nil {
			t.Fatalf("%+v: %v", a, err)
		}
		d.Close()
	}
}

package benchkit

import (
	"bufio"
	"bytes"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
)

func TestMarkers(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"", nil},
		{`{"text":"x","mark":"~T12~"}`, []string{"~T12~"}},
		{"~T1~~T2~ ~T1~", []string{"~T1~", "~T2~"}}, // each once, in order
		{"~T~ ~Tx1~ ~T12", nil},                     // no digits, not digits, not closed
		{"~T~T7~", []string{"~T7~"}},                // a false start right before a marker
	} {
		if got := Markers([]byte(tc.in)); !slices.Equal(got, tc.want) {
			t.Errorf("Markers(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// A marked message written on one traced connection is logged as a write
// there and as a read on the accepted (traced) end, two connections.
func TestConnTraceLogsBothEnds(t *testing.T) {
	if OpenConnTrace("BENCHKIT_TEST_UNSET_VARIABLE") != nil {
		t.Fatal("OpenConnTrace with the variable unset is not nil")
	}
	// Not OpenConnTrace: its file's flusher runs for the process's life.
	var out bytes.Buffer
	tr := &ConnTrace{f: &TraceFile{w: bufio.NewWriter(&out)}}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis = tr.Listener(lis)
	defer lis.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := lis.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	raw, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	client := tr.Wrap(raw)
	defer client.Close()
	server, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	defer server.Close()
	msg := []byte(`call {"mark":"~T42~"}`)
	if _, err := client.Write(msg); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(server, buf); err != nil {
		t.Fatal(err)
	}
	// Read stamps after its Read returned: both lines are in once it has.
	tr.f.mu.Lock()
	_ = tr.f.w.Flush()
	tr.f.mu.Unlock()
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("trace lines = %q, want a write and a read", lines)
	}
	var w, r []string
	for _, l := range lines {
		f := strings.Fields(l)
		if len(f) != 4 || f[0] != "~T42~" {
			t.Fatalf("bad line %q", l)
		}
		switch f[1] {
		case "w":
			w = f
		case "r":
			r = f
		}
	}
	if w == nil || r == nil {
		t.Fatalf("trace lines = %q, want one w and one r", lines)
	}
	if w[2] == r[2] {
		t.Errorf("both ends logged as connection %s; they are two connections", w[2])
	}
}

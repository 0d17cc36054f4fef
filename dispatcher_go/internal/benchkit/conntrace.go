package benchkit

import (
	"bytes"
	"net"
	"sync/atomic"
	"time"
)

// ConnTrace follows marked messages through a process's TCP connections,
// for benchmarks only (the tool round trip's socket legs, see
// scripts/tool_legs.py). A benchmark client puts a marker ~T<digits>~ in a
// message's text; every read and write of a traced connection whose bytes
// hold a marker appends one line per marker found:
//
//	marker r|w conn unix_ns
//
// conn numbers the process's traced connections. A write's time is when
// the process handed the bytes to the kernel: on loopback they are in the
// peer's socket when the write returns, so the peer's read of them minus
// this write is the peer's wake-up (its reader goroutine's netpoll and
// scheduling). A marker split across two reads is not found.
type ConnTrace struct {
	f     *TraceFile
	conns atomic.Int64
}

// OpenConnTrace returns a ConnTrace writing to the file named by the
// environment variable env, or nil when it is unset.
func OpenConnTrace(env string) *ConnTrace {
	f := OpenTrace(env)
	if f == nil {
		return nil
	}
	return &ConnTrace{f: f}
}

// Wrap returns c traced (c itself when t is nil).
func (t *ConnTrace) Wrap(c net.Conn) net.Conn {
	if t == nil {
		return c
	}
	return &tracedConn{Conn: c, t: t, id: t.conns.Add(1)}
}

// Listener returns l whose accepted connections are traced (l itself when
// t is nil).
func (t *ConnTrace) Listener(l net.Listener) net.Listener {
	if t == nil {
		return l
	}
	return &tracedListener{Listener: l, t: t}
}

type tracedListener struct {
	net.Listener
	t *ConnTrace
}

func (l *tracedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.t.Wrap(c), nil
}

type tracedConn struct {
	net.Conn
	t  *ConnTrace
	id int64
}

func (c *tracedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.t.scan(b[:n], 'r', c.id, time.Now().UnixNano())
	}
	return n, err
}

func (c *tracedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.t.scan(b[:n], 'w', c.id, time.Now().UnixNano())
	}
	return n, err
}

var markerStart = []byte("~T")

// scan logs every marker in b (each once per buffer).
func (t *ConnTrace) scan(b []byte, dir byte, conn, at int64) {
	for _, m := range Markers(b) {
		t.f.Printf("%s %c %d %d\n", m, dir, conn, at)
	}
}

// Markers returns the distinct markers ~T<digits>~ in b, in order.
func Markers(b []byte) []string {
	var out []string
	for {
		i := bytes.Index(b, markerStart)
		if i < 0 {
			return out
		}
		b = b[i+len(markerStart):]
		j := 0
		for j < len(b) && b[j] >= '0' && b[j] <= '9' {
			j++
		}
		if j == 0 || j == len(b) || b[j] != '~' {
			continue
		}
		m := "~T" + string(b[:j]) + "~"
		dup := false
		for _, o := range out {
			dup = dup || o == m
		}
		if !dup {
			out = append(out, m)
		}
		b = b[j+1:]
	}
}

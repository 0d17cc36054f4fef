//go:build linux

// Command stopcap is a benchmark tool: it watches the loopback interface
// (an AF_PACKET socket; needs root or CAP_NET_RAW) for the stop packets and
// the stopped packets of loadgen's stop scenario and prints, for each,
//
//	NS stop|stopped SESSION [user]
//
// NS being the kernel's timestamp of the packet (SO_TIMESTAMPNS): on
// loopback, the moment the sending process's write put it on the wire.
// A packet that came without one gets the time stopcap read it, later than
// the wire, and the row ends in "user" (their count is printed on exit;
// stop_legs.py counts them too).
// scripts/stop_legs.py splits the stop's transport legs there, into the
// sending and the receiving process's parts. It runs until killed:
//
//	stopcap > wire.trace & LOADGEN_STOP_TRACE=lg.trace BENCH_ONLY=stop scripts/bench.sh; kill %1
//	scripts/stop_legs.py - lg.trace wire.trace
//
// It matches payload bytes (the scenario's reasons, gRPC without TLS), so
// it knows only loadgen's stops.
package main

import (
	"bytes"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"regexp"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// userStamped counts the rows printed without a kernel timestamp.
var userStamped atomic.Int64

func main() {
	log.SetFlags(0)
	fd, err := syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, int(htons(syscall.ETH_P_ALL)))
	if err != nil {
		log.Fatalf("stopcap: %v", err)
	}
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		log.Fatalf("stopcap: %v", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrLinklayer{Protocol: htons(syscall.ETH_P_ALL), Ifindex: lo.Index}); err != nil {
		log.Fatalf("stopcap: %v", err)
	}
	if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_TIMESTAMPNS, 1); err != nil {
		log.Fatalf("stopcap: %v", err)
	}
	_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, 8<<20)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		if n := userStamped.Load(); n > 0 {
			log.Printf("stopcap: %d rows without a kernel timestamp (marked \"user\": the time read after the packet)", n)
		}
		os.Exit(0)
	}()
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	seen := map[string]bool{}
	for {
		n, oobn, _, _, err := syscall.Recvmsg(fd, buf, oob, 0)
		if err != nil {
			if err == syscall.EINTR {
				continue
			}
			log.Fatalf("stopcap: %v", err)
		}
		hits := match(buf[:n])
		if len(hits) == 0 {
			continue
		}
		// No kernel timestamp: the time read now, after the packet was
		// queued to us, so later than the wire by the capture's delay. The
		// row says so ("user" after the session), and stop_legs.py counts
		// such rows.
		ts, kernel := kernelTime(oob[:oobn])
		mark := ""
		if !kernel {
			ts = time.Now().UnixNano()
			mark = " user"
		}
		for _, h := range hits {
			k := h.dir + h.sid
			if seen[k] {
				continue // loopback: the same packet seen going out and coming in
			}
			seen[k] = true
			if mark != "" {
				userStamped.Add(1)
			}
			fmt.Printf("%d %s %s%s\n", ts, h.dir, h.sid, mark)
		}
	}
}

// kernelTime is the packet's SO_TIMESTAMPNS in oob (its control
// messages), false if it has none.
func kernelTime(oob []byte) (int64, bool) {
	msgs, _ := syscall.ParseSocketControlMessage(oob)
	for _, m := range msgs {
		if m.Header.Level == syscall.SOL_SOCKET && m.Header.Type == syscall.SO_TIMESTAMPNS &&
			len(m.Data) >= int(unsafe.Sizeof(syscall.Timespec{})) {
			if ns := (*syscall.Timespec)(unsafe.Pointer(&m.Data[0])).Nano(); ns != 0 {
				return ns, true
			}
		}
	}
	return 0, false
}

// hit is one stop or stopped found in a packet.
type hit struct{ dir, sid string }

var (
	stopMark    = []byte("loadgen stop scenario")
	stoppedMark = []byte("bench planner cancelled")
	sesRe       = regexp.MustCompile(`ses-[0-9a-f]{24}`)
)

// match returns the stops and stoppeds in p (one packet's bytes). Go's
// protobuf marshalling writes a packet's session_id ahead of its payload
// (DownstreamPacket: ahead of the oneof, though its field number is
// higher), so each is the session id nearest before its reason.
func match(p []byte) []hit {
	var hits []hit
	// Upstream: the stopped packet.
	for off := 0; ; {
		k := bytes.Index(p[off:], stoppedMark)
		if k < 0 {
			break
		}
		k += off
		if sid := sessionBefore(p, k); sid != "" {
			hits = append(hits, hit{"stopped", sid})
		}
		off = k + len(stoppedMark)
	}
	// Downstream: the stop packet.
	for off := 0; ; {
		k := bytes.Index(p[off:], stopMark)
		if k < 0 {
			break
		}
		k += off
		if k >= len("bench planner cancelled: ") && bytes.HasSuffix(p[:k], []byte("bench planner cancelled: ")) {
			off = k + len(stopMark)
			continue // the stopped's reason
		}
		if sid := sessionBefore(p, k); sid != "" {
			hits = append(hits, hit{"stop", sid})
		}
		off = k + len(stopMark)
	}
	return hits
}

// sessionBefore is the session id nearest before p[k], within the 64 bytes
// before it (the packet's own fields); "" if none.
func sessionBefore(p []byte, k int) string {
	begin := max(0, k-64)
	ids := sesRe.FindAllIndex(p[begin:k], -1)
	if len(ids) == 0 {
		return ""
	}
	last := ids[len(ids)-1]
	return string(p[begin+last[0] : begin+last[1]])
}

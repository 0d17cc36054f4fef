package httpapi

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// The origin rules. Every request (API, page, unknown paths) passes two
// checks before anything else:
//
//   - Host: it must name this server — a loopback name (localhost, a
//     loopback IP) or the IP address the connection arrived on, with the
//     port it arrived on; or match an entry of Options.AllowedHosts.
//     Anything else (a DNS-rebinding name, say) → 421 HOST_NOT_ALLOWED.
//   - Origin: a browser names the page that sent a request in Origin (on
//     every cross-origin request and every POST). When present it must
//     pass the same host rules (its port from the URL or the scheme), so
//     a page of another origin cannot drive the API whatever its content
//     type. Without Origin, Sec-Fetch-Site cross-site or same-site is
//     refused too, except a top-level navigation to the page (a link to
//     it). Refused → 403 ORIGIN_NOT_ALLOWED.
//
// Clients that are not browsers (curl, scripts) send neither Origin nor
// Sec-Fetch-Site: only their Host is checked.

// hostRule is one entry of Options.AllowedHosts.
type hostRule struct {
	name string // lower case, no trailing dot; for a wildcard, the suffix with its dot (".example.com")
	wild bool   // "*.example.com": any name below example.com, not example.com itself
	port int    // 0: any port
}

func (r hostRule) match(host string, port int) bool {
	if r.port != 0 && r.port != port {
		return false
	}
	if r.wild {
		return strings.HasSuffix(host, r.name) && len(host) > len(r.name)
	}
	return host == r.name
}

// ValidateAllowedHosts checks entries for Options.AllowedHosts: each is a
// host name, an IP address ([...] for IPv6) or a pattern "*.example.com"
// (any name below example.com), optionally with ":port" (without: any
// port).
func ValidateAllowedHosts(entries []string) error {
	var errs []error
	for _, e := range entries {
		if _, err := parseHostRule(e); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func parseHostRule(s string) (hostRule, error) {
	bad := func(why string) (hostRule, error) {
		return hostRule{}, fmt.Errorf("allowed host %q: %s (want host, host:port, *.domain or *.domain:port)", s, why)
	}
	if s == "" {
		return bad("empty")
	}
	if strings.HasSuffix(s, ":") {
		return bad("empty port")
	}
	host, port, ok := splitHost(s, 0)
	if !ok {
		return bad("not a host[:port]")
	}
	// splitHost takes a port given as 0 for "none"; an explicit port must be
	// 1..65535 (checked there).
	r := hostRule{port: port}
	if rest, ok := strings.CutPrefix(host, "*."); ok {
		if !validName(rest) {
			return bad("the part after *. is not a host name")
		}
		r.name, r.wild = "."+rest, true
		return r, nil
	}
	if net.ParseIP(host) == nil && !validName(host) {
		return bad("not a host name or IP address")
	}
	r.name = host
	return r, nil
}

// validName reports whether s is a DNS name: labels of letters, digits,
// '-' and '_', separated by dots.
func validName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

// splitHost splits a Host header value (or an Origin's host part) into a
// lower-case host without brackets or trailing dot and a port, defPort if
// it names none. ok is false for anything that is not host[:port].
func splitHost(hostport string, defPort int) (host string, port int, ok bool) {
	host, portStr := hostport, ""
	switch {
	case strings.HasPrefix(hostport, "["):
		end := strings.IndexByte(hostport, ']')
		if end < 0 {
			return "", 0, false
		}
		host, rest := hostport[1:end], hostport[end+1:]
		if net.ParseIP(host) == nil || strings.Contains(host, "%") {
			return "", 0, false
		}
		if rest != "" {
			var cut bool
			if portStr, cut = strings.CutPrefix(rest, ":"); !cut {
				return "", 0, false
			}
		}
		return withPort(strings.ToLower(host), portStr, defPort)
	case strings.Count(hostport, ":") == 1:
		host, portStr, _ = strings.Cut(hostport, ":")
	case strings.Count(hostport, ":") > 1:
		// A bare IPv6 address: a valid entry of AllowedHosts, never a
		// valid Host header (those are bracketed).
		if net.ParseIP(hostport) == nil {
			return "", 0, false
		}
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if host == "" || strings.ContainsAny(host, "/\\@?#% \t") {
		return "", 0, false
	}
	return withPort(host, portStr, defPort)
}

func withPort(host, portStr string, defPort int) (string, int, bool) {
	if portStr == "" {
		return host, defPort, host != ""
	}
	p, err := strconv.Atoi(portStr)
	if err != nil || p < 1 || p > 65535 || strings.TrimLeft(portStr, "0123456789") != "" {
		return "", 0, false
	}
	return host, p, host != ""
}

// hostAllowed reports whether host:port names this server: a loopback
// name or the connection's own IP address on the connection's port, or an
// allowed-hosts entry.
func (h *handler) hostAllowed(host string, port int, local *net.TCPAddr) bool {
	if local != nil && port == local.Port {
		if host == "localhost" {
			return true
		}
		// An IP literal cannot be re-pointed by DNS: the loopback ones and
		// the address the client reached us on are this server.
		if ip := net.ParseIP(host); ip != nil && (ip.IsLoopback() || ip.Equal(local.IP)) {
			return true
		}
	}
	for _, r := range h.hosts {
		if r.match(host, port) {
			return true
		}
	}
	return false
}

// originAllowed reports whether a browser's Origin header is one of this
// server's origins.
func (h *handler) originAllowed(origin string, local *net.TCPAddr) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Opaque != "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return false // includes "null" (sandboxed frames, file: pages)
	}
	var def int
	switch u.Scheme {
	case "http":
		def = 80
	case "https":
		def = 443
	default:
		return false
	}
	host, port, ok := splitHost(u.Host, def)
	return ok && h.hostAllowed(host, port, local)
}

// guard applies the origin rules (see the top of this file) before next.
func (h *handler) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local, _ := r.Context().Value(http.LocalAddrContextKey).(*net.TCPAddr)
		def := 80
		if r.TLS != nil {
			def = 443
		}
		host, port, ok := splitHost(r.Host, def)
		if !ok || !h.hostAllowed(host, port, local) {
			writeError(w, http.StatusMisdirectedRequest, "HOST_NOT_ALLOWED",
				fmt.Sprintf("host %q is not served here: allowed are the loopback names and the server's address on its port, and --http-allowed-hosts", r.Host))
			return
		}
		if origin := r.Header.Get("Origin"); origin != "" {
			if !h.originAllowed(origin, local) {
				writeError(w, http.StatusForbidden, "ORIGIN_NOT_ALLOWED",
					fmt.Sprintf("cross-origin request refused: origin %q is not one of this server's (see --http-allowed-hosts)", origin))
				return
			}
		} else if site := r.Header.Get("Sec-Fetch-Site"); (site == "cross-site" || site == "same-site") && !pageNavigation(r) {
			writeError(w, http.StatusForbidden, "ORIGIN_NOT_ALLOWED", "cross-site request refused")
			return
		}
		next.ServeHTTP(w, r)
	})
}

// pageNavigation: a top-level navigation (a followed link, a bookmark) to
// the web page, not to the API. The page holds no data and cannot be framed.
func pageNavigation(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	if r.Header.Get("Sec-Fetch-Mode") != "navigate" {
		return false
	}
	if d := r.Header.Get("Sec-Fetch-Dest"); d != "" && d != "document" {
		return false
	}
	return r.URL.Path != "/api" && !strings.HasPrefix(r.URL.Path, "/api/")
}

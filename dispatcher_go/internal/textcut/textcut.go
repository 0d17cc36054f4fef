// Package textcut is the one way the dispatcher cuts and cleans text: every
// string it shortens or builds from bytes stays valid UTF-8. Protobuf
// refuses to send or decode a string that is not (a gRPC stream carrying
// one is torn down) and a stored event holding one can never be read
// again, so a cut through the middle of a character (a Chinese file name
// in a tool error) is a fault, not a cosmetic issue.
//
// It must not import anything of ours, and must not allocate for text that
// needs no change.
package textcut

import (
	"strings"
	"unicode/utf8"
)

// Mark ends a text that was shortened.
const Mark = "…"

// Prefix is the longest prefix of s of at most n bytes that does not end
// in the middle of a UTF-8 character (n <= 0: ""). Bytes of s that are not
// UTF-8 are kept as they are; Valid cleans them.
func Prefix(s string, n int) string {
	if len(s) <= n {
		return s
	}
	if n <= 0 {
		return ""
	}
	// s[n] is the first byte cut off: if it continues a character, the
	// cut goes back to where that character starts (at most UTFMax-1
	// bytes; further back it is no UTF-8 character and the cut stays).
	i := n
	for i > n-utf8.UTFMax+1 && i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	if !utf8.RuneStart(s[i]) {
		i = n
	}
	return s[:i]
}

// Shorten is s made valid (see Valid) and, if longer than n bytes, cut to
// a Prefix of n bytes followed by Mark.
func Shorten(s string, n int) string {
	s = Valid(s)
	if len(s) <= n {
		return s
	}
	return Prefix(s, n) + Mark
}

// Valid is s with each byte sequence that is not UTF-8 replaced by U+FFFD;
// s itself when it is valid already (the common case costs one scan).
func Valid(s string) string {
	if utf8.ValidString(s) {
		return s
	}
	return strings.ToValidUTF8(s, "\uFFFD")
}

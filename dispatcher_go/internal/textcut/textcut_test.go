package textcut

import (
	"strings"
	"testing"
	"unicode/utf8"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestPrefixNeverSplitsACharacter: every cut of texts mixing 1- to 4-byte
// characters is valid UTF-8, at most n bytes, a prefix of the text, and
// loses at most the one character the cut went through.
func TestPrefixNeverSplitsACharacter(t *testing.T) {
	for _, s := range []string{"", "ascii only", "文件名不存在：中文", "é😀a文b\U0010FFFF", strings.Repeat("😀", 50)} {
		for n := -1; n <= len(s)+1; n++ {
			got := Prefix(s, n)
			if !utf8.ValidString(got) || len(got) > max(n, 0) || !strings.HasPrefix(s, got) {
				t.Fatalf("Prefix(%q, %d) = %q", s, n, got)
			}
			if n >= 0 && n < len(s) && n-len(got) >= utf8.UTFMax {
				t.Fatalf("Prefix(%q, %d) = %q: cut more than one character", s, n, got)
			}
		}
	}
}

// TestShorten: a text over the bound is cut and marked; an invalid one is
// repaired first; a text within the bound is returned as it is.
func TestShorten(t *testing.T) {
	if got := Shorten("short", 10); got != "short" {
		t.Fatalf("Shorten within the bound = %q", got)
	}
	if got := Shorten("x"+strings.Repeat("文", 200), 512); got != "x"+strings.Repeat("文", 170)+Mark {
		t.Fatalf("Shorten = %q", got)
	}
	if got := Shorten("bad \xe6\x96 bytes", 100); got != "bad \uFFFD bytes" {
		t.Fatalf("Shorten of invalid UTF-8 = %q", got)
	}
}

func TestValidAllocatesNothingForValidText(t *testing.T) {
	s := strings.Repeat("文件", 100)
	if n := testing.AllocsPerRun(100, func() { _ = Valid(s) }); n != 0 {
		t.Fatalf("Valid of valid text allocates %v times", n)
	}
	if got := Valid("a\xffb"); got != "a\uFFFDb" {
		t.Fatalf("Valid = %q", got)
	}
}

package tenant

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"

	"go.yaml.in/yaml/v3"
)

// File is a parsed tenants file. Its format (YAML; JSON is YAML too):
//
//	tenants:
//	  - name: team-a
//	    tokens: ["sha256:<hex>"]            # client tokens (gRPC, HTTP, web page, dispatchctl)
//	    commander_tokens: ["sha256:<hex>"]  # optional: commanders that serve team-a only
//	  - name: ops
//	    admin: true                         # sees and acts on every tenant's tasks
//	    tokens: ["sha256:<hex>"]
//
// A hash is "sha256:" and the 64 hex digits of the token's SHA-256:
// printf %s "$TOKEN" | sha256sum | sed 's/^/sha256:/; s/ .*//'
type File struct {
	Tenants []Entry `yaml:"tenants" json:"tenants"`
}

// Entry is one tenant of the file.
type Entry struct {
	Name            string   `yaml:"name"`
	Admin           bool     `yaml:"admin"`
	Tokens          []string `yaml:"tokens"`
	CommanderTokens []string `yaml:"commander_tokens"`
}

// maxFileBytes bounds the tenants file.
const maxFileBytes = 4 << 20

// namePattern is what a tenant name may be: it is shown in listings and
// logs and matched against commanders' hellos.
var namePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// emptyTokenHash is the SHA-256 of "", never a token of the file.
var emptyTokenHash = HashToken("")

// ValidName reports whether s may name a tenant.
func ValidName(s string) bool { return namePattern.MatchString(s) }

// Directory maps token hashes to tenants. It is immutable.
type Directory struct {
	clients    []credential
	commanders []credential
	tenants    int
}

type credential struct {
	hash   Hash
	tenant string
	admin  bool
}

// Parse reads a tenants file. Every error names the tenant and field.
// Unknown fields are refused (a typo such as "admn: true" must not pass
// silently), as are a token hash used twice and an empty file.
func Parse(src []byte) (*Directory, error) {
	if len(src) > maxFileBytes {
		return nil, fmt.Errorf("tenants file of %d bytes exceeds %d", len(src), maxFileBytes)
	}
	var f File
	dec := yaml.NewDecoder(bytes.NewReader(src))
	dec.KnownFields(true)
	if err := dec.Decode(&f); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("tenants file is empty")
		}
		return nil, fmt.Errorf("tenants file: %w", err)
	}
	if len(f.Tenants) == 0 {
		return nil, errors.New("tenants file names no tenant")
	}
	d := &Directory{tenants: len(f.Tenants)}
	names := map[string]bool{}
	seen := map[Hash]string{}
	add := func(list *[]credential, e *Entry, field string, hashes []string) error {
		for i, s := range hashes {
			h, ok := ParseHash(s)
			if !ok {
				return fmt.Errorf("tenant %q: %s[%d] is not \"sha256:<64 hex digits>\"", e.Name, field, i)
			}
			if h == emptyTokenHash {
				return fmt.Errorf("tenant %q: %s[%d] is the hash of the empty token (was $TOKEN unset when it was hashed?): every request without a token would be this tenant's", e.Name, field, i)
			}
			if other, dup := seen[h]; dup {
				return fmt.Errorf("tenant %q: %s[%d] is already a token of tenant %q", e.Name, field, i, other)
			}
			seen[h] = e.Name
			*list = append(*list, credential{hash: h, tenant: e.Name, admin: e.Admin})
		}
		return nil
	}
	for i := range f.Tenants {
		e := &f.Tenants[i]
		if !ValidName(e.Name) {
			return nil, fmt.Errorf("tenants[%d]: name %q must be 1 to 64 letters, digits, '.', '_' or '-'", i, e.Name)
		}
		if names[e.Name] {
			return nil, fmt.Errorf("tenants[%d]: tenant %q named twice", i, e.Name)
		}
		names[e.Name] = true
		if len(e.Tokens) == 0 && len(e.CommanderTokens) == 0 {
			return nil, fmt.Errorf("tenant %q has no tokens", e.Name)
		}
		if err := add(&d.clients, e, "tokens", e.Tokens); err != nil {
			return nil, err
		}
		if err := add(&d.commanders, e, "commander_tokens", e.CommanderTokens); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// LoadFile reads and parses the tenants file at path.
func LoadFile(path string) (*Directory, error) {
	src, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read tenants file: %w", err)
	}
	return Parse(src)
}

// CommanderTokens is the number of commander tokens in the file.
func (d *Directory) CommanderTokens() int { return len(d.commanders) }

// Tenants is the number of tenants in the file.
func (d *Directory) Tenants() int { return d.tenants }

// lookup finds h among creds. It compares h with every credential, a match
// or not, each in constant time: how long it takes does not tell how many
// hashes or which one matched.
func lookup(creds []credential, h Hash) (credential, bool) {
	var found credential
	ok := 0
	for _, c := range creds {
		m := subtleEq(c.hash, h)
		if m == 1 && ok == 0 {
			found = c
		}
		ok |= m
	}
	return found, ok == 1
}

func subtleEq(a, b Hash) int {
	if equal(a, b) {
		return 1
	}
	return 0
}

// hasHash reports whether h is any credential's of the directory.
func (d *Directory) hasHash(h Hash) bool {
	_, a := lookup(d.clients, h)
	_, b := lookup(d.commanders, h)
	return a || b
}

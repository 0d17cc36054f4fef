// Package tenant says who a bearer token belongs to: which tenant a client
// acts for (and whether it is an admin, who sees every tenant), which tenant
// a commander serves. It owns the tenants file (tenant → SHA-256 hashes of
// its tokens, YAML or JSON), its reload when it changes, the single-token
// flags as the one-tenant case, and the caller carried in a request's
// context.
//
// A caller that no token mapped (no auth configured, or the plain client
// token) is the default tenant "", which is what every task is in a
// dispatcher without a tenants file: the one-tenant case works unchanged.
// A request context without a caller is that same default tenant — never
// an admin — so a front end that forgets to set one fails closed.
//
// It must not know about tasks, transports or the store: the task manager
// asks Caller.Sees, the transports call Auth and WithCaller.
package tenant

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"strings"
)

// Caller is who a client request acts for.
type Caller struct {
	// Tenant is the tenant's name; "" is the default tenant (the one-tenant
	// case, the plain --client-token).
	Tenant string
	// Admin callers see and act on every tenant's tasks.
	Admin bool
}

// Sees reports whether the caller may see and act on a task of owner.
func (c Caller) Sees(owner string) bool { return c.Admin || c.Tenant == owner }

type callerKey struct{}

// WithCaller returns ctx carrying c.
func WithCaller(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, callerKey{}, c)
}

// FromContext is the caller ctx carries; without one, the default tenant
// (not an admin).
func FromContext(ctx context.Context) Caller {
	c, _ := ctx.Value(callerKey{}).(Caller)
	return c
}

// Commander is what a commander's token says about it.
type Commander struct {
	// Tenant, when Restricted, is the only tenant the commander may serve
	// (it authenticated with that tenant's own commander token).
	Tenant     string
	Restricted bool
}

type commanderKey struct{}

// WithCommander returns ctx carrying c.
func WithCommander(ctx context.Context, c Commander) context.Context {
	return context.WithValue(ctx, commanderKey{}, c)
}

// CommanderFromContext is the commander identity ctx carries; without one,
// an unrestricted commander (no auth, or the shared --commander-token).
func CommanderFromContext(ctx context.Context) Commander {
	c, _ := ctx.Value(commanderKey{}).(Commander)
	return c
}

// Hash is the SHA-256 of a token, as the tenants file holds it.
type Hash [sha256.Size]byte

// HashToken hashes a token.
func HashToken(token string) Hash { return sha256.Sum256([]byte(token)) }

// String is the hash as the tenants file writes it: "sha256:<hex>".
func (h Hash) String() string { return hashPrefix + hex.EncodeToString(h[:]) }

const hashPrefix = "sha256:"

// ParseHash reads "sha256:<64 hex digits>".
func ParseHash(s string) (Hash, bool) {
	var h Hash
	rest, ok := strings.CutPrefix(strings.TrimSpace(s), hashPrefix)
	if !ok || len(rest) != 2*sha256.Size {
		return h, false
	}
	if _, err := hex.Decode(h[:], []byte(rest)); err != nil {
		return h, false
	}
	return h, true
}

// equal compares two hashes in constant time.
func equal(a, b Hash) bool { return subtle.ConstantTimeCompare(a[:], b[:]) == 1 }

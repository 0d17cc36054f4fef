package tenant

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Options are the tokens a dispatcher accepts besides the tenants file.
type Options struct {
	// ClientToken is the default tenant's client token (--client-token).
	ClientToken string
	// CommanderToken is the shared commander token (--commander-token): a
	// commander with it serves the tenants its hello names (all if none).
	CommanderToken string
	// AdminToken is a client token that sees every tenant (--admin-token).
	AdminToken string
	// File is the tenants file; "" none.
	File string
	// Poll is how often File is checked for changes (default 1 s).
	Poll time.Duration
	// Logger receives reloads and rejected files; nil discards.
	Logger *slog.Logger
}

// Auth answers who a token is. Safe for concurrent use; the tenants file
// may be swapped under it (Watch).
type Auth struct {
	client, commander, admin Hash
	hasClient                bool
	hasCommander             bool
	hasAdmin                 bool
	file                     string
	poll                     time.Duration
	log                      *slog.Logger
	dir                      atomic.Pointer[Directory]
	// fileCommanders: a tenants file loaded so far held commander tokens.
	// Commanders then need a token for good: a reload that drops them must
	// not let any commander in, unrestricted.
	fileCommanders atomic.Bool
	// changed is closed (and replaced) when a reload puts a new file in
	// force (Changed).
	changed atomic.Pointer[chan struct{}]

	mu      sync.Mutex // serialises loads
	lastSrc []byte
}

// New checks the tokens and loads the tenants file (an error if it cannot
// be read or parsed: a dispatcher must not start with an unknown set of
// tenants).
func New(o Options) (*Auth, error) {
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.Poll <= 0 {
		o.Poll = time.Second
	}
	a := &Auth{file: o.File, poll: o.Poll, log: o.Logger}
	ch := make(chan struct{})
	a.changed.Store(&ch)
	a.client, a.hasClient = HashToken(o.ClientToken), o.ClientToken != ""
	a.commander, a.hasCommander = HashToken(o.CommanderToken), o.CommanderToken != ""
	a.admin, a.hasAdmin = HashToken(o.AdminToken), o.AdminToken != ""
	if a.hasCommander && ((a.hasClient && o.ClientToken == o.CommanderToken) || (a.hasAdmin && o.AdminToken == o.CommanderToken)) {
		return nil, errors.New("the client (or admin) and commander tokens must differ: with one token every client can also serve as a commander and receive every task's config")
	}
	if a.hasClient && a.hasAdmin && o.ClientToken == o.AdminToken {
		return nil, errors.New("the client and admin tokens must differ")
	}
	if o.File != "" {
		src, err := os.ReadFile(o.File)
		if err != nil {
			return nil, fmt.Errorf("read tenants file: %w", err)
		}
		d, err := a.parse(src)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", o.File, err)
		}
		a.install(d)
		a.lastSrc = src
		a.log.Info("tenants loaded", "file", o.File, "tenants", d.Tenants())
	}
	return a, nil
}

// parse parses a tenants file and refuses one that reuses a token given by
// a flag (a flag's token already means something else).
func (a *Auth) parse(src []byte) (*Directory, error) {
	d, err := Parse(src)
	if err != nil {
		return nil, err
	}
	for _, f := range []struct {
		set  bool
		h    Hash
		name string
	}{{a.hasClient, a.client, "--client-token"}, {a.hasCommander, a.commander, "--commander-token"}, {a.hasAdmin, a.admin, "--admin-token"}} {
		if f.set && d.hasHash(f.h) {
			return nil, fmt.Errorf("a token of the file is the %s", f.name)
		}
	}
	return d, nil
}

// ClientAuth reports whether clients must present a token.
func (a *Auth) ClientAuth() bool {
	return a.hasClient || a.hasAdmin || a.file != ""
}

// HasTenants reports whether a tenants file is in use: the default tenant
// (the plain client token) is then one tenant among others.
func (a *Auth) HasTenants() bool { return a.file != "" }

// CommanderAuth reports whether commanders must present a token: with the
// shared token, or once a tenants file held commander tokens (for good,
// whatever a later reload holds).
func (a *Auth) CommanderAuth() bool {
	return a.hasCommander || a.fileCommanders.Load()
}

// Client is the caller a client token acts for; ok is false for a token
// that is none of them (and for any token when clients need none, the
// caller is the default tenant).
func (a *Auth) Client(token string) (Caller, bool) {
	if !a.ClientAuth() {
		return Caller{}, true
	}
	h := HashToken(token)
	// Every comparison runs, whichever matches.
	isClient := a.hasClient && equal(h, a.client)
	isAdmin := a.hasAdmin && equal(h, a.admin)
	var c credential
	var inFile bool
	if d := a.dir.Load(); d != nil {
		c, inFile = lookup(d.clients, h)
	}
	switch {
	case isAdmin:
		return Caller{Admin: true}, true
	case isClient:
		return Caller{}, true
	case inFile:
		return Caller{Tenant: c.tenant, Admin: c.admin}, true
	}
	return Caller{}, false
}

// Commander is what a commander token says; ok is false for a token that
// is none of them.
func (a *Auth) Commander(token string) (Commander, bool) {
	if !a.CommanderAuth() {
		return Commander{}, true
	}
	h := HashToken(token)
	shared := a.hasCommander && equal(h, a.commander)
	var c credential
	var inFile bool
	if d := a.dir.Load(); d != nil {
		c, inFile = lookup(d.commanders, h)
	}
	switch {
	case shared:
		return Commander{}, true
	case inFile:
		return Commander{Tenant: c.tenant, Restricted: true}, true
	}
	return Commander{}, false
}

// Reload reads the tenants file again. A file that cannot be read or
// parsed is an error and the tenants in force stay.
func (a *Auth) Reload() error {
	if a.file == "" {
		return nil
	}
	src, err := os.ReadFile(a.file)
	if err != nil {
		return fmt.Errorf("read tenants file: %w", err)
	}
	_, err = a.load(src)
	return err
}

// load installs src if it differs from what is in force; changed says
// whether it did.
func (a *Auth) load(src []byte) (changed bool, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if bytes.Equal(src, a.lastSrc) {
		return false, nil
	}
	d, err := a.parse(src)
	if err != nil {
		return false, err
	}
	a.install(d)
	a.lastSrc = src
	return true, nil
}

// install puts d in force and tells Changed's waiters. Called by one
// goroutine at a time (New, or under mu).
func (a *Auth) install(d *Directory) {
	if len(d.commanders) > 0 {
		a.fileCommanders.Store(true)
	}
	a.dir.Store(d)
	ch := make(chan struct{})
	close(*a.changed.Swap(&ch))
}

// Changed is a channel closed once a reload puts a new tenants file in
// force: a long-lived stream asks again who its token is then, and ends if
// it is no longer the same (a token taken away, or moved to another
// tenant). Take it before the check it guards, so that no reload in
// between goes unnoticed.
func (a *Auth) Changed() <-chan struct{} { return *a.changed.Load() }

// Watch reloads the tenants file when it changes, polling every Poll (as
// the policy file: a change is read once the file has held still for one
// poll, so a file written in place is never read half written). A file
// that fails to load is logged as an error and the tenants in force stay.
// It returns when ctx ends; without a file at once.
func (a *Auth) Watch(ctx context.Context) {
	if a.file == "" {
		return
	}
	t := time.NewTicker(a.poll)
	defer t.Stop()
	var lastMod, seenMod time.Time
	var lastSize, seenSize int64 = -1, -1
	var failedSrc []byte
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		fi, err := os.Stat(a.file)
		if err != nil {
			continue // being replaced, or gone: the tenants in force stay
		}
		if fi.ModTime().Equal(lastMod) && fi.Size() == lastSize {
			continue
		}
		if !fi.ModTime().Equal(seenMod) || fi.Size() != seenSize {
			seenMod, seenSize = fi.ModTime(), fi.Size()
			continue
		}
		lastMod, lastSize = fi.ModTime(), fi.Size()
		src, err := os.ReadFile(a.file)
		if err != nil || bytes.Equal(src, failedSrc) {
			continue
		}
		changed, err := a.load(src)
		if err != nil {
			failedSrc = src
			a.log.Error("tenants file reload rejected; the previous tenants stay in force", "file", a.file, "error", err)
			continue
		}
		failedSrc = nil
		if changed {
			a.log.Info("tenants reloaded", "file", a.file, "tenants", a.dir.Load().Tenants())
		}
	}
}

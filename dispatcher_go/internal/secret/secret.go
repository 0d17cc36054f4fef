// Package secret owns the secret fields of the messages the dispatcher
// holds (API keys, tokens, passwords in configs and sandboxes): which fields
// are secret, and the three things done to them — masking them for clients
// (Mask), emptying them for disk (Strip), and sealing a whole message with
// AES-256-GCM (Sealer) so that the secrets a restart needs are stored
// encrypted. One walk over a message's fields (secretFields) serves Mask and
// Strip (and Values), so a secret added to the schema is handled by all or
// by none. RedactText masks secrets in free text a client reads (a task's
// conversation): known values, and anything shaped like a key.
//
// It must not decide where a message goes (callers choose: clients get
// Mask, disk gets Strip and Seal), keep any state besides a Sealer's key, or
// log: a secret never reaches a log line through this package.
package secret

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"regexp"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// Mask returns a copy of m with every secret string field (see isSecret)
// masked (see MaskString). It walks the message generically so that a
// secret added to the schema later is masked without touching this code.
func Mask[M proto.Message](m M) M {
	c := proto.Clone(m).(M)
	secretFields(c.ProtoReflect(), func(m protoreflect.Message, fd protoreflect.FieldDescriptor, v protoreflect.Value) {
		m.Set(fd, protoreflect.ValueOfString(MaskString(v.String())))
	})
	return c
}

// Strip returns a copy of m with every secret field (see Mask) emptied:
// what may be written to disk.
func Strip[M proto.Message](m M) M {
	c := proto.Clone(m).(M)
	secretFields(c.ProtoReflect(), func(m protoreflect.Message, fd protoreflect.FieldDescriptor, _ protoreflect.Value) {
		m.Clear(fd)
	})
	return c
}

// secretFields calls fn for every set secret string field of m and of the
// messages (single or repeated) nested in it. fn may set or clear that
// field (and only that one) of the message it is given.
func secretFields(m protoreflect.Message, fn func(protoreflect.Message, protoreflect.FieldDescriptor, protoreflect.Value)) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.Kind() == protoreflect.StringKind && !fd.IsList() && !fd.IsMap() && isSecret(fd):
			fn(m, fd, v)
		case fd.Kind() == protoreflect.MessageKind && !fd.IsList() && !fd.IsMap():
			secretFields(v.Message(), fn)
		case fd.Kind() == protoreflect.MessageKind && fd.IsList():
			l := v.List()
			for i := range l.Len() {
				secretFields(l.Get(i).Message(), fn)
			}
		}
		return true
	})
}

// isSecret reports whether fd holds a secret, by its name.
func isSecret(fd protoreflect.FieldDescriptor) bool {
	switch fd.Name() {
	case "apiKey", "api_key", "token", "password", "secret":
		return true
	}
	return false
}

// MaskString shows the last four characters of a secret after "****"
// ("sk-…abcd" → "****abcd"). Secrets shorter than 8 characters are masked
// entirely: their last four would be half the secret.
func MaskString(s string) string {
	if s == "" {
		return ""
	}
	r := []rune(s)
	if len(r) < 8 {
		return "****"
	}
	return "****" + string(r[len(r)-4:])
}

// Sealer encrypts whole messages with AES-256-GCM, the key being the
// SHA-256 of the configured secret key. A sealed message is the nonce
// followed by the ciphertext; the additional data (e.g. the id of the task
// it belongs to) binds it to its owner. A nil *Sealer (no key) seals
// nothing and opens nothing.
type Sealer struct {
	aead cipher.AEAD
}

// NewSealer returns a Sealer for key; nil (and no error) when key is empty.
func NewSealer(key []byte) (*Sealer, error) {
	if len(key) == 0 {
		return nil, nil
	}
	k := sha256.Sum256(key)
	block, err := aes.NewCipher(k[:])
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: aead}, nil
}

// Seal returns m encrypted and bound to aad; nil without a key (or if m
// cannot be marshalled).
func (s *Sealer) Seal(m proto.Message, aad string) []byte {
	if s == nil {
		return nil
	}
	plain, err := proto.Marshal(m)
	if err != nil {
		return nil
	}
	n := s.aead.NonceSize()
	nonce := make([]byte, n, n+len(plain)+s.aead.Overhead())
	_, _ = rand.Read(nonce)
	return s.aead.Seal(nonce, nonce, plain, []byte(aad))
}

// Open decrypts sealed (bound to aad) into m and reports whether it could:
// false without a key, with another key or aad, or when there is nothing
// sealed. On false m is to be discarded.
func (s *Sealer) Open(sealed []byte, aad string, m proto.Message) bool {
	if s == nil || len(sealed) < s.aead.NonceSize() {
		return false
	}
	n := s.aead.NonceSize()
	plain, err := s.aead.Open(nil, sealed[:n], sealed[n:], []byte(aad))
	if err != nil {
		return false
	}
	return proto.Unmarshal(plain, m) == nil
}

// keyShaped matches text that looks like an API key or a bearer token:
// "sk-…", "sk_live_…", "lysk-…", "ark-…" with at least 8 more characters,
// and "Bearer <token>".
var keyShaped = regexp.MustCompile(`\b(?:sk|lysk|ark|pk|rk|key)[-_][A-Za-z0-9_\-]{8,}|(?i:bearer)\s+[A-Za-z0-9._~+/\-]+=*`)

// Values returns the set secret string fields of m (and of the messages
// nested in it), e.g. to redact them from text with RedactText.
func Values(m proto.Message) []string {
	var out []string
	secretFields(m.ProtoReflect(), func(_ protoreflect.Message, _ protoreflect.FieldDescriptor, v protoreflect.Value) {
		if s := v.String(); len(s) >= 4 && !strings.HasPrefix(s, "****") {
			out = append(out, s)
		}
	})
	return out
}

// RedactText masks secrets in free text that a client will read (e.g. a
// task's conversation): every occurrence of a known secret value, and
// anything shaped like an API key or a bearer token, becomes its
// MaskString form.
func RedactText(s string, known ...string) string {
	for _, k := range known {
		if k != "" {
			s = strings.ReplaceAll(s, k, MaskString(k))
		}
	}
	return keyShaped.ReplaceAllStringFunc(s, MaskString)
}

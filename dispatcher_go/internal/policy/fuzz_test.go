package policy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzCompile: whatever the operator's policy file holds, the loader
// (Engine.LoadFile → Compile) answers with an error wrapping ErrInvalid or
// a policy, never a panic, within a time bound; a refused file leaves the
// policy in force as it was; an accepted one is what the engine then uses,
// compiles again from its Source to the same shape, and decides packets.
func FuzzCompile(f *testing.F) {
	names, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		f.Fatal(err)
	}
	invalid, err := filepath.Glob("testdata/invalid/*.yaml")
	if err != nil {
		f.Fatal(err)
	}
	for _, name := range append(names, invalid...) {
		src, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(string(src))
	}
	f.Add("")
	f.Add("---\n---\n")
	f.Add("rules: [{id: a, when: 'true', action: stop}]\ntests: [{name: t, packets: [{kind: content, text: x}], expect: {action: stop, rule: a}}]")
	f.Add("rules:\n  - &a {id: a, phrases: [x], action: deny}\n  - *a\n")
	f.Add("hold_timeout: 99999h\ntext_window: -1\ncost_limit: 18446744073709551615\n")
	f.Add(rulesOf(3, `text.matches("((a{10}){10}){10}")`))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, src string) {
		// A hang is a failure too, with the input that caused it: the
		// fuzzer keeps the input of a worker that crashed.
		watchdog := time.AfterFunc(10*time.Second, func() {
			panic(fmt.Sprintf("FuzzCompile: no answer within 10s for %q", src))
		})
		defer watchdog.Stop()
		path := filepath.Join(dir, "policy.yaml")
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		e := NewEngine(nil)
		prev := e.Current()
		start := time.Now()
		p, err := e.LoadFile(path)
		if el := time.Since(start); el > 5*time.Second {
			t.Fatalf("loading took %v", el)
		}
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			if p != nil || e.Current() != prev {
				t.Fatal("a refused file changed the policy in force")
			}
			return
		}
		if p == nil || e.Current() != p {
			t.Fatalf("accepted policy %p, in force %p", p, e.Current())
		}
		again, err := Compile(p.Source())
		if err != nil {
			t.Fatalf("the policy's own source does not compile again: %v", err)
		}
		if again.NumRules() != p.NumRules() || again.Limits() != p.Limits() {
			t.Fatalf("recompiled: %d rules %+v, first %d rules %+v", again.NumRules(), again.Limits(), p.NumRules(), p.Limits())
		}
		s := NewSession(e, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		for _, pkt := range []Packet{
			{Kind: KindContent, Text: strings.Repeat("ab ", 200)},
			{Kind: KindThought, Text: "launch codes"},
			{Kind: KindToolCall, ToolName: "shell", ToolArgsJSON: `{"cmd":"rm -rf /"}`},
		} {
			d := s.Evaluate(ctx, pkt, State{InputTokens: 1, Cost: 0.5})
			if d.Action < Allow || d.Action > Stop || (d.Action != Allow && d.RuleID == "") {
				t.Fatalf("bad decision %+v", d)
			}
		}
	})
}

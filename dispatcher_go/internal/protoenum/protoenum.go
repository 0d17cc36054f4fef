// Package protoenum turns an enum value of the protos into a word:
// TOOL_ERROR_CODE_TIMEOUT → "timeout". It is the one place that knows
// how the protos name enum values, so that the dispatcher (events,
// metrics) and the CLI (dispatchctl) word them alike.
//
// What it must not do: depend on anything but the protobuf runtime (the
// CLI imports it, and must not pull in the dispatcher's packages), or hold
// any state beyond its name cache.
package protoenum

import (
	"strconv"
	"strings"
	"sync"

	"google.golang.org/protobuf/reflect/protoreflect"
)

// names caches Name by value descriptor (descriptors are never freed,
// and there are few values), so the recording path does not allocate.
var names sync.Map // protoreflect.EnumValueDescriptor → string

// Name is the word for an enum value: its name without the enum's type
// prefix, lower-cased (ToolErrorCode TOOL_ERROR_CODE_TIMEOUT → "timeout",
// HoldOutcome HOLD_OUTCOME_TIMED_OUT → "timed_out"). Values of enums whose
// names carry no prefix are only lower-cased (TaskStatus NOT_FOUND →
// "not_found"); a number the enum does not define is its decimal form, as
// String() has it.
func Name(e protoreflect.Enum) string {
	v := e.Descriptor().Values().ByNumber(e.Number())
	if v == nil {
		return strconv.Itoa(int(e.Number()))
	}
	if s, ok := names.Load(v); ok {
		return s.(string)
	}
	name := string(v.Name())
	name = strings.TrimPrefix(name, screamingSnake(string(e.Descriptor().Name()))+"_")
	name = strings.ToLower(name)
	names.Store(v, name)
	return name
}

// screamingSnake is the prefix the protobuf style guide gives the values
// of an enum named s: ToolErrorCode → TOOL_ERROR_CODE, SandboxOS →
// SANDBOX_OS.
func screamingSnake(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		upper := 'A' <= c && c <= 'Z'
		if upper && i > 0 {
			prevLower := 'a' <= s[i-1] && s[i-1] <= 'z' || '0' <= s[i-1] && s[i-1] <= '9'
			nextLower := i+1 < len(s) && 'a' <= s[i+1] && s[i+1] <= 'z'
			if prevLower || ('A' <= s[i-1] && s[i-1] <= 'Z' && nextLower) {
				b.WriteByte('_')
			}
		}
		if 'a' <= c && c <= 'z' {
			c -= 'a' - 'A'
		}
		b.WriteByte(c)
	}
	return b.String()
}

package broker

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

// Bounds of a tool's argument schema (see compileSchema).
const (
	maxSchemaBytes = 256 << 10
	maxSchemaDepth = 64 // JSON objects and arrays inside each other
)

// jsonDepth is the deepest nesting of objects and arrays in src (JSON;
// brackets inside strings do not count). It stops counting past
// maxSchemaDepth.
func jsonDepth(src string) int {
	depth, deepest, inString := 0, 0, false
	for i := 0; i < len(src); i++ {
		c := src[i]
		switch {
		case inString:
			if c == '\\' {
				i++
			} else if c == '"' {
				inString = false
			}
		case c == '"':
			inString = true
		case c == '{' || c == '[':
			depth++
			if depth > deepest {
				deepest = depth
				if deepest > maxSchemaDepth {
					return deepest
				}
			}
		case c == '}' || c == ']':
			depth--
		}
	}
	return deepest
}

// schemaURL names the one schema each compiler holds.
const schemaURL = "mem:///tool-arguments.json"

// noLoader refuses every external reference: a provider's schema must be
// self-contained. Without this a "$ref": "file:///etc/…" would make the
// dispatcher read local files (the library's default loader does).
type noLoader struct{}

// Load refuses every URL.
func (noLoader) Load(url string) (any, error) {
	return nil, fmt.Errorf("external schema references are not allowed (%s)", url)
}

// compileSchema compiles a tool's argument schema (JSON Schema 2020-12 unless
// it says otherwise). An empty schema accepts any object. anyObject reports
// a schema that accepts every object (empty, or {"type":"object"} with
// annotations only): arguments need no decoding to be validated.
func compileSchema(src string) (sch *jsonschema.Schema, anyObject bool, err error) {
	if strings.TrimSpace(src) == "" {
		return nil, true, nil
	}
	// The compiler's time grows with the cube of the nesting (a 30 KB
	// schema of 800 nested "properties" took 25 s of a core, one of 2 000
	// minutes, and a provider's hello waits for it) and with the size:
	// bounded here, far beyond what a tool's arguments need.
	if len(src) > maxSchemaBytes {
		return nil, false, fmt.Errorf("%d bytes, over the %d allowed", len(src), maxSchemaBytes)
	}
	if d := jsonDepth(src); d > maxSchemaDepth {
		return nil, false, fmt.Errorf("nested %d levels deep, over the %d allowed", d, maxSchemaDepth)
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(src))
	if err != nil {
		return nil, false, fmt.Errorf("not JSON: %w", err)
	}
	m, ok := doc.(map[string]any)
	if !ok {
		if _, isBool := doc.(bool); !isBool {
			return nil, false, errors.New("a schema must be an object or a boolean")
		}
	}
	// A compiler per schema: Compiler is not safe for concurrent use and
	// keeping schemas apart means one tool cannot $ref another's.
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.UseLoader(noLoader{})
	if err := c.AddResource(schemaURL, doc); err != nil {
		return nil, false, err
	}
	sch, err = c.Compile(schemaURL)
	return sch, err == nil && acceptsAnyObject(m), err
}

// acceptsAnyObject reports whether schema m (nil: a boolean schema) holds
// nothing but "type":"object" and keywords that only annotate: with the
// object check every call gets, it accepts every object.
func acceptsAnyObject(m map[string]any) bool {
	if m == nil {
		return false
	}
	for k, v := range m {
		switch k {
		case "type":
			if v != "object" {
				return false
			}
		case "title", "description", "$comment", "$schema", "examples":
		default:
			return false
		}
	}
	return true
}

// checkObject is parseArguments for a tool whose schema accepts any
// object: the same verdicts (and messages), without decoding.
func checkObject(raw string) error {
	if strings.TrimSpace(raw) == "" {
		return nil // no arguments mean {}
	}
	if !json.Valid([]byte(raw)) {
		return errors.New("arguments are not valid JSON")
	}
	// Valid JSON: only JSON whitespace can come before the value.
	if strings.TrimLeft(raw, " \t\r\n")[0] != '{' {
		return errors.New("arguments must be a JSON object")
	}
	return nil
}

// parseArguments decodes a call's arguments, which must be a JSON object.
// Empty arguments mean {} (a call of a tool without parameters).
func parseArguments(raw string) (map[string]any, error) {
	if strings.TrimSpace(raw) == "" {
		return map[string]any{}, nil
	}
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(raw))
	if err != nil {
		return nil, errors.New("arguments are not valid JSON")
	}
	m, ok := v.(map[string]any)
	if !ok {
		return nil, errors.New("arguments must be a JSON object")
	}
	return m, nil
}

// schemaError renders a validation error on one line.
func schemaError(err error) string {
	var ve *jsonschema.ValidationError
	if errors.As(err, &ve) {
		return strings.Join(strings.Fields(fmt.Sprintf("%v", ve)), " ")
	}
	return err.Error()
}

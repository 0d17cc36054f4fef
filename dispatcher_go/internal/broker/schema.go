package broker

import (
	"errors"
	"fmt"
	"strings"

	"github.com/santhosh-tekuri/jsonschema/v6"
)

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
// it says otherwise). An empty schema accepts any object.
func compileSchema(src string) (*jsonschema.Schema, error) {
	if strings.TrimSpace(src) == "" {
		return nil, nil
	}
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(src))
	if err != nil {
		return nil, fmt.Errorf("not JSON: %w", err)
	}
	if _, ok := doc.(map[string]any); !ok {
		if _, isBool := doc.(bool); !isBool {
			return nil, errors.New("a schema must be an object or a boolean")
		}
	}
	// A compiler per schema: Compiler is not safe for concurrent use and
	// keeping schemas apart means one tool cannot $ref another's.
	c := jsonschema.NewCompiler()
	c.DefaultDraft(jsonschema.Draft2020)
	c.UseLoader(noLoader{})
	if err := c.AddResource(schemaURL, doc); err != nil {
		return nil, err
	}
	return c.Compile(schemaURL)
}

// parseArguments decodes a call's arguments, which must be a JSON object.
// Empty arguments mean {} (a call of a tool without parameters).
func parseArguments(raw string) (any, error) {
	if strings.TrimSpace(raw) == "" {
		return map[string]any{}, nil
	}
	v, err := jsonschema.UnmarshalJSON(strings.NewReader(raw))
	if err != nil {
		return nil, errors.New("arguments are not valid JSON")
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, errors.New("arguments must be a JSON object")
	}
	return v, nil
}

// schemaError renders a validation error on one line.
func schemaError(err error) string {
	var ve *jsonschema.ValidationError
	if errors.As(err, &ve) {
		return strings.Join(strings.Fields(fmt.Sprintf("%v", ve)), " ")
	}
	return err.Error()
}

package broker

import (
	"context"
	"errors"
	"fmt"

	dispatchv1 "github.com/agentdispatch/dispatcher/internal/gen/dispatch/v1"
)

// Local providers: tool executors inside the dispatcher's process that are
// not built-ins, e.g. the MCP servers of internal/mcp. Their tools pass the
// same checks as a provider's (name, JSON Schema, timeout, result size), and
// their calls run under the same context (a stop or the tool's timeout ends
// them); only the transport differs.

// LocalFunc runs one call of a local provider's tool. The arguments passed
// the tool's schema. It returns the result JSON, or an error: ctx's error,
// Failure for a specific code, any other error as EXECUTION_FAILED.
type LocalFunc func(ctx context.Context, c Call) (string, error)

// Failure is an error a LocalFunc returns to fail a call with code (e.g.
// PROVIDER_UNAVAILABLE while its server restarts).
func Failure(code dispatchv1.ToolErrorCode, msg string) error {
	return &toolError{code: code, msg: msg}
}

type localProvider struct {
	id  string
	run LocalFunc
}

// SetLocalTools publishes the tools of the local provider id, replacing the
// ones it had; run executes their calls. A spec that is invalid, or whose
// name another executor serves, is left out and reported in the error; the
// others are published. It returns the names published. Empty specs remove
// the provider's tools.
func (b *Broker) SetLocalTools(id string, specs []*dispatchv1.ToolSpec, run LocalFunc) ([]string, error) {
	if id == "" || id == ExecutorBuiltin {
		return nil, fmt.Errorf("%w: local provider id %q", ErrProtocol, id)
	}
	lp := &localProvider{id: id, run: run}
	var errs []error
	compiled := make([]*tool, 0, len(specs))
	for _, spec := range specs {
		t, err := b.compileTool(spec)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		t.local = lp
		compiled = append(compiled, t)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for name, t := range b.tools {
		if t.local != nil && t.local.id == id {
			delete(b.tools, name)
		}
	}
	names := make([]string, 0, len(compiled))
	for _, t := range compiled {
		name := t.spec.GetName()
		if old, ok := b.tools[name]; ok {
			errs = append(errs, fmt.Errorf("%w: tool %q is served by %s", ErrToolExists, name, old.executor()))
			continue
		}
		b.tools[name] = t
		names = append(names, name)
	}
	b.rebuildLocked()
	return names, errors.Join(errs...)
}

// RemoveLocal removes the tools of the local provider id.
func (b *Broker) RemoveLocal(id string) {
	_, _ = b.SetLocalTools(id, nil, nil)
}

// executor names who serves t.
func (t *tool) executor() string {
	switch {
	case t.provider != nil:
		return t.provider.id
	case t.local != nil:
		return t.local.id
	}
	return ExecutorBuiltin
}

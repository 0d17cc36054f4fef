package fleet

import (
	"bytes"
	"context"
	"encoding/json"
)

// SetResults stores the results of several commands (ids[i] gets rs[i])
// in one statement: the owner books the cancels a storm announced at
// once with one commit, not one each (cmdBookLoop).
func (l *Leases) SetResults(ctx context.Context, ids []int64, rs []cmdResult) error {
	docs := make([]string, len(rs))
	for i, r := range rs {
		docs[i] = string(jsonbDoc(r))
	}
	_, err := l.pool.Exec(ctx, `UPDATE fleet_commands c SET result = v.r::jsonb
		FROM unnest($1::bigint[], $2::text[]) AS v(id, r) WHERE c.id = v.id`, ids, docs)
	return err
}

// jsonbDoc is v as JSON that PostgreSQL's jsonb takes: a NUL character in
// a string (JSON "\u0000", which jsonb refuses with SQLSTATE 22P05 and so
// failed the command's row, or every row of its batch) is stored as
// U+FFFD. A reason or an error message keeps the rest of its text.
func jsonbDoc(v any) []byte {
	b, _ := json.Marshal(v)
	if !bytes.Contains(b, []byte(`\u0000`)) {
		return b
	}
	out := make([]byte, 0, len(b))
	for i := 0; i < len(b); i++ {
		if b[i] != '\\' || i+1 >= len(b) {
			out = append(out, b[i])
			continue
		}
		// An escape: copied whole, so an escaped backslash followed by
		// "u0000" (the text \u0000) is left alone.
		if bytes.HasPrefix(b[i:], []byte(`\u0000`)) {
			out = append(out, `\ufffd`...)
			i += len(`\u0000`) - 1
			continue
		}
		out = append(out, b[i], b[i+1])
		i++
	}
	return out
}

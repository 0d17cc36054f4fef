package fleet

import (
	"context"
	"encoding/json"
)

// SetResults stores the results of several commands (ids[i] gets rs[i])
// in one statement: the owner books the cancels a storm announced at
// once with one commit, not one each (cmdBookLoop).
func (l *Leases) SetResults(ctx context.Context, ids []int64, rs []cmdResult) error {
	docs := make([]string, len(rs))
	for i, r := range rs {
		b, _ := json.Marshal(r)
		docs[i] = string(b)
	}
	_, err := l.pool.Exec(ctx, `UPDATE fleet_commands c SET result = v.r::jsonb
		FROM unnest($1::bigint[], $2::text[]) AS v(id, r) WHERE c.id = v.id`, ids, docs)
	return err
}

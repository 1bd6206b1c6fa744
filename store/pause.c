#include <stdio.h>

#include "store/store_int.h"

/*
 * Pausing the fleet: rows of fleet_pause (schema version 5), which every
 * worker's due query reads.  Written by `billing-worker pause` and
 * `resume`, never by the daemon.
 */

static const char sql_pause[] =
    "INSERT INTO fleet_pause (kind, reason, paused_by) VALUES ($1, $2, $3) "
    "ON CONFLICT (kind) DO UPDATE SET reason = EXCLUDED.reason, "
    "paused_by = EXCLUDED.paused_by RETURNING (xmax = 0)";

static const char sql_resume[] = "DELETE FROM fleet_pause WHERE kind = $1";

static const struct store_stmt stmt_pause = {
	.send = STORE_PARAMS, .text = sql_pause, .what = "could not pause",
	.want = PGRES_TUPLES_OK,
};
static const struct store_stmt stmt_resume = {
	.send = STORE_PARAMS, .text = sql_resume, .what = "could not resume",
	.want = PGRES_COMMAND_OK,
};

int
store_set_pause(store *st, const bool kinds[ITEM_KIND_COUNT], bool pause,
    const char *reason, const char *by, int *ret_changed)
{
	PGresult *res = NULL;
	int changed = 0, ret = -1;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		const char *params[3] = { item_kind_name(k), reason, by };

		if (!kinds[k])
			continue;
		if (store_run(st, pause ? &stmt_pause : &stmt_resume, pause ? 3 : 1, params,
		    &res) == -1)
			goto out;
		/* A new pause inserts (xmax 0); a resume deletes one row. */
		if (pause ? PQgetvalue(res, 0, 0)[0] == 't' : PQcmdTuples(res)[0] == '1')
			changed++;
		PQclear(res);
		res = NULL;
	}
	*ret_changed = changed;
	ret = 0;
out:
	PQclear(res);
	return ret;
}

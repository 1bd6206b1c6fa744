#include <stdio.h>

#include "store/store_int.h"

/*
 * The fleet's record of workers the billing API refuses (worker_status,
 * schema version 4), so `status` run on any host can name them.  Written
 * only when a worker's state changes and at each of its probes: a few
 * statements a minute at most, never per item.
 */

static const char sql_blocked[] =
    "INSERT INTO worker_status (worker_id, api_blocked_since, api_blocked_reason, updated_at) "
    "VALUES ($1, now(), $2, now()) ON CONFLICT (worker_id) DO UPDATE "
    "SET api_blocked_reason = EXCLUDED.api_blocked_reason, updated_at = now()";

static const char sql_unblocked[] = "DELETE FROM worker_status WHERE worker_id = $1";

int
store_set_api_blocked(store *st, const char *worker_id, const char *reason)
{
	const char *params[2] = { worker_id, reason };
	PGresult *res;
	int ret = -1;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	res = store_exec_params_bounded(store_conn(st), store_client_deadline_ms(st),
	    reason != NULL ? sql_blocked : sql_unblocked, reason != NULL ? 2 : 1, params);
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		store_set_error(st, "could not record the worker's state", res);
		goto out;
	}
	ret = 0;
out:
	PQclear(res);
	return ret;
}

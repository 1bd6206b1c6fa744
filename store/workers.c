#include <stdio.h>

#include "store/store_int.h"

/*
 * The fleet's registry (workers, schema version 4): one row per running
 * worker, written at start, every few seconds and when the billing API
 * starts or stops refusing it, so `status` on any host can list the live
 * workers and name the refused ones.  A few statements a minute per worker,
 * never per item.
 */

static const char sql_seen[] =
    "INSERT INTO workers (worker_id, host, version, lock_mode, api_blocked_since, "
    " api_blocked_reason) VALUES ($1, $2, $3, $4, CASE WHEN $5::text IS NULL THEN NULL "
    " ELSE now() END, $5) "
    "ON CONFLICT (worker_id) DO UPDATE SET host = EXCLUDED.host, version = EXCLUDED.version, "
    " lock_mode = EXCLUDED.lock_mode, seen_at = now(), "
    " api_blocked_since = CASE WHEN $5 IS NULL THEN NULL "
    "  ELSE coalesce(workers.api_blocked_since, now()) END, "
    " api_blocked_reason = $5";

static const char sql_gone[] = "DELETE FROM workers WHERE worker_id = $1";

static int
run(store *st, const char *sql, int n, const char *const *params)
{
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql, .what = "could not update the worker registry",
		.want = PGRES_COMMAND_OK,
	};

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	return store_run(st, &stmt, n, params, NULL);
}

int
store_worker_seen(store *st, const struct worker_info *wi, const char *refused)
{
	const char *params[5] = { wi->id, wi->host, wi->version, wi->lock_mode, refused };

	return run(st, sql_seen, 5, params);
}

int
store_worker_gone(store *st, const char *worker_id)
{
	const char *params[1] = { worker_id };

	return run(st, sql_gone, 1, params);
}

#include <stdio.h>
#include <stdlib.h>

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

/*
 * The daemon's heartbeat, asynchronous (store_set_pipeline): its
 * parameters copied, kept for a retry; its answer read at the next one.
 */
struct seen_op {
	struct store_op op;
	char value[5][600];
	const char *params[5];
};

static const struct store_stmt seen_stmt = {
	.send = STORE_PARAMS, .text = sql_seen, .what = "could not update the worker registry",
	.want = PGRES_COMMAND_OK,
};

/* The last heartbeat's answer, if it is in: -1 when it failed. */
static int
seen_answer(store *st)
{
	int r;

	if (st->seen == NULL || !store_op_active(&st->seen->op))
		return 0;
	if ((r = store_op_poll(st, &st->seen->op)) == 1)
		store_op_clear(&st->seen->op);
	return r == -1 ? -1 : 0;
}

static int
seen_send(store *st, const struct worker_info *wi, const char *refused)
{
	const char *const in[5] = { wi->id, wi->host, wi->version, wi->lock_mode, refused };
	const struct store_stmt *stmts[1] = { &seen_stmt };
	const char *const *params[1];
	int nparams[1] = { 5 };
	struct seen_op *o = st->seen;

	if (o == NULL && (o = st->seen = calloc(1, sizeof(*o))) == NULL) {
		store_errorf(st, "out of memory");
		return -1;
	}
	/*
	 * The last one still unanswered (a refusal right after a beat, or a
	 * database slower than the beat): waited for, within its deadline, so
	 * no change of the row is lost.
	 */
	if (store_op_active(&o->op))
		pq_wait(st->engine, &o->op.job);
	if (seen_answer(st) == -1)
		return -1;          /* the last one's failure; this one waits for the next beat */
	for (int i = 0; i < 5; i++) {
		snprintf(o->value[i], sizeof(o->value[i]), "%s", in[i] != NULL ? in[i] : "");
		o->params[i] = in[i] != NULL ? o->value[i] : NULL;
	}
	params[0] = o->params;
	return store_op_send(st, &o->op, stmts, 1, nparams, params);
}

int
store_worker_seen(store *st, const struct worker_info *wi, const char *refused)
{
	const char *params[5] = { wi->id, wi->host, wi->version, wi->lock_mode, refused };

	if (st->pipeline && st->conn == NULL)
		return seen_send(st, wi, refused);
	return run(st, sql_seen, 5, params);
}

void
store_workers_free(store *st)
{
	if (st->seen == NULL)
		return;
	store_op_clear(&st->seen->op);
	free(st->seen);
	st->seen = NULL;
}

int
store_worker_gone(store *st, const char *worker_id)
{
	const char *params[1] = { worker_id };

	return run(st, sql_gone, 1, params);
}

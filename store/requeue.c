#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * billing-worker requeue: putting failed items back for a new charge
 * attempt (schema version 6).  Only a failed item qualifies: the contract
 * promises it has no successful result at the API under its key, so a new
 * attempt cannot be a second charge.  A paid one was charged, and a pending
 * one is still being worked on (a call of it may be in flight): both are
 * refused.
 *
 * The new attempt is a new generation, with a key of its own (item_key):
 * the old key holds the API's stored refusal, which it would replay.  The
 * same statement bumps the fence, so a completion of the old generation
 * still queued in some worker's memory matches no row, and appends to
 * requeues who did it and why.  Run by an operator, never by the daemon:
 * plain parameterized statements, one transaction, nothing prepared.
 */

static const char *const table_of[ITEM_KIND_COUNT] = { "invoices", "redemptions" };
static const char *const result_column[ITEM_KIND_COUNT] = { "charge_id", "fulfillment_id" };

/*
 * The failed items chosen: by id ($1), or by when they failed ($2) and
 * what their last error says ($3, a POSIX regular expression), newest
 * first.  A NULL parameter selects everything on its axis.
 */
#define REQUEUE_WHERE                                                          \
	"status = 'failed' AND ($1::bigint[] IS NULL OR id = ANY ($1)) "       \
	"AND ($2::timestamptz IS NULL OR finished_at >= $2) "                  \
	"AND ($3::text IS NULL OR coalesce(last_error, '') ~ $3) "

#define REQUEUE_COLUMNS                                                        \
	"coalesce(to_char(finished_at, 'YYYY-MM-DD HH24:MI:SSOF'), 'never'), " \
	"coalesce(last_error, '') "

static const char sql_preview[] =
    "SELECT id, generation + 1, " REQUEUE_COLUMNS "FROM %1$s WHERE " REQUEUE_WHERE
    "ORDER BY finished_at DESC NULLS LAST, id DESC";

/*
 * Everything a fresh row has, as a producer's INSERT would leave it, but
 * the fence (bumped, never reset: fences only grow) and the generation.
 * lease_until is cleared too, or the first claim of the new generation
 * would take it for a holder that died mid-call and mark it ambiguous.
 */
static const char sql_requeue[] =
    "WITH old AS (SELECT id, finished_at, last_error FROM %1$s WHERE " REQUEUE_WHERE
    "  FOR UPDATE), "
    "upd AS (UPDATE %1$s AS t SET status = 'pending', generation = t.generation + 1, "
    "  fence = t.fence + 1, attempts = 0, blocked_calls = 0, ambiguous = false, "
    "  last_error = NULL, needs_operator = NULL, %2$s = NULL, next_attempt_at = now(), "
    "  first_claimed_at = NULL, locked_by = NULL, lease_until = NULL, updated_at = now(), "
    "  finished_at = NULL "
    "  FROM old WHERE t.id = old.id AND t.status = 'failed' "
    "  RETURNING t.id, t.generation, old.finished_at, old.last_error), "
    "log AS (INSERT INTO requeues (kind, item_id, from_generation, reason, requeued_by) "
    "  SELECT $4, id, generation - 1, $5, $6 FROM upd) "
    "SELECT id, generation, " REQUEUE_COLUMNS "FROM upd "
    "ORDER BY finished_at DESC NULLS LAST, id DESC";

/* The items named by id, locked so that what is checked is what is changed. */
static const char sql_named[] =
    "SELECT id, status FROM %1$s WHERE id = ANY ($1::bigint[]) ORDER BY id FOR UPDATE";

/* Workers poll at once instead of at their next poll_interval_ms. */
static const char sql_notify[] = "SELECT pg_notify('billing_worker', 'requeue')";

static int
id_cmp(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;

	return x < y ? -1 : x > y;
}

/* Whether the statement ran; errmsg set when not.  RES is the caller's on success. */
static int
run(store *st, const char *sql, int nparams, const char *const *params,
    ExecStatusType want, PGresult **ret)
{
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql, .what = "could not requeue", .want = want,
	};

	return store_run(st, &stmt, nparams, params, ret);
}

/* The ids as an array literal, sorted and without duplicates; NULL without memory. */
static char *
ids_literal(const int64_t *ids, size_t n, int64_t **ret_sorted, size_t *ret_n)
{
	int64_t *sorted = NULL;
	char *lit = NULL;
	size_t m = 0, len = 0;

	if ((sorted = malloc(n * sizeof(*sorted))) == NULL ||
	    (lit = malloc(n * 22 + 3)) == NULL)
		goto fail;
	memcpy(sorted, ids, n * sizeof(*sorted));
	qsort(sorted, n, sizeof(*sorted), id_cmp);
	lit[len++] = '{';
	for (size_t i = 0; i < n; i++) {
		if (m > 0 && sorted[m - 1] == sorted[i])
			continue;
		sorted[m] = sorted[i];
		len += (size_t)sprintf(lit + len, "%s%" PRId64, m > 0 ? "," : "", sorted[m]);
		m++;
	}
	lit[len++] = '}';
	lit[len] = '\0';
	*ret_sorted = sorted;
	*ret_n = m;
	return lit;
fail:
	free(sorted);
	free(lit);
	return NULL;
}

/*
 * Prints to ERR why each named item that is not failed stays as it is;
 * returns how many.  NAMED is sql_named's answer, IDS the sorted ids.
 */
static int
report_refusals(const PGresult *named, enum item_kind kind, const int64_t *ids, size_t n,
    FILE *err)
{
	const char *what = item_kind_name(kind);
	int row = 0, rows = PQntuples(named), refused = 0;

	for (size_t i = 0; i < n; i++) {
		const char *status;

		while (row < rows && strtoll(PQgetvalue(named, row, 0), NULL, 10) < ids[i])
			row++;
		if (row == rows || strtoll(PQgetvalue(named, row, 0), NULL, 10) != ids[i]) {
			fprintf(err, "billing-worker: %s %" PRId64 " does not exist\n", what, ids[i]);
			refused++;
			continue;
		}
		status = PQgetvalue(named, row, 1);
		if (strcmp(status, "failed") == 0)
			continue;
		fprintf(err, "billing-worker: %s %" PRId64 " is %s, not failed: only a failed item "
		    "may be requeued (%s)\n", what, ids[i], status, strcmp(status, "pending") == 0 ?
		    "a pending one is still being worked on, and a call of it may be in flight" :
		    "it was charged: a new attempt would charge it again");
		refused++;
	}
	return refused;
}

int
store_requeue(store *st, const struct requeue_selection *sel, const char *reason,
    const char *by, bool dry_run, FILE *out, FILE *err, int *ret_requeued, int *ret_refused)
{
	char sql[2048], *ids = NULL;
	int64_t *sorted = NULL;
	size_t nsorted = 0;
	const char *params[6] = { NULL, sel->since, sel->error_pattern,
	    item_kind_name(sel->kind), reason, by };
	PGresult *res = NULL;
	struct item key_of;
	bool in_tx = false;
	int refused = 0, ret = -1;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	if (sel->ids != NULL) {
		if ((ids = ids_literal(sel->ids, sel->nids, &sorted, &nsorted)) == NULL) {
			store_errorf(st, "out of memory");
			return -1;
		}
		params[0] = ids;
	}
	if (run(st, "BEGIN", 0, NULL, PGRES_COMMAND_OK, NULL) == -1)
		goto out;
	in_tx = true;
	/* All or nothing: one item named that may not be requeued stops them all. */
	if (sel->ids != NULL) {
		snprintf(sql, sizeof(sql), sql_named, table_of[sel->kind]);
		if (run(st, sql, 1, params, PGRES_TUPLES_OK, &res) == -1)
			goto out;
		refused = report_refusals(res, sel->kind, sorted, nsorted, err);
		PQclear(res);
		res = NULL;
		if (refused > 0) {
			*ret_requeued = 0;
			*ret_refused = refused;
			ret = 0;
			goto out;
		}
	}
	if (dry_run)
		snprintf(sql, sizeof(sql), sql_preview, table_of[sel->kind]);
	else
		snprintf(sql, sizeof(sql), sql_requeue, table_of[sel->kind],
		    result_column[sel->kind]);
	if (run(st, sql, dry_run ? 3 : 6, params, PGRES_TUPLES_OK, &res) == -1)
		goto out;
	memset(&key_of, 0, sizeof(key_of));
	key_of.kind = sel->kind;
	for (int r = 0; r < PQntuples(res); r++) {
		char key[ITEM_KEY_MAX];

		key_of.id = strtoll(PQgetvalue(res, r, 0), NULL, 10);
		key_of.generation = atoi(PQgetvalue(res, r, 1));
		item_key(&key_of, key, sizeof(key));
		fprintf(out, "%s %s %" PRId64 ": generation %d, key \"%s\" (failed %s: %s)\n",
		    dry_run ? "would requeue" : "requeued", item_kind_name(sel->kind), key_of.id,
		    key_of.generation, key, PQgetvalue(res, r, 2), PQgetvalue(res, r, 3));
	}
	*ret_requeued = PQntuples(res);
	*ret_refused = 0;
	if (!dry_run && PQntuples(res) > 0 &&
	    run(st, sql_notify, 0, NULL, PGRES_TUPLES_OK, NULL) == -1)
		goto out;
	if (!dry_run && run(st, "COMMIT", 0, NULL, PGRES_COMMAND_OK, NULL) == -1)
		goto out;
	in_tx = dry_run;
	ret = 0;
out:
	/* A dry run, a refusal and a failure all leave the database as it was. */
	if (in_tx)
		store_run_cleanup(st, "ROLLBACK", false);
	PQclear(res);
	free(ids);
	free(sorted);
	return ret;
}

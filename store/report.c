#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "store/report.h"
#include "store/store_int.h"

/* The in-flight and overdue lists stop at this many rows. */
#define STATUS_LIST_MAX 100

/*
 * The status report: read-only queries an operator runs by hand, so they
 * are plain parameterized queries rather than prepared statements.  The
 * backlog query below runs inside the daemon's loop (a scrape of /metrics,
 * the systemd status line), so like every other statement it has the
 * client-side deadline: a frozen server must not stall the loop.
 */

/*
 * Counts by state.  Pending, in flight, retrying and failed are counted
 * exactly, through the partial indexes on pending and failed rows; they
 * are the few.  Finished rows grow without bound, and counting ten million
 * of them is a full scan on every call, so above STATUS_EXACT_MAX rows the
 * done column is the planner's estimate of the table's rows (pg_class's
 * reltuples per page times the pages now, as the planner scales it) less
 * the exact pending and failed counts, and the last column says so.
 * Below it (or never analyzed: reltuples -1) they are counted, but never
 * past STATUS_EXACT_MAX rows: statistics can be stale, and the LIMIT also
 * keeps the plan's cost low, where an unbounded count(*), even in a CASE
 * branch never taken, costs enough to have the query JIT-compiled (50 ms
 * at ten million rows).
 */
#define STATUS_EXACT_MAX "100000"

#define SQL_COUNTS(kind, table, done)                                              \
	"SELECT '" kind "', pending, in_flight, retrying, "                            \
	" CASE WHEN exact < " STATUS_EXACT_MAX " THEN exact "                          \
	"  ELSE greatest(n - pending - failed, exact, 0)::bigint END, "                 \
	" failed, oldest, exact IS NULL OR exact >= " STATUS_EXACT_MAX " "              \
	"FROM (SELECT p.*, f.failed, e.n, CASE WHEN e.n < " STATUS_EXACT_MAX " THEN "   \
	"   (SELECT count(*) FROM (SELECT 1 FROM " table " WHERE status = '" done "' "  \
	"    LIMIT " STATUS_EXACT_MAX ") d) END AS exact "                              \
	"FROM (SELECT count(*) AS pending, "                                            \
	"       count(*) FILTER (WHERE lease_until > now()) AS in_flight, "            \
	"       count(*) FILTER (WHERE attempts > 0 AND lease_until IS NULL) AS retrying, " \
	"       coalesce(extract(epoch FROM now() - min(created_at)), 0)::numeric(12,1) AS oldest " \
	"      FROM " table " WHERE status = 'pending') p, "                           \
	"     (SELECT count(*) AS failed FROM " table " WHERE status = 'failed') f, "   \
	"     (SELECT CASE WHEN c.reltuples < 0 THEN -1 WHEN c.relpages = 0 THEN c.reltuples " \
	"       ELSE c.reltuples / c.relpages * (pg_relation_size(c.oid) / "            \
	"        current_setting('block_size')::int) END AS n "                        \
	"      FROM pg_class c WHERE c.oid = '" table "'::regclass) e) s"

static const char sql_counts[] =
    SQL_COUNTS("invoices", "invoices", "paid")
    " UNION ALL "
    SQL_COUNTS("redemptions", "redemptions", "redeemed");

static const char sql_in_flight[] =
    "SELECT kind, id, locked_by, attempts, "
    " extract(epoch FROM lease_until - now())::numeric(12,1) "
    "FROM (SELECT 'invoice' AS kind, id, locked_by, attempts, lease_until FROM invoices "
    "       WHERE status = 'pending' AND lease_until > now() "
    "      UNION ALL "
    "      SELECT 'redemption', id, locked_by, attempts, lease_until FROM redemptions "
    "       WHERE status = 'pending' AND lease_until > now()) AS f "
    "ORDER BY locked_by, kind, id LIMIT 100";

/*
 * Overdue: an attempt may have charged, so the item is never given up, but
 * it has had more attempts than max_attempts.  These need a human.
 */
static const char sql_overdue[] =
    "SELECT kind, id, attempts, coalesce(last_error, '') "
    "FROM (SELECT 'invoice' AS kind, id, attempts, last_error FROM invoices "
    "       WHERE status = 'pending' AND ambiguous AND attempts >= $1 "
    "      UNION ALL "
    "      SELECT 'redemption', id, attempts, last_error FROM redemptions "
    "       WHERE status = 'pending' AND ambiguous AND attempts >= $1) AS o "
    "ORDER BY kind, id LIMIT 100";

/*
 * Items that wait for an operator (needs_operator, schema version 4): an
 * attempt may have taken effect and the last answer was not final, or the
 * idempotency key may have expired.  The worker never fails them.
 */
static const char sql_operator[] =
    "SELECT kind, id, attempts, "
    " coalesce(extract(epoch FROM now() - first_claimed_at), 0)::numeric(12,0), "
    " needs_operator, coalesce(last_error, '') "
    "FROM (SELECT 'invoice' AS kind, id, attempts, first_claimed_at, needs_operator, "
    "       last_error FROM invoices WHERE status = 'pending' AND needs_operator IS NOT NULL "
    "      UNION ALL "
    "      SELECT 'redemption', id, attempts, first_claimed_at, needs_operator, last_error "
    "       FROM redemptions WHERE status = 'pending' AND needs_operator IS NOT NULL) AS o "
    "ORDER BY kind, id LIMIT 100";

/* Kinds the fleet does not bill now (billing-worker pause). */
static const char sql_pauses[] =
    "SELECT kind, to_char(since, 'YYYY-MM-DD HH24:MI:SSOF'), paused_by, reason "
    "FROM fleet_pause ORDER BY kind";

/*
 * The fleet's registry: every worker that said it is alive, newest
 * heartbeat first; one not seen for a minute (heartbeats come every 10 s)
 * has most likely died without deleting its row.  Refused: the billing API
 * answers it 401, 403, 404 or 405.
 */
static const char sql_workers[] =
    "SELECT worker_id, host, version, lock_mode, "
    " extract(epoch FROM now() - seen_at)::numeric(12,0), "
    " to_char(started_at, 'YYYY-MM-DD HH24:MI:SSOF'), "
    " coalesce(to_char(api_blocked_since, 'YYYY-MM-DD HH24:MI:SSOF'), ''), "
    " coalesce(api_blocked_reason, ''), seen_at > now() - interval '60 seconds' "
    "FROM workers ORDER BY seen_at DESC, worker_id LIMIT 100";

/* The rows of SQL, or NULL with store_errmsg() set; the caller PQclear()s them. */
static PGresult *
query(store *st, const char *sql, int nparams, const char *const *params)
{
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql, .what = "status", .want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL;

	return store_run(st, &stmt, nparams, params, &res) == 0 ? res : NULL;
}

/* The three result sets of the report, fetched in one place for both formats. */
struct status_rows {
	PGresult *counts, *flight, *overdue, *operator, *workers, *pauses;
};

static void
status_rows_clear(struct status_rows *r)
{
	PQclear(r->counts);
	PQclear(r->flight);
	PQclear(r->overdue);
	PQclear(r->operator);
	PQclear(r->workers);
	PQclear(r->pauses);
	memset(r, 0, sizeof(*r));
}

static int
status_fetch(store *st, int max_attempts, struct status_rows *r)
{
	char maxa[16];
	const char *params[1] = { maxa };

	memset(r, 0, sizeof(*r));
	snprintf(maxa, sizeof(maxa), "%d", max_attempts);
	if ((r->counts = query(st, sql_counts, 0, NULL)) == NULL ||
	    (r->flight = query(st, sql_in_flight, 0, NULL)) == NULL ||
	    (r->overdue = query(st, sql_overdue, 1, params)) == NULL ||
	    (r->operator = query(st, sql_operator, 0, NULL)) == NULL ||
	    (r->workers = query(st, sql_workers, 0, NULL)) == NULL ||
	    (r->pauses = query(st, sql_pauses, 0, NULL)) == NULL) {
		status_rows_clear(r);
		return -1;
	}
	return 0;
}

int
store_status(store *st, FILE *out, int max_attempts)
{
	struct status_rows rows;
	PGresult *counts, *flight, *overdue;
	int estimates = 0;

	if (status_fetch(st, max_attempts, &rows) == -1)
		return -1;
	counts = rows.counts;
	flight = rows.flight;
	overdue = rows.overdue;

	for (int r = 0; r < PQntuples(rows.pauses); r++)
		fprintf(out, "PAUSED: %ss since %s by %s: %s\n", PQgetvalue(rows.pauses, r, 0),
		    PQgetvalue(rows.pauses, r, 1), PQgetvalue(rows.pauses, r, 2),
		    PQgetvalue(rows.pauses, r, 3));
	if (PQntuples(rows.pauses) > 0)
		fputc('\n', out);
	fprintf(out, "%-12s %9s %9s %9s %10s %9s %14s\n", "kind", "pending",
	    "in-flight", "retrying", "done", "failed", "oldest-pending");
	for (int r = 0; r < PQntuples(counts); r++) {
		bool estimated = PQgetvalue(counts, r, 7)[0] == 't';

		estimates += estimated;
		fprintf(out, "%-12s %9s %9s %9s %s%9s %9s %12ss\n",
		    PQgetvalue(counts, r, 0), PQgetvalue(counts, r, 1),
		    PQgetvalue(counts, r, 2), PQgetvalue(counts, r, 3),
		    estimated ? "~" : " ", PQgetvalue(counts, r, 4), PQgetvalue(counts, r, 5),
		    PQgetvalue(counts, r, 6));
	}
	if (estimates > 0)
		fprintf(out, "(~ estimated from the table's statistics: over " STATUS_EXACT_MAX
		    " rows, finished items are not counted one by one; the other columns are "
		    "exact)\n");

	fprintf(out, "\nin flight: %d%s\n", PQntuples(flight),
	    PQntuples(flight) == STATUS_LIST_MAX ? " (first 100)" : "");
	for (int r = 0; r < PQntuples(flight); r++)
		fprintf(out, "  %s %s  holder \"%s\"  attempts %s  lease %ss left\n",
		    PQgetvalue(flight, r, 0), PQgetvalue(flight, r, 1),
		    PQgetvalue(flight, r, 2), PQgetvalue(flight, r, 3),
		    PQgetvalue(flight, r, 4));

	fprintf(out, "\noverdue (an attempt may have taken effect; retried until the API "
	    "answers): %d\n", PQntuples(overdue));
	for (int r = 0; r < PQntuples(overdue); r++)
		fprintf(out, "  %s %s  attempts %s  last error: %s\n",
		    PQgetvalue(overdue, r, 0), PQgetvalue(overdue, r, 1),
		    PQgetvalue(overdue, r, 2), PQgetvalue(overdue, r, 3));

	fprintf(out, "\nneeds an operator (pending, never failed by the worker): %d%s\n",
	    PQntuples(rows.operator), PQntuples(rows.operator) == STATUS_LIST_MAX ?
	    " (first 100)" : "");
	for (int r = 0; r < PQntuples(rows.operator); r++)
		fprintf(out, "  %s %s  attempts %s  first claimed %ss ago\n    why: %s\n"
		    "    last answer: %s\n", PQgetvalue(rows.operator, r, 0),
		    PQgetvalue(rows.operator, r, 1), PQgetvalue(rows.operator, r, 2),
		    PQgetvalue(rows.operator, r, 3), PQgetvalue(rows.operator, r, 4),
		    PQgetvalue(rows.operator, r, 5));

	fprintf(out, "\nworkers: %d\n", PQntuples(rows.workers));
	for (int r = 0; r < PQntuples(rows.workers); r++)
		fprintf(out, "  \"%s\"  host %s  version %s  mode %s  seen %ss ago%s\n",
		    PQgetvalue(rows.workers, r, 0), PQgetvalue(rows.workers, r, 1),
		    PQgetvalue(rows.workers, r, 2), PQgetvalue(rows.workers, r, 3),
		    PQgetvalue(rows.workers, r, 4), PQgetvalue(rows.workers, r, 8)[0] == 't' ? "" :
		    " (stale: it may have died)");
	{
		int refused = 0;

		for (int r = 0; r < PQntuples(rows.workers); r++)
			refused += PQgetvalue(rows.workers, r, 6)[0] != '\0';
		fprintf(out, "\nworkers the billing API refuses (taking no new items): %d\n",
		    refused);
		for (int r = 0; r < PQntuples(rows.workers); r++)
			if (PQgetvalue(rows.workers, r, 6)[0] != '\0')
				fprintf(out, "  \"%s\"  since %s  last probe %ss ago: %s\n",
				    PQgetvalue(rows.workers, r, 0), PQgetvalue(rows.workers, r, 6),
				    PQgetvalue(rows.workers, r, 4), PQgetvalue(rows.workers, r, 7));
	}
	status_rows_clear(&rows);
	return 0;
}

/*
 * JSON values from result cells.  Text from the database is UTF-8 (the
 * schema's encoding); a value jansson still refuses becomes null rather
 * than failing the whole report.
 */
static json_t *
j_int(const PGresult *res, int row, int col)
{
	return json_integer(strtoll(PQgetvalue(res, row, col), NULL, 10));
}

static json_t *
j_real(const PGresult *res, int row, int col)
{
	return json_real(strtod(PQgetvalue(res, row, col), NULL));
}

static json_t *
j_str(const PGresult *res, int row, int col)
{
	json_t *v = json_string(PQgetvalue(res, row, col));

	return v != NULL ? v : json_null();
}

/* Builds the report document; NULL without memory. */
static json_t *
status_json(const struct status_rows *rows)
{
	json_t *kinds = json_array(), *flight = json_array(), *overdue = json_array();
	json_t *operator = json_array(), *workers = json_array(), *pauses = json_array();
	bool ok = kinds != NULL && flight != NULL && overdue != NULL && operator != NULL &&
	    workers != NULL && pauses != NULL;

	for (int r = 0; ok && r < PQntuples(rows->counts); r++) {
		const PGresult *c = rows->counts;

		ok = json_array_append_new(kinds, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:o, s:b}",
		    "kind", j_str(c, r, 0), "pending", j_int(c, r, 1), "in_flight", j_int(c, r, 2),
		    "retrying", j_int(c, r, 3), "done", j_int(c, r, 4), "failed", j_int(c, r, 5),
		    "oldest_pending_s", j_real(c, r, 6),
		    "done_estimated", PQgetvalue(c, r, 7)[0] == 't')) == 0;
	}
	for (int r = 0; ok && r < PQntuples(rows->flight); r++) {
		const PGresult *f = rows->flight;

		ok = json_array_append_new(flight, json_pack("{s:o, s:o, s:o, s:o, s:o}",
		    "kind", j_str(f, r, 0), "id", j_int(f, r, 1), "holder", j_str(f, r, 2),
		    "attempts", j_int(f, r, 3), "lease_left_s", j_real(f, r, 4))) == 0;
	}
	for (int r = 0; ok && r < PQntuples(rows->overdue); r++) {
		const PGresult *o = rows->overdue;

		ok = json_array_append_new(overdue, json_pack("{s:o, s:o, s:o, s:o}",
		    "kind", j_str(o, r, 0), "id", j_int(o, r, 1), "attempts", j_int(o, r, 2),
		    "last_error", j_str(o, r, 3))) == 0;
	}
	for (int r = 0; ok && r < PQntuples(rows->operator); r++) {
		const PGresult *o = rows->operator;

		ok = json_array_append_new(operator, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o}",
		    "kind", j_str(o, r, 0), "id", j_int(o, r, 1), "attempts", j_int(o, r, 2),
		    "first_claimed_s_ago", j_real(o, r, 3), "why", j_str(o, r, 4),
		    "last_error", j_str(o, r, 5))) == 0;
	}
	for (int r = 0; ok && r < PQntuples(rows->workers); r++) {
		const PGresult *w = rows->workers;
		bool refused = PQgetvalue(w, r, 6)[0] != '\0';

		ok = json_array_append_new(workers, json_pack("{s:o, s:o, s:o, s:o, s:o, s:o, s:b, "
		    "s:o, s:o}", "worker_id", j_str(w, r, 0), "host", j_str(w, r, 1),
		    "version", j_str(w, r, 2), "lock_mode", j_str(w, r, 3),
		    "seen_s_ago", j_real(w, r, 4), "started_at", j_str(w, r, 5),
		    "live", PQgetvalue(w, r, 8)[0] == 't',
		    "api_refused_since", refused ? j_str(w, r, 6) : json_null(),
		    "api_refused_reason", refused ? j_str(w, r, 7) : json_null())) == 0;
	}
	for (int r = 0; ok && r < PQntuples(rows->pauses); r++) {
		const PGresult *p = rows->pauses;

		ok = json_array_append_new(pauses, json_pack("{s:o, s:o, s:o, s:o}",
		    "kind", j_str(p, r, 0), "since", j_str(p, r, 1), "paused_by", j_str(p, r, 2),
		    "reason", j_str(p, r, 3))) == 0;
	}
	if (!ok) {
		json_decref(kinds);
		json_decref(flight);
		json_decref(overdue);
		json_decref(operator);
		json_decref(workers);
		json_decref(pauses);
		return NULL;
	}
	/* json_pack takes the arrays over, on failure too. */
	return json_pack("{s:s, s:o, s:o, s:o, s:b, s:o, s:b, s:o, s:o}", "version", BW_VERSION,
	    "paused", pauses, "kinds", kinds,
	    "in_flight", flight, "in_flight_truncated", PQntuples(rows->flight) == STATUS_LIST_MAX,
	    "overdue", overdue, "overdue_truncated", PQntuples(rows->overdue) == STATUS_LIST_MAX,
	    "needs_operator", operator, "workers", workers);
}

int
store_status_json(store *st, FILE *out, int max_attempts)
{
	struct status_rows rows;
	json_t *doc;
	int ret = -1;

	if (status_fetch(st, max_attempts, &rows) == -1)
		return -1;
	if ((doc = status_json(&rows)) == NULL)
		store_errorf(st, "status: out of memory");
	else if (json_dumpf(doc, out, JSON_INDENT(2) | JSON_PRESERVE_ORDER) == -1 ||
	    fputc('\n', out) == EOF)
		store_errorf(st, "status: could not write the report");
	else
		ret = 0;
	json_decref(doc);
	status_rows_clear(&rows);
	return ret;
}

/* A failed group lists the ids of this many of its newest items. */
#define FAILED_IDS_MAX 20

/*
 * Failed items by kind and reason, the group with the newest failure
 * first.  Served by the partial indexes on failed rows (schema version 6).
 */
static const char sql_failed[] =
    "SELECT kind, reason, n, "
    " coalesce(to_char(newest, 'YYYY-MM-DD HH24:MI:SSOF'), ''), "
    " coalesce(to_char(oldest, 'YYYY-MM-DD HH24:MI:SSOF'), ''), "
    " array_to_string(ids[1:$1], ', '), to_json(ids[1:$1])::text "
    "FROM (SELECT 'invoice' AS kind, coalesce(last_error, '') AS reason, count(*) AS n, "
    "       max(finished_at) AS newest, min(finished_at) AS oldest, "
    "       array_agg(id ORDER BY finished_at DESC NULLS LAST, id DESC) AS ids "
    "       FROM invoices WHERE status = 'failed' GROUP BY 2 "
    "      UNION ALL "
    "      SELECT 'redemption', coalesce(last_error, ''), count(*), max(finished_at), "
    "       min(finished_at), array_agg(id ORDER BY finished_at DESC NULLS LAST, id DESC) "
    "       FROM redemptions WHERE status = 'failed' GROUP BY 2) AS g "
    "ORDER BY newest DESC NULLS LAST, kind, reason LIMIT 100";

static void
status_failed_text(const PGresult *res, FILE *out)
{
	int64_t items = 0;
	int groups = PQntuples(res);

	for (int r = 0; r < groups; r++)
		items += strtoll(PQgetvalue(res, r, 2), NULL, 10);
	fprintf(out, "failed items by reason, newest first: %" PRId64 " item%s, %d reason%s%s\n",
	    items, items == 1 ? "" : "s", groups, groups == 1 ? "" : "s",
	    groups == STATUS_LIST_MAX ? " (first 100)" : "");
	for (int r = 0; r < groups; r++) {
		int64_t n = strtoll(PQgetvalue(res, r, 2), NULL, 10);

		fprintf(out, "\n  %s: %" PRId64 " failed, newest %s, oldest %s\n"
		    "    reason: %s\n    ids: %s%s\n", PQgetvalue(res, r, 0), n,
		    PQgetvalue(res, r, 3), PQgetvalue(res, r, 4),
		    PQgetvalue(res, r, 1)[0] != '\0' ? PQgetvalue(res, r, 1) : "(none recorded)",
		    PQgetvalue(res, r, 5), n > FAILED_IDS_MAX ? ", ..." : "");
	}
}

/* The report as a JSON document; NULL without memory. */
static json_t *
status_failed_json(const PGresult *res)
{
	json_t *groups = json_array();
	int64_t items = 0;
	bool ok = groups != NULL;

	for (int r = 0; ok && r < PQntuples(res); r++) {
		json_t *ids = json_loads(PQgetvalue(res, r, 6), 0, NULL);
		int64_t n = strtoll(PQgetvalue(res, r, 2), NULL, 10);

		items += n;
		ok = ids != NULL && json_array_append_new(groups, json_pack(
		    "{s:o, s:o, s:o, s:o, s:o, s:o, s:b}", "kind", j_str(res, r, 0),
		    "reason", j_str(res, r, 1), "count", j_int(res, r, 2), "newest", j_str(res, r, 3),
		    "oldest", j_str(res, r, 4), "ids", ids, "ids_truncated", n > FAILED_IDS_MAX)) == 0;
	}
	if (!ok) {
		json_decref(groups);
		return NULL;
	}
	return json_pack("{s:I, s:o, s:b}", "failed_items", (json_int_t)items, "failed", groups,
	    "failed_truncated", PQntuples(res) == STATUS_LIST_MAX);
}

int
store_status_failed(store *st, FILE *out, bool json)
{
	char max_ids[16];
	const char *params[1] = { max_ids };
	json_t *doc = NULL;
	PGresult *res;
	int ret = -1;

	snprintf(max_ids, sizeof(max_ids), "%d", FAILED_IDS_MAX);
	if ((res = query(st, sql_failed, 1, params)) == NULL)
		return -1;
	if (!json) {
		status_failed_text(res, out);
		ret = 0;
	} else if ((doc = status_failed_json(res)) == NULL) {
		store_errorf(st, "status: out of memory");
	} else if (json_dumpf(doc, out, JSON_INDENT(2) | JSON_PRESERVE_ORDER) == -1 ||
	    fputc('\n', out) == EOF) {
		store_errorf(st, "status: could not write the report");
	} else {
		ret = 0;
	}
	json_decref(doc);
	PQclear(res);
	return ret;
}

/*
 * The due count reads the index of the pending rows no lease holds, by
 * time (schema version 12), and stops at the cap; the predicate is written
 * as the index's, so the planner matches it.  A claimed row is left out
 * because it is leased, not because its next_attempt_at moved to the
 * lease's end: so a claim writes no entry there.  The oldest pending row
 * is the first entry of the pending rows' created_at index (schema version
 * 9), whatever the table's size.
 */
const char store_sql_backlog[] =
    "SELECT 0, (SELECT count(*) FROM (SELECT 1 FROM invoices WHERE status = 'pending' "
    "  AND lease_until IS NULL AND next_attempt_at <= now() LIMIT $1) d), "
    " coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM invoices "
    "  WHERE status = 'pending')), 0)::float8 "
    "UNION ALL "
    "SELECT 1, (SELECT count(*) FROM (SELECT 1 FROM redemptions WHERE status = 'pending' "
    "  AND lease_until IS NULL AND next_attempt_at <= now() LIMIT $1) d), "
    " coalesce(extract(epoch FROM now() - (SELECT min(created_at) FROM redemptions "
    "  WHERE status = 'pending')), 0)::float8";

void
store_backlog_read(const PGresult *res, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT])
{
	_Static_assert(ITEM_INVOICE == 0 && ITEM_REDEMPTION == 1, "kinds are numbered in the SQL");
	for (int r = 0; r < PQntuples(res); r++) {
		int k = atoi(PQgetvalue(res, r, 0));

		if (k < 0 || k >= ITEM_KIND_COUNT)
			continue;
		due[k] = strtoll(PQgetvalue(res, r, 1), NULL, 10);
		oldest_pending_s[k] = strtod(PQgetvalue(res, r, 2), NULL);
	}
}

int
store_backlog(store *st, int64_t due[ITEM_KIND_COUNT], double oldest_pending_s[ITEM_KIND_COUNT])
{
	char cap[16];
	const char *params[1] = { cap };
	PGresult *res;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	snprintf(cap, sizeof(cap), "%d", STORE_BACKLOG_CAP);
	if ((res = query(st, store_sql_backlog, 1, params)) == NULL)
		return -1;
	store_backlog_read(res, due, oldest_pending_s);
	PQclear(res);
	return 0;
}

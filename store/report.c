#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * The status report: read-only queries an operator runs by hand, so they
 * are plain parameterized queries rather than prepared statements.
 */

static const char sql_counts[] =
    "SELECT 'invoices' AS kind, "
    " count(*) FILTER (WHERE status = 'pending'), "
    " count(*) FILTER (WHERE status = 'pending' AND lease_until > now()), "
    " count(*) FILTER (WHERE status = 'pending' AND attempts > 0 AND lease_until IS NULL), "
    " count(*) FILTER (WHERE status = 'paid'), "
    " count(*) FILTER (WHERE status = 'failed'), "
    " coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::numeric(12,1) "
    "FROM invoices "
    "UNION ALL "
    "SELECT 'redemptions', "
    " count(*) FILTER (WHERE status = 'pending'), "
    " count(*) FILTER (WHERE status = 'pending' AND lease_until > now()), "
    " count(*) FILTER (WHERE status = 'pending' AND attempts > 0 AND lease_until IS NULL), "
    " count(*) FILTER (WHERE status = 'redeemed'), "
    " count(*) FILTER (WHERE status = 'failed'), "
    " coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE status = 'pending')), 0)::numeric(12,1) "
    "FROM redemptions";

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

static PGresult *
query(store *st, const char *sql, int nparams, const char *const *params)
{
	PGresult *res = PQexecParams(store_conn(st), sql, nparams, NULL, params,
	    NULL, NULL, 0);

	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		store_set_error(st, "status", res);
		PQclear(res);
		return NULL;
	}
	return res;
}

int
store_status(store *st, FILE *out, int max_attempts)
{
	PGresult *counts = NULL, *flight = NULL, *overdue = NULL;
	char maxa[16];
	const char *params[1] = { maxa };
	int ret = -1;

	snprintf(maxa, sizeof(maxa), "%d", max_attempts);
	if ((counts = query(st, sql_counts, 0, NULL)) == NULL ||
	    (flight = query(st, sql_in_flight, 0, NULL)) == NULL ||
	    (overdue = query(st, sql_overdue, 1, params)) == NULL)
		goto out;

	fprintf(out, "%-12s %9s %9s %9s %9s %9s %14s\n", "kind", "pending",
	    "in-flight", "retrying", "done", "failed", "oldest-pending");
	for (int r = 0; r < PQntuples(counts); r++)
		fprintf(out, "%-12s %9s %9s %9s %9s %9s %12ss\n",
		    PQgetvalue(counts, r, 0), PQgetvalue(counts, r, 1),
		    PQgetvalue(counts, r, 2), PQgetvalue(counts, r, 3),
		    PQgetvalue(counts, r, 4), PQgetvalue(counts, r, 5),
		    PQgetvalue(counts, r, 6));

	fprintf(out, "\nin flight: %d%s\n", PQntuples(flight),
	    PQntuples(flight) == 100 ? " (first 100)" : "");
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
	ret = 0;
out:
	PQclear(counts);
	PQclear(flight);
	PQclear(overdue);
	return ret;
}

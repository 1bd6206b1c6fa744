#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "store/store_int.h"

/*
 * The attempts history (schema version 7): its retention and
 * `billing-worker show`.  The history itself is written by the completion
 * statement (complete.c), never here.
 */

/*
 * Old rows through the BRIN index on finished_at, the oldest ids first, and
 * only of items that are finished: a pending item keeps its whole history,
 * however old.
 */
static const char sql_prune[] =
    "DELETE FROM attempts WHERE ctid = ANY (ARRAY("
    " SELECT a.ctid FROM attempts a"
    " WHERE a.finished_at < now() - $1::int * interval '1 day'"
    " AND NOT EXISTS (SELECT 1 FROM invoices i WHERE a.kind = 'invoice'"
    "   AND i.id = a.item_id AND i.status = 'pending')"
    " AND NOT EXISTS (SELECT 1 FROM redemptions r WHERE a.kind = 'redemption'"
    "   AND r.id = a.item_id AND r.status = 'pending')"
    " ORDER BY a.id LIMIT $2::int))";

int
store_prune_history(store *st, int days, int limit, int *ret_n)
{
	char d[16], lim[16];
	const char *params[2] = { d, lim };
	static const struct store_stmt prune = {
		.send = STORE_PARAMS, .text = sql_prune, .what = "could not prune the history",
		.want = PGRES_COMMAND_OK, .custom_plan = true,
	};
	PGresult *res = NULL;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	snprintf(d, sizeof(d), "%d", days);
	snprintf(lim, sizeof(lim), "%d", limit);
	if (store_run(st, &prune, 2, params, &res) == -1)
		return -1;
	*ret_n = atoi(PQcmdTuples(res));
	PQclear(res);
	return 0;
}

/* The item's row, every column, as text; %1$s is the table. */
static const char sql_item[] =
    "SELECT * FROM %s WHERE id = $1::bigint";

static const char sql_ledger[] =
    "SELECT id, kind, amount_cents, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS.MSOF') "
    "FROM ledger_transactions WHERE redemption_id = $1::bigint ORDER BY id";

static const char sql_history[] =
    "SELECT generation || '.' || attempt, worker_id, to_char(started_at, 'YYYY-MM-DD HH24:MI:SS.MSOF'), "
    " round(extract(epoch FROM finished_at - started_at) * 1000)::bigint, "
    " coalesce(http_status::text, ''), class, coalesce(result_id, ''), coalesce(error, '') "
    "FROM attempts WHERE kind = $1 AND item_id = $2::bigint ORDER BY id";

/* The rows of SQL, or NULL with store_errmsg() set; the caller PQclear()s them. */
static PGresult *
fetch(store *st, const char *sql, int n, const char *const *params)
{
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql, .what = "show", .want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL;

	return store_run(st, &stmt, n, params, &res) == 0 ? res : NULL;
}

static const char *const history_cols[] = {
	"attempt", "worker_id", "started_at", "took_ms", "http_status", "class", "result_id",
	"error",
};

static void
show_text(FILE *out, const char *kind, const PGresult *item, const PGresult *ledger,
    const PGresult *hist)
{
	fprintf(out, "%s %s\n", kind, PQgetvalue(item, 0, 0));
	for (int c = 1; c < PQnfields(item); c++)
		fprintf(out, "  %-16s %s\n", PQfname(item, c),
		    PQgetisnull(item, 0, c) ? "(null)" : PQgetvalue(item, 0, c));
	if (ledger != NULL) {
		fprintf(out, "\nledger: %d row%s\n", PQntuples(ledger), PQntuples(ledger) == 1 ? "" : "s");
		for (int r = 0; r < PQntuples(ledger); r++)
			fprintf(out, "  #%s  %-8s %10s cents  %s\n", PQgetvalue(ledger, r, 0),
			    PQgetvalue(ledger, r, 1), PQgetvalue(ledger, r, 2), PQgetvalue(ledger, r, 3));
	}
	fprintf(out, "\nhistory: %d attempt%s\n", PQntuples(hist), PQntuples(hist) == 1 ? "" : "s");
	for (int r = 0; r < PQntuples(hist); r++) {
		const char *status = PQgetvalue(hist, r, 4), *id = PQgetvalue(hist, r, 6);
		const char *err = PQgetvalue(hist, r, 7);

		fprintf(out, "  %s  %s  %s ms  %s%s%s  worker \"%s\"%s%s%s%s\n",
		    PQgetvalue(hist, r, 0), PQgetvalue(hist, r, 2), PQgetvalue(hist, r, 3),
		    PQgetvalue(hist, r, 5), status[0] != '\0' ? ", http " : "", status,
		    PQgetvalue(hist, r, 1), id[0] != '\0' ? "  id " : "", id,
		    err[0] != '\0' ? "  " : "", err);
	}
}

/* Cells as JSON strings (null for NULL): the report is for reading, not arithmetic. */
static json_t *
row_object(const PGresult *res, int r, const char *const *names)
{
	json_t *o = json_object();

	for (int c = 0; o != NULL && c < PQnfields(res); c++) {
		json_t *v = PQgetisnull(res, r, c) ? json_null() : json_string(PQgetvalue(res, r, c));

		if (json_object_set_new(o, names != NULL ? names[c] : PQfname(res, c),
		    v != NULL ? v : json_null()) == -1) {
			json_decref(o);
			return NULL;
		}
	}
	return o;
}

static const char *const ledger_cols[] = { "id", "kind", "amount_cents", "created_at" };

static int
show_json(FILE *out, const char *kind, const PGresult *item, const PGresult *ledger,
    const PGresult *hist)
{
	json_t *doc = json_pack("{s:s, s:o, s:o}", "kind", kind, "item", row_object(item, 0, NULL),
	    "history", json_array());
	json_t *h = doc != NULL ? json_object_get(doc, "history") : NULL;
	int ret = -1;

	for (int r = 0; h != NULL && r < PQntuples(hist); r++)
		if (json_array_append_new(h, row_object(hist, r, history_cols)) == -1)
			goto out;
	if (doc != NULL && ledger != NULL) {
		json_t *l = json_array();

		if (l == NULL || json_object_set_new(doc, "ledger", l) == -1)
			goto out;
		for (int r = 0; r < PQntuples(ledger); r++)
			if (json_array_append_new(l, row_object(ledger, r, ledger_cols)) == -1)
				goto out;
	}
	if (doc != NULL && json_dumpf(doc, out, JSON_INDENT(2) | JSON_PRESERVE_ORDER) == 0 &&
	    fputc('\n', out) != EOF)
		ret = 0;
out:
	json_decref(doc);
	return ret;
}

int
store_show(store *st, enum item_kind kind, int64_t id, bool json, FILE *out, bool *ret_found)
{
	char idtext[24], sql[128];
	const char *params[2] = { item_kind_name(kind), idtext };
	PGresult *item = NULL, *ledger = NULL, *hist = NULL;
	int ret = -1;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	snprintf(idtext, sizeof(idtext), "%" PRId64, id);
	snprintf(sql, sizeof(sql), sql_item, kind == ITEM_INVOICE ? "invoices" : "redemptions");
	if ((item = fetch(st, sql, 1, params + 1)) == NULL)
		goto out;
	*ret_found = PQntuples(item) == 1;
	if (!*ret_found) {
		ret = 0;
		goto out;
	}
	if ((kind == ITEM_REDEMPTION && (ledger = fetch(st, sql_ledger, 1, params + 1)) == NULL) ||
	    (hist = fetch(st, sql_history, 2, params)) == NULL)
		goto out;
	if (json) {
		if (show_json(out, item_kind_name(kind), item, ledger, hist) == -1) {
			store_errorf(st, "show: out of memory");
			goto out;
		}
	} else {
		show_text(out, item_kind_name(kind), item, ledger, hist);
	}
	ret = 0;
out:
	PQclear(item);
	PQclear(ledger);
	PQclear(hist);
	return ret;
}

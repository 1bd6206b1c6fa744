#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * Recording outcomes: every completion ready at a turn of the loop in one
 * fenced statement per kind, and its history in the same statement.
 */

/*
 * Completions commit without waiting for the WAL flush (set_config(...,
 * true) applies to this transaction only, from inside the one statement).
 * That is safe here and only here: a completion lost in a database crash
 * leaves the item pending on a lease, and the next holder's call is a replay
 * that records the same result.  Claims and holds stay synchronous: they
 * must be durable before the API call they allow.
 */
#define COMPLETE_INPUT                                                         \
	"unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::bool[], " \
	"$6::bigint[], $7::text[], $8::text[], $9::bool[], $10::text[], "      \
	"$11::bigint[], $12::int[], $13::text[]) "                             \
	"AS u(id, fence, state, calls, ambiguous, delay_ms, result_id, error, " \
	"blocked, operator_note, started_ms, http_status, class), "            \
	"(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"

#define COMPLETE_SET(done_state, id_column)                                    \
	"SET status = CASE u.state WHEN 'done' THEN '" done_state "' "         \
	"WHEN 'failed' THEN 'failed' ELSE 'pending' END, "                     \
	id_column " = u.result_id, attempts = t.attempts + u.calls, "          \
	"blocked_calls = t.blocked_calls + u.blocked::int, "                   \
	"last_error = CASE WHEN u.error IS NULL AND u.operator_note IS NOT NULL " \
	"THEN t.last_error ELSE u.error END, "                                 \
	"needs_operator = u.operator_note, "                                   \
	"ambiguous = t.ambiguous OR u.ambiguous, "                             \
	"next_attempt_at = CASE WHEN u.state <> 'retry' THEN t.next_attempt_at " \
	"WHEN u.delay_ms < 0 THEN 'infinity' "                                 \
	"ELSE now() + u.delay_ms * interval '1 millisecond' END, "             \
	"locked_by = NULL, lease_until = NULL, updated_at = now(), "           \
	"finished_at = CASE WHEN u.state = 'retry' THEN NULL ELSE now() END "

#define COMPLETE_WHERE "WHERE t.id = u.id AND t.fence = u.fence AND t.status = 'pending' "

/*
 * What a completion hands to the history: the outcomes that applied (a
 * completion turned away by its fence leaves no trace, its holder's does).
 */
#define COMPLETE_RETURNING                                                     \
	"RETURNING t.id, t.status, t.attempts, u.started_ms, u.http_status, "  \
	"u.class, u.result_id, u.error, t.generation"

/*
 * The history of each outcome recorded, in the same statement, so it can
 * neither be lost nor written for an outcome that was not ($14: this
 * worker; $15: history.enabled).
 */
#define COMPLETE_HISTORY(kind)                                                 \
	"hist AS (INSERT INTO attempts (kind, item_id, generation, attempt, "  \
	"worker_id, started_at, finished_at, http_status, class, result_id, "  \
	"error) SELECT '" kind "', id, generation, attempts, $14, "           \
	"to_timestamp(started_ms / 1000.0), now(), nullif(http_status, 0), "   \
	"coalesce(class, 'not called'), result_id, error FROM upd WHERE $15::bool) "

static const char sql_complete_invoice[] =
    "WITH upd AS (UPDATE invoices AS t " COMPLETE_SET("paid", "charge_id")
    "FROM " COMPLETE_INPUT " " COMPLETE_WHERE COMPLETE_RETURNING "), "
    COMPLETE_HISTORY("invoice")
    "SELECT id FROM upd";

/*
 * A failed redemption gives its hold back in the same statement that marks
 * it failed, so no moment exists where it is failed with money still held.
 * Only the current generation's hold: an earlier one was given back when
 * that generation failed.
 */
static const char sql_complete_redemption[] =
    "WITH upd AS (UPDATE redemptions AS t " COMPLETE_SET("redeemed", "fulfillment_id")
    "FROM " COMPLETE_INPUT " " COMPLETE_WHERE COMPLETE_RETURNING "), "
    COMPLETE_HISTORY("redemption") ", "
    "rev AS (INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind, "
    "generation) SELECT h.subsidy_id, -h.amount_cents, h.redemption_id, 'reversal', h.generation "
    "FROM ledger_transactions h JOIN upd ON h.redemption_id = upd.id "
    "AND h.generation = upd.generation "
    "WHERE h.kind = 'hold' AND upd.status = 'failed' ON CONFLICT DO NOTHING) "
    "SELECT id FROM upd";

static const char *const complete_names[ITEM_KIND_COUNT] = {
	"complete_invoice", "complete_redemption",
};

int
store_prepare_complete(store *st, enum item_kind kind)
{
	return store_prepare(st, complete_names[kind], kind == ITEM_INVOICE ?
	    sql_complete_invoice : sql_complete_redemption);
}

static const char *const state_names[] = { "done", "failed", "retry" };

/* Records the completions of one kind; marks accepted[] for those applied. */
static int
complete_kind(store *st, enum item_kind kind, const struct completion *c,
    size_t n, bool *accepted)
{
	const struct store_stmt stmt = {
		.send = STORE_PREPARED, .text = complete_names[kind], .what = "complete",
		.want = PGRES_TUPLES_OK,
	};
	struct buf *a = st->arr;
	struct id_pos *ix;
	const char *params[15];
	PGresult *res = NULL;
	size_t count = 0;

	for (int i = 0; i < 13; i++)
		if (arr_open(&a[i]) == -1)
			goto oom;
	if ((ix = index_reserve(st, n)) == NULL)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		if (c[i].kind != kind)
			continue;
		ix[count].id = c[i].id;
		ix[count].pos = i;
		count++;
		if (arr_add_int(&a[0], c[i].id) == -1 ||
		    arr_add_int(&a[1], c[i].fence) == -1 ||
		    arr_add_raw(&a[2], state_names[c[i].state]) == -1 ||
		    arr_add_int(&a[3], c[i].calls) == -1 ||
		    arr_add_raw(&a[4], c[i].ambiguous ? "t" : "f") == -1 ||
		    arr_add_int(&a[5], c[i].delay_ms) == -1 ||
		    arr_add_text(&a[6], c[i].state == COMPLETION_DONE ? c[i].result_id : NULL) == -1 ||
		    arr_add_text(&a[7], c[i].state == COMPLETION_DONE ? NULL : c[i].error) == -1 ||
		    arr_add_raw(&a[8], c[i].blocked ? "t" : "f") == -1 ||
		    arr_add_text(&a[9], c[i].state == COMPLETION_RETRY ? c[i].operator_note :
		    NULL) == -1 ||
		    arr_add_int(&a[10], c[i].started_unix_ms) == -1 ||
		    arr_add_int(&a[11], c[i].http_status) == -1 ||
		    arr_add_text(&a[12], c[i].history_class) == -1)
			goto oom;
	}
	if (count == 0)
		return 0;
	for (int i = 0; i < 13; i++) {
		if (arr_close(&a[i]) == -1)
			goto oom;
		params[i] = a[i].data;
	}
	params[13] = st->worker_id;
	params[14] = st->history ? "t" : "f";
	if (store_run(st, &stmt, 15, params, &res) == -1)
		return -1;
	qsort(ix, count, sizeof(*ix), id_pos_cmp);
	for (int r = 0; r < PQntuples(res); r++) {
		ssize_t pos = index_find(ix, count, strtoll(PQgetvalue(res, r, 0), NULL, 10));

		if (pos >= 0)
			accepted[pos] = true;
	}
	PQclear(res);
	return 0;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

/* A batch of completions, as the body of store_retrying(). */
struct batch {
	const struct completion *c;
	size_t n;
	bool *accepted;
	bool kinds[ITEM_KIND_COUNT];
};

static int
complete_batch(store *st, void *arg)
{
	struct batch *b = arg;

	memset(b->accepted, 0, b->n * sizeof(*b->accepted));
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (b->kinds[k] && complete_kind(st, k, b->c, b->n, b->accepted) == -1)
			return -1;
	return 0;
}

/*
 * Both kinds in one transaction when both are in the batch: a batch redone
 * after a deadlock then starts from the rows as they were, where a kind
 * already committed would match no row the second time and read as lost.
 */
int
store_complete(store *st, const struct completion *c, size_t n, bool *accepted)
{
	struct batch b = { .c = c, .n = n, .accepted = accepted };

	if (n == 0)
		return 0;
	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	for (size_t i = 0; i < n; i++)
		b.kinds[c[i].kind] = true;
	if (store_retrying(st, b.kinds[ITEM_INVOICE] && b.kinds[ITEM_REDEMPTION], complete_batch,
	    &b, "completion of %zu items", n) == 0)
		return 0;
	memset(accepted, 0, n * sizeof(*accepted));
	return -1;
}

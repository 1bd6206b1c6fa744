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

#define COMPLETE_WHERE                                                         \
	"WHERE t.id = u.id AND t.fence = u.fence AND " PENDING_BY_ID("t") " "

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

static const char *const state_names[] = { "done", "failed", "retry" };

/*
 * One kind's share of a batch: its 15 parameters, built in its own
 * buffers, and the sorted index that maps the ids it returns back to the
 * batch.  The loop's batch in flight keeps one per kind until its answer.
 */
struct kind_params {
	struct buf arr[13];
	const char *params[15];
	struct id_pos *ix;
	size_t ix_cap, count;
};

static const struct store_stmt complete_stmts[ITEM_KIND_COUNT] = {
	{ .send = STORE_PREPARED, .text = "complete_invoice", .what = "complete",
	  .want = PGRES_TUPLES_OK },
	{ .send = STORE_PREPARED, .text = "complete_redemption", .what = "complete",
	  .want = PGRES_TUPLES_OK },
};

static void
kind_params_free(struct kind_params *kp)
{
	for (int i = 0; i < 13; i++)
		free(kp->arr[i].data);
	free(kp->ix);
}

/* Builds KP from the completions of KIND among C; KP->count says how many. */
static int
build_kind(store *st, struct kind_params *kp, enum item_kind kind, const struct completion *c,
    size_t n)
{
	struct buf *a = kp->arr;

	kp->count = 0;
	for (int i = 0; i < 13; i++)
		if (arr_open(&a[i]) == -1)
			goto oom;
	if (index_grow(&kp->ix, &kp->ix_cap, n) == NULL)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		if (c[i].kind != kind)
			continue;
		kp->ix[kp->count].id = c[i].id;
		kp->ix[kp->count].pos = i;
		kp->count++;
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
	for (int i = 0; i < 13; i++) {
		if (arr_close(&a[i]) == -1)
			goto oom;
		kp->params[i] = a[i].data;
	}
	kp->params[13] = st->worker_id;
	kp->params[14] = st->history ? "t" : "f";
	qsort(kp->ix, kp->count, sizeof(*kp->ix), id_pos_cmp);
	return 0;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

/* Marks accepted[] for the rows of RES, the answer to KP's statement. */
static void
take_kind(const struct kind_params *kp, const PGresult *res, bool *accepted)
{
	for (int r = 0; r < PQntuples(res); r++) {
		ssize_t pos = index_find(kp->ix, kp->count, strtoll(PQgetvalue(res, r, 0), NULL,
		    10));

		if (pos >= 0)
			accepted[pos] = true;
	}
}

/* Records the completions of one kind; marks accepted[] for those applied. */
static int
complete_kind(store *st, enum item_kind kind, const struct completion *c,
    size_t n, bool *accepted)
{
	struct kind_params kp = { 0 };
	PGresult *res = NULL;
	int ret = -1;

	if (build_kind(st, &kp, kind, c, n) == -1)
		goto out;
	if (kp.count > 0) {
		if (store_run(st, &complete_stmts[kind], 15, kp.params, &res) == -1)
			goto out;
		take_kind(&kp, res, accepted);
		PQclear(res);
	}
	ret = 0;
out:
	kind_params_free(&kp);
	return ret;
}

int
store_prepare_complete(store *st, enum item_kind kind)
{
	return store_prepare(st, complete_stmts[kind].text, kind == ITEM_INVOICE ?
	    sql_complete_invoice : sql_complete_redemption);
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

/*
 * The loop's batch in flight: both kinds' statements in one job, so one
 * transaction as in store_complete(), their parameters kept for a retry.
 */
struct complete_batch {
	struct store_op op;
	struct kind_params kinds[ITEM_KIND_COUNT];
	int stmt_of[ITEM_KIND_COUNT];   /* the op's statement of each kind, -1 for none */
	size_t n;
};

int
store_complete_send(store *st, const struct completion *c, size_t n)
{
	struct complete_batch *b = st->complete;
	const struct store_stmt *stmts[ITEM_KIND_COUNT];
	const char *const *params[ITEM_KIND_COUNT];
	int nparams[ITEM_KIND_COUNT], m = 0;

	if (b == NULL && (b = st->complete = calloc(1, sizeof(*b))) == NULL) {
		store_errorf(st, "out of memory");
		return -1;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		b->stmt_of[k] = -1;
		if (build_kind(st, &b->kinds[k], k, c, n) == -1)
			return -1;
		if (b->kinds[k].count == 0)
			continue;
		b->stmt_of[k] = m;
		stmts[m] = &complete_stmts[k];
		nparams[m] = 15;
		params[m++] = b->kinds[k].params;
	}
	b->n = n;
	snprintf(b->op.subject, sizeof(b->op.subject), "completion of %zu items", n);
	if (m == 0) {
		store_errorf(st, "complete: nothing to record");
		return -1;
	}
	return store_op_send(st, &b->op, stmts, m, nparams, params);
}

bool
store_complete_pending(const store *st)
{
	return st->complete != NULL && store_op_active(&st->complete->op);
}

int
store_complete_take(store *st, bool *accepted)
{
	struct complete_batch *b = st->complete;
	int r;

	if (b == NULL)
		return -1;
	if ((r = store_op_poll(st, &b->op)) != 1) {
		if (r == -1)
			memset(accepted, 0, b->n * sizeof(*accepted));
		return r;
	}
	memset(accepted, 0, b->n * sizeof(*accepted));
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (b->stmt_of[k] >= 0)
			take_kind(&b->kinds[k], store_op_result(&b->op, b->stmt_of[k]), accepted);
	store_op_clear(&b->op);
	return 1;
}

void
store_complete_free(store *st)
{
	if (st->complete == NULL)
		return;
	store_op_clear(&st->complete->op);
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		kind_params_free(&st->complete->kinds[k]);
	free(st->complete);
	st->complete = NULL;
}

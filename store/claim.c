#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "store/store_int.h"

/*
 * Taking items: the due query, the claims that lease a batch, and the
 * renewals that keep the leases of the items in flight.
 */

static const char *const table_of[ITEM_KIND_COUNT] = { "invoices", "redemptions" };

/*
 * The SQL, one template per statement; %1$s is the table.  Table names are
 * constants of ours; every value is a parameter.
 */
/*
 * Pending rows in two disjoint sets (sql/010_due_cursor.sql): first
 * attempts, found by id from a cursor on the primary key, and the rest
 * (retries, deferrals, reclaims), found by time through the small
 * *_retry_due partial index (sql/011_retry_index.sql).  Written exactly as
 * the index's predicate, so the planner matches it, and its status test
 * "IS TRUE" so that no pending-only index matches it; the one set is the
 * other's negation.
 */
#define FIRST_ATTEMPT                                                          \
	"status = 'pending' AND attempts = 0 AND fence <= 1 AND generation <= 1 "  \
	"AND last_error IS NULL AND (lease_until IS NOT NULL OR next_attempt_at <= created_at)"
#define RETRY                                                                  \
	"(status = 'pending') IS TRUE AND (attempts <> 0 OR fence > 1 "          \
	"OR generation > 1 OR last_error IS NOT NULL "                            \
	"OR (lease_until IS NULL AND next_attempt_at > created_at))"

/*
 * Due items of both kinds, oldest first, in one statement: an idle worker
 * costs one query per poll, and neither kind can starve the other.
 *
 * Why not the due index of version 1 alone: ordered by time, it keeps the
 * dead entry each claim and completion leaves in front of the live ones,
 * and with the xmin horizon pinned (a long transaction anywhere) every poll
 * walked all of them: 16 times slower after 2 minutes, and the fleet fell
 * to 38 % of the inserts (make bench-bloat, BENCHMARKS.md).
 * First attempts are looked for from $2 (invoices) and $3 (redemptions),
 * the worker's cursors, on the primary key: what lies below a cursor,
 * however dead, is never walked.  A cursor of 0 is looked up: the lowest
 * first attempt, or past the newest row.  Each kind's front comes back as
 * a row of kind 4 + its kind: the lowest first attempt at or past the
 * cursor, pending, in flight or not, or past the newest row; the cursor
 * moves there (store_due_take), never past a row still in the first set.
 * The rest come from the *_retry_due index, small whatever the history.
 */
/*
 * The fleet's pauses (schema version 5) ride along: a paused kind's branch
 * returns nothing (its NOT EXISTS is one uncorrelated lookup per
 * statement), and each pause comes first as a row of kind 2 + its kind,
 * with its reason, so the worker knows at no extra round trip.
 */
/*
 * Closed at the newest id: a generic plan sees an open range of a parameter
 * as a third of the table and the rest of the predicate as one row, and
 * sorts a sequential scan's result (0.2 s at 300 000 rows); a closed
 * range of parameters it takes for a small one, and walks the primary key.
 */
#define ID_RANGE(table, from)                                                  \
	"id BETWEEN " from " AND (SELECT max(id) FROM " table ")"
/*
 * The rows from the cursor on, in id order, on the primary key, whatever
 * the statistics say.  With the first-attempt test beside the range, a
 * planner that takes it for selective (no statistics yet, or a table
 * mostly finished, where attempts = 0 is rare) read every pending row of
 * the range through a pending-only index or a bitmap and sorted them:
 * 12.5 ms a poll at 20 000 pending behind 280 000 finished, 4 ms a poll in
 * make bench, 65-75 % of the database's time.  Behind a LIMIT (a subquery
 * with one is planned on its own, and a LIMIT that is not a constant is
 * taken for a tenth of the rows) the walk is ordered and stops at the
 * outer LIMIT: 0.9 ms.  (Of its columns the planner reads only those the
 * outer query uses.)
 */
#define FIRST_FROM(table, from)                                                \
	"(SELECT * FROM " table " WHERE " ID_RANGE(table, from)                   \
	" ORDER BY id LIMIT (SELECT 2147483647)) AS f"
#define FIRST_FROM_CURSOR(table, col) FIRST_FROM(table, "(SELECT " col " FROM c)")
/*
 * The lookup from scratch reads the pending rows (a pending-only index),
 * behind OFFSET 0: min(id) over the table itself is planned as a walk of
 * the primary key from id 1 that stops at the first match, and the first
 * match lies past the whole finished history (20 916 buffers, 152 ms
 * behind a million finished rows).
 */
#define DUE_FROM(table, col, param)                                            \
	"CASE WHEN " param "::bigint > 0 THEN " param "::bigint ELSE coalesce("  \
	"(SELECT min(id) FROM (SELECT id FROM " table " WHERE " FIRST_ATTEMPT    \
	" OFFSET 0) AS p), "                                                      \
	"(SELECT max(id) + 1 FROM " table "), 1) END AS " col
#define DUE_FRONT(kind, table, col)                                            \
	" (SELECT " kind ", greatest((SELECT " col " FROM c), coalesce("        \
	"(SELECT id FROM " FIRST_FROM_CURSOR(table, col) " WHERE "               \
	FIRST_ATTEMPT " ORDER BY id LIMIT 1), (SELECT max(id) + 1 FROM " table \
	"))), '-infinity'::timestamptz, NULL)"
/*
 * The first attempts free to claim are looked for from FREE (the
 * cursor's free_at, never below the front): between the front and them
 * lie the rows in flight, the whole fleet's, and the finished ones among
 * them, which each poll used to walk: with 3 000 rows leased in front of
 * the free ones, 278 buffers a poll against 42 (test_due_plan.py).  Their
 * rows say 'f' in the note column, so the next free_at is the lowest of
 * them.
 */
#define DUE_BRANCHES(kind, table, col, free, name)                             \
	" (SELECT " kind ", id, next_attempt_at, 'f' FROM "                      \
	FIRST_FROM(table, "greatest((SELECT " col " FROM c), " free "::bigint)")  \
	" WHERE " FIRST_ATTEMPT                                                    \
	"   AND next_attempt_at <= now()"                                         \
	"   AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = '" name "')"  \
	"   ORDER BY id LIMIT $1::bigint)"                                        \
	" UNION ALL"                                                              \
	" (SELECT " kind ", id, next_attempt_at, NULL FROM " table               \
	"   WHERE " RETRY " AND next_attempt_at <= now()"                         \
	"   AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = '" name "')"  \
	"   ORDER BY next_attempt_at, id LIMIT $1::bigint)"

static const char sql_due[] =
    "WITH c AS (SELECT " DUE_FROM("invoices", "inv", "$2") ", "
    DUE_FROM("redemptions", "red", "$3") ") "
    "SELECT kind, id, note FROM ("
    " (SELECT 2 + (kind = 'redemption')::int AS kind, 0::bigint AS id,"
    "   '-infinity'::timestamptz AS next_attempt_at, format('%s (paused by %s since %s)',"
    "   reason, paused_by, to_char(since, 'YYYY-MM-DD HH24:MI:SSOF')) AS note"
    "   FROM fleet_pause)"
    " UNION ALL" DUE_FRONT("4", "invoices", "inv")
    " UNION ALL" DUE_FRONT("5", "redemptions", "red")
    " UNION ALL" DUE_BRANCHES("0", "invoices", "inv", "$4", "invoice")
    " UNION ALL" DUE_BRANCHES("1", "redemptions", "red", "$5", "redemption")
    ") AS d ORDER BY next_attempt_at, kind, id LIMIT $1::bigint + 4";

/*
 * How the cursors move.  Each poll starts at the front the last one found.
 * Identity values are not committed in id order: a producer's INSERT may
 * commit after a higher id was seen, and the cursor already be past it.
 * So every DUE_SWEEP_MS a poll starts instead at the lowest front seen in
 * the last DUE_LAG_MS: a row committed up to DUE_LAG_MS - DUE_SWEEP_MS
 * after it took its id is found by it.  Every DUE_DEEP_MS the cursor is
 * looked up again from scratch, for the transactions longer than that.
 * A sweep walks the ids of the last DUE_LAG_MS, once per DUE_SWEEP_MS;
 * the lookup reads the whole table (a sequential scan), once per
 * DUE_DEEP_MS and at the start: the one cost that grows with the history,
 * kept rare rather than indexed, since an index of the first set would
 * cost every INSERT and every first claim one more entry.
 */
#define DUE_SWEEP_MS 2000
#define DUE_LAG_MS 10000
#define DUE_DEEP_MS 300000
#define DUE_SAMPLE_MS 1000

/*
 * A claim's SET: bump the fence, take the lease, and hide the item until the
 * lease ends by moving next_attempt_at there.  lease_until still set means
 * the previous claim never completed: its API call may have happened.
 */
#define CLAIM_SET                                                              \
	"SET fence = t.fence + 1, locked_by = $1, "                            \
	"lease_until = now() + $2 * interval '1 millisecond', "                \
	"next_attempt_at = now() + $2 * interval '1 millisecond', "            \
	"ambiguous = t.ambiguous OR t.lease_until IS NOT NULL, updated_at = now(), " \
	"first_claimed_at = coalesce(t.first_claimed_at, now()) "

/*
 * After the kind's own columns: what the give-up rule and the key's age
 * need, and the generation the key is built from (schema version 6).
 */
#define CLAIM_RETURNING_COMMON                                                 \
	", t.blocked_calls, "                                                  \
	"(extract(epoch FROM now() - t.first_claimed_at) * 1000)::bigint, "    \
	"t.generation"

/*
 * A claim racing a pause takes nothing once the pause committed: the due
 * query that chose the ids may be older.  %3$s is the kind's name.
 */
#define CLAIM_NOT_PAUSED \
	"AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = '%3$s') "

static const char *const claim_returning[ITEM_KIND_COUNT] = {
	"RETURNING t.id, t.fence, t.attempts, t.ambiguous, t.amount_cents, "
	"t.customer_id, t.currency, NULL::bigint, false" CLAIM_RETURNING_COMMON,
	"RETURNING t.id, t.fence, t.attempts, t.ambiguous, t.amount_cents, "
	"t.customer_id, NULL::text, t.subsidy_id, EXISTS (SELECT 1 FROM "
	"ledger_transactions h WHERE h.redemption_id = t.id "
	"AND h.generation = t.generation AND h.kind = 'hold')"
	CLAIM_RETURNING_COMMON,
};

/*
 * Both claims lock the rows in a subquery and update them by primary key
 * (t.id = ANY (ARRAY(...))).  A join instead let the generic plan of the
 * prepared statement hash the whole table, or walk the due index across the
 * whole backlog to find a handful of ids: 10 ms per claim of 50 rows on a
 * 20 000-row backlog, against 0.3 ms now (see BENCHMARKS.md).
 */
/*
 * Skip-locked mode takes the retries first, then the first attempts past
 * the cursor ($4): the retries are few, and a backlog of new work must not
 * hold them back.  Rows locked by the second list but cut by the slice are
 * only locked, until the statement's end.
 *
 * The first attempts are found as the due query finds them (FIRST_FROM:
 * an ordered walk of the primary key, whatever the statistics) and then
 * locked by primary key: a lock inside that walk would lock every row it
 * passes, in flight or not.  Four times the claim's size are looked at,
 * so that workers claiming at the same moment, which see the same rows,
 * each find some unlocked; one that finds none claims again next turn.
 * The due test is repeated on the locked row (i) because a row locked
 * after another claim committed is checked again in its new version, and
 * only conditions on the locked table are.
 */
static const char sql_claim_skip[] =
    "UPDATE %1$s AS t " CLAIM_SET
    "WHERE t.id = ANY ((ARRAY(SELECT id FROM %1$s WHERE " RETRY " "
    "AND next_attempt_at <= now() ORDER BY next_attempt_at, id LIMIT $3 "
    "FOR UPDATE SKIP LOCKED) || ARRAY(SELECT i.id FROM unnest(ARRAY(SELECT id FROM "
    FIRST_FROM("%1$s", "$4::bigint") " WHERE " FIRST_ATTEMPT " AND next_attempt_at <= now() "
    "ORDER BY id LIMIT 4 * $3::bigint)) AS x(id) JOIN %1$s i ON i.id = x.id "
    "WHERE " PENDING_BY_ID("i") " AND (i.next_attempt_at <= now()) IS TRUE "
    "ORDER BY i.id LIMIT $3 FOR UPDATE OF i SKIP LOCKED))[1:$3::int]) " CLAIM_NOT_PAUSED "%2$s";

/*
 * The ids come from us, so only the primary key may serve this: the due
 * test is written "IS TRUE" so no stale estimate can make the planner scan
 * the due index for them instead, and the status test so no pending-only
 * index matches it (PENDING_BY_ID).
 */
static const char sql_claim_ids[] =
    "UPDATE %1$s AS t " CLAIM_SET
    "WHERE t.id = ANY (ARRAY(SELECT i.id FROM unnest($3::bigint[]) AS x(id) "
    "JOIN %1$s i ON i.id = x.id WHERE " PENDING_BY_ID("i") " "
    "AND (i.next_attempt_at <= now()) IS TRUE FOR UPDATE OF i SKIP LOCKED)) "
    CLAIM_NOT_PAUSED "%2$s";

static const char sql_renew[] =
    "UPDATE %1$s AS t SET lease_until = now() + $3 * interval '1 millisecond', "
    "next_attempt_at = now() + $3 * interval '1 millisecond' "
    "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, fence) "
    "WHERE t.id = u.id AND t.fence = u.fence AND " PENDING_BY_ID("t") " "
    "RETURNING t.id";

/* Prepared once per kind, as NAME_KIND: "claim_ids_invoice". */
enum stmt {
	STMT_CLAIM_SKIP,
	STMT_CLAIM_IDS,
	STMT_RENEW,
	STMT_COUNT,
};

static const char *const stmt_names[STMT_COUNT] = { "claim_skip", "claim_ids", "renew" };

static const struct store_stmt due_stmt = {
	.send = STORE_PREPARED, .text = "due", .what = "due", .want = PGRES_TUPLES_OK,
};

static void due_moved(struct due_cursor *c, int64_t front, int64_t now_ms);
static void take_due(store *st, const PGresult *res, size_t limit, enum item_kind *kinds,
    int64_t *ids, size_t *ret_n);

#define STMT_NAME_LEN 64

int
store_prepare_claims(store *st, enum item_kind kind)
{
	char sql[4096], name[STMT_NAME_LEN];

	for (int s = 0; s < STMT_COUNT; s++) {
		if (s == STMT_RENEW)
			snprintf(sql, sizeof(sql), sql_renew, table_of[kind]);
		else
			snprintf(sql, sizeof(sql), s == STMT_CLAIM_SKIP ? sql_claim_skip :
			    sql_claim_ids, table_of[kind], claim_returning[kind],
			    item_kind_name(kind));
		snprintf(name, sizeof(name), "%s_%s", stmt_names[s], item_kind_name(kind));
		if (store_prepare(st, name, sql) == -1)
			return -1;
	}
	return 0;
}

int
store_prepare_due(store *st)
{
	return store_prepare(st, "due", sql_due);
}

/* Statement S of KIND; its name is written to NAME, which must outlive it. */
static struct store_stmt
stmt_of(enum stmt s, enum item_kind kind, char name[STMT_NAME_LEN])
{
	snprintf(name, STMT_NAME_LEN, "%s_%s", stmt_names[s], item_kind_name(kind));
	return (struct store_stmt){ .send = STORE_PREPARED, .text = name,
	    .what = stmt_names[s], .want = PGRES_TUPLES_OK };
}

/* The due query's answer RES: the pauses noted, up to LIMIT items listed. */
static void
take_due(store *st, const PGresult *res, size_t limit, enum item_kind *kinds, int64_t *ids,
    size_t *ret_n)
{
	int64_t now_ms = clock_ms(), free[ITEM_KIND_COUNT] = { 0 };
	size_t n;

	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		st->pause_note[k][0] = '\0';
	n = 0;
	for (int r = 0; r < PQntuples(res); r++) {
		int kind = atoi(PQgetvalue(res, r, 0));
		int64_t id;

		if (kind >= 2 && kind < 2 + ITEM_KIND_COUNT) {
			snprintf(st->pause_note[kind - 2], sizeof(st->pause_note[0]), "%s",
			    PQgetvalue(res, r, 2));
			continue;
		}
		if (kind >= 4 && kind < 4 + ITEM_KIND_COUNT) {
			due_moved(&st->cursor[kind - 4], strtoll(PQgetvalue(res, r, 1), NULL, 10),
			    now_ms);
			continue;
		}
		if (kind < 0 || kind >= ITEM_KIND_COUNT)
			continue;
		id = strtoll(PQgetvalue(res, r, 1), NULL, 10);
		/* A free first attempt (note 'f'): the lowest is the next free_at. */
		if (PQgetvalue(res, r, 2)[0] == 'f' && (free[kind] == 0 || id < free[kind]))
			free[kind] = id;
		if (n == limit)
			continue;
		kinds[n] = kind == 1 ? ITEM_REDEMPTION : ITEM_INVOICE;
		ids[n++] = id;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (free[k] != 0)
			st->cursor[k].free_at = free[k];
	*ret_n = n;
}

/*
 * attempts as read from a row, clamped to [0, INT_MAX - 1]: the worker adds
 * the call it is about to make, and a corrupted counter must not make that
 * addition overflow (the database then refuses the update, and the row is
 * parked; see store/park.c).
 */
static int
attempts_of(const char *text)
{
	long long v = strtoll(text, NULL, 10);

	if (v < 0)
		return 0;
	return v >= INT_MAX ? INT_MAX - 1 : (int)v;
}

/* A cell's text, or NULL for SQL NULL; owned by RES. */
static const char *
value_or_null(const PGresult *res, int row, int col)
{
	return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

/*
 * A claim's parameters, built in ARR (ids given) or LIM, LEASE and CUR
 * (owned by the caller, who keeps them until the statement is answered).
 * Returns how many there are, or -1.
 */
static int
claim_params(store *st, enum item_kind kind, const int64_t *ids, size_t nids, size_t limit,
    int lease_ms, struct buf *arr, char lim[32], char lease[32], char cur[32],
    const char *params[4])
{
	snprintf(lease, 32, "%d", lease_ms);
	snprintf(lim, 32, "%zu", limit);
	params[0] = st->worker_id;
	params[1] = lease;
	params[2] = lim;
	if (ids == NULL) {
		/* Sent after a due query answered, so the cursor is known. */
		snprintf(cur, 32, "%" PRId64, st->cursor[kind].at);
		params[3] = cur;
		return 4;
	}
	if (arr_open(arr) == -1)
		goto oom;
	for (size_t i = 0; i < nids; i++)
		if (arr_add_int(arr, ids[i]) == -1)
			goto oom;
	if (arr_close(arr) == -1)
		goto oom;
	params[2] = arr->data;
	return 3;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

/* The claimed rows of RES, up to LIMIT, as KIND's items. */
static int
take_claimed(store *st, enum item_kind kind, const PGresult *res, size_t limit,
    struct item *items, size_t *ret_n)
{
	int n = PQntuples(res);

	if ((size_t)n > limit)
		n = (int)limit;
	for (int i = 0; i < n; i++) {
		struct item *it = &items[i];
		bool copied;

		memset(it, 0, sizeof(*it));
		it->kind = kind;
		it->id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
		it->fence = strtoll(PQgetvalue(res, i, 1), NULL, 10);
		it->attempts = attempts_of(PQgetvalue(res, i, 2));
		it->ambiguous = PQgetvalue(res, i, 3)[0] == 't';
		it->amount_cents = strtoll(PQgetvalue(res, i, 4), NULL, 10);
		copied = item_set_strings(it, value_or_null(res, i, 5), value_or_null(res, i, 6)) == 0;
		if (!PQgetisnull(res, i, 7))
			it->subsidy_id = strtoll(PQgetvalue(res, i, 7), NULL, 10);
		it->held = PQgetvalue(res, i, 8)[0] == 't';
		it->blocked_calls = attempts_of(PQgetvalue(res, i, 9));
		it->key_age_ms = strtoll(PQgetvalue(res, i, 10), NULL, 10);
		it->generation = atoi(PQgetvalue(res, i, 11));
		if (!copied) {
			/* Out of memory: give back what was filled; leases run out. */
			for (int j = 0; j <= i; j++)
				item_clear(&items[j]);
			store_errorf(st, "out of memory");
			*ret_n = 0;
			return -1;
		}
	}
	*ret_n = (size_t)n;
	return 0;
}

int
store_claim(store *st, enum item_kind kind, const int64_t *ids, size_t nids,
    size_t limit, int lease_ms, struct item *items, size_t *ret_n)
{
	char lease[32], lim[32], cur[32], name[STMT_NAME_LEN];
	const char *params[4];
	struct store_stmt stmt;
	PGresult *res = NULL;
	int ret, nparams;

	*ret_n = 0;
	if (ids != NULL && nids == 0)
		return 0;
	if ((nparams = claim_params(st, kind, ids, nids, limit, lease_ms, &st->arr[0], lim,
	    lease, cur, params)) == -1)
		return -1;
	stmt = stmt_of(ids != NULL ? STMT_CLAIM_IDS : STMT_CLAIM_SKIP, kind, name);
	if (store_run_retrying(st, &stmt, nparams, params, &res, "claim of %ss",
	    item_kind_name(kind)) == -1)
		return -1;
	ret = take_claimed(st, kind, res, limit, items, ret_n);
	PQclear(res);
	return ret;
}

/*
 * The loop's asynchronous due query and claims (store_set_pipeline): one
 * op each, the claims one per kind, their parameters kept until answered.
 */
struct due_op {
	struct store_op op;
	char lim[32], from[ITEM_KIND_COUNT][32], free[ITEM_KIND_COUNT][32];
	const char *params[1 + 2 * ITEM_KIND_COUNT];
	size_t limit;
};

struct claim_op {
	struct store_op op;
	struct buf arr;
	char lease[32], lim[32], cur[32], name[STMT_NAME_LEN];
	struct store_stmt stmt;
	const char *params[4];
	size_t limit;
};

/*
 * Where KIND's due query starts now (at NOW_MS): 0 for a lookup from
 * scratch, the lowest front of the last DUE_LAG_MS for a sweep, else the
 * cursor.  *FREE is where its free first attempts are looked for: from
 * free_at on an ordinary poll, from the start itself (0) on a lookup or
 * a sweep, which so also finds, within DUE_SWEEP_MS, a row below free_at
 * that is free again (a lease run out, a row the poll's LIMIT cut).
 */
static int64_t
due_from(struct due_cursor *c, int64_t now_ms, int64_t *free)
{
	int64_t from = c->at;

	*free = 0;
	if (c->at == 0 || now_ms - c->deep_ms >= DUE_DEEP_MS) {
		c->deep_ms = c->sweep_ms = now_ms;
		return 0;
	}
	if (now_ms - c->sweep_ms < DUE_SWEEP_MS) {
		*free = c->free_at;
		return from;
	}
	c->sweep_ms = now_ms;
	for (int i = 0; i < c->nsamples; i++)
		if (now_ms - c->sample_ms[i] <= DUE_LAG_MS && c->sample_at[i] < from)
			from = c->sample_at[i];
	return from;
}

/* KIND's front FRONT, found from where its due query started: the cursor moves there. */
static void
due_moved(struct due_cursor *c, int64_t front, int64_t now_ms)
{
	if (front <= 0)
		return;
	c->at = front;
	if (c->nsamples > 0 && now_ms - c->sample_ms[(c->next_sample + DUE_CURSOR_SAMPLES - 1) %
	    DUE_CURSOR_SAMPLES] < DUE_SAMPLE_MS)
		return;
	c->sample_ms[c->next_sample] = now_ms;
	c->sample_at[c->next_sample] = front;
	c->next_sample = (c->next_sample + 1) % DUE_CURSOR_SAMPLES;
	if (c->nsamples < DUE_CURSOR_SAMPLES)
		c->nsamples++;
}

int
store_due_send(store *st, size_t limit)
{
	const struct store_stmt *stmts[1] = { &due_stmt };
	const char *const *params[1];
	int nparams[1] = { 1 + 2 * ITEM_KIND_COUNT };
	struct due_op *d = st->due;
	int64_t now_ms = clock_ms();

	if (d == NULL && (d = st->due = calloc(1, sizeof(*d))) == NULL) {
		store_errorf(st, "out of memory");
		return -1;
	}
	snprintf(d->lim, sizeof(d->lim), "%zu", limit);
	d->params[0] = d->lim;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		int64_t free;

		snprintf(d->from[k], sizeof(d->from[k]), "%" PRId64, due_from(&st->cursor[k],
		    now_ms, &free));
		snprintf(d->free[k], sizeof(d->free[k]), "%" PRId64, free);
		d->params[1 + k] = d->from[k];
		d->params[1 + ITEM_KIND_COUNT + k] = d->free[k];
	}
	d->limit = limit;
	params[0] = d->params;
	return store_op_send(st, &d->op, stmts, 1, nparams, params);
}

bool
store_due_pending(const store *st)
{
	return st->due != NULL && store_op_active(&st->due->op);
}

int
store_due_take(store *st, enum item_kind *kinds, int64_t *ids, size_t *ret_n)
{
	int r;

	*ret_n = 0;
	if (st->due == NULL)
		return -1;
	if ((r = store_op_poll(st, &st->due->op)) != 1)
		return r;
	take_due(st, store_op_result(&st->due->op, 0), st->due->limit, kinds, ids, ret_n);
	store_op_clear(&st->due->op);
	return 1;
}

int
store_claim_send(store *st, enum item_kind kind, const int64_t *ids, size_t nids,
    size_t limit, int lease_ms)
{
	const struct store_stmt *stmts[1];
	const char *const *params[1];
	int nparams[1];
	struct claim_op *c = st->claim[kind];

	if (c == NULL && (c = st->claim[kind] = calloc(1, sizeof(*c))) == NULL) {
		store_errorf(st, "out of memory");
		return -1;
	}
	if ((nparams[0] = claim_params(st, kind, ids, nids, limit, lease_ms, &c->arr, c->lim,
	    c->lease, c->cur, c->params)) == -1)
		return -1;
	c->stmt = stmt_of(ids != NULL ? STMT_CLAIM_IDS : STMT_CLAIM_SKIP, kind, c->name);
	c->limit = limit;
	stmts[0] = &c->stmt;
	params[0] = c->params;
	snprintf(c->op.subject, sizeof(c->op.subject), "claim of %ss", item_kind_name(kind));
	return store_op_send(st, &c->op, stmts, 1, nparams, params);
}

bool
store_claim_pending(const store *st, enum item_kind kind)
{
	return st->claim[kind] != NULL && store_op_active(&st->claim[kind]->op);
}

int
store_claim_take(store *st, enum item_kind kind, struct item *items, size_t *ret_n)
{
	struct claim_op *c = st->claim[kind];
	int r;

	*ret_n = 0;
	if (c == NULL)
		return -1;
	if ((r = store_op_poll(st, &c->op)) != 1)
		return r;
	r = take_claimed(st, kind, store_op_result(&c->op, 0), c->limit, items, ret_n);
	store_op_clear(&c->op);
	return r == 0 ? 1 : -1;
}

void
store_claims_free(store *st)
{
	if (st->due != NULL)
		store_op_clear(&st->due->op);
	free(st->due);
	st->due = NULL;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		if (st->claim[k] == NULL)
			continue;
		store_op_clear(&st->claim[k]->op);
		free(st->claim[k]->arr.data);
		free(st->claim[k]);
		st->claim[k] = NULL;
	}
}


/*
 * The loop's renewal of one kind, asynchronous: the ids and fences sent
 * are kept, so the answer can say which were not renewed even if their
 * items have finished (and their slots been reused) meanwhile.
 */
struct renew_op {
	struct store_op op;
	struct buf ids, fences;
	char lease[32], name[STMT_NAME_LEN];
	struct store_stmt stmt;
	const char *params[3];
	int64_t *sent_ids, *sent_fences, *lost_ids, *lost_fences;
	bool *renewed;
	size_t nsent, nlost, cap;
	struct id_pos *ix;
	size_t ix_cap;
};

static int
renew_grow(struct renew_op *r, size_t n)
{
	void *p;

	if (n <= r->cap)
		return 0;
#define RENEW_GROW(field) \
	do { \
		if ((p = realloc(r->field, n * sizeof(*r->field))) == NULL) \
			return -1; \
		r->field = p; \
	} while (0)
	RENEW_GROW(sent_ids);
	RENEW_GROW(sent_fences);
	RENEW_GROW(lost_ids);
	RENEW_GROW(lost_fences);
	RENEW_GROW(renewed);
#undef RENEW_GROW
	r->cap = n;
	return 0;
}

int
store_renew_send(store *st, enum item_kind kind, struct item *const *items, size_t n,
    int lease_ms)
{
	const struct store_stmt *stmts[1];
	const char *const *params[1];
	int nparams[1] = { 3 };
	struct renew_op *r = st->renew[kind];

	if (r == NULL && (r = st->renew[kind] = calloc(1, sizeof(*r))) == NULL)
		goto oom;
	if (renew_grow(r, n) == -1 || arr_open(&r->ids) == -1 || arr_open(&r->fences) == -1)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		r->sent_ids[i] = items[i]->id;
		r->sent_fences[i] = items[i]->fence;
		if (arr_add_int(&r->ids, items[i]->id) == -1 ||
		    arr_add_int(&r->fences, items[i]->fence) == -1)
			goto oom;
	}
	if (arr_close(&r->ids) == -1 || arr_close(&r->fences) == -1)
		goto oom;
	r->nsent = n;
	snprintf(r->lease, sizeof(r->lease), "%d", lease_ms);
	r->params[0] = r->ids.data;
	r->params[1] = r->fences.data;
	r->params[2] = r->lease;
	r->stmt = stmt_of(STMT_RENEW, kind, r->name);
	stmts[0] = &r->stmt;
	params[0] = r->params;
	return store_op_send(st, &r->op, stmts, 1, nparams, params);
oom:
	store_errorf(st, "out of memory");
	return -1;
}

bool
store_renew_pending(const store *st, enum item_kind kind)
{
	return st->renew[kind] != NULL && store_op_active(&st->renew[kind]->op);
}

int
store_renew_take(store *st, enum item_kind kind, const int64_t **lost_ids,
    const int64_t **lost_fences, size_t *ret_nlost)
{
	struct renew_op *r = st->renew[kind];
	const PGresult *res;
	int ret;

	*ret_nlost = 0;
	if (r == NULL)
		return -1;
	if ((ret = store_op_poll(st, &r->op)) != 1)
		return ret;
	if (index_grow(&r->ix, &r->ix_cap, r->nsent) == NULL) {
		store_op_clear(&r->op);
		store_errorf(st, "out of memory");
		return -1;
	}
	for (size_t i = 0; i < r->nsent; i++) {
		r->ix[i].id = r->sent_ids[i];
		r->ix[i].pos = i;
		r->renewed[i] = false;
	}
	qsort(r->ix, r->nsent, sizeof(*r->ix), id_pos_cmp);
	/* Renewed rows come back; everything else is no longer ours. */
	res = store_op_result(&r->op, 0);
	for (int row = 0; row < PQntuples(res); row++) {
		ssize_t pos = index_find(r->ix, r->nsent, strtoll(PQgetvalue(res, row, 0), NULL,
		    10));

		if (pos >= 0)
			r->renewed[pos] = true;
	}
	store_op_clear(&r->op);
	r->nlost = 0;
	for (size_t i = 0; i < r->nsent; i++) {
		if (r->renewed[i])
			continue;
		r->lost_ids[r->nlost] = r->sent_ids[i];
		r->lost_fences[r->nlost++] = r->sent_fences[i];
	}
	*lost_ids = r->lost_ids;
	*lost_fences = r->lost_fences;
	*ret_nlost = r->nlost;
	return 1;
}

void
store_renewals_free(store *st)
{
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		struct renew_op *r = st->renew[k];

		if (r == NULL)
			continue;
		store_op_clear(&r->op);
		free(r->ids.data);
		free(r->fences.data);
		free(r->sent_ids);
		free(r->sent_fences);
		free(r->lost_ids);
		free(r->lost_fences);
		free(r->renewed);
		free(r->ix);
		free(r);
		st->renew[k] = NULL;
	}
}

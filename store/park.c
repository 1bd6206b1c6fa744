#include <inttypes.h>
#include <stdio.h>

#include "common/log.h"
#include "store/store_int.h"

/*
 * The last resort for a poison row: one whose completion the database
 * refuses (a corrupted counter out of range, a producer's trigger, a
 * constraint).  Recording it again would fail again, and retrying the
 * batch at once would spin and hold every other outcome of the batch back.
 * Parking writes only columns that cannot overflow or violate anything of
 * ours, so the row carries the reason for an operator (status lists it as
 * overdue) and is retried after a long delay instead of spinning.
 */
static const char *const sql_park[ITEM_KIND_COUNT] = {
	"UPDATE invoices SET last_error = $3, ambiguous = ambiguous OR $4::bool, "
	"next_attempt_at = now() + $5 * interval '1 millisecond', locked_by = NULL, "
	"lease_until = NULL, updated_at = now() "
	"WHERE id = $1 AND fence = $2 AND status = 'pending' RETURNING id",
	"UPDATE redemptions SET last_error = $3, ambiguous = ambiguous OR $4::bool, "
	"next_attempt_at = now() + $5 * interval '1 millisecond', locked_by = NULL, "
	"lease_until = NULL, updated_at = now() "
	"WHERE id = $1 AND fence = $2 AND status = 'pending' RETURNING id",
};

int
store_park(store *st, const struct completion *c, int64_t delay_ms, const char *reason,
    bool *ret_parked)
{
	char id[24], fence[24], delay[24];
	/* A recorded success is a charge that stands: never to be given up on. */
	bool ambiguous = c->ambiguous || c->state == COMPLETION_DONE;
	const char *params[5] = { id, fence, reason, ambiguous ? "t" : "f", delay };
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql_park[c->kind], .what = "park",
		.want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	snprintf(id, sizeof(id), "%" PRId64, c->id);
	snprintf(fence, sizeof(fence), "%" PRId64, c->fence);
	snprintf(delay, sizeof(delay), "%" PRId64, delay_ms);
	if (store_run(st, &stmt, 5, params, &res) == -1)
		return -1;
	*ret_parked = PQntuples(res) == 1;
	PQclear(res);
	return 0;
}

/*
 * A row whose claim the database refuses (its fence cannot be bumped, a
 * producer's trigger) has no claim and so no fence to check: it is parked
 * only while it is pending, due and under no live lease, which is exactly
 * what a claim would have required.  Fence, holder, lease and attempts stay
 * as they are, so a later claim still sees an expired lease as ambiguous.
 */
static const char *const sql_park_unclaimed[ITEM_KIND_COUNT] = {
	"UPDATE invoices SET last_error = $2, "
	"next_attempt_at = now() + $3 * interval '1 millisecond', updated_at = now() "
	"WHERE id = $1 AND status = 'pending' AND next_attempt_at <= now() "
	"AND (lease_until IS NULL OR lease_until <= now()) RETURNING id",
	"UPDATE redemptions SET last_error = $2, "
	"next_attempt_at = now() + $3 * interval '1 millisecond', updated_at = now() "
	"WHERE id = $1 AND status = 'pending' AND next_attempt_at <= now() "
	"AND (lease_until IS NULL OR lease_until <= now()) RETURNING id",
};

int
store_park_unclaimed(store *st, enum item_kind kind, int64_t id, int64_t delay_ms,
    const char *reason, bool *ret_parked)
{
	char idtext[24], delay[24];
	const char *params[3] = { idtext, reason, delay };
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql_park_unclaimed[kind], .what = "park",
		.want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	snprintf(idtext, sizeof(idtext), "%" PRId64, id);
	snprintf(delay, sizeof(delay), "%" PRId64, delay_ms);
	if (store_run(st, &stmt, 3, params, &res) == -1)
		return -1;
	*ret_parked = PQntuples(res) == 1;
	if (*ret_parked)
		log_error("%s %" PRId64 ": %s; left pending with this reason for an operator, "
		    "not claimed again for %" PRId64 " ms", item_kind_name(kind), id, reason,
		    delay_ms);
	PQclear(res);
	return 0;
}

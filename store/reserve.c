#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * Setting funds aside before a redemption's API call: bw_reserve() (the
 * schema's function) locks each subsidy's row, checks its balance and
 * writes the hold, for a whole batch in one statement.
 */

int
store_prepare_reserve(store *st)
{
	return store_prepare(st, "reserve",
	    "SELECT rid, result FROM bw_reserve($1::bigint[], $2::bigint[])");
}

static const struct store_stmt reserve = {
	.send = STORE_PREPARED, .text = "reserve", .what = "reserve",
	.want = PGRES_TUPLES_OK,
};

/* What bw_reserve() said of one redemption. */
static enum reserve_result
result_of(const char *what)
{
	return strcmp(what, "held") == 0 ? RESERVE_HELD :
	    strcmp(what, "insufficient") == 0 ? RESERVE_INSUFFICIENT :
	    strcmp(what, "busy") == 0 ? RESERVE_BUSY : RESERVE_LOST;
}


/*
 * The loop's reservation, asynchronous: the ids sent are kept with their
 * positions, so the answer maps back to the batch the caller sent.
 */
struct reserve_op {
	struct store_op op;
	struct buf ids, fences;
	const char *params[2];
	struct id_pos *ix;
	size_t ix_cap, n;
};

int
store_reserve_send(store *st, struct item *const *items, size_t n)
{
	const struct store_stmt *stmts[1] = { &reserve };
	const char *const *params[1];
	int nparams[1] = { 2 };
	struct reserve_op *r = st->reserve;

	if (r == NULL && (r = st->reserve = calloc(1, sizeof(*r))) == NULL)
		goto oom;
	if (index_grow(&r->ix, &r->ix_cap, n) == NULL || arr_open(&r->ids) == -1 ||
	    arr_open(&r->fences) == -1)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		r->ix[i].id = items[i]->id;
		r->ix[i].pos = i;
		if (arr_add_int(&r->ids, items[i]->id) == -1 ||
		    arr_add_int(&r->fences, items[i]->fence) == -1)
			goto oom;
	}
	if (arr_close(&r->ids) == -1 || arr_close(&r->fences) == -1)
		goto oom;
	qsort(r->ix, n, sizeof(*r->ix), id_pos_cmp);
	r->n = n;
	r->params[0] = r->ids.data;
	r->params[1] = r->fences.data;
	params[0] = r->params;
	snprintf(r->op.subject, sizeof(r->op.subject), "reservation of %zu redemptions", n);
	return store_op_send(st, &r->op, stmts, 1, nparams, params);
oom:
	store_errorf(st, "out of memory");
	return -1;
}

bool
store_reserve_pending(const store *st)
{
	return st->reserve != NULL && store_op_active(&st->reserve->op);
}

int
store_reserve_take(store *st, enum reserve_result *results)
{
	struct reserve_op *r = st->reserve;
	const PGresult *res;
	int ret;

	if (r == NULL)
		return -1;
	if ((ret = store_op_poll(st, &r->op)) != 1)
		return ret;
	for (size_t i = 0; i < r->n; i++)
		results[i] = RESERVE_LOST;
	res = store_op_result(&r->op, 0);
	for (int row = 0; row < PQntuples(res); row++) {
		ssize_t pos = index_find(r->ix, r->n, strtoll(PQgetvalue(res, row, 0), NULL, 10));

		if (pos >= 0)
			results[pos] = result_of(PQgetvalue(res, row, 1));
	}
	store_op_clear(&r->op);
	return 1;
}

void
store_reserve_free(store *st)
{
	if (st->reserve == NULL)
		return;
	store_op_clear(&st->reserve->op);
	free(st->reserve->ids.data);
	free(st->reserve->fences.data);
	free(st->reserve->ix);
	free(st->reserve);
	st->reserve = NULL;
}

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

int
store_reserve(store *st, struct item *const *items, size_t n,
    enum reserve_result *results)
{
	static const struct store_stmt reserve = {
		.send = STORE_PREPARED, .text = "reserve", .what = "reserve",
		.want = PGRES_TUPLES_OK,
	};
	struct buf *ids = &st->arr[0], *fences = &st->arr[1];
	struct id_pos *ix;
	const char *params[2];
	PGresult *res = NULL;
	int ret = -1;

	if (n == 0)
		return 0;
	if (arr_open(ids) == -1 || arr_open(fences) == -1)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		results[i] = RESERVE_LOST;
		if (arr_add_int(ids, items[i]->id) == -1 ||
		    arr_add_int(fences, items[i]->fence) == -1)
			goto oom;
	}
	if (arr_close(ids) == -1 || arr_close(fences) == -1)
		goto oom;
	params[0] = ids->data;
	params[1] = fences->data;
	if (store_run_retrying(st, &reserve, 2, params, &res, "reservation of %zu redemptions",
	    n) == -1)
		return -1;
	if ((ix = index_items(st, items, n)) == NULL) {
		PQclear(res);
		goto oom;
	}
	for (int r = 0; r < PQntuples(res); r++) {
		ssize_t pos = index_find(ix, n, strtoll(PQgetvalue(res, r, 0), NULL, 10));
		const char *what = PQgetvalue(res, r, 1);

		if (pos >= 0)
			results[pos] = strcmp(what, "held") == 0 ? RESERVE_HELD :
			    strcmp(what, "insufficient") == 0 ? RESERVE_INSUFFICIENT :
			    strcmp(what, "busy") == 0 ? RESERVE_BUSY : RESERVE_LOST;
	}
	ret = 0;
	PQclear(res);
	return ret;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

/*
 * Unit tests for billing/fleet.c: the local share of the budget while
 * Redis cannot be asked, and what a shared grant does with the answers of
 * its scripts.  The Redis connection is a fake that records each script
 * call's arguments and answers from a script the test sets; the scripts'
 * own arithmetic runs against a real redis-server in the integration
 * tests (test_rate_limit.py).
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "billing/fleet.h"

/* ---- a fake connection ---- */

struct redis_conn {
	bool connected;
	bool fail;                      /* the next eval fails */
	int nscripts;
	int last_script;
	char last_args[8][64];
	size_t last_nargs;
	long long answer[3];            /* the next eval's reply */
	int evals;
};
static struct redis_conn conn;

int
redis_conn_script(redis_conn *rc, const char *name, const char *source, int *ret_id)
{
	(void)name;
	(void)source;
	*ret_id = rc->nscripts++;
	return 0;
}

bool redis_conn_connected(const redis_conn *rc) { return rc->connected; }
const char *redis_conn_errmsg(const redis_conn *rc) { (void)rc; return "fake redis error"; }
const char *redis_conn_prefix(const redis_conn *rc) { (void)rc; return "bw:"; }

int
redis_conn_eval(redis_conn *rc, int id, const char *const *keys, size_t nkeys,
    const char *const *args, size_t nargs, long long *out, size_t nout)
{
	(void)keys;
	assert_int_equal(nkeys, 0);
	rc->evals++;
	rc->last_script = id;
	rc->last_nargs = nargs;
	for (size_t i = 0; i < nargs && i < 8; i++)
		snprintf(rc->last_args[i], sizeof(rc->last_args[i]), "%s", args[i]);
	if (rc->fail)
		return -1;
	for (size_t i = 0; i < nout; i++)
		out[i] = rc->answer[i];
	return 0;
}

int
redis_conn_eval_many(redis_conn *rc, const struct redis_eval *ev, size_t n)
{
	int ret = 0;

	for (size_t k = 0; k < n; k++)
		if (redis_conn_eval(rc, ev[k].id, ev[k].keys, ev[k].nkeys, ev[k].args, ev[k].nargs,
		    ev[k].out, ev[k].nout) == -1)
			ret = -1;
	return ret;
}

static int
reset(void **state)
{
	(void)state;
	memset(&conn, 0, sizeof(conn));
	conn.connected = true;
	return 0;
}

/* ---- the local share ---- */

static void
test_without_a_limit_everything_is_granted(void **state)
{
	fleet *f;
	size_t n;

	(void)state;
	assert_int_equal(fleet_new(NULL, "w1", &f), 0);
	fleet_set_rate(f, 0);
	assert_int_equal(fleet_grant(f, true, 500, 800, &n), 0);   /* no conn: local */
	assert_int_equal(n, 500);
	assert_int_equal(fleet_wait_ms(f), 0);
	fleet_free(f);
}

static void
test_local_share_is_the_bucket_and_says_how_long_to_wait(void **state)
{
	fleet *f;
	size_t n;

	(void)state;
	assert_int_equal(fleet_new(NULL, "w1", &f), 0);
	fleet_set_rate(f, 100);         /* 50 ms worth: 5 calls */
	assert_int_equal(fleet_grant(f, false, 64, 64, &n), 0);
	assert_int_equal(n, 5);
	assert_int_equal(fleet_grant(f, false, 64, 64, &n), 0);
	assert_int_equal(n, 0);
	assert_true(fleet_wait_ms(f) > 0 && fleet_wait_ms(f) <= 10);
	fleet_free(f);
}

static void
test_a_429_pauses_the_local_share_too(void **state)
{
	fleet *f;
	size_t n;

	(void)state;
	assert_int_equal(fleet_new(NULL, "w1", &f), 0);
	fleet_set_rate(f, 0);
	fleet_pause(f, 5000);
	assert_int_equal(fleet_grant(f, false, 10, 10, &n), 0);
	assert_int_equal(n, 0);
	assert_true(fleet_wait_ms(f) > 4000 && fleet_wait_ms(f) <= 5000);
	fleet_free(f);
}

/* ---- the shared budget ---- */

/*
 * A clean stop takes the worker out of the registry at once: it counted
 * in the others' share of the rate and their candidate window for 10 s
 * after it was gone.  Nothing is sent without a connection.
 */
static void
test_leaving_takes_the_worker_out_of_the_registry(void **state)
{
	fleet *f;

	(void)state;
	assert_int_equal(fleet_new(&conn, "w1", &f), 0);
	fleet_leave(f);
	assert_int_equal(conn.evals, 1);
	assert_int_equal(conn.last_script, 3);
	assert_int_equal(conn.last_nargs, 2);
	assert_string_equal(conn.last_args[0], "w1");
	assert_string_equal(conn.last_args[1], "bw:");
	conn.connected = false;
	fleet_leave(f);
	assert_int_equal(conn.evals, 1);
	fleet_free(f);
}

static void
test_shared_grant_asks_redis_and_gives_back_what_was_not_locked(void **state)
{
	fleet *f;
	size_t n;

	(void)state;
	assert_int_equal(fleet_new(&conn, "w1", &f), 0);
	assert_int_equal(conn.nscripts, 4);
	fleet_set_rate(f, 1000);
	conn.answer[0] = 8;
	conn.answer[1] = 0;
	conn.answer[2] = 3;
	assert_int_equal(fleet_workers(f), 0);  /* not counted yet */
	assert_int_equal(fleet_grant(f, true, 10, 40, &n), 0);
	assert_int_equal(n, 8);
	assert_int_equal(fleet_workers(f), 3);
	/* rate, burst (50 ms of 1000/s), want, offered, member, prefix */
	assert_int_equal(conn.last_nargs, 6);
	assert_string_equal(conn.last_args[0], "1000");
	assert_string_equal(conn.last_args[1], "50");
	assert_string_equal(conn.last_args[2], "10");
	assert_string_equal(conn.last_args[3], "40");
	assert_string_equal(conn.last_args[4], "w1");
	assert_string_equal(conn.last_args[5], "bw:");

	conn.answer[0] = 7;             /* the give-back's wait */
	fleet_give_back(f, 5);
	assert_int_equal(conn.evals, 2);
	assert_string_equal(conn.last_args[2], "5");
	assert_string_equal(conn.last_args[3], "1");    /* 8 granted of 40 due: short */
	assert_int_equal(fleet_wait_ms(f), 7);

	fleet_give_back(f, 0);          /* nothing to give: no round trip */
	assert_int_equal(conn.evals, 2);
	fleet_free(f);
}

static void
test_no_give_back_without_a_limit(void **state)
{
	fleet *f;
	size_t n;

	(void)state;
	assert_int_equal(fleet_new(&conn, "w1", &f), 0);
	fleet_set_rate(f, 0);
	conn.answer[0] = 10;
	assert_int_equal(fleet_grant(f, true, 10, 10, &n), 0);
	fleet_give_back(f, 4);
	assert_int_equal(conn.evals, 1);
	fleet_free(f);
}

static void
test_failed_grant_grants_nothing_and_the_share_follows_the_registry(void **state)
{
	fleet *f;
	size_t n = 99;

	(void)state;
	assert_int_equal(fleet_new(&conn, "w1", &f), 0);
	fleet_set_rate(f, 400);         /* alone: 20 calls banked; among 4: 5 */
	conn.answer[0] = 1;
	conn.answer[2] = 4;
	assert_int_equal(fleet_grant(f, true, 1, 1, &n), 0);
	conn.fail = true;
	assert_int_equal(fleet_grant(f, true, 64, 64, &n), -1);
	assert_int_equal(n, 0);
	/* The caller falls back to the local share: rate / 4 workers. */
	assert_int_equal(fleet_grant(f, false, 64, 64, &n), 0);
	assert_int_equal(n, 5);
	fleet_free(f);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_without_a_limit_everything_is_granted, reset),
		cmocka_unit_test_setup(test_leaving_takes_the_worker_out_of_the_registry, reset),
		cmocka_unit_test_setup(test_local_share_is_the_bucket_and_says_how_long_to_wait, reset),
		cmocka_unit_test_setup(test_a_429_pauses_the_local_share_too, reset),
		cmocka_unit_test_setup(test_shared_grant_asks_redis_and_gives_back_what_was_not_locked,
		    reset),
		cmocka_unit_test_setup(test_no_give_back_without_a_limit, reset),
		cmocka_unit_test_setup(test_failed_grant_grants_nothing_and_the_share_follows_the_registry,
		    reset),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

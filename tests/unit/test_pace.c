#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "billing/pace.h"

static void
test_unlimited_grants_everything(void **state)
{
	struct pace p;

	(void)state;
	pace_init(&p, 0, 100, 0);
	assert_int_equal(pace_take(&p, 1000, 0), 1000);
	assert_int_equal(pace_wait_ms(&p, 0), 0);
}

static void
test_rate_is_kept_over_time(void **state)
{
	struct pace p;
	int total = 0;

	(void)state;
	/* 100/s with a 100 ms bucket: 10 at once, then 1 per 10 ms. */
	pace_init(&p, 100, 100, 0);
	for (int64_t t = 0; t <= 2000; t += 5)
		total += pace_take(&p, 50, t);
	/* 10 up front + 200 over two seconds. */
	assert_in_range(total, 205, 211);
}

static void
test_empty_bucket_says_how_long_to_wait(void **state)
{
	struct pace p;

	(void)state;
	pace_init(&p, 50, 100, 1000);
	assert_int_equal(pace_take(&p, 100, 1000), 5);
	assert_int_equal(pace_take(&p, 1, 1000), 0);
	assert_int_equal(pace_wait_ms(&p, 1000), 20);
	assert_int_equal(pace_wait_ms(&p, 1010), 10);
	assert_int_equal(pace_take(&p, 5, 1020), 1);
}

static void
test_low_rate_still_admits_one(void **state)
{
	struct pace p;

	(void)state;
	pace_init(&p, 1, 100, 0);
	assert_int_equal(pace_take(&p, 3, 0), 1);
	assert_int_equal(pace_wait_ms(&p, 0), 1000);
	assert_int_equal(pace_take(&p, 3, 999), 0);
	assert_int_equal(pace_take(&p, 3, 1000), 1);
}

static void
test_pause_stops_everything_until_it_ends(void **state)
{
	struct pace p;

	(void)state;
	pace_init(&p, 0, 100, 0);
	pace_pause(&p, 2000);
	pace_pause(&p, 1500);           /* an earlier end never shortens it */
	assert_int_equal(pace_take(&p, 10, 1999), 0);
	assert_int_equal(pace_wait_ms(&p, 1000), 1000);
	assert_int_equal(pace_take(&p, 10, 2000), 10);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_unlimited_grants_everything),
		cmocka_unit_test(test_rate_is_kept_over_time),
		cmocka_unit_test(test_empty_bucket_says_how_long_to_wait),
		cmocka_unit_test(test_low_rate_still_admits_one),
		cmocka_unit_test(test_pause_stops_everything_until_it_ends),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

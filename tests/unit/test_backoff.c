/*
 * Unit tests for common/backoff.c: the cap doubles from the initial delay
 * and stops at the maximum, whatever the attempt count, and the delay is
 * drawn from [0, cap] by the caller's random value.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <limits.h>

#include <cmocka.h>

#include "common/backoff.h"

/* The defaults of billing_api.backoff_initial_ms and backoff_max_ms. */
#define INITIAL 1000
#define MAX     300000

/* A deterministic spread of 64-bit values (xorshift64*). */
static uint64_t
next_rnd(uint64_t *s)
{
	*s ^= *s >> 12;
	*s ^= *s << 25;
	*s ^= *s >> 27;
	return *s * UINT64_C(2685821657736338717);
}

static void
test_cap_doubles_then_stops(void **state)
{
	static const struct {
		int attempt;
		int64_t cap;
	} rows[] = {
		{ 1, 1000 }, { 2, 2000 }, { 3, 4000 }, { 4, 8000 }, { 5, 16000 },
		{ 6, 32000 }, { 7, 64000 }, { 8, 128000 }, { 9, 256000 },
		{ 10, 300000 }, { 11, 300000 }, { 30, 300000 },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		if (backoff_cap_ms(rows[i].attempt, INITIAL, MAX) != rows[i].cap)
			print_message("attempt %d\n", rows[i].attempt);
		assert_int_equal(backoff_cap_ms(rows[i].attempt, INITIAL, MAX), rows[i].cap);
	}
}

static void
test_cap_reaches_max_exactly(void **state)
{
	(void)state;
	/* max a power-of-two multiple of initial: no step past it. */
	assert_int_equal(backoff_cap_ms(3, 1000, 4000), 4000);
	assert_int_equal(backoff_cap_ms(4, 1000, 4000), 4000);
	/* initial == max: flat. */
	assert_int_equal(backoff_cap_ms(1, 5000, 5000), 5000);
	assert_int_equal(backoff_cap_ms(9, 5000, 5000), 5000);
	/* The config's extremes. */
	assert_int_equal(backoff_cap_ms(1, 1, 86400000), 1);
	assert_int_equal(backoff_cap_ms(1000, 1, 86400000), 86400000);
	assert_int_equal(backoff_cap_ms(1000, 86400000, 86400000), 86400000);
}

static void
test_attempt_below_one_is_one(void **state)
{
	static const int attempts[] = { 0, -1, -1000, INT_MIN };

	(void)state;
	for (size_t i = 0; i < sizeof(attempts) / sizeof(attempts[0]); i++) {
		assert_int_equal(backoff_cap_ms(attempts[i], INITIAL, MAX), INITIAL);
		assert_int_equal(backoff_delay_ms(attempts[i], INITIAL, MAX, INITIAL), INITIAL);
		assert_int_equal(backoff_delay_ms(attempts[i], INITIAL, MAX, UINT64_MAX),
		    (int64_t)(UINT64_MAX % (INITIAL + 1)));
	}
}

static void
test_huge_attempts_give_max(void **state)
{
	static const int attempts[] = { 64, 65, 1000, INT_MAX - 1, INT_MAX };

	(void)state;
	for (size_t i = 0; i < sizeof(attempts) / sizeof(attempts[0]); i++) {
		assert_int_equal(backoff_cap_ms(attempts[i], INITIAL, MAX), MAX);
		assert_int_equal(backoff_cap_ms(attempts[i], 1, 86400000), 86400000);
		assert_int_equal(backoff_delay_ms(attempts[i], INITIAL, MAX, MAX), MAX);
		assert_int_equal(backoff_delay_ms(attempts[i], INITIAL, MAX, MAX + 1), 0);
	}
}

/* Doubling must not overflow int64 on its way to a maximum near the top. */
static void
test_large_max_no_overflow(void **state)
{
	(void)state;
	assert_int_equal(backoff_cap_ms(63, 1, INT64_MAX), INT64_C(1) << 62);
	assert_int_equal(backoff_cap_ms(64, 1, INT64_MAX), INT64_MAX);
	assert_int_equal(backoff_cap_ms(INT_MAX, 1, INT64_MAX), INT64_MAX);
	assert_int_equal(backoff_cap_ms(2, INT64_MAX / 2 + 1, INT64_MAX), INT64_MAX);
	assert_int_equal(backoff_cap_ms(INT_MAX, 3, INT64_MAX), INT64_MAX);
	assert_int_equal(backoff_delay_ms(INT_MAX, 1, INT64_MAX, UINT64_MAX),
	    (int64_t)(UINT64_MAX % ((uint64_t)INT64_MAX + 1)));
}

static void
test_delay_within_cap(void **state)
{
	static const uint64_t fixed[] = {
		0, 1, 2, 999, 1000, 1001, 299999, 300000, 300001,
		UINT64_MAX / 2, UINT64_MAX - 1, UINT64_MAX,
	};
	uint64_t s = UINT64_C(0x9e3779b97f4a7c15);

	(void)state;
	for (int attempt = -2; attempt <= 40; attempt++) {
		int64_t cap = backoff_cap_ms(attempt, INITIAL, MAX);

		assert_true(cap >= INITIAL && cap <= MAX);
		for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
			int64_t d = backoff_delay_ms(attempt, INITIAL, MAX, fixed[i]);

			assert_in_range(d, 0, cap);
		}
		for (int i = 0; i < 2000; i++) {
			int64_t d = backoff_delay_ms(attempt, INITIAL, MAX, next_rnd(&s));

			assert_in_range(d, 0, cap);
		}
	}
}

/* Full jitter: rnd picks any value in [0, cap], both ends included. */
static void
test_full_jitter_spreads(void **state)
{
	uint64_t s = 42;
	int64_t lo = INT64_MAX, hi = -1;

	(void)state;
	/* attempt 3: cap 4000, 4001 possible delays. */
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 0), 0);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 1), 1);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 2000), 2000);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 4000), 4000);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 4001), 0);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 4002), 1);
	assert_int_equal(backoff_delay_ms(3, INITIAL, MAX, 2 * 4001 + 17), 17);
	/* At the max. */
	assert_int_equal(backoff_delay_ms(20, INITIAL, MAX, MAX), MAX);
	assert_int_equal(backoff_delay_ms(20, INITIAL, MAX, MAX + 1), 0);

	for (int i = 0; i < 10000; i++) {
		int64_t d = backoff_delay_ms(20, INITIAL, MAX, next_rnd(&s));

		lo = d < lo ? d : lo;
		hi = d > hi ? d : hi;
	}
	assert_true(lo < MAX / 100);
	assert_true(hi > MAX - MAX / 100);
}

/* A zero or negative cap (not allowed by the config) gives no delay. */
static void
test_nonpositive_cap_gives_zero(void **state)
{
	(void)state;
	assert_int_equal(backoff_delay_ms(1, 0, MAX, 12345), 0);
	assert_int_equal(backoff_delay_ms(5, 0, MAX, UINT64_MAX), 0);
	assert_int_equal(backoff_delay_ms(1, 1000, 0, 12345), 0);
	assert_int_equal(backoff_delay_ms(1, -5, MAX, 12345), 0);
	/* Neither overflows nor spins through INT_MAX doublings. */
	assert_int_equal(backoff_delay_ms(INT_MAX, -5, MAX, 12345), 0);
	assert_int_equal(backoff_delay_ms(INT_MAX, 0, MAX, 12345), 0);
	assert_true(backoff_cap_ms(INT_MAX, INT64_MIN, MAX) <= 0);
}

/* struct backoff: min, doubling, held at max, back to min on reset. */
static void
test_doubling_helper(void **state)
{
	static const int64_t want[] = { 200, 400, 800, 1600, 3200, 6400, 10000, 10000, 10000 };
	struct backoff b;

	(void)state;
	backoff_init(&b, 200, 10000);
	for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
		assert_int_equal(backoff_peek(&b), want[i]);
		assert_int_equal(backoff_take(&b), want[i]);
	}
	backoff_reset(&b);
	assert_int_equal(backoff_take(&b), 200);
	assert_int_equal(backoff_take(&b), 400);
}

/* Taken forever, it neither overflows nor leaves [min, max]; odd bounds hold. */
static void
test_doubling_helper_bounds(void **state)
{
	struct backoff b;

	(void)state;
	backoff_init(&b, 1, INT64_MAX);
	for (int i = 0; i < 200; i++) {
		int64_t d = backoff_take(&b);

		assert_true(d >= 1 && d <= INT64_MAX);
	}
	assert_int_equal(backoff_take(&b), INT64_MAX);
	/* A maximum below the minimum is the minimum; a zero minimum is 1 ms. */
	backoff_init(&b, 500, 100);
	assert_int_equal(backoff_take(&b), 500);
	assert_int_equal(backoff_take(&b), 500);
	backoff_init(&b, 0, 4);
	assert_int_equal(backoff_take(&b), 1);
	assert_int_equal(backoff_take(&b), 2);
	assert_int_equal(backoff_take(&b), 4);
	assert_int_equal(backoff_take(&b), 4);
}

int
main(void)
{
	static const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_cap_doubles_then_stops),
		cmocka_unit_test(test_cap_reaches_max_exactly),
		cmocka_unit_test(test_attempt_below_one_is_one),
		cmocka_unit_test(test_huge_attempts_give_max),
		cmocka_unit_test(test_large_max_no_overflow),
		cmocka_unit_test(test_delay_within_cap),
		cmocka_unit_test(test_full_jitter_spreads),
		cmocka_unit_test(test_nonpositive_cap_gives_zero),
		cmocka_unit_test(test_doubling_helper),
		cmocka_unit_test(test_doubling_helper_bounds),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

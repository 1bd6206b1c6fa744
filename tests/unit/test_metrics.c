/*
 * Unit tests for common/metrics.c: every series exists from the start, the
 * increments land in the series they name, the histogram is cumulative with
 * inclusive bounds, and the text follows the exposition format line by line.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "common/metrics.h"

static char *
render(void)
{
	char *text = NULL;
	size_t len = 0;

	assert_int_equal(metrics_render(&text, &len), 0);
	assert_int_equal(strlen(text), len);
	return text;
}

/* The value of SERIES (the full name with labels); fails when it is missing. */
static double
value_of(const char *text, const char *series)
{
	size_t n = strlen(series);
	const char *p = text;

	while ((p = strstr(p, series)) != NULL) {
		if ((p == text || p[-1] == '\n') && p[n] == ' ')
			return strtod(p + n + 1, NULL);
		p += n;
	}
	fail_msg("series %s not found in:\n%s", series, text);
	return -1;
}

static bool
has_series(const char *text, const char *series)
{
	char line[256];

	snprintf(line, sizeof(line), "\n%s ", series);
	return strstr(text, line) != NULL;
}

static int
reset(void **state)
{
	(void)state;
	metrics_reset();
	return 0;
}

static void
test_all_series_start_at_zero(void **state)
{
	char *t = render();

	(void)state;
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"invoice\",outcome=\"paid\"}") == 0);
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"redemption\",outcome=\"redeemed\"}") == 0);
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"redemption\",outcome=\"failed\"}") == 0);
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"5xx\"}") == 0);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"+Inf\"}") == 0);
	assert_true(value_of(t, "billing_worker_lock_losses_total{lock=\"lease\"}") == 0);
	assert_true(value_of(t, "billing_worker_reconnects_total{peer=\"redis\"}") == 0);
	assert_true(value_of(t, "billing_worker_in_flight") == 0);
	assert_true(value_of(t, "billing_worker_api_blocked") == 0);
	assert_true(value_of(t, "billing_worker_redis_up") == 0);
	/* No round yet: 0, which a staleness alert reads as long ago. */
	assert_true(value_of(t, "billing_worker_last_poll_timestamp_seconds") == 0);
	/* Not known until the first query: absent rather than a false 0. */
	assert_false(has_series(t, "billing_worker_backlog{kind=\"invoice\"}"));
	assert_null(strstr(t, "\nbilling_worker_lock_mode{"));
	free(t);
}

static void
test_outcomes_by_kind(void **state)
{
	char *t;

	(void)state;
	for (int i = 0; i < 45; i++)
		metrics_item_finished(ITEM_INVOICE, true);
	for (int i = 0; i < 5; i++)
		metrics_item_finished(ITEM_INVOICE, false);
	metrics_item_finished(ITEM_REDEMPTION, true);
	metrics_retry_scheduled(ITEM_REDEMPTION);
	metrics_retry_scheduled(ITEM_REDEMPTION);
	metrics_completion_rejected(ITEM_INVOICE);
	t = render();
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"invoice\",outcome=\"paid\"}") == 45);
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"invoice\",outcome=\"failed\"}") == 5);
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"redemption\",outcome=\"redeemed\"}") == 1);
	assert_true(value_of(t, "billing_worker_items_finished_total{kind=\"redemption\",outcome=\"failed\"}") == 0);
	assert_true(value_of(t, "billing_worker_retries_scheduled_total{kind=\"redemption\"}") == 2);
	assert_true(value_of(t, "billing_worker_retries_scheduled_total{kind=\"invoice\"}") == 0);
	assert_true(value_of(t, "billing_worker_completions_rejected_total{kind=\"invoice\"}") == 1);
	free(t);
}

static void
test_status_classes(void **state)
{
	static const long statuses[] = { 200, 201, 402, 409, 429, 500, 503, 0, 0, 302 };
	char *t;

	(void)state;
	for (size_t i = 0; i < sizeof(statuses) / sizeof(statuses[0]); i++)
		metrics_api_call(statuses[i], 1.0);
	t = render();
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"2xx\"}") == 2);
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"4xx\"}") == 3);
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"5xx\"}") == 2);
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"none\"}") == 2);
	assert_true(value_of(t, "billing_worker_api_calls_total{class=\"other\"}") == 1);
	free(t);
}

static void
test_histogram_is_cumulative_with_inclusive_bounds(void **state)
{
	char *t;

	(void)state;
	metrics_api_call(200, 3.0);         /* 0.003 s: le 0.005 */
	metrics_api_call(200, 100.0);       /* exactly 0.1 s: le 0.1, not 0.25 */
	metrics_api_call(200, 3000.0);      /* le 5 */
	metrics_api_call(0, 100000.0);      /* beyond 60: only +Inf */
	t = render();
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"0.005\"}") == 1);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"0.05\"}") == 1);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"0.1\"}") == 2);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"2.5\"}") == 2);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"5\"}") == 3);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"60\"}") == 3);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_bucket{le=\"+Inf\"}") == 4);
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_count") == 4);
	assert_float_equal(value_of(t, "billing_worker_api_call_duration_seconds_sum"), 103.103, 1e-6);
	free(t);
}

/*
 * The loop stall: 0.1 ms to 10 s, bounds inclusive, and the gauge keeps
 * the longest turn however many short ones follow it.
 */
static void
test_loop_stall_histogram_and_max(void **state)
{
	char *t;

	(void)state;
	t = render();
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"0.0001\"}") == 0);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_count") == 0);
	assert_true(value_of(t, "billing_worker_loop_stall_max_seconds") == 0);
	free(t);

	metrics_loop_stall(0.00005);        /* le 0.0001 */
	metrics_loop_stall(0.0001);         /* exactly the bound: le 0.0001 */
	metrics_loop_stall(0.003);          /* le 0.005 */
	metrics_loop_stall(5.2);            /* a frozen backend: le 10 */
	metrics_loop_stall(0.0002);         /* shorter again: the max stays */
	metrics_loop_stall(42.0);           /* beyond 10: only +Inf */
	metrics_loop_stall(0.001);
	t = render();
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"0.0001\"}") == 2);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"0.00025\"}") == 3);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"0.001\"}") == 4);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"0.005\"}") == 5);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"5\"}") == 5);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"10\"}") == 6);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_bucket{le=\"+Inf\"}") == 7);
	assert_true(value_of(t, "billing_worker_loop_stall_seconds_count") == 7);
	assert_float_equal(value_of(t, "billing_worker_loop_stall_seconds_sum"), 47.20435, 1e-6);
	assert_float_equal(value_of(t, "billing_worker_loop_stall_max_seconds"), 42.0, 1e-9);
	/* The API latency histogram is untouched by it. */
	assert_true(value_of(t, "billing_worker_api_call_duration_seconds_count") == 0);
	free(t);
}

static void
test_locks_reconnects_and_gauges(void **state)
{
	char *t;

	(void)state;
	metrics_lock(METRICS_LOCK_ACQUIRED, 50);
	metrics_lock(METRICS_LOCK_CONTENDED, 7);
	metrics_lock(METRICS_LOCK_LOST_LEASE, 1);
	metrics_lock(METRICS_LOCK_LOST_REDIS, 2);
	metrics_reconnect(METRICS_PEER_DATABASE);
	metrics_set_in_flight(12);
	metrics_set_concurrency(64);
	metrics_set_database_up(true);
	metrics_set_backlog(ITEM_INVOICE, 340, 12.5);
	metrics_set_backlog(ITEM_REDEMPTION, 0, 0);
	t = render();
	assert_true(value_of(t, "billing_worker_lock_acquisitions_total") == 50);
	assert_true(value_of(t, "billing_worker_lock_contentions_total") == 7);
	assert_true(value_of(t, "billing_worker_lock_losses_total{lock=\"lease\"}") == 1);
	assert_true(value_of(t, "billing_worker_lock_losses_total{lock=\"redis\"}") == 2);
	assert_true(value_of(t, "billing_worker_reconnects_total{peer=\"database\"}") == 1);
	assert_true(value_of(t, "billing_worker_reconnects_total{peer=\"redis\"}") == 0);
	assert_true(value_of(t, "billing_worker_in_flight") == 12);
	assert_true(value_of(t, "billing_worker_concurrency") == 64);
	assert_true(value_of(t, "billing_worker_database_up") == 1);
	assert_true(value_of(t, "billing_worker_backlog{kind=\"invoice\"}") == 340);
	assert_true(value_of(t, "billing_worker_oldest_pending_age_seconds{kind=\"invoice\"}") == 12.5);
	assert_true(value_of(t, "billing_worker_backlog{kind=\"redemption\"}") == 0);
	free(t);
}

static void
test_redis_up_lock_mode_and_last_poll(void **state)
{
	char *t;

	(void)state;
	metrics_set_lock_mode("redis");
	metrics_set_redis_up(true);
	/* Beyond 2^31: written whole, never in exponent form. */
	metrics_set_last_poll(INT64_C(4102444800));
	t = render();
	assert_true(value_of(t, "billing_worker_redis_up") == 1);
	assert_true(value_of(t, "billing_worker_lock_mode{mode=\"redis\"}") == 1);
	assert_non_null(strstr(t, "\nbilling_worker_last_poll_timestamp_seconds 4102444800\n"));
	free(t);

	/* Redis lost, then a later round: the newest value wins, one mode only. */
	metrics_set_redis_up(false);
	metrics_set_lock_mode("auto");
	metrics_set_last_poll(INT64_C(4102444801));
	t = render();
	assert_true(value_of(t, "billing_worker_redis_up") == 0);
	assert_true(value_of(t, "billing_worker_lock_mode{mode=\"auto\"}") == 1);
	assert_false(has_series(t, "billing_worker_lock_mode{mode=\"redis\"}"));
	assert_true(value_of(t, "billing_worker_last_poll_timestamp_seconds") == 4102444801.0);
	free(t);

	metrics_set_api_blocked(true);
	t = render();
	assert_true(value_of(t, "billing_worker_api_blocked") == 1);
	free(t);
}

/*
 * Every line is a comment (# HELP / # TYPE) or NAME[{LABELS}] VALUE, every
 * family has HELP and TYPE before its samples, and no name repeats a TYPE.
 */
/* One line names the build, whatever else was counted, and it is always 1. */
static void
test_build_info(void **state)
{
	char *t;
	const char *line;

	(void)state;
	metrics_item_finished(ITEM_INVOICE, true);
	t = render();
	line = strstr(t, "\nbilling_worker_build_info{");
	assert_non_null(line);
	assert_non_null(strstr(t, "\n# TYPE billing_worker_build_info gauge\n"));
	assert_memory_equal(line + 1, "billing_worker_build_info{version=\"" BW_VERSION "\"} 1\n",
	    strlen("billing_worker_build_info{version=\"" BW_VERSION "\"} 1\n"));
	/* exactly one such series */
	assert_null(strstr(line + 1, "\nbilling_worker_build_info{"));
	assert_true(BW_VERSION[0] != '\0');
	free(t);
}

static void
test_exposition_format(void **state)
{
	char *t, *save = NULL, *line;
	char typed[64][96];
	int ntyped = 0;

	(void)state;
	metrics_set_backlog(ITEM_INVOICE, 1, 1);
	metrics_set_lock_mode("skip-locked");
	t = render();
	assert_true(t[strlen(t) - 1] == '\n');
	for (line = strtok_r(t, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
		char name[96], type[32];
		size_t n;

		if (sscanf(line, "# TYPE %95s %31s", name, type) == 2) {
			for (int i = 0; i < ntyped; i++)
				assert_string_not_equal(typed[i], name);
			assert_true(strcmp(type, "counter") == 0 || strcmp(type, "gauge") == 0 ||
			    strcmp(type, "histogram") == 0);
			assert_true(ntyped < 64);
			snprintf(typed[ntyped++], sizeof(typed[0]), "%s", name);
			continue;
		}
		if (strncmp(line, "# HELP billing_worker_", 22) == 0)
			continue;
		n = strspn(line, "abcdefghijklmnopqrstuvwxyz_");
		assert_true(n > 0);
		assert_true(line[n] == ' ' || line[n] == '{');
		/* The sample belongs to the last family typed (or its _bucket/_sum/_count). */
		assert_true(ntyped > 0);
		assert_memory_equal(line, typed[ntyped - 1], strlen(typed[ntyped - 1]));
		if (line[n] == '{') {
			const char *close = strchr(line, '}');

			assert_non_null(close);
			assert_true(close[1] == ' ');
		}
	}
	assert_true(ntyped >= 17);
	free(t);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup(test_all_series_start_at_zero, reset),
		cmocka_unit_test_setup(test_outcomes_by_kind, reset),
		cmocka_unit_test_setup(test_status_classes, reset),
		cmocka_unit_test_setup(test_histogram_is_cumulative_with_inclusive_bounds, reset),
		cmocka_unit_test_setup(test_loop_stall_histogram_and_max, reset),
		cmocka_unit_test_setup(test_locks_reconnects_and_gauges, reset),
		cmocka_unit_test_setup(test_redis_up_lock_mode_and_last_poll, reset),
		cmocka_unit_test_setup(test_build_info, reset),
		cmocka_unit_test_setup(test_exposition_format, reset),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

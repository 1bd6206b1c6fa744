/*
 * Unit tests for billing/outcome.c, the one place the give-up rule lives:
 * a verdict on one call plus what the item knew before -> done, failed, or
 * retry after a delay.  The rule as data, one cmocka test per row; then
 * the properties that need loops and the two fixed outcomes.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "tests/unit/table.h"
#include "common/backoff.h"
#include "billing/outcome.h"

/* max 5 attempts, delays 1 s, 2 s, 4 s, 8 s ... capped at 60 s. */
static const struct retry_policy policy = {
	.max_attempts = 5,
	.backoff_initial_ms = 1000,
	.backoff_max_ms = 60000,
};

#define ANY_DELAY -1   /* expected delay: anything in [0, backoff cap] */

struct outcome_case {
	const char *name;
	enum api_class cls;
	int retry_after_s;
	int attempts;           /* calls recorded before this one */
	bool was_ambiguous;
	uint64_t rnd;
	enum completion_state state;
	bool ambiguous;
	int64_t delay_ms;       /* exact, or ANY_DELAY */
	const char *error;      /* exact */
	bool needs_operator;    /* an operator note is set */
	bool blocked;           /* counted as a worker-level answer */
};

#define V_ERR "http 503"

static const struct outcome_case cases[] = {
	{ "success", API_SUCCESS, -1, 0, false, 7,
	  COMPLETION_DONE, false, 0, "", false, false },
	{ "success after ambiguous keeps the flag", API_SUCCESS, -1, 9, true, 7,
	  COMPLETION_DONE, true, 0, "", false, false },
	{ "declined", API_DECLINED, -1, 0, false, 7,
	  COMPLETION_FAILED, false, 0, V_ERR, false, false },
	{ "declined after ambiguous fails: it is stored under the key", API_DECLINED, -1, 2,
	  true, 7, COMPLETION_FAILED, true, 0, V_ERR, false, false },
	{ "declined beyond max fails without give-up text", API_DECLINED, -1, 20, false, 7,
	  COMPLETION_FAILED, false, 0, V_ERR, false, false },
	{ "refused", API_REFUSED, -1, 0, false, 7,
	  COMPLETION_FAILED, false, 0, V_ERR, false, false },
	{ "refused after ambiguous waits for an operator", API_REFUSED, -1, 2, true, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, true, false },
	{ "key reused", API_KEY_REUSED, -1, 1, false, 7,
	  COMPLETION_FAILED, false, 0, V_ERR, false, false },
	{ "key reused after ambiguous waits for an operator", API_KEY_REUSED, -1, 1, true, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, true, false },

	/* Worker-level answers: never failed, never counted, no operator needed. */
	{ "worker-level first call", API_WORKER, -1, 0, false, 7,
	  COMPLETION_RETRY, false, 7, V_ERR, false, true },
	{ "worker-level at max does not give up", API_WORKER, -1, 4, false, 7,
	  COMPLETION_RETRY, false, 7, V_ERR, false, true },
	{ "worker-level far past max", API_WORKER, -1, 500, false, 1000,
	  COMPLETION_RETRY, false, 1000, V_ERR, false, true },
	{ "worker-level after ambiguous stays ambiguous", API_WORKER, -1, 3, true, 7,
	  COMPLETION_RETRY, true, 7, V_ERR, false, true },

	/* Transient: retry with backoff, give up at max_attempts. */
	{ "transient first call", API_TRANSIENT, -1, 0, false, 12345,
	  COMPLETION_RETRY, false, ANY_DELAY, V_ERR, false, false },
	{ "transient first call rnd at cap", API_TRANSIENT, -1, 0, false, 1000,
	  COMPLETION_RETRY, false, 1000, V_ERR, false, false },
	{ "transient third call rnd at cap", API_TRANSIENT, -1, 2, false, 4000,
	  COMPLETION_RETRY, false, 4000, V_ERR, false, false },
	{ "transient third call rnd past cap", API_TRANSIENT, -1, 2, false, 4001,
	  COMPLETION_RETRY, false, 0, V_ERR, false, false },
	{ "transient one below max", API_TRANSIENT, -1, 3, false, 8000,
	  COMPLETION_RETRY, false, 8000, V_ERR, false, false },
	{ "transient at max gives up", API_TRANSIENT, -1, 4, false, 7,
	  COMPLETION_FAILED, false, 0, "gave up after 5 attempts: " V_ERR, false, false },
	{ "transient past max gives up", API_TRANSIENT, -1, 10, false, 7,
	  COMPLETION_FAILED, false, 0, "gave up after 11 attempts: " V_ERR, false, false },
	{ "transient at max with Retry-After still gives up", API_TRANSIENT, 30, 4, false, 7,
	  COMPLETION_FAILED, false, 0, "gave up after 5 attempts: " V_ERR, false, false },
	{ "transient below max after ambiguous", API_TRANSIENT, -1, 1, true, 2000,
	  COMPLETION_RETRY, true, 2000, V_ERR, false, false },
	{ "transient at max after ambiguous never gives up", API_TRANSIENT, -1, 4, true, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },
	{ "transient far past max after ambiguous", API_TRANSIENT, -1, 999, true, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },

	/* Ambiguous and in progress: the item becomes ambiguous, never fails. */
	{ "ambiguous first call", API_AMBIGUOUS, -1, 0, false, 999,
	  COMPLETION_RETRY, true, 999, V_ERR, false, false },
	{ "ambiguous below max", API_AMBIGUOUS, -1, 2, false, UINT64_MAX,
	  COMPLETION_RETRY, true, ANY_DELAY, V_ERR, false, false },
	{ "ambiguous at max", API_AMBIGUOUS, -1, 4, false, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },
	{ "ambiguous past max", API_AMBIGUOUS, -1, 50, false, 0,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },
	{ "in progress first call", API_IN_PROGRESS, -1, 0, false, 0,
	  COMPLETION_RETRY, true, 0, V_ERR, false, false },
	{ "in progress at max", API_IN_PROGRESS, -1, 4, false, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },
	{ "in progress past max after ambiguous", API_IN_PROGRESS, -1, 8, true, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },

	/* Retry-After raises the delay, never lowers it. */
	{ "Retry-After above backoff raises", API_TRANSIENT, 30, 0, false, 500,
	  COMPLETION_RETRY, false, 30000, V_ERR, false, false },
	{ "Retry-After below backoff does not lower", API_TRANSIENT, 1, 2, false, 4000,
	  COMPLETION_RETRY, false, 4000, V_ERR, false, false },
	{ "Retry-After zero does not lower", API_TRANSIENT, 0, 0, false, 500,
	  COMPLETION_RETRY, false, 500, V_ERR, false, false },
	{ "Retry-After equal to backoff", API_TRANSIENT, 4, 2, false, 4000,
	  COMPLETION_RETRY, false, 4000, V_ERR, false, false },
	{ "Retry-After on 409", API_IN_PROGRESS, 3, 0, false, 0,
	  COMPLETION_RETRY, true, 3000, V_ERR, false, false },
	{ "Retry-After above max when overdue", API_AMBIGUOUS, 120, 4, false, 7,
	  COMPLETION_RETRY, true, 120000, V_ERR, false, false },
	{ "Retry-After below max when overdue", API_AMBIGUOUS, 5, 4, false, 7,
	  COMPLETION_RETRY, true, 60000, V_ERR, false, false },
	{ "Retry-After of a day", API_TRANSIENT, 86400, 0, false, 7,
	  COMPLETION_RETRY, false, 86400000, V_ERR, false, false },
};


static void
make_item(struct item *it, int attempts, bool ambiguous)
{
	memset(it, 0, sizeof(*it));
	it->kind = ITEM_REDEMPTION;
	it->id = INT64_MAX;
	it->fence = 123456789012;
	it->attempts = attempts;
	it->ambiguous = ambiguous;
	it->amount_cents = 2500;
	it->subsidy_id = 7;
}

static void
make_verdict(struct api_verdict *v, enum api_class cls, int retry_after_s, const char *error)
{
	memset(v, 0, sizeof(*v));
	v->cls = cls;
	v->retry_after_s = retry_after_s;
	if (cls == API_SUCCESS)
		snprintf(v->id, sizeof(v->id), "re_123");
	else
		snprintf(v->error, sizeof(v->error), "%s", error);
}

static void
assert_copied(const struct completion *c, const struct item *it)
{
	assert_int_equal(c->kind, it->kind);
	assert_int_equal(c->id, it->id);
	assert_int_equal(c->fence, it->fence);
}

static void
test_case(void **state)
{
	const struct outcome_case *c = *state;
	struct item it;
	struct api_verdict v;
	struct completion out;

	make_item(&it, c->attempts, c->was_ambiguous);
	make_verdict(&v, c->cls, c->retry_after_s, V_ERR);
	memset(&out, 0xa5, sizeof(out));
	outcome_after_call(&it, &v, &policy, c->rnd, &out);

	assert_copied(&out, &it);
	assert_int_equal(out.state, c->state);
	assert_int_equal(out.calls, 1);
	assert_int_equal(out.ambiguous, c->ambiguous);
	if (c->delay_ms == ANY_DELAY)
		assert_in_range(out.delay_ms, 0,
		    backoff_cap_ms(c->attempts + 1, policy.backoff_initial_ms,
		    policy.backoff_max_ms));
	else
		assert_int_equal(out.delay_ms, c->delay_ms);
	assert_string_equal(out.error, c->error);
	assert_string_equal(out.result_id, c->state == COMPLETION_DONE ? "re_123" : "");
	assert_int_equal(out.operator_note[0] != '\0', c->needs_operator);
	assert_int_equal(out.blocked, c->blocked);
	/* The item itself is left alone. */
	assert_int_equal(it.attempts, c->attempts);
	assert_int_equal(it.ambiguous, c->was_ambiguous);
}

/* Below max_attempts the delay is always within the backoff cap. */
static void
test_delay_within_cap(void **state)
{
	static const enum api_class classes[] = { API_TRANSIENT, API_AMBIGUOUS, API_IN_PROGRESS };
	uint64_t rnd = 88172645463325252ULL;

	(void)state;
	for (size_t k = 0; k < sizeof(classes) / sizeof(classes[0]); k++) {
		for (int attempts = 0; attempts < policy.max_attempts - 1; attempts++) {
			int64_t cap = backoff_cap_ms(attempts + 1, policy.backoff_initial_ms,
			    policy.backoff_max_ms);

			for (int i = 0; i < 500; i++) {
				struct item it;
				struct api_verdict v;
				struct completion out;

				rnd ^= rnd << 13;
				rnd ^= rnd >> 7;
				rnd ^= rnd << 17;
				make_item(&it, attempts, false);
				make_verdict(&v, classes[k], -1, V_ERR);
				outcome_after_call(&it, &v, &policy, i == 0 ? UINT64_MAX : rnd, &out);
				assert_int_equal(out.state, COMPLETION_RETRY);
				assert_in_range(out.delay_ms, 0, cap);
			}
		}
	}
}

/* With max_attempts 1 the first transient failure is the last. */
static void
test_single_attempt_policy(void **state)
{
	const struct retry_policy one = { 1, 1000, 60000, 0 };
	struct item it;
	struct api_verdict v;
	struct completion out;

	(void)state;
	make_item(&it, 0, false);
	make_verdict(&v, API_TRANSIENT, -1, "could not reach the billing API: Connection refused");
	outcome_after_call(&it, &v, &one, 7, &out);
	assert_int_equal(out.state, COMPLETION_FAILED);
	assert_string_equal(out.error,
	    "gave up after 1 attempts: could not reach the billing API: Connection refused");

	make_verdict(&v, API_AMBIGUOUS, -1, "no answer from the billing API: timeout");
	outcome_after_call(&it, &v, &one, 7, &out);
	assert_int_equal(out.state, COMPLETION_RETRY);
	assert_true(out.ambiguous);
	assert_int_equal(out.delay_ms, 60000);
}

/* The longest verdict error still fits after "gave up after N attempts: ". */
static void
test_long_error_fits(void **state)
{
	struct item it;
	struct api_verdict v;
	struct completion out;
	char expect[sizeof(out.error)];

	(void)state;
	make_item(&it, 999, false);
	memset(&v, 0, sizeof(v));
	v.cls = API_TRANSIENT;
	v.retry_after_s = -1;
	memset(v.error, 'e', sizeof(v.error) - 1);
	v.error[sizeof(v.error) - 1] = '\0';
	outcome_after_call(&it, &v, &policy, 7, &out);
	assert_int_equal(out.state, COMPLETION_FAILED);
	snprintf(expect, sizeof(expect), "gave up after 1000 attempts: %s", v.error);
	assert_true(strlen(expect) == strlen("gave up after 1000 attempts: ") + strlen(v.error));
	assert_string_equal(out.error, expect);
}

static void
test_refused_before_call(void **state)
{
	struct item it;
	struct completion out;

	(void)state;
	make_item(&it, 3, false);
	it.kind = ITEM_INVOICE;
	it.id = 17;
	memset(&out, 0xa5, sizeof(out));
	outcome_refused(&it, "customer_id is empty", &out);
	assert_copied(&out, &it);
	assert_int_equal(out.state, COMPLETION_FAILED);
	assert_int_equal(out.calls, 0);
	assert_false(out.ambiguous);
	assert_int_equal(out.delay_ms, 0);
	assert_string_equal(out.error, "customer_id is empty");
	assert_string_equal(out.result_id, "");
}

static void
test_abandoned(void **state)
{
	struct item it;
	struct completion out;

	(void)state;
	make_item(&it, 0, false);
	memset(&out, 0xa5, sizeof(out));
	outcome_abandoned(&it, "call abandoned at shutdown", &out);
	assert_copied(&out, &it);
	assert_int_equal(out.state, COMPLETION_RETRY);
	assert_int_equal(out.calls, 1);
	assert_true(out.ambiguous);
	assert_int_equal(out.delay_ms, 0);
	assert_string_equal(out.error, "call abandoned at shutdown");
	assert_string_equal(out.result_id, "");

	/* Past max_attempts too: abandoning never fails an item. */
	make_item(&it, 100, false);
	outcome_abandoned(&it, "call abandoned at shutdown", &out);
	assert_int_equal(out.state, COMPLETION_RETRY);
	assert_true(out.ambiguous);
}

/*
 * Calls answered 401/403/404/405 stay in attempts but never count toward
 * max_attempts: after any number of them, a transient failure is judged on
 * the other calls alone.
 */
static void
test_blocked_calls_not_counted(void **state)
{
	struct item it;
	struct api_verdict v;
	struct completion out;

	(void)state;
	make_item(&it, 104, false);
	it.blocked_calls = 100;         /* 4 counted calls so far */
	make_verdict(&v, API_TRANSIENT, -1, V_ERR);
	outcome_after_call(&it, &v, &policy, 7, &out);
	assert_int_equal(out.state, COMPLETION_FAILED);
	assert_string_equal(out.error, "gave up after 5 attempts: " V_ERR);

	it.blocked_calls = 101;         /* 3 counted: one more may follow */
	outcome_after_call(&it, &v, &policy, 7, &out);
	assert_int_equal(out.state, COMPLETION_RETRY);

	/* A corrupted counter above attempts counts as none counted. */
	it.attempts = 2;
	it.blocked_calls = 50;
	outcome_after_call(&it, &v, &policy, 7, &out);
	assert_int_equal(out.state, COMPLETION_RETRY);
}

/* The key's age: only an ambiguous item past the key's ttl is held back. */
static void
test_before_call_key_ttl(void **state)
{
	struct retry_policy ttl = policy;
	struct item it;
	struct completion out;

	(void)state;
	ttl.key_ttl_ms = 86400000;
	make_item(&it, 3, true);
	it.key_age_ms = 86400000 - 1;
	assert_int_equal(outcome_before_call(&it, &ttl, &out), 0);

	it.key_age_ms = 86400000;
	memset(&out, 0xa5, sizeof(out));
	assert_int_equal(outcome_before_call(&it, &ttl, &out), 1);
	assert_copied(&out, &it);
	assert_int_equal(out.state, COMPLETION_RETRY);
	assert_int_equal(out.calls, 0);
	assert_true(out.ambiguous);
	assert_int_equal(out.delay_ms, COMPLETION_DELAY_NEVER);
	assert_string_equal(out.error, "");
	assert_non_null(strstr(out.operator_note, "first claimed 86400 s ago"));

	/* Not ambiguous: no attempt took effect, a retry under any key is safe. */
	it.ambiguous = false;
	it.key_age_ms = 10 * 86400000LL;
	assert_int_equal(outcome_before_call(&it, &ttl, &out), 0);

	/* ttl 0: the API keeps keys forever. */
	it.ambiguous = true;
	assert_int_equal(outcome_before_call(&it, &policy, &out), 0);
}

static const struct CMUnitTest fixed_tests[] = {
	cmocka_unit_test(test_blocked_calls_not_counted),
	cmocka_unit_test(test_before_call_key_ttl),
	cmocka_unit_test(test_delay_within_cap),
	cmocka_unit_test(test_single_attempt_policy),
	cmocka_unit_test(test_long_error_fits),
	cmocka_unit_test(test_refused_before_call),
	cmocka_unit_test(test_abandoned),
};

TABLE_TESTS_MAIN(cases, test_case, fixed_tests)

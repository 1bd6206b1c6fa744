/*
 * Unit tests for common/item.c: the idempotency key, the checks run on
 * producers' data before any API call (one cmocka test per row),
 * item_set_strings and item_clear.  Run under valgrind to see item_clear
 * free everything.
 *
 * Linked with -Wl,--wrap=strdup (test_item_LDFLAGS in the Makefile): every
 * strdup of this test and of item.c goes through __wrap_strdup, which can
 * be told to fail one call, as an out-of-memory would.
 */

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/unit/table.h"
#include "common/item.h"

#define C10  "cccccccccc"
#define C50  C10 C10 C10 C10 C10
#define C250 C50 C50 C50 C50 C50
#define C255 C250 "ccccc"
#define C256 C255 "c"

#define R_EMPTY    "customer_id is empty"
#define R_LONG     "customer_id is longer than 255 bytes"
#define R_TEXT     "customer_id is not valid UTF-8 or holds control characters"
#define R_AMOUNT   "amount_cents is not positive"
#define R_CURRENCY "currency is not a three-letter ISO 4217 code"

#define INV ITEM_INVOICE
#define RED ITEM_REDEMPTION

struct validate_case {
	const char *name;
	enum item_kind kind;
	const char *customer_id;
	int64_t amount_cents;
	const char *currency;
	const char *reason;         /* NULL: accepted */
};

static const struct validate_case cases[] = {
	{ "normal invoice", INV, "cus_42", 1999, "usd", NULL },
	{ "normal redemption", RED, "learner-9", 2500, NULL, NULL },
	{ "redemption ignores currency", RED, "learner-9", 2500, "not a code", NULL },
	{ "upper-case currency", INV, "cus_42", 1999, "EUR", NULL },
	{ "mixed-case currency", INV, "cus_42", 1999, "uSd", NULL },
	{ "amount of one cent", INV, "cus_42", 1, "usd", NULL },
	{ "largest amount", INV, "cus_42", INT64_MAX, "usd", NULL },
	{ "one-byte customer id", INV, "c", 1999, "usd", NULL },
	{ "255-byte customer id", INV, C255, 1999, "usd", NULL },
	{ "customer id with spaces and punctuation", INV, "cus 42 / \"x\" ~", 1999, "usd", NULL },

	{ "NULL customer id", INV, NULL, 1999, "usd", R_EMPTY },
	{ "empty customer id", INV, "", 1999, "usd", R_EMPTY },
	{ "empty customer id on a redemption", RED, "", 2500, NULL, R_EMPTY },
	{ "256-byte customer id", INV, C256, 1999, "usd", R_LONG },
	{ "256-byte customer id on a redemption", RED, C256, 2500, NULL, R_LONG },

	/* Control characters. */
	{ "newline", INV, "cus\n42", 1999, "usd", R_TEXT },
	{ "trailing newline", INV, "cus_42\n", 1999, "usd", R_TEXT },
	{ "carriage return", INV, "cus\r42", 1999, "usd", R_TEXT },
	{ "tab", INV, "\tcus_42", 1999, "usd", R_TEXT },
	{ "0x01", INV, "cus\x01" "42", 1999, "usd", R_TEXT },
	{ "0x1f", INV, "cus\x1f", 1999, "usd", R_TEXT },
	{ "DEL", INV, "cus\x7f" "42", 1999, "usd", R_TEXT },
	{ "escape", INV, "\x1b[31mcus", 1999, "usd", R_TEXT },
	/* C1 controls: terminals read U+009B as CSI, U+0085 as a new line. */
	{ "C1 U+0080", INV, "\xc2\x80x", 1999, "usd", R_TEXT },
	{ "C1 NEL U+0085", INV, "cus\xc2\x85" "42", 1999, "usd", R_TEXT },
	{ "C1 CSI U+009B", INV, "\xc2\x9b" "31mcus", 1999, "usd", R_TEXT },
	{ "C1 U+009F", INV, "cus\xc2\x9f", 1999, "usd", R_TEXT },

	/* Valid multibyte UTF-8. */
	{ "two-byte UTF-8", INV, "Jos\xc3\xa9", 1999, "usd", NULL },
	{ "three-byte UTF-8", INV, "\xe6\x97\xa5\xe6\x9c\xac", 1999, "usd", NULL },
	{ "four-byte UTF-8", INV, "cus_\xf0\x9f\x98\x80", 1999, "usd", NULL },
	{ "lowest two-byte after the C1 controls U+00A0", INV, "\xc2\xa0x", 1999, "usd", NULL },
	{ "lowest three-byte U+0800", INV, "\xe0\xa0\x80", 1999, "usd", NULL },
	{ "last before surrogates U+D7FF", INV, "\xed\x9f\xbf", 1999, "usd", NULL },
	{ "first after surrogates U+E000", INV, "\xee\x80\x80", 1999, "usd", NULL },
	{ "U+FFFD", INV, "\xef\xbf\xbd", 1999, "usd", NULL },
	{ "lowest four-byte U+10000", INV, "\xf0\x90\x80\x80", 1999, "usd", NULL },
	{ "highest U+10FFFF", INV, "\xf4\x8f\xbf\xbf", 1999, "usd", NULL },
	{ "multibyte at the 255-byte limit", INV, C250 "c\xf0\x9f\x98\x80", 1999, "usd", NULL },

	/* Invalid UTF-8. */
	{ "lone continuation byte", INV, "cus\x80", 1999, "usd", R_TEXT },
	{ "continuation byte first", INV, "\xbf" "cus", 1999, "usd", R_TEXT },
	{ "overlong NUL C0 80", INV, "cus\xc0\x80", 1999, "usd", R_TEXT },
	{ "overlong C1 BF", INV, "\xc1\xbf", 1999, "usd", R_TEXT },
	{ "overlong three-byte E0 80 AF", INV, "\xe0\x80\xaf", 1999, "usd", R_TEXT },
	{ "overlong four-byte F0 80 80 AF", INV, "\xf0\x80\x80\xaf", 1999, "usd", R_TEXT },
	{ "surrogate ED A0 80", INV, "\xed\xa0\x80", 1999, "usd", R_TEXT },
	{ "surrogate ED BF BF", INV, "\xed\xbf\xbf", 1999, "usd", R_TEXT },
	{ "above U+10FFFF F4 90 80 80", INV, "\xf4\x90\x80\x80", 1999, "usd", R_TEXT },
	{ "F5 lead byte", INV, "\xf5\x80\x80\x80", 1999, "usd", R_TEXT },
	{ "FE byte", INV, "\xfe", 1999, "usd", R_TEXT },
	{ "FF byte", INV, "cus\xff", 1999, "usd", R_TEXT },
	{ "truncated two-byte at end", INV, "Jos\xc3", 1999, "usd", R_TEXT },
	{ "truncated three-byte at end", INV, "cus\xe6\x97", 1999, "usd", R_TEXT },
	{ "truncated four-byte at end", INV, "cus\xf0\x9f\x98", 1999, "usd", R_TEXT },
	{ "lead byte then ASCII", INV, "\xc3" "A", 1999, "usd", R_TEXT },
	{ "three-byte lead then ASCII", INV, "\xe6\x97" "A", 1999, "usd", R_TEXT },
	{ "truncated E0 at end", INV, "\xe0", 1999, "usd", R_TEXT },
	{ "truncated ED at end", INV, "\xed", 1999, "usd", R_TEXT },
	{ "truncated F0 at end", INV, "\xf0", 1999, "usd", R_TEXT },
	{ "truncated F4 at end", INV, "\xf4", 1999, "usd", R_TEXT },

	/* Amount. */
	{ "zero amount", INV, "cus_42", 0, "usd", R_AMOUNT },
	{ "negative amount", INV, "cus_42", -1999, "usd", R_AMOUNT },
	{ "most negative amount", INV, "cus_42", INT64_MIN, "usd", R_AMOUNT },
	{ "zero amount redemption", RED, "learner-9", 0, NULL, R_AMOUNT },

	/* Currency. */
	{ "two-letter currency", INV, "cus_42", 1999, "us", R_CURRENCY },
	{ "four-letter currency", INV, "cus_42", 1999, "usdd", R_CURRENCY },
	{ "currency with a symbol", INV, "cus_42", 1999, "u$d", R_CURRENCY },
	{ "currency with a digit", INV, "cus_42", 1999, "us1", R_CURRENCY },
	{ "currency with a space", INV, "cus_42", 1999, " us", R_CURRENCY },
	{ "currency with a non-ASCII letter", INV, "cus_42", 1999, "\xc3\xa9u", R_CURRENCY },
	{ "empty currency", INV, "cus_42", 1999, "", R_CURRENCY },
	{ "NULL currency on an invoice", INV, "cus_42", 1999, NULL, R_CURRENCY },
};


char *__real_strdup(const char *s);
char *__wrap_strdup(const char *s);

/* The strdup call (1 = the next one) that fails; 0: none. */
static int strdup_fail_at;
static int strdup_calls;

char *
__wrap_strdup(const char *s)
{
	if (strdup_fail_at > 0 && ++strdup_calls == strdup_fail_at) {
		strdup_fail_at = 0;
		errno = ENOMEM;
		return NULL;
	}
	return __real_strdup(s);
}

/* Makes the Nth strdup from now fail. */
static void
fail_strdup(int n)
{
	strdup_calls = 0;
	strdup_fail_at = n;
}

static char *
dup_or_null(const char *s)
{
	char *d;

	if (s == NULL)
		return NULL;
	d = strdup(s);
	assert_non_null(d);
	return d;
}

static void
test_case(void **state)
{
	const struct validate_case *c = *state;
	struct item it;
	const char *reason = NULL;
	int rc;

	memset(&it, 0, sizeof(it));
	it.kind = c->kind;
	it.id = 17;
	it.amount_cents = c->amount_cents;
	it.customer_id = dup_or_null(c->customer_id);
	it.currency = dup_or_null(c->currency);

	rc = item_validate(&it, &reason);
	if (c->reason == NULL) {
		if (rc != 0)
			print_message("refused: %s\n", reason);
		assert_int_equal(rc, 0);
	} else {
		assert_int_equal(rc, -1);
		assert_non_null(reason);
		assert_string_equal(reason, c->reason);
	}
	item_clear(&it);
}

static void
test_key(void **state)
{
	struct item it;
	char buf[ITEM_KEY_MAX];

	(void)state;
	memset(&it, 0, sizeof(it));
	it.kind = ITEM_INVOICE;
	it.id = 17;
	item_key(&it, buf, sizeof(buf));
	assert_string_equal(buf, "invoice-17");

	it.kind = ITEM_REDEMPTION;
	it.id = 5;
	item_key(&it, buf, sizeof(buf));
	assert_string_equal(buf, "redemption-5");

	/* The widest keys fit ITEM_KEY_MAX. */
	it.id = INT64_MAX;
	item_key(&it, buf, sizeof(buf));
	assert_string_equal(buf, "redemption-9223372036854775807");
	it.id = INT64_MIN;
	item_key(&it, buf, sizeof(buf));
	assert_string_equal(buf, "redemption--9223372036854775808");

	/* A short buffer truncates, terminated. */
	it.kind = ITEM_INVOICE;
	it.id = 17;
	item_key(&it, buf, 8);
	assert_string_equal(buf, "invoice");
}

/*
 * Generations: the first keeps the contract's key, so rows billed before
 * requeue existed replay under the key they were charged with; every later
 * one gets its own suffix, so the API holds no stored refusal for it.
 */
static void
test_key_generations(void **state)
{
	static const struct {
		enum item_kind kind;
		int64_t id;
		int generation;
		const char *want;
	} gens[] = {
		{ INV, 17, 0, "invoice-17" },           /* a zeroed item */
		{ INV, 17, 1, "invoice-17" },
		{ INV, 17, 2, "invoice-17-2" },
		{ INV, 17, 3, "invoice-17-3" },
		{ RED, 5, 1, "redemption-5" },
		{ RED, 5, 2, "redemption-5-2" },
		{ RED, 5, 10, "redemption-5-10" },
		{ INV, 17, -4, "invoice-17" },          /* never a negative suffix */
		/* The widest key of all fits ITEM_KEY_MAX. */
		{ RED, INT64_MIN, INT32_MAX, "redemption--9223372036854775808-2147483647" },
	};
	char buf[ITEM_KEY_MAX];
	struct item it;

	(void)state;
	for (size_t i = 0; i < sizeof(gens) / sizeof(gens[0]); i++) {
		memset(&it, 0, sizeof(it));
		it.kind = gens[i].kind;
		it.id = gens[i].id;
		it.generation = gens[i].generation;
		item_key(&it, buf, sizeof(buf));
		assert_string_equal(buf, gens[i].want);
	}
	_Static_assert(sizeof("redemption--9223372036854775808-2147483647") <= ITEM_KEY_MAX,
	    "the widest key fits");

	/* A short buffer truncates, terminated, generation or not. */
	memset(&it, 0, sizeof(it));
	it.kind = INV;
	it.id = 17;
	it.generation = 2;
	item_key(&it, buf, 11);
	assert_string_equal(buf, "invoice-17");
}

static void
test_kind_name(void **state)
{
	(void)state;
	assert_string_equal(item_kind_name(ITEM_INVOICE), "invoice");
	assert_string_equal(item_kind_name(ITEM_REDEMPTION), "redemption");
}

static void
test_clear(void **state)
{
	struct item it, zero;

	(void)state;
	memset(&zero, 0, sizeof(zero));
	memset(&it, 0, sizeof(it));
	it.kind = ITEM_INVOICE;
	it.id = 17;
	it.fence = 99;
	it.attempts = 3;
	it.ambiguous = true;
	it.amount_cents = 1999;
	it.subsidy_id = 7;
	it.held = true;
	it.lock_lost = true;
	it.customer_id = dup_or_null("cus_42");
	it.currency = dup_or_null("usd");
	strcpy(it.token, "web1:0123456789abcdef0123456789abcdef");

	item_clear(&it);
	assert_memory_equal(&it, &zero, sizeof(it));

	/* A cleared item clears again; so do NULL strings. */
	item_clear(&it);
	assert_memory_equal(&it, &zero, sizeof(it));
	it.customer_id = dup_or_null("learner-9");
	it.kind = ITEM_REDEMPTION;
	item_clear(&it);
	assert_memory_equal(&it, &zero, sizeof(it));
}

static void
test_set_strings(void **state)
{
	const char cus[] = "cus_42", cur[] = "usd";
	struct item it;

	(void)state;
	memset(&it, 0, sizeof(it));
	assert_int_equal(item_set_strings(&it, cus, cur), 0);
	assert_string_equal(it.customer_id, "cus_42");
	assert_string_equal(it.currency, "usd");
	assert_ptr_not_equal(it.customer_id, cus);      /* copies, owned by the item */
	assert_ptr_not_equal(it.currency, cur);
	item_clear(&it);

	/* NULL is "absent", not a failure: redemptions have no currency. */
	assert_int_equal(item_set_strings(&it, "learner-9", NULL), 0);
	assert_string_equal(it.customer_id, "learner-9");
	assert_null(it.currency);
	item_clear(&it);
	assert_int_equal(item_set_strings(&it, NULL, NULL), 0);
	assert_null(it.customer_id);
	assert_null(it.currency);
}

/*
 * Covers the claim's copy of a row's strings (store_claim in store/claim.c
 * calls item_set_strings): a failed allocation of either string must fail
 * the whole copy, never leave an item with a NULL currency that
 * item_validate would then refuse for good as "currency is not a
 * three-letter ISO 4217 code".
 */
static void
test_set_strings_out_of_memory(void **state)
{
	struct item it;

	(void)state;
	/* The first copy (customer_id) fails. */
	memset(&it, 0, sizeof(it));
	fail_strdup(1);
	assert_int_equal(item_set_strings(&it, "cus_42", "usd"), -1);
	assert_int_equal(strdup_fail_at, 0);    /* the failure did happen */
	assert_null(it.customer_id);
	assert_null(it.currency);

	/* The second copy (currency) fails: customer_id is given back too. */
	memset(&it, 0, sizeof(it));
	fail_strdup(2);
	assert_int_equal(item_set_strings(&it, "cus_42", "usd"), -1);
	assert_int_equal(strdup_fail_at, 0);
	assert_null(it.customer_id);
	assert_null(it.currency);

	/* One string only: its copy failing fails too. */
	memset(&it, 0, sizeof(it));
	fail_strdup(1);
	assert_int_equal(item_set_strings(&it, NULL, "usd"), -1);
	assert_null(it.currency);
}

static const struct CMUnitTest fixed_tests[] = {
	cmocka_unit_test(test_key),
	cmocka_unit_test(test_key_generations),
	cmocka_unit_test(test_kind_name),
	cmocka_unit_test(test_clear),
	cmocka_unit_test(test_set_strings),
	cmocka_unit_test(test_set_strings_out_of_memory),
};

TABLE_TESTS_MAIN(cases, test_case, fixed_tests)

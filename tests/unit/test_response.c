/*
 * Unit tests for billing/response.c: every row of CONTRACT section 2 as
 * data, {transport, status, body, Retry-After} -> {class, id, error,
 * retry_after_s}, each row its own cmocka test named after it; then
 * api_parse_retry_after on its own.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "tests/unit/table.h"
#include "billing/response.h"

#define C10  "cccccccccc"
#define C50  C10 C10 C10 C10 C10
#define C250 C50 C50 C50 C50 C50
#define C255 C250 "ccccc"
#define C256 C255 "c"

#define M100 "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
#define M1000 M100 M100 M100 M100 M100 M100 M100 M100 M100 M100

#define CARD_DECLINED \
	"{\"error\":{\"type\":\"card_error\",\"code\":\"card_declined\"," \
	"\"message\":\"Your card was declined.\"}}"

#define OK API_TRANSPORT_OK

struct classify_case {
	const char *name;
	enum api_transport transport;
	long status;
	const char *body;           /* NUL-terminated here; NULL for none */
	const char *retry_after;
	const char *transport_error;
	enum api_class cls;
	const char *id;             /* expected id; "" unless API_SUCCESS */
	const char *err_is;         /* exact error text, or NULL */
	const char *err_has;        /* a piece of the error text, or NULL */
	int retry_after_s;
};

static const struct classify_case cases[] = {
	/* 2xx: success only with a sane id. */
	{ "200 with id", OK, 200, "{\"id\":\"ch_1\",\"object\":\"charge\"}", NULL, NULL,
	  API_SUCCESS, "ch_1", "", NULL, -1 },
	{ "201 with id", OK, 201, "{\"id\":\"re_5\",\"amount\":2500}", NULL, NULL,
	  API_SUCCESS, "re_5", "", NULL, -1 },
	{ "202 with id", OK, 202, "{\"id\":\"ch_2\"}", NULL, NULL,
	  API_SUCCESS, "ch_2", "", NULL, -1 },
	{ "200 with whitespace around", OK, 200, " \n{ \"id\" : \"ch_3\" }\n", NULL, NULL,
	  API_SUCCESS, "ch_3", "", NULL, -1 },
	{ "200 with id of 255 chars", OK, 200, "{\"id\":\"" C255 "\"}", NULL, NULL,
	  API_SUCCESS, C255, "", NULL, -1 },
	{ "200 with id of printable punctuation", OK, 200, "{\"id\":\"ch_!~/{}\"}", NULL, NULL,
	  API_SUCCESS, "ch_!~/{}", "", NULL, -1 },
	{ "200 replay with Retry-After still success", OK, 200, "{\"id\":\"ch_1\"}", "5", NULL,
	  API_SUCCESS, "ch_1", "", NULL, 5 },
	{ "200 without id", OK, 200, "{\"object\":\"charge\"}", NULL, NULL,
	  API_AMBIGUOUS, "", "http 200 answer without a readable \"id\"", NULL, -1 },
	{ "201 without id", OK, 201, "{}", NULL, NULL,
	  API_AMBIGUOUS, "", "http 201 answer without a readable \"id\"", NULL, -1 },
	{ "200 id is a number", OK, 200, "{\"id\":42}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id is null", OK, 200, "{\"id\":null}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id is an object", OK, 200, "{\"id\":{\"id\":\"ch_1\"}}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id is empty", OK, 200, "{\"id\":\"\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id of 256 chars", OK, 200, "{\"id\":\"" C256 "\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id with a space", OK, 200, "{\"id\":\"ch 1\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id with a newline", OK, 200, "{\"id\":\"ch_1\\n\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id with a control char", OK, 200, "{\"id\":\"ch\\u0001\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id with DEL", OK, 200, "{\"id\":\"ch\\u007f\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id not ASCII", OK, 200, "{\"id\":\"ch_\xc3\xa9\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 id with NUL", OK, 200, "{\"id\":\"ch\\u0000x\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 duplicate id keys", OK, 200, "{\"id\":\"ch_1\",\"id\":\"ch_2\"}", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 invalid JSON", OK, 200, "{\"id\":\"ch_1\"", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 trailing garbage", OK, 200, "{\"id\":\"ch_1\"} x", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 JSON array", OK, 200, "[{\"id\":\"ch_1\"}]", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 JSON string", OK, 200, "\"ch_1\"", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 HTML", OK, 200, "<html>ok</html>", NULL, NULL,
	  API_AMBIGUOUS, "", NULL, "readable \"id\"", -1 },
	{ "200 empty body", OK, 200, "", NULL, NULL,
	  API_AMBIGUOUS, "", "http 200 answer without a readable \"id\"", NULL, -1 },
	{ "200 no body", OK, 200, NULL, NULL, NULL,
	  API_AMBIGUOUS, "", "http 200 answer without a readable \"id\"", NULL, -1 },
	{ "204 no content", OK, 204, NULL, NULL, NULL,
	  API_AMBIGUOUS, "", "http 204 answer without a readable \"id\"", NULL, -1 },

	/* 409: another request with the key is running. */
	{ "409 in progress", OK, 409, "{\"error\":{\"code\":\"in_progress\"}}", NULL, NULL,
	  API_IN_PROGRESS, "", NULL, "http 409", -1 },
	{ "409 with Retry-After", OK, 409, NULL, "3", NULL,
	  API_IN_PROGRESS, "", NULL, "http 409", 3 },

	/* Transient: nothing was done. */
	{ "408", OK, 408, NULL, NULL, NULL, API_TRANSIENT, "", "http 408", NULL, -1 },
	{ "429 Retry-After seconds", OK, 429, "{}", "7", NULL,
	  API_TRANSIENT, "", "http 429", NULL, 7 },
	{ "429 Retry-After date in the past", OK, 429, NULL, "Sun, 06 Nov 1994 08:49:37 GMT",
	  NULL, API_TRANSIENT, "", "http 429", NULL, 0 },
	{ "429 Retry-After date far ahead", OK, 429, NULL, "Tue, 31 Dec 2999 23:59:59 GMT",
	  NULL, API_TRANSIENT, "", "http 429", NULL, 86400 },
	{ "429 Retry-After garbage", OK, 429, NULL, "soon", NULL,
	  API_TRANSIENT, "", "http 429", NULL, -1 },
	{ "429 Retry-After empty", OK, 429, NULL, "", NULL,
	  API_TRANSIENT, "", "http 429", NULL, -1 },
	{ "429 Retry-After huge", OK, 429, NULL, "999999999", NULL,
	  API_TRANSIENT, "", "http 429", NULL, 86400 },
	{ "429 Retry-After beyond long", OK, 429, NULL, "99999999999999999999999", NULL,
	  API_TRANSIENT, "", "http 429", NULL, 86400 },
	{ "429 with an error object", OK, 429,
	  "{\"error\":{\"code\":\"rate_limited\",\"message\":\"Too many requests\"}}", "2", NULL,
	  API_TRANSIENT, "", "rate_limited: Too many requests", NULL, 2 },
	{ "500", OK, 500, "Internal Server Error", NULL, NULL,
	  API_TRANSIENT, "", "http 500", NULL, -1 },
	{ "502 HTML", OK, 502, "<html><body>Bad Gateway</body></html>", NULL, NULL,
	  API_TRANSIENT, "", "http 502", NULL, -1 },
	{ "503 with Retry-After", OK, 503, NULL, "120", NULL,
	  API_TRANSIENT, "", "http 503", NULL, 120 },
	{ "599", OK, 599, NULL, NULL, NULL, API_TRANSIENT, "", "http 599", NULL, -1 },

	/* 422: the key was reused with another body. */
	{ "422", OK, 422, NULL, NULL, NULL, API_KEY_REUSED, "",
	  "idempotency key reused with a different body: http 422", NULL, -1 },
	{ "422 with an error object", OK, 422,
	  "{\"error\":{\"code\":\"idempotency_key_reused\",\"message\":\"Keys are for one body.\"}}",
	  NULL, NULL, API_KEY_REUSED, "",
	  "idempotency key reused with a different body: idempotency_key_reused: "
	  "Keys are for one body.", NULL, -1 },

	/*
	 * 402: declined, stored under the key.  401, 403, 404, 405: about
	 * the worker.  Other 4xx: refused, not stored under the key.
	 */
	{ "402 card declined", OK, 402, CARD_DECLINED, NULL, NULL,
	  API_DECLINED, "", "card_declined: Your card was declined.", NULL, -1 },
	{ "402 redemption declined", OK, 402,
	  "{\"error\":{\"type\":\"redemption_error\",\"code\":\"redemption_declined\","
	  "\"message\":\"Subsidy exhausted.\"}}", NULL, NULL,
	  API_DECLINED, "", "redemption_declined: Subsidy exhausted.", NULL, -1 },
	{ "400 code only", OK, 400, "{\"error\":{\"code\":\"invalid_request\"}}", NULL, NULL,
	  API_REFUSED, "", "invalid_request (http 400)", NULL, -1 },
	{ "400 code and non-string message", OK, 400,
	  "{\"error\":{\"code\":\"invalid_request\",\"message\":7}}", NULL, NULL,
	  API_REFUSED, "", "invalid_request (http 400)", NULL, -1 },
	{ "401 no body", OK, 401, NULL, NULL, NULL, API_WORKER, "", "http 401", NULL, -1 },
	{ "402 message only", OK, 402, "{\"error\":{\"message\":\"no\"}}", NULL, NULL,
	  API_DECLINED, "", "no (http 402)", NULL, -1 },
	{ "403 HTML", OK, 403, "<h1>Forbidden</h1>", NULL, NULL,
	  API_WORKER, "", "http 403", NULL, -1 },
	{ "404 without an error object", OK, 404, "{\"message\":\"not found\"}", NULL, NULL,
	  API_WORKER, "", "http 404", NULL, -1 },
	{ "404 error is a string", OK, 404, "{\"error\":\"not found\"}", NULL, NULL,
	  API_WORKER, "", "http 404", NULL, -1 },
	{ "405 through a proxy", OK, 405, "<h1>Method Not Allowed</h1>", NULL, NULL,
	  API_WORKER, "", "http 405", NULL, -1 },
	{ "413 from a proxy is refused, not declined", OK, 413, NULL, NULL, NULL,
	  API_REFUSED, "", "http 413", NULL, -1 },
	{ "418 is another 4xx", OK, 418, NULL, NULL, NULL,
	  API_REFUSED, "", "http 418", NULL, -1 },
	{ "402 message with control chars", OK, 402,
	  "{\"error\":{\"code\":\"card_declined\","
	  "\"message\":\"line one\\nline two\\r\\u0001\\u007f\\tend\"}}", NULL, NULL,
	  API_DECLINED, "", "card_declined: line one line two    end", NULL, -1 },
	{ "402 code with control chars", OK, 402,
	  "{\"error\":{\"code\":\"card\\ndeclined\"}}", NULL, NULL,
	  API_DECLINED, "", "card declined (http 402)", NULL, -1 },
	{ "402 message with UTF-8 kept", OK, 402,
	  "{\"error\":{\"code\":\"card_declined\",\"message\":\"Carte refus\xc3\xa9" "e\"}}",
	  NULL, NULL, API_DECLINED, "", "card_declined: Carte refus\xc3\xa9" "e", NULL, -1 },
	{ "402 very long message is cut", OK, 402,
	  "{\"error\":{\"code\":\"card_declined\",\"message\":\"" M1000 "\"}}", NULL, NULL,
	  API_DECLINED, "", NULL, "card_declined: mmmm", -1 },

	/* Anything else: we cannot know it did nothing. */
	{ "301", OK, 301, NULL, NULL, NULL, API_AMBIGUOUS, "",
	  "unexpected http 301 from the billing API (redirect not followed)", NULL, -1 },
	{ "302", OK, 302, "{\"id\":\"ch_1\"}", NULL, NULL, API_AMBIGUOUS, "",
	  NULL, "redirect not followed", -1 },
	{ "100", OK, 100, NULL, NULL, NULL, API_AMBIGUOUS, "",
	  "unexpected http 100 from the billing API", NULL, -1 },
	{ "199", OK, 199, NULL, NULL, NULL, API_AMBIGUOUS, "",
	  "unexpected http 199 from the billing API", NULL, -1 },
	{ "600", OK, 600, NULL, NULL, NULL, API_AMBIGUOUS, "",
	  "unexpected http 600 from the billing API", NULL, -1 },
	{ "status 0", OK, 0, NULL, NULL, NULL, API_AMBIGUOUS, "",
	  "unexpected http 0 from the billing API", NULL, -1 },

	/* The transport decides first. */
	{ "not sent", API_TRANSPORT_NOT_SENT, 0, NULL, NULL, "Connection refused",
	  API_TRANSIENT, "", "could not reach the billing API: Connection refused", NULL, -1 },
	{ "not sent without a message", API_TRANSPORT_NOT_SENT, 0, NULL, "9", NULL,
	  API_TRANSIENT, "", "could not reach the billing API: connection failed", NULL, -1 },
	{ "lost", API_TRANSPORT_LOST, 0, NULL, NULL, "Operation timed out",
	  API_AMBIGUOUS, "", "no answer from the billing API: Operation timed out", NULL, -1 },
	{ "lost without a message", API_TRANSPORT_LOST, 0, NULL, NULL, NULL,
	  API_AMBIGUOUS, "", "no answer from the billing API: connection lost", NULL, -1 },
	{ "lost after a 200 with id", API_TRANSPORT_LOST, 200, "{\"id\":\"ch_1\"}", NULL,
	  "transfer closed", API_AMBIGUOUS, "", NULL, "no answer", -1 },
	{ "too large 200", API_TRANSPORT_TOO_LARGE, 200, "{\"id\":\"ch_1\"", NULL, NULL,
	  API_AMBIGUOUS, "", "http 200 answer too large, cut off", NULL, -1 },
	{ "too large 402", API_TRANSPORT_TOO_LARGE, 402, CARD_DECLINED, NULL, NULL,
	  API_AMBIGUOUS, "", "http 402 answer too large, cut off", NULL, -1 },
};


static void
assert_clean(const char *s)
{
	for (; *s != '\0'; s++)
		assert_false((unsigned char)*s < 0x20 || *s == 0x7f);
}

static void
test_case(void **state)
{
	const struct classify_case *c = *state;
	struct api_response r = {
		.transport = c->transport,
		.status = c->status,
		.body = c->body,
		.body_len = c->body != NULL ? strlen(c->body) : 0,
		.retry_after = c->retry_after,
		.transport_error = c->transport_error,
	};
	struct api_verdict v;

	memset(&v, 0xa5, sizeof(v));
	api_classify(&r, &v);
	if (v.cls != c->cls)
		print_message("class %s, error \"%s\"\n", api_class_name(v.cls), v.error);
	assert_int_equal(v.cls, c->cls);
	assert_string_equal(v.id, c->id);
	if (c->err_is != NULL)
		assert_string_equal(v.error, c->err_is);
	if (c->err_has != NULL) {
		if (strstr(v.error, c->err_has) == NULL)
			print_message("error \"%s\"\n", v.error);
		assert_non_null(strstr(v.error, c->err_has));
	}
	assert_true(strlen(v.error) < sizeof(v.error));
	assert_clean(v.error);
	assert_int_equal(v.retry_after_s, c->retry_after_s);
	if (c->cls != API_SUCCESS)
		assert_true(v.error[0] != '\0');
}

/* The body is a length, not a string: bytes past body_len are not read. */
static void
test_body_not_terminated(void **state)
{
	static const char buf[] = "{\"id\":\"ch_1\"}GARBAGE";
	struct api_response r = {
		.transport = API_TRANSPORT_OK, .status = 200,
		.body = buf, .body_len = 13,
	};
	struct api_verdict v;

	(void)state;
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_SUCCESS);
	assert_string_equal(v.id, "ch_1");

	r.body_len = 12;    /* cut one byte short */
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_AMBIGUOUS);

	r.status = 402;
	r.body = CARD_DECLINED "trailing";
	r.body_len = strlen(CARD_DECLINED);
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_DECLINED);
	assert_string_equal(v.error, "card_declined: Your card was declined.");
}

/* An HTTP-date relative to the real clock, as api_classify uses it. */
static void
test_classify_retry_after_date(void **state)
{
	time_t t = time(NULL) + 100;
	struct tm tm;
	char date[64];
	struct api_response r = {
		.transport = API_TRANSPORT_OK, .status = 429, .retry_after = date,
	};
	struct api_verdict v;

	(void)state;
	assert_non_null(gmtime_r(&t, &tm));
	assert_true(strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm) > 0);
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_TRANSIENT);
	assert_in_range(v.retry_after_s, 95, 100);
}

struct retry_after_case {
	const char *value;
	int expect;
};

static void
test_parse_retry_after_seconds(void **state)
{
	static const struct retry_after_case rows[] = {
		{ "0", 0 },
		{ "7", 7 },
		{ " 12 ", 12 },
		{ "\t5\t", 5 },
		{ "12\r\n", 12 },
		{ "007", 7 },
		{ "86400", 86400 },
		{ "86401", 86400 },
		{ "2147483648", 86400 },
		{ "99999999999999999999999", 86400 },
		{ "-1", -1 },
		{ "-0", -1 },
		{ "+5", -1 },
		{ "12abc", -1 },
		{ "12 13", -1 },
		{ "1.5", -1 },
		{ "0x10", -1 },
		{ "abc", -1 },
		{ "", -1 },
		{ "   ", -1 },
		{ NULL, -1 },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		int got = api_parse_retry_after(rows[i].value, 0);

		if (got != rows[i].expect)
			print_message("\"%s\": %d\n", rows[i].value ? rows[i].value : "(null)", got);
		assert_int_equal(got, rows[i].expect);
	}
}

static void
test_parse_retry_after_date(void **state)
{
	/* Sun, 06 Nov 1994 08:49:37 GMT */
	const long long t = 784111777;

	(void)state;
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", t - 30), 30);
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", t - 1), 1);
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", t), 0);
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", t + 3600), 0);
	assert_int_equal(api_parse_retry_after("  Sun, 06 Nov 1994 08:49:37 GMT", t - 30), 30);
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT",
	    t - 86400), 86400);
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT",
	    t - 86401), 86400);
	assert_int_equal(api_parse_retry_after("Tue, 31 Dec 2999 23:59:59 GMT", t), 86400);
	/* Across a day boundary. */
	assert_int_equal(api_parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT",
	    1767225600LL - 0), 30);
	/* Not an IMF-fixdate. */
	assert_int_equal(api_parse_retry_after("Sun, 06 Nov 1994 08:49:37", t - 30), -1);
	assert_int_equal(api_parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", t - 30), -1);
	assert_int_equal(api_parse_retry_after("Sun Nov  6 08:49:37 1994", t - 30), -1);
	assert_int_equal(api_parse_retry_after("Sun, 32 Nov 1994 08:49:37 GMT", t - 30), -1);
	assert_int_equal(api_parse_retry_after("Sun, 06 Foo 1994 08:49:37 GMT", t - 30), -1);
}

/* Answers only a hostile server gives: each 2xx is ambiguous, never a success. */
static void
test_hostile_success_bodies(void **state)
{
	static const char *const bodies[] = {
		"{\"id\":\"ch_\\u0000x\"}",        /* NUL inside the id */
		"{\"id\":\"ch_1\",\"id\":\"ch_2\"}", /* which one? */
		"{\"id\":12345}",
		"{\"id\":[\"ch_1\"]}",
		"{\"id\":null}",
		"[{\"id\":\"ch_1\"}]",
		"\"ch_1\"",
		"{\"id\":\"ch 1\"}",
		"{\"id\":\"ch_\u00e9\"}",
		"{\"id\":\"ch_1\"",
		"\xef\xbb\xbf{\"id\":\"ch_1\"}",    /* a BOM */
	};
	struct api_response r = { .transport = API_TRANSPORT_OK, .status = 200 };
	struct api_verdict v;
	char deep[60001];

	(void)state;
	for (size_t i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
		r.body = bodies[i];
		r.body_len = strlen(bodies[i]);
		api_classify(&r, &v);
		if (v.cls != API_AMBIGUOUS)
			print_message("body %zu: %s\n", i, bodies[i]);
		assert_int_equal(v.cls, API_AMBIGUOUS);
		assert_string_equal(v.id, "");
	}
	/* 60000 nested arrays: the parser's depth limit, not the stack, ends it. */
	memset(deep, '[', sizeof(deep) - 1);
	deep[sizeof(deep) - 1] = '\0';
	r.body = deep;
	r.body_len = sizeof(deep) - 1;
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_AMBIGUOUS);
}

/* An error body of the wrong shape still gives a one-line reason. */
static void
test_hostile_error_bodies(void **state)
{
	struct api_response r = { .transport = API_TRANSPORT_OK, .status = 402 };
	struct api_verdict v;

	(void)state;
	r.body = "{\"error\":{\"code\":[1],\"message\":{\"a\":1}}}";
	r.body_len = strlen(r.body);
	api_classify(&r, &v);
	assert_int_equal(v.cls, API_DECLINED);
	assert_string_equal(v.error, "http 402");

	r.body = "{\"error\":{\"code\":\"x\\ny\\r\\u001b[31m\",\"message\":\"a\\tb\"}}";
	r.body_len = strlen(r.body);
	api_classify(&r, &v);
	assert_string_equal(v.error, "x y  [31m: a b");
}

static void
test_header_value(void **state)
{
	static const struct {
		const char *line;
		int found;
		const char *value;
	} rows[] = {
		{ "Retry-After: 5\r\n", 1, "5" },
		{ "retry-after:\t120 \r\n", 1, "120" },
		{ "RETRY-AFTER:5", 1, "5" },
		{ "Retry-After:\r\n", 1, "" },
		{ "Retry-After: Sun, 06 Nov 1994 08:49:37 GMT\r\n", 1,
		  "Sun, 06 Nov 1994 08:49:37 GMT" },
		{ "Retry-After-Extra: 1\r\n", 0, NULL },
		{ "Retry-After 5\r\n", 0, NULL },
		{ "Retry-Afte", 0, NULL },
		{ "Retry-After", 0, NULL },
		{ "X-Retry-After: 5\r\n", 0, NULL },
		{ "", 0, NULL },
	};
	char out[40];

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		strcpy(out, "unset");
		assert_int_equal(api_header_value(rows[i].line, strlen(rows[i].line), "Retry-After",
		    out, sizeof(out)), rows[i].found);
		assert_string_equal(out, rows[i].found ? rows[i].value : "unset");
	}
	/* Cut to the buffer, and never read past N (no NUL in a header buffer). */
	assert_int_equal(api_header_value("Retry-After: 123456789012\r\n", 27, "Retry-After",
	    out, 8), 1);
	assert_string_equal(out, "1234567");
	assert_int_equal(api_header_value("Retry-After: 42XXXX", 15, "Retry-After", out,
	    sizeof(out)), 1);
	assert_string_equal(out, "42");
}

static void
test_class_names(void **state)
{
	(void)state;
	assert_string_equal(api_class_name(API_SUCCESS), "success");
	assert_string_equal(api_class_name(API_DECLINED), "declined");
	assert_string_equal(api_class_name(API_REFUSED), "refused");
	assert_string_equal(api_class_name(API_WORKER), "worker refused");
	assert_string_equal(api_class_name(API_KEY_REUSED), "key reused");
	assert_string_equal(api_class_name(API_IN_PROGRESS), "in progress");
	assert_string_equal(api_class_name(API_TRANSIENT), "transient");
	assert_string_equal(api_class_name(API_AMBIGUOUS), "ambiguous");
	assert_string_equal(api_class_name((enum api_class)42), "unknown");
}

/* Which answers show the worker got past authentication and routing. */
static void
test_class_admitted(void **state)
{
	(void)state;
	assert_true(api_class_admitted(API_SUCCESS));
	assert_true(api_class_admitted(API_DECLINED));
	assert_true(api_class_admitted(API_REFUSED));
	assert_true(api_class_admitted(API_KEY_REUSED));
	assert_true(api_class_admitted(API_IN_PROGRESS));
	assert_false(api_class_admitted(API_WORKER));
	assert_false(api_class_admitted(API_TRANSIENT));
	assert_false(api_class_admitted(API_AMBIGUOUS));
}

static const struct CMUnitTest fixed_tests[] = {
	cmocka_unit_test(test_class_admitted),
	cmocka_unit_test(test_body_not_terminated),
	cmocka_unit_test(test_classify_retry_after_date),
	cmocka_unit_test(test_parse_retry_after_seconds),
	cmocka_unit_test(test_parse_retry_after_date),
	cmocka_unit_test(test_class_names),
	cmocka_unit_test(test_hostile_success_bodies),
	cmocka_unit_test(test_hostile_error_bodies),
	cmocka_unit_test(test_header_value),
};

TABLE_TESTS_MAIN(cases, test_case, fixed_tests)

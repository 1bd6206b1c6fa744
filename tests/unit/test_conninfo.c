/*
 * Unit tests for store/conninfo.c: finding a conninfo's password, and
 * redacting it from messages, cut or not.  The regression rows come from
 * the fuzz target tests/fuzz/conninfo.c.
 */

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "store/conninfo.h"

static void
test_password_found(void **state)
{
	static const struct {
		const char *conninfo;
		int ret;
		const char *password;       /* NULL: none */
	} rows[] = {
		{ "host=db dbname=billing user=w password=s3cret", 0, "s3cret" },
		{ "password='a b\\'c' host=x", 0, "a b'c" },
		{ "postgresql://w:s3cret@db:5432/billing", 0, "s3cret" },
		{ "postgresql://w:pa%20ss@db/billing", 0, "pa ss" },
		{ "postgresql://db/billing?password=q", 0, "q" },
		{ "host=db dbname=billing", 0, NULL },
		{ "postgresql:///billing", 0, NULL },
		{ "password=", 0, NULL },
		{ "host=x password=abc def", -1, NULL },
		{ "postgresql://w:pa%zz@db/x", -1, NULL },
		{ "billing", -1, NULL },            /* a bare database name */
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		char *pw = (char *)"unset";
		int ret = conninfo_password(rows[i].conninfo, &pw);

		if (ret != rows[i].ret)
			print_message("%s: %d\n", rows[i].conninfo, ret);
		assert_int_equal(ret, rows[i].ret);
		if (rows[i].password == NULL)
			assert_null(pw);
		else
			assert_string_equal(pw, rows[i].password);
		free(pw);
	}
}

static void
test_may_hold_secret(void **state)
{
	(void)state;
	assert_true(conninfo_may_hold_secret("host=x PASSWORD=y"));
	assert_true(conninfo_may_hold_secret("postgresql://u:p@h/db"));
	assert_false(conninfo_may_hold_secret("host=x dbname=y"));
	assert_false(conninfo_may_hold_secret(""));
}

static void
test_redact(void **state)
{
	static const struct {
		const char *msg, *secret;
		size_t outlen;
		const char *want;
	} rows[] = {
		{ "database \"s3cret\" does not exist", "s3cret", 64,
		  "database \"[redacted]\" does not exist" },
		{ "s3crets3cret and s3cret", "s3cret", 64, "[redacted][redacted] and [redacted]" },
		{ "nothing here", "s3cret", 64, "nothing here" },
		{ "nothing here", NULL, 64, "nothing here" },
		{ "nothing here", "", 64, "nothing here" },
		{ "aaa", "aa", 64, "[redacted]a" },
		/* Cut before the secret: no prefix of it is left behind. */
		{ "abc s3cret", "s3cret", 7, "abc [r" },
		{ "abc s3cret", "s3cret", 5, "abc " },
		{ "abc s3cret", "s3cret", 1, "" },
		/* Found by the fuzzer: the marker and plain text spell the secret. */
		{ "password=word=[", "word=[", 64, "password=[redacted]" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		char out[64];

		memset(out, 'z', sizeof(out));
		conninfo_redact(rows[i].msg, rows[i].secret, out, rows[i].outlen);
		assert_string_equal(out, rows[i].want);
	}
}

/* What check-config and a refused start say; never a piece of a password. */
static void
test_check(void **state)
{
	static const struct {
		const char *conninfo;
		int ret;
		const char *want;           /* the message, or NULL when it parses */
	} rows[] = {
		{ "host=db dbname=billing", 0, NULL },
		{ "postgresql:///billing", 0, NULL },
		{ "host=db dbname", -1, "\"database.conninfo\" is not a valid connection string: "
		  "missing \"=\" after \"dbname\" in connection info string" },
		{ "host=db nosuchkey=1", -1, "\"database.conninfo\" is not a valid connection "
		  "string: invalid connection option \"nosuchkey\"" },
		{ "host=db password=s3cret s3cret-tail", -1, "\"database.conninfo\" is not a valid "
		  "connection string (libpq's message is not shown: it may quote the password)" },
		{ "postgresql://w:s3cret%zz@db/x", -1, "\"database.conninfo\" is not a valid "
		  "connection string (libpq's message is not shown: it may quote the password)" },
	};

	(void)state;
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		char err[512] = "untouched";

		assert_int_equal(conninfo_check("database.conninfo", rows[i].conninfo, err, sizeof(err)), rows[i].ret);
		if (rows[i].want == NULL)
			assert_string_equal(err, "untouched");
		else
			assert_string_equal(err, rows[i].want);
		assert_null(strstr(err, "s3cret"));
	}
}

int
main(void)
{
	static const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_password_found),
		cmocka_unit_test(test_may_hold_secret),
		cmocka_unit_test(test_redact),
		cmocka_unit_test(test_check),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

/*
 * Unit tests for common/log.c: text lines keep their shape, and JSON lines
 * always parse (whatever bytes the message holds), carry ts/level/worker/
 * msg, the item's kind and id when the message names one, and errno's text.
 * stderr is pointed at a temporary file and read back.
 */

#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "common/log.h"

static FILE *capture;
static int saved_stderr = -1;

static int
start_capture(void **state)
{
	(void)state;
	fflush(stderr);
	capture = tmpfile();
	assert_non_null(capture);
	saved_stderr = dup(STDERR_FILENO);
	assert_true(dup2(fileno(capture), STDERR_FILENO) != -1);
	log_init("web1:812", LOG_DEBUG);
	log_set_json(0);
	return 0;
}

static int
stop_capture(void **state)
{
	(void)state;
	fflush(stderr);
	dup2(saved_stderr, STDERR_FILENO);
	close(saved_stderr);
	fclose(capture);
	return 0;
}

/* Everything logged since the capture started, NUL-terminated; caller frees. */
static char *
captured(void)
{
	long len;
	char *buf;

	fflush(stderr);
	len = lseek(fileno(capture), 0, SEEK_END);
	buf = calloc(1, (size_t)len + 1);
	assert_non_null(buf);
	assert_int_equal(pread(fileno(capture), buf, (size_t)len, 0), len);
	return buf;
}

/* The one JSON object logged; fails unless exactly one line parses. */
static json_t *
one_json_line(void)
{
	char *text = captured();
	json_error_t err;
	json_t *v;
	char *nl = strchr(text, '\n');

	assert_non_null(nl);
	assert_true(nl[1] == '\0');
	v = json_loads(text, 0, &err);
	if (v == NULL)
		fail_msg("not JSON (%s): %s", err.text, text);
	assert_true(json_is_object(v));
	free(text);
	return v;
}

static const char *
str_field(json_t *v, const char *key)
{
	json_t *f = json_object_get(v, key);

	if (!json_is_string(f))
		fail_msg("no string field \"%s\"", key);
	return json_string_value(f);
}

static void
test_text_line(void **state)
{
	char *text;

	(void)state;
	log_info("invoice %d: paid", 17);
	text = captured();
	/* 2026-11-22T00:28:49.123Z info worker=web1:812 invoice 17: paid */
	assert_int_equal(strlen(text), 24 + strlen(" info worker=web1:812 invoice 17: paid\n"));
	assert_true(text[10] == 'T' && text[23] == 'Z');
	assert_string_equal(text + 24, " info worker=web1:812 invoice 17: paid\n");
	free(text);
}

static void
test_json_fields(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	log_warnx("invoice %d: failed: %s", 17, "card_declined");
	v = one_json_line();
	assert_string_equal(str_field(v, "level"), "warning");
	assert_string_equal(str_field(v, "worker"), "web1:812");
	assert_string_equal(str_field(v, "msg"), "invoice 17: failed: card_declined");
	assert_string_equal(str_field(v, "kind"), "invoice");
	assert_int_equal(json_integer_value(json_object_get(v, "item")), 17);
	assert_int_equal(strlen(str_field(v, "ts")), 24);
	assert_null(json_object_get(v, "error"));
	json_decref(v);
}

static void
test_json_redemption_and_no_item(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	log_info("redemption 9000000000: redeemed");
	v = one_json_line();
	assert_string_equal(str_field(v, "kind"), "redemption");
	assert_int_equal(json_integer_value(json_object_get(v, "item")), 9000000000LL);
	json_decref(v);
}

static void
test_json_without_item(void **state)
{
	const char *const msgs[] = {
		"connected to the database",
		"invoices 3 done",              /* not "invoice N:" */
		"invoice 17 lost",              /* no colon after the id */
		"invoice x: odd",
	};

	(void)state;
	log_set_json(1);
	for (size_t i = 0; i < sizeof(msgs) / sizeof(msgs[0]); i++) {
		json_t *v;

		/* stderr shares the file offset: back to the start of an empty file */
		assert_int_equal(ftruncate(fileno(capture), 0), 0);
		assert_int_equal(lseek(fileno(capture), 0, SEEK_SET), 0);
		log_info("%s", msgs[i]);
		v = one_json_line();
		assert_string_equal(str_field(v, "msg"), msgs[i]);
		assert_null(json_object_get(v, "kind"));
		assert_null(json_object_get(v, "item"));
		json_decref(v);
	}
}

static void
test_json_escapes_anything(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	log_info("quote \" backslash \\ newline\n tab\t bell\a del\x7f utf8 \xc3\xa9 bad \xff\xc3 end");
	v = one_json_line();
	assert_string_equal(str_field(v, "msg"),
	    "quote \" backslash \\ newline\n tab\t bell\a del\x7f utf8 \xc3\xa9 bad "
	    "\xef\xbf\xbd\xef\xbf\xbd end");
	json_decref(v);
}

static void
test_json_rejects_overlong_and_surrogates(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	/* overlong "/" (c0 af), a UTF-16 surrogate (ed a0 80): three U+FFFD each at most */
	log_info("a\xc0\xaf b\xed\xa0\x80 c");
	v = one_json_line();
	assert_null(strstr(str_field(v, "msg"), "\xc0"));
	assert_null(strstr(str_field(v, "msg"), "\xed\xa0"));
	json_decref(v);
}

static void
test_json_errno(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	errno = ENOENT;
	log_warn("could not open \"%s\"", "/nope");
	v = one_json_line();
	assert_string_equal(str_field(v, "msg"), "could not open \"/nope\"");
	assert_string_equal(str_field(v, "error"), strerror(ENOENT));
	assert_int_equal(errno, ENOENT);
	json_decref(v);
}

static void
test_json_long_message_still_parses(void **state)
{
	char big[3000];
	json_t *v;

	(void)state;
	memset(big, '\x01', sizeof(big) - 1);      /* each escaped as \u0001 */
	big[sizeof(big) - 1] = '\0';
	log_set_json(1);
	log_info("%s", big);
	v = one_json_line();
	assert_true(strlen(str_field(v, "msg")) > 2000);
	json_decref(v);
}

static void
test_level_filter_applies_to_json(void **state)
{
	char *text;

	(void)state;
	log_set_json(1);
	log_set_level(LOG_WARN);
	log_info("not shown");
	log_debug("not shown");
	text = captured();
	assert_string_equal(text, "");
	free(text);
	log_set_level(LOG_DEBUG);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_text_line, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_fields, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_redemption_and_no_item, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_without_item, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_escapes_anything, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_rejects_overlong_and_surrogates, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_json_errno, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_long_message_still_parses, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_level_filter_applies_to_json, start_capture,
		    stop_capture),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

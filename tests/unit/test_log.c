/*
 * Unit tests for common/log.c: text lines keep their shape, and JSON lines
 * always parse (whatever bytes the message holds), carry ts/level/worker/
 * msg, the item's kind and id when the message names one, and errno's text.
 * A message of several lines stays one text line.  log_item() gives JSON its
 * structured fields.  Under the journal (JOURNAL_STREAM naming stderr's
 * device and inode) each line starts with its sd-daemon(3) priority.
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
#include <sys/stat.h>
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
	/* The tests may run under a unit: only the journal tests fake it. */
	unsetenv("JOURNAL_STREAM");
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
	unsetenv("JOURNAL_STREAM");
	log_init("web1:812", LOG_DEBUG);
	return 0;
}

/* Empties the capture file: the next line read back is the only one. */
static void
restart_capture(void)
{
	fflush(stderr);
	/* stderr shares the file offset: back to the start of an empty file */
	assert_int_equal(ftruncate(fileno(capture), 0), 0);
	assert_int_equal(lseek(fileno(capture), 0, SEEK_SET), 0);
}

/* Sets JOURNAL_STREAM to FD's "device:inode", as systemd would for a stream it made. */
static void
fake_journal_stream(int fd)
{
	struct stat sb;
	char value[64];

	assert_int_equal(fstat(fd, &sb), 0);
	snprintf(value, sizeof(value), "%ju:%ju", (uintmax_t)sb.st_dev, (uintmax_t)sb.st_ino);
	assert_int_equal(setenv("JOURNAL_STREAM", value, 1), 0);
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
	assert_int_equal(json_integer_value(json_object_get(v, "id")), 17);
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

/* libpq's errors come in several lines, ending in a newline: one line each here. */
static void
test_text_folds_lines(void **state)
{
	char *text;

	(void)state;
	log_error("could not claim invoices: %s",
	    "ERROR:  value too long\nDETAIL:  Key (id)=(7)\r\nCONTEXT:  PL/pgSQL function x\n");
	text = captured();
	assert_string_equal(text + 24, " error worker=web1:812 could not claim invoices: "
	    "ERROR:  value too long / DETAIL:  Key (id)=(7) / CONTEXT:  PL/pgSQL function x\n");
	assert_ptr_equal(strchr(text, '\n'), text + strlen(text) - 1);
	free(text);
}

static void
test_json_drops_trailing_newline(void **state)
{
	json_t *v;

	(void)state;
	log_set_json(1);
	log_warnx("%s", "ERROR:  boom\nCONTEXT:  here\n");
	v = one_json_line();
	assert_string_equal(str_field(v, "msg"), "ERROR:  boom\nCONTEXT:  here");
	json_decref(v);
}

static void
test_journal_priority_prefix(void **state)
{
	static const struct {
		int level;
		const char *prefix;
	} rows[] = {
		{ LOG_DEBUG, "<7>" }, { LOG_INFO, "<6>" }, { LOG_WARN, "<4>" }, { LOG_ERROR, "<3>" },
	};
	char *text;

	(void)state;
	fake_journal_stream(fileno(capture));
	log_init("web1:812", LOG_DEBUG);
	for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
		restart_capture();
		switch (rows[i].level) {
		case LOG_DEBUG: log_debug("invoice %d: x", 1); break;
		case LOG_INFO: log_info("invoice %d: x", 1); break;
		case LOG_WARN: log_warnx("invoice %d: x", 1); break;
		default: log_error("invoice %d: x", 1); break;
		}
		text = captured();
		assert_memory_equal(text, rows[i].prefix, 3);
		/* then the line exactly as outside the journal */
		assert_true(text[3 + 10] == 'T' && text[3 + 23] == 'Z');
		assert_non_null(strstr(text, " worker=web1:812 invoice 1: x\n"));
		free(text);
	}
	/* JSON too: journald strips the prefix, the message stays an object. */
	restart_capture();
	log_set_json(1);
	log_warnx("invoice %d: x", 1);
	text = captured();
	assert_memory_equal(text, "<4>{\"ts\":", 9);
	free(text);
}

/* An inherited JOURNAL_STREAM that is not our stderr, or nonsense: plain lines. */
static void
test_journal_stream_must_be_stderr(void **state)
{
	const char *const bogus[] = { "", "12", "12:", "1:2:3", "x:y", "1:2x" };
	FILE *other = tmpfile();
	char *text;

	(void)state;
	assert_non_null(other);
	fake_journal_stream(fileno(other));
	log_init("web1:812", LOG_DEBUG);
	log_info("plain");
	text = captured();
	assert_true(text[0] == '2');
	free(text);
	fclose(other);
	for (size_t i = 0; i < sizeof(bogus) / sizeof(bogus[0]); i++) {
		restart_capture();
		assert_int_equal(setenv("JOURNAL_STREAM", bogus[i], 1), 0);
		log_init("web1:812", LOG_DEBUG);
		log_info("plain");
		text = captured();
		if (text[0] != '2')
			fail_msg("JOURNAL_STREAM=\"%s\" gave a prefix: %s", bogus[i], text);
		free(text);
	}
}

static void
test_log_item_text(void **state)
{
	const struct log_item_fields f = { .kind = "redemption", .id = 280, .outcome = "failed",
	    .http_status = 0, .latency_ms = -1 };
	char *text;

	(void)state;
	log_item(LOG_WARN, &f, "failed before any call: %s", "insufficient funds");
	text = captured();
	assert_string_equal(text + 24,
	    " warning worker=web1:812 redemption 280: failed before any call: insufficient funds\n");
	free(text);
}

static void
test_log_item_json_fields(void **state)
{
	const struct log_item_fields f = { .kind = "invoice", .id = 17, .outcome = "paid",
	    .attempt = 2, .http_status = 200, .latency_ms = 65.74 };
	json_t *v;

	(void)state;
	log_set_json(1);
	log_item(LOG_INFO, &f, "paid, id \"%s\" (attempt 2, http 200, 65.7 ms)", "ch_1");
	v = one_json_line();
	assert_string_equal(str_field(v, "msg"),
	    "invoice 17: paid, id \"ch_1\" (attempt 2, http 200, 65.7 ms)");
	assert_string_equal(str_field(v, "kind"), "invoice");
	assert_int_equal(json_integer_value(json_object_get(v, "id")), 17);
	assert_int_equal(json_integer_value(json_object_get(v, "item")), 17);
	assert_string_equal(str_field(v, "outcome"), "paid");
	assert_int_equal(json_integer_value(json_object_get(v, "attempt")), 2);
	assert_int_equal(json_integer_value(json_object_get(v, "http_status")), 200);
	assert_true(json_is_real(json_object_get(v, "latency_ms")));
	assert_float_equal(json_real_value(json_object_get(v, "latency_ms")), 65.7, 1e-9);
	json_decref(v);
}

/* What is not known is left out, not written as 0 or null. */
static void
test_log_item_json_unknown_fields(void **state)
{
	const struct log_item_fields f = { .kind = "redemption", .id = 9000000000LL,
	    .latency_ms = -1 };
	json_t *v;

	(void)state;
	log_set_json(1);
	log_item(LOG_ERROR, &f, "left pending");
	v = one_json_line();
	assert_string_equal(str_field(v, "msg"), "redemption 9000000000: left pending");
	assert_int_equal(json_integer_value(json_object_get(v, "id")), 9000000000LL);
	assert_null(json_object_get(v, "outcome"));
	assert_null(json_object_get(v, "attempt"));
	assert_null(json_object_get(v, "http_status"));
	assert_null(json_object_get(v, "latency_ms"));
	json_decref(v);
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
		cmocka_unit_test_setup_teardown(test_text_folds_lines, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_json_drops_trailing_newline, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_journal_priority_prefix, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_journal_stream_must_be_stderr, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_log_item_text, start_capture, stop_capture),
		cmocka_unit_test_setup_teardown(test_log_item_json_fields, start_capture,
		    stop_capture),
		cmocka_unit_test_setup_teardown(test_log_item_json_unknown_fields, start_capture,
		    stop_capture),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

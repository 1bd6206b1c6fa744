#ifndef BW_LOG_H
#define BW_LOG_H

/*
 * One line per event on stderr, in the style of OpenBSD ntpd's log.h:
 *
 *   2026-11-22T00:28:49.123Z info worker=web1:812 invoice 17: paid ...
 *
 * or, with log_set_json(1), one JSON object per line:
 *
 *   {"ts":"2026-11-22T00:28:49.123Z","level":"info","worker":"web1:812",
 *    "msg":"invoice 17: paid ...","kind":"invoice","item":17}
 *
 * Messages follow PostgreSQL's style: lowercase, no trailing period, names
 * in double quotes.  Nothing secret is ever passed to these functions: the
 * API token and passwords stay inside the modules that use them.
 *
 * A text line is always one line: a message of several (libpq's "ERROR:
 * ...\nDETAIL: ...") has its line breaks shown as " / " and its trailing
 * newline dropped.  When stderr is the journal ($JOURNAL_STREAM names its
 * device and inode, systemd.exec(5)), every line, text or JSON, starts with
 * its syslog priority as sd-daemon(3)'s "<N>" prefix, which journald strips
 * and stores as PRIORITY, so "journalctl -p warning" works.
 */

#include <stdint.h>

enum {
	LOG_DEBUG = 0,
	LOG_INFO = 1,
	LOG_WARN = 2,
	LOG_ERROR = 3,
};

/*
 * Sets the worker id shown on every line (copied) and the lowest level
 * shown, and looks again at whether stderr is the journal (until the first
 * call, the first line looks).
 */
void log_init(const char *worker_id, int level);
void log_set_level(int level);
/*
 * JSON lines instead of text, for log shippers: one object per line with
 * "ts", "level", "worker", "msg", "kind" and "item" when the message is
 * about an item, and "error" (strerror) for log_warn and fatal.
 */
void log_set_json(int json);
/*
 * Lines for a person at a terminal rather than for the journal:
 * "billing-worker: error: MESSAGE", no time stamp or worker id.  For
 * check-config, whose problems are the same messages run would log.
 */
void log_set_plain(int plain);
int log_level_enabled(int level);

void log_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* log_warn appends ": strerror(errno)"; log_warnx does not. */
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_warnx(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void log_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Log and exit(1). */
void fatal(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
void fatalx(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

/*
 * What a line about one item knows besides its text.  In JSON each known
 * value is a field of its own ("kind", "id", "outcome", "attempt",
 * "http_status", "latency_ms"; "item" repeats "id" for the shippers that
 * already index it), so a log shipper can count outcomes or chart latency
 * without parsing "msg".  KIND is borrowed for the call.
 */
struct log_item_fields {
	const char *kind;           /* "invoice", "redemption" */
	int64_t id;
	const char *outcome;        /* "paid", "failed", "retry" ...; NULL: not known */
	int attempt;                /* 0: not known */
	long http_status;           /* 0: no HTTP answer, or no call */
	double latency_ms;          /* < 0: no call */
};

/*
 * Logs at LEVEL a line about the item F names: the message is "KIND ID: "
 * followed by FMT, so every item line names its item the same way.
 */
void log_item(int level, const struct log_item_fields *f, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

#endif

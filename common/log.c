#include "common/log.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char log_worker_id[256] = "-";
static int log_min_level = LOG_INFO;
static bool log_json;
/* Whether stderr is the journal's stream: -1 until looked at. */
static int log_journal = -1;
static bool log_plain;

static const char *const level_names[] = { "debug", "info", "warning", "error" };
/* sd-daemon(3): SD_DEBUG, SD_INFO, SD_WARNING, SD_ERR, by our levels. */
static const char *const journal_prefix[] = { "<7>", "<6>", "<4>", "<3>" };

/*
 * systemd.exec(5): JOURNAL_STREAM is "DEVICE:INODE" of the stream the
 * service's stderr was connected to.  It is inherited, so it proves
 * nothing unless our stderr is still that very file: a worker started by
 * hand from a shell under a unit, or whose stderr was redirected, must
 * print plain lines.
 */
static bool
stderr_is_journal(void)
{
	const char *env = getenv("JOURNAL_STREAM");
	uintmax_t dev, ino;
	struct stat sb;
	char extra;

	if (env == NULL || sscanf(env, "%ju:%ju%c", &dev, &ino, &extra) != 2)
		return false;
	if (fstat(STDERR_FILENO, &sb) == -1)
		return false;
	return (uintmax_t)sb.st_dev == dev && (uintmax_t)sb.st_ino == ino;
}

void
log_init(const char *worker_id, int level)
{
	if (worker_id != NULL && worker_id[0] != '\0')
		snprintf(log_worker_id, sizeof(log_worker_id), "%s", worker_id);
	log_min_level = level;
	log_journal = stderr_is_journal();
}

void
log_set_level(int level)
{
	log_min_level = level;
}

void
log_set_json(int json)
{
	log_json = json != 0;
}

void
log_set_plain(int plain)
{
	log_plain = plain != 0;
}

int
log_level_enabled(int level)
{
	return level >= log_min_level;
}

/* Length of the valid UTF-8 sequence at P, or 0 when it is not one. */
static size_t
utf8_len(const unsigned char *p)
{
	size_t n;
	uint32_t cp;

	if (p[0] < 0x80)
		return 1;
	if (p[0] >= 0xc2 && p[0] <= 0xdf)
		n = 2, cp = p[0] & 0x1f;
	else if (p[0] >= 0xe0 && p[0] <= 0xef)
		n = 3, cp = p[0] & 0x0f;
	else if (p[0] >= 0xf0 && p[0] <= 0xf4)
		n = 4, cp = p[0] & 0x07;
	else
		return 0;
	for (size_t i = 1; i < n; i++) {
		if ((p[i] & 0xc0) != 0x80)
			return 0;
		cp = (cp << 6) | (p[i] & 0x3f);
	}
	/* overlong forms, surrogates and beyond U+10FFFF are not UTF-8 */
	if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
	    (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return n;
}

/*
 * Appends S to OUT as the body of a JSON string.  Log text may carry bytes
 * from the API or the database that are not UTF-8; they become U+FFFD so
 * the line always parses.
 */
static void
json_escape(FILE *out, const char *s)
{
	const unsigned char *p = (const unsigned char *)s;

	while (*p != '\0') {
		size_t n = utf8_len(p);

		if (n == 0) {
			fputs("\\ufffd", out);
			p++;
		} else if (*p == '"' || *p == '\\') {
			fputc('\\', out);
			fputc(*p++, out);
		} else if (*p == '\n') {
			fputs("\\n", out);
			p++;
		} else if (*p < 0x20 || *p == 0x7f) {
			fprintf(out, "\\u%04x", *p++);
		} else {
			fwrite(p, 1, n, out);
			p += n;
		}
	}
}

/*
 * Messages about an item start "invoice 17: " (see STYLE.md); in JSON the
 * kind and id also get fields of their own, so a log shipper can index them,
 * also on the lines not written through log_item().
 */
static void
json_item_fields(FILE *out, const char *msg)
{
	static const char *const kinds[] = { "invoice", "redemption" };

	for (size_t k = 0; k < sizeof(kinds) / sizeof(kinds[0]); k++) {
		size_t len = strlen(kinds[k]);
		const char *p = msg + len;
		char *end;
		long long id;

		if (strncmp(msg, kinds[k], len) != 0 || *p != ' ' ||
		    p[1] < '0' || p[1] > '9')
			continue;
		id = strtoll(p + 1, &end, 10);
		if (*end == ':')
			fprintf(out, ",\"kind\":\"%s\",\"id\":%lld,\"item\":%lld", kinds[k], id,
			    id);
		return;
	}
}

/* The fields log_item() was given, each only when known. */
static void
json_given_fields(FILE *out, const struct log_item_fields *f)
{
	fputs(",\"kind\":\"", out);
	json_escape(out, f->kind);
	fprintf(out, "\",\"id\":%" PRId64 ",\"item\":%" PRId64, f->id, f->id);
	if (f->outcome != NULL) {
		fputs(",\"outcome\":\"", out);
		json_escape(out, f->outcome);
		fputc('"', out);
	}
	if (f->attempt > 0)
		fprintf(out, ",\"attempt\":%d", f->attempt);
	if (f->http_status > 0)
		fprintf(out, ",\"http_status\":%ld", f->http_status);
	if (f->latency_ms >= 0)
		fprintf(out, ",\"latency_ms\":%.1f", f->latency_ms);
}

static void
write_json(const char *prefix, const char *stamp, long ms, int level, int errnum,
    const struct log_item_fields *f, const char *msg)
{
	/* Room for the longest message with every byte escaped as \uXXXX. */
	char line[16384];
	FILE *out = fmemopen(line, sizeof(line), "w");
	long len;

	if (out == NULL)
		return;
	fprintf(out, "%s{\"ts\":\"%s.%03ldZ\",\"level\":\"%s\",\"worker\":\"", prefix, stamp,
	    ms, level_names[level]);
	json_escape(out, log_worker_id);
	fputs("\",\"msg\":\"", out);
	json_escape(out, msg);
	fputc('"', out);
	if (f != NULL)
		json_given_fields(out, f);
	else
		json_item_fields(out, msg);
	if (errnum != 0) {
		fputs(",\"error\":\"", out);
		json_escape(out, strerror(errnum));
		fputc('"', out);
	}
	fputs("}\n", out);
	len = ftell(out);
	fclose(out);
	if (len > 0 && len < (long)sizeof(line))
		fwrite(line, 1, (size_t)len, stderr);
}

/*
 * Copies IN to OUT (LEN bytes) as one line: each line break inside becomes
 * " / ", so a journal or a grep sees one event per line.
 */
static void
fold_lines(char *out, size_t len, const char *in)
{
	size_t o = 0;

	for (const char *p = in; *p != '\0' && o + 1 < len; p++) {
		if (*p == '\r' && p[1] == '\n')
			continue;
		if (*p == '\n' || *p == '\r') {
			if (o + 3 >= len)
				break;
			memcpy(out + o, " / ", 3);
			o += 3;
		} else {
			out[o++] = *p;
		}
	}
	out[o] = '\0';
}

/*
 * Formats the whole line first and writes it with one fputs, so lines of
 * several processes sharing a journal or a file never interleave mid-line.
 * F, when not NULL, names the item the line is about.
 */
static void
log_vwrite(int level, int errnum, const struct log_item_fields *f, const char *fmt,
    va_list ap)
{
	char msg[2048], folded[3 * sizeof(msg)], stamp[32];
	const char *prefix;
	struct timespec ts;
	struct tm tm;
	size_t n = 0;

	if (level < log_min_level)
		return;
	if (log_journal < 0)
		log_journal = stderr_is_journal();
	prefix = log_journal ? journal_prefix[level] : "";
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	if (f != NULL)
		n = (size_t)snprintf(msg, sizeof(msg), "%s %" PRId64 ": ", f->kind, f->id);
	if (n < sizeof(msg))
		vsnprintf(msg + n, sizeof(msg) - n, fmt, ap);
	/* libpq's messages end in a newline: the line ends here anyway. */
	n = strlen(msg);
	while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	if (log_json && !log_plain) {
		write_json(prefix, stamp, ts.tv_nsec / 1000000, level, errnum, f, msg);
		return;
	}
	fold_lines(folded, sizeof(folded), msg);
	if (log_plain && errnum != 0)
		fprintf(stderr, "billing-worker: %s: %s: %s\n", level_names[level], folded,
		    strerror(errnum));
	else if (log_plain)
		fprintf(stderr, "billing-worker: %s: %s\n", level_names[level], folded);
	else if (errnum != 0)
		fprintf(stderr, "%s%s.%03ldZ %s worker=%s %s: %s\n", prefix, stamp,
		    ts.tv_nsec / 1000000, level_names[level], log_worker_id, folded,
		    strerror(errnum));
	else
		fprintf(stderr, "%s%s.%03ldZ %s worker=%s %s\n", prefix, stamp,
		    ts.tv_nsec / 1000000, level_names[level], log_worker_id, folded);
}

#define LOG_BODY(level, errnum)                 \
	do {                                    \
		va_list ap;                     \
		va_start(ap, fmt);              \
		log_vwrite(level, errnum, NULL, fmt, ap); \
		va_end(ap);                     \
	} while (0)

void log_debug(const char *fmt, ...) { LOG_BODY(LOG_DEBUG, 0); }
void log_info(const char *fmt, ...) { LOG_BODY(LOG_INFO, 0); }
void log_warnx(const char *fmt, ...) { LOG_BODY(LOG_WARN, 0); }
void log_error(const char *fmt, ...) { LOG_BODY(LOG_ERROR, 0); }

void
log_warn(const char *fmt, ...)
{
	int saved = errno;

	LOG_BODY(LOG_WARN, saved);
	errno = saved;
}

void
fatal(const char *fmt, ...)
{
	int saved = errno;

	LOG_BODY(LOG_ERROR, saved);
	exit(1);
}

void
fatalx(const char *fmt, ...)
{
	LOG_BODY(LOG_ERROR, 0);
	exit(1);
}

void
log_item(int level, const struct log_item_fields *f, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	log_vwrite(level, 0, f, fmt, ap);
	va_end(ap);
}

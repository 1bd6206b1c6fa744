#include "common/log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char log_worker_id[256] = "-";
static int log_min_level = LOG_INFO;

static const char *const level_names[] = { "debug", "info", "warning", "error" };

void
log_init(const char *worker_id, int level)
{
	if (worker_id != NULL && worker_id[0] != '\0')
		snprintf(log_worker_id, sizeof(log_worker_id), "%s", worker_id);
	log_min_level = level;
}

void
log_set_level(int level)
{
	log_min_level = level;
}

int
log_level_enabled(int level)
{
	return level >= log_min_level;
}

/*
 * Formats the whole line first and writes it with one fputs, so lines of
 * several processes sharing a journal or a file never interleave mid-line.
 */
static void
log_vwrite(int level, int errnum, const char *fmt, va_list ap)
{
	char msg[2048], stamp[32];
	struct timespec ts;
	struct tm tm;

	if (level < log_min_level)
		return;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	if (errnum != 0)
		fprintf(stderr, "%s.%03ldZ %s worker=%s %s: %s\n", stamp,
		    ts.tv_nsec / 1000000, level_names[level], log_worker_id, msg,
		    strerror(errnum));
	else
		fprintf(stderr, "%s.%03ldZ %s worker=%s %s\n", stamp,
		    ts.tv_nsec / 1000000, level_names[level], log_worker_id, msg);
}

#define LOG_BODY(level, errnum)                 \
	do {                                    \
		va_list ap;                     \
		va_start(ap, fmt);              \
		log_vwrite(level, errnum, fmt, ap); \
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

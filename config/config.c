/*
 * The configuration file.
 *
 * libconfig parses the syntax; everything after that is driven by the one
 * table below (pgbouncer's cf_parameters, redis' standardConfig): each key
 * names its type, range, default, whether SIGHUP may change it and where it
 * lives in struct bw_config.  Loading walks the parsed tree once, checks
 * every setting against the table and reports every problem it finds, so
 * an operator fixes a file in one pass rather than one error per restart.
 */

#include "config/config.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <libconfig.h>

enum opt_type {
	OPT_INT,
	OPT_STRING,
	OPT_ENUM,
	OPT_BOOL,
	OPT_LIST,
};

#define RELOAD  true
#define RESTART false

/*
 * A string check returns NULL when VALUE is acceptable, else the rest of a
 * message that follows the quoted key ("must not be empty").
 */
typedef const char *string_check(const char *value);

struct opt {
	const char *key;            /* "group.name" */
	enum opt_type type;
	long long min;              /* OPT_INT: inclusive bounds */
	long long max;
	long long def;              /* OPT_INT, OPT_ENUM: the default */
	const char *def_str;        /* OPT_STRING: the default; NULL = required */
	string_check *check;        /* OPT_STRING, OPT_LIST (each entry): extra validation, or NULL */
	const char *const *names;   /* OPT_ENUM: value i is names[i]; NULL ends */
	bool reloadable;            /* may change on SIGHUP without a restart */
	size_t offset;              /* of the field in struct bw_config */
};

#define INT_OPT(k, lo, hi, d, rl, field) { .key = (k), .type = OPT_INT, \
	.min = (lo), .max = (hi), .def = (d), .reloadable = (rl), \
	.offset = offsetof(struct bw_config, field) }
#define STR_OPT(k, d, chk, rl, field) { .key = (k), .type = OPT_STRING, \
	.def_str = (d), .check = (chk), .reloadable = (rl), \
	.offset = offsetof(struct bw_config, field) }
#define ENUM_OPT(k, nm, d, rl, field) { .key = (k), .type = OPT_ENUM, \
	.names = (nm), .def = (d), .reloadable = (rl), \
	.offset = offsetof(struct bw_config, field) }

/*
 * A list (or array) of strings, kept as one string of its entries joined
 * by commas ("" for none): config_free, the restart check and SIGHUP then
 * treat it as any string, and CHECK refuses a comma inside an entry.
 */
#define LIST_OPT(k, chk, rl, field) { .key = (k), .type = OPT_LIST, \
	.def_str = "", .check = (chk), .reloadable = (rl), \
	.offset = offsetof(struct bw_config, field) }

#define BOOL_OPT(k, d, rl, field) { .key = (k), .type = OPT_BOOL, \
	.def = (d), .reloadable = (rl), .offset = offsetof(struct bw_config, field) }

/* Enum fields are written through an int *; make sure that is what they are. */
_Static_assert(sizeof(enum lock_mode) == sizeof(int), "enum lock_mode is not int-sized");
_Static_assert(sizeof(enum db_pooling) == sizeof(int), "enum db_pooling is not int-sized");
_Static_assert(sizeof(enum log_level) == sizeof(int), "enum log_level is not int-sized");
_Static_assert(sizeof(enum log_format) == sizeof(int), "enum log_format is not int-sized");

/* Indexed by the enum values in config.h: keep the order. */
static const char *const lock_mode_names[] = { "redis", "skip-locked", "auto", NULL };
static const char *const db_pooling_names[] = { "session", "transaction", NULL };
static const char *const log_level_names[] = { "debug", "info", "warn", "error", NULL };
static const char *const log_format_names[] = { "text", "json", NULL };

static string_check check_nonempty;
static string_check check_url;
static string_check check_listen;
static string_check check_key_prefix;
static string_check check_no_control;
static string_check check_sentinel;

/*
 * Every key the file may hold, in the order the documentation and the
 * example file list them; config_restart_needed reports in this order too.
 */
static const struct opt opts[] = {
	STR_OPT("worker.id", "", NULL, RESTART, worker.id),
	INT_OPT("worker.concurrency", 1, 10000, 64, RELOAD, worker.concurrency),
	INT_OPT("worker.batch_size", 1, 10000, 64, RELOAD, worker.batch_size),
	INT_OPT("worker.poll_interval_ms", 10, 3600000, 1000, RELOAD, worker.poll_interval_ms),
	INT_OPT("worker.gather_us", 0, 20000, 2000, RELOAD, worker.gather_us),
	INT_OPT("worker.shutdown_timeout_ms", 0, 3600000, 30000, RELOAD, worker.shutdown_timeout_ms),
	INT_OPT("worker.once_patience_ms", 1000, 3600000, 60000, RELOAD, worker.once_patience_ms),
	BOOL_OPT("worker.allow_readable_secrets", false, RESTART, worker.allow_readable_secrets),

	STR_OPT("database.conninfo", NULL, check_nonempty, RESTART, database.conninfo),
	INT_OPT("database.query_timeout_ms", 100, 3600000, 30000, RESTART,
	    database.query_timeout_ms),
	/*
	 * Both need a restart: the store's way of sending statements and the
	 * LISTEN connection are set up once, at start.
	 */
	ENUM_OPT("database.pooling", db_pooling_names, DB_POOLING_SESSION, RESTART,
	    database.pooling),
	STR_OPT("database.listen_conninfo", "", NULL, RESTART, database.listen_conninfo),

	STR_OPT("redis.host", "127.0.0.1", NULL, RESTART, redis.host),
	INT_OPT("redis.port", 1, 65535, 6379, RESTART, redis.port),
	STR_OPT("redis.socket", "", NULL, RESTART, redis.socket),
	STR_OPT("redis.password_file", "", NULL, RESTART, redis.password_file),
	STR_OPT("redis.username", "", check_no_control, RESTART, redis.username),
	/*
	 * Redis ships with 16 databases, but "databases" in redis.conf may
	 * raise that: the server, not this table, knows the bound, and refuses
	 * a wrong index at connect with a message naming it.
	 */
	INT_OPT("redis.db", 0, INT_MAX, 0, RESTART, redis.db),
	/* The prefix of every release so far, so existing fleets keep their keys. */
	STR_OPT("redis.key_prefix", "billing-worker:", check_key_prefix, RESTART,
	    redis.key_prefix),
	INT_OPT("redis.connect_timeout_ms", 1, 60000, 500, RESTART, redis.connect_timeout_ms),
	INT_OPT("redis.command_timeout_ms", 1, 60000, 2000, RESTART, redis.command_timeout_ms),
	/* With sentinels the master's address comes from them, not host/port. */
	LIST_OPT("redis.sentinels", check_sentinel, RESTART, redis.sentinels),
	STR_OPT("redis.master_name", "", check_no_control, RESTART, redis.master_name),

	ENUM_OPT("locks.mode", lock_mode_names, LOCK_MODE_REDIS, RESTART, locks.mode),
	INT_OPT("locks.ttl_ms", 100, 86400000, 30000, RELOAD, locks.ttl_ms),
	INT_OPT("locks.renew_interval_ms", 10, 86400000, 10000, RELOAD, locks.renew_interval_ms),

	STR_OPT("billing_api.base_url", NULL, check_url, RESTART, billing_api.base_url),
	STR_OPT("billing_api.token_file", "/etc/billing-worker/api-token", NULL, RESTART,
	    billing_api.token_file),
	INT_OPT("billing_api.timeout_ms", 1, 600000, 10000, RELOAD, billing_api.timeout_ms),
	INT_OPT("billing_api.connect_timeout_ms", 1, 600000, 2000, RELOAD,
	    billing_api.connect_timeout_ms),
	INT_OPT("billing_api.max_attempts", 1, 1000, 8, RELOAD, billing_api.max_attempts),
	INT_OPT("billing_api.backoff_initial_ms", 1, 86400000, 1000, RELOAD,
	    billing_api.backoff_initial_ms),
	INT_OPT("billing_api.backoff_max_ms", 1, 86400000, 300000, RELOAD,
	    billing_api.backoff_max_ms),
	INT_OPT("billing_api.max_requests_per_second", 0, 1000000, 0, RELOAD,
	    billing_api.max_requests_per_second),
	INT_OPT("billing_api.idempotency_key_ttl_s", 0, 315360000, 0, RELOAD,
	    billing_api.idempotency_key_ttl_s),
	STR_OPT("billing_api.ca_file", "", NULL, RESTART, billing_api.ca_file),
	BOOL_OPT("billing_api.allow_insecure_http", false, RESTART, billing_api.allow_insecure_http),

	ENUM_OPT("log.level", log_level_names, LOG_LEVEL_INFO, RELOAD, log.level),
	ENUM_OPT("log.format", log_format_names, LOG_FORMAT_TEXT, RELOAD, log.format),

	STR_OPT("metrics.listen", "", check_listen, RESTART, metrics.listen),

	BOOL_OPT("history.enabled", true, RELOAD, history.enabled),
	INT_OPT("history.retention_days", 0, 36500, 0, RELOAD, history.retention_days),
};

#define N_OPTS (sizeof(opts) / sizeof(opts[0]))

enum rule_op {
	RULE_LT,
	RULE_LE,
	RULE_GE,
};

/*
 * Rules between two integer keys: "left op right" must hold.  The error
 * points at LEFT's line when the file sets it, since that is usually the
 * one to change.
 */
static const struct rule {
	const char *left;
	enum rule_op op;
	const char *right;
} rules[] = {
	/* a lock renewed no sooner than it expires is lost between renewals */
	{ "locks.renew_interval_ms", RULE_LT, "locks.ttl_ms" },
	{ "billing_api.connect_timeout_ms", RULE_LE, "billing_api.timeout_ms" },
	{ "billing_api.backoff_max_ms", RULE_GE, "billing_api.backoff_initial_ms" },
};

/* The state of one load: the struct being built and the errors so far. */
struct segment;

struct loader {
	const char *name;               /* FILE in messages */
	FILE *out;                      /* open_memstream over text/len, or NULL */
	char *text;
	size_t len;
	int nerrors;
	FILE *warn_out;                 /* open_memstream over warn_text/warn_len */
	char *warn_text;
	size_t warn_len;
	struct segment *segs;           /* expanded line -> file and line, in order */
	size_t nsegs, capsegs;
	char **files;                   /* the @include'd files' resolved names */
	size_t nfiles;
	const config_setting_t *seen[N_OPTS];   /* where the file sets each key */
	bool bad[N_OPTS];               /* set but invalid: skip rules using it */
	struct bw_config cfg;
};

static int *
int_field(struct bw_config *cfg, const struct opt *o)
{
	return (int *)(void *)((char *)cfg + o->offset);
}

static const int *
int_field_const(const struct bw_config *cfg, const struct opt *o)
{
	return (const int *)(const void *)((const char *)cfg + o->offset);
}

static bool *
bool_field(struct bw_config *cfg, const struct opt *o)
{
	return (bool *)(void *)((char *)cfg + o->offset);
}

static char **
str_field(struct bw_config *cfg, const struct opt *o)
{
	return (char **)(void *)((char *)cfg + o->offset);
}

static const char *
str_value(const struct bw_config *cfg, const struct opt *o)
{
	const char *s = *(char *const *)(const void *)((const char *)cfg + o->offset);

	/* A zeroed struct compares equal to an empty string. */
	return s != NULL ? s : "";
}

static int
find_opt(const char *group, const char *name)
{
	size_t glen = strlen(group);
	int found = -1;

	for (size_t i = 0; i < N_OPTS && found < 0; i++) {
		const char *key = opts[i].key;

		if (strncmp(key, group, glen) == 0 && key[glen] == '.' &&
		    strcmp(key + glen + 1, name) == 0)
			found = (int)i;
	}
	return found;
}

static int
find_key(const char *key)
{
	int found = -1;

	for (size_t i = 0; i < N_OPTS && found < 0; i++)
		if (strcmp(opts[i].key, key) == 0)
			found = (int)i;
	return found;
}

static bool
is_group(const char *name)
{
	size_t len = strlen(name);
	bool found = false;

	for (size_t i = 0; i < N_OPTS && !found; i++)
		found = strncmp(opts[i].key, name, len) == 0 && opts[i].key[len] == '.';
	return found;
}

static void source_of(const struct loader *ld, unsigned out_line, const char **file,
    unsigned *line);
static void verror(struct loader *ld, const char *file, unsigned line,
    const char *fmt, va_list ap) __attribute__((format(printf, 4, 0)));
static void error_at(struct loader *ld, const char *file, unsigned line,
    const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void error_in(struct loader *ld, const config_setting_t *s,
    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Counts the error even when there is no memory left to word it. */
static void
verror(struct loader *ld, const char *file, unsigned line, const char *fmt,
    va_list ap)
{
	ld->nerrors++;
	if (ld->out != NULL) {
		fprintf(ld->out, "%s:%u: ", file, line);
		vfprintf(ld->out, fmt, ap);
		fputc('\n', ld->out);
	}
}

static void
error_at(struct loader *ld, const char *file, unsigned line, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	verror(ld, file, line, fmt, ap);
	va_end(ap);
}

/*
 * An error about setting S, or about the file as a whole when S is NULL.
 * A setting from an @include'd file carries that file's name; the main
 * file's settings carry none, since it is handed to libconfig as text.
 */
static void
error_in(struct loader *ld, const config_setting_t *s, const char *fmt, ...)
{
	const char *file = ld->name;
	unsigned line = 0;
	va_list ap;

	if (s != NULL)
		source_of(ld, config_setting_source_line(s), &file, &line);
	va_start(ap, fmt);
	verror(ld, file, line, fmt, ap);
	va_end(ap);
}

static void warning_in(struct loader *ld, const config_setting_t *s,
    const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Like error_in, for a setting that is valid but likely a mistake. */
static void
warning_in(struct loader *ld, const config_setting_t *s, const char *fmt, ...)
{
	const char *file = ld->name;
	unsigned line = 0;

	if (ld->warn_out == NULL)
		return;
	if (s != NULL)
		source_of(ld, config_setting_source_line(s), &file, &line);
	va_list ap;

	fprintf(ld->warn_out, "%s:%u: warning: ", file, line);
	va_start(ap, fmt);
	vfprintf(ld->warn_out, fmt, ap);
	va_end(ap);
	fputc('\n', ld->warn_out);
}

static const char *
check_nonempty(const char *value)
{
	return value[0] != '\0' ? NULL : "must not be empty";
}

/*
 * Accepts AUTHORITY[/...] where AUTHORITY is [userinfo@]host[:port] and
 * host is a name, an IPv4 address or a bracketed IPv6 address.  libcurl
 * does the real parsing; this catches the typos that would otherwise only
 * show on the first API call.
 */
static bool
url_authority_ok(const char *rest)
{
	size_t alen = strcspn(rest, "/?#");
	const char *host = rest;
	const char *at = memchr(rest, '@', alen);
	const char *end = rest + alen;
	const char *port = NULL;
	bool ok = false;

	if (at != NULL)
		host = at + 1;
	if (host[0] == '[') {
		const char *close = memchr(host, ']', (size_t)(end - host));

		if (close != NULL && close > host + 1 &&
		    (close + 1 == end || close[1] == ':')) {
			ok = true;
			port = close + 1 == end ? NULL : close + 2;
		}
	} else {
		const char *colon = memchr(host, ':', (size_t)(end - host));
		const char *hend = colon != NULL ? colon : end;

		ok = hend > host;
		port = colon != NULL ? colon + 1 : NULL;
	}
	if (ok && port != NULL) {
		long n = 0;

		ok = port < end && end - port <= 5;
		for (const char *p = port; ok && p < end; p++) {
			ok = isdigit((unsigned char)*p);
			n = n * 10 + (*p - '0');
		}
		ok = ok && n >= 1 && n <= 65535;
	}
	return ok;
}

static const char *
check_url(const char *value)
{
	const char *rest = NULL;
	const char *msg = "must be an http:// or https:// URL with a host";
	bool clean = true;

	/* Spaces and control characters are never right in a URL. */
	for (const unsigned char *p = (const unsigned char *)value; *p != '\0'; p++)
		if (*p <= ' ' || *p == 0x7f)
			clean = false;
	if (strncmp(value, "http://", 7) == 0)
		rest = value + 7;
	else if (strncmp(value, "https://", 8) == 0)
		rest = value + 8;
	if (clean && rest != NULL && url_authority_ok(rest))
		msg = NULL;
	return msg;
}

/*
 * "" (off), or HOST:PORT where HOST is a name, an IPv4 address or a
 * bracketed IPv6 address.  Whether it resolves and is free is found at start.
 */
static const char *
check_listen(const char *value)
{
	const char *colon = strrchr(value, ':');
	const char *msg = "must be \"\" or HOST:PORT, e.g. \"127.0.0.1:9187\" or \"[::1]:9187\"";
	size_t hlen;
	long port = 0;
	bool ok;

	if (value[0] == '\0')
		return NULL;
	if (colon == NULL)
		return msg;
	hlen = (size_t)(colon - value);
	if (value[0] == '[')
		ok = hlen > 2 && value[hlen - 1] == ']' && memchr(value + 1, ']', hlen - 1) ==
		    value + hlen - 1;
	else
		ok = hlen > 0 && memchr(value, ':', hlen) == NULL;
	for (size_t i = 0; ok && i < hlen; i++)
		ok = (unsigned char)value[i] > ' ' && value[i] != '/';
	ok = ok && colon[1] != '\0' && strlen(colon + 1) <= 5;
	for (const char *p = colon + 1; ok && *p != '\0'; p++) {
		ok = isdigit((unsigned char)*p);
		port = port * 10 + (*p - '0');
	}
	return ok && port >= 1 && port <= 65535 ? NULL : msg;
}

#define STRINGIFY_(x) #x
#define STRINGIFY(x) STRINGIFY_(x)

/*
 * Every key the fleet keeps in Redis starts with it, and Redis' own tools
 * (redis-cli --scan --pattern, the slow log) show it: printable ASCII only,
 * so it can be typed and grepped, and bounded so a key always fits.
 */
static const char *
check_key_prefix(const char *value)
{
	size_t len = strlen(value);
	bool ok = len > 0 && len <= CONFIG_REDIS_KEY_PREFIX_MAX;

	for (const char *p = value; ok && *p != '\0'; p++)
		ok = *p > ' ' && *p < 0x7f;
	return ok ? NULL : "must be 1 to " STRINGIFY(CONFIG_REDIS_KEY_PREFIX_MAX)
	    " printable ASCII characters without spaces, e.g. \"billing-worker:staging:\"";
}

/* A name that goes into a Redis command and into log lines as it is. */
static const char *
check_no_control(const char *value)
{
	for (const unsigned char *p = (const unsigned char *)value; *p != '\0'; p++)
		if (*p < ' ' || *p == 0x7f)
			return "must not contain control characters";
	return NULL;
}

/*
 * One entry of redis.sentinels: HOST:PORT as metrics.listen takes it, and
 * no comma, since the entries are kept joined by commas.
 */
static const char *
check_sentinel(const char *value)
{
	if (value[0] == '\0' || strchr(value, ',') != NULL || check_listen(value) != NULL)
		return "must be HOST:PORT, e.g. \"10.0.0.5:26379\" or \"[::1]:26379\"";
	return NULL;
}

/*
 * Returns the end of the number starting at P (digits, maybe signed) and
 * sets *wide when it is an integer literal without an L suffix whose value
 * does not fit in an int.
 */
static const char *
scan_number(const char *p, bool *wide)
{
	const char *q = p;
	unsigned long long mag = 0;
	unsigned long long limit = INT_MAX;
	bool overflow = false;
	bool is_int = true;
	int base = 10;

	if (*q == '-' || *q == '+') {
		if (*q == '-')
			limit = (unsigned long long)INT_MAX + 1;
		q++;
	}
	if (q == p && q[0] == '0' && (q[1] == 'x' || q[1] == 'X') &&
	    isxdigit((unsigned char)q[2])) {
		/* libconfig reads hex as unsigned bits: 0xFFFFFFFF is -1 */
		base = 16;
		q += 2;
	}
	for (; base == 16 ? isxdigit((unsigned char)*q) : isdigit((unsigned char)*q); q++) {
		int d = isdigit((unsigned char)*q) ? *q - '0' :
		    tolower((unsigned char)*q) - 'a' + 10;

		if (mag > (ULLONG_MAX - (unsigned long long)d) / (unsigned long long)base)
			overflow = true;
		else
			mag = mag * (unsigned long long)base + (unsigned long long)d;
	}
	if (base == 10 && (*q == '.' || *q == 'e' || *q == 'E')) {
		/* a float: its digits and exponent never need widening */
		is_int = false;
		while (isdigit((unsigned char)*q) || *q == '.')
			q++;
		if (*q == 'e' || *q == 'E') {
			q++;
			if (*q == '-' || *q == '+')
				q++;
			while (isdigit((unsigned char)*q))
				q++;
		}
	} else if (isalnum((unsigned char)*q) || *q == '_') {
		/* already 64-bit (L), or not a number libconfig accepts */
		is_int = false;
	}
	*wide = is_int && (overflow || mag > limit);
	return q;
}

/* The end of the comment or string that starts at P, or NULL when none does. */
static const char *
skip_comment_or_string(const char *p)
{
	const char *end = NULL;

	if (p[0] == '#' || (p[0] == '/' && p[1] == '/')) {
		end = p + strcspn(p, "\n");
	} else if (p[0] == '/' && p[1] == '*') {
		end = strstr(p + 2, "*/");
		end = end != NULL ? end + 2 : p + strlen(p);
	} else if (p[0] == '"') {
		for (end = p + 1; *end != '\0' && *end != '"'; end++)
			if (*end == '\\' && end[1] != '\0')
				end++;
		if (*end == '"')
			end++;
	}
	return end;
}

/*
 * libconfig 1.5 (Debian 12) reads an integer without an L suffix with
 * atoi(), so 4294967396 silently becomes 100 and passes range checks.
 * Appending the L to such literals makes libconfig read them as 64-bit
 * values, which the range checks then reject with the number the operator
 * wrote.  Comments and strings are skipped; no newline is added, so line
 * numbers are unchanged.  Returns a malloc'd copy, or NULL without memory.
 */
static char *
widen_integers(const char *in)
{
	size_t len = strlen(in);
	char *out = NULL;
	char *o;
	const char *p = in;

	/* At most one 'L' per input character. */
	if (len < SIZE_MAX / 2)
		out = malloc(2 * len + 1);
	o = out;
	while (out != NULL && *p != '\0') {
		const char *start = p;
		bool wide = false;

		const char *skipped = skip_comment_or_string(p);

		if (skipped != NULL) {
			p = skipped;
		} else if (isalpha((unsigned char)*p) || *p == '*') {
			/* a name, as libconfig's scanner reads one: digits inside are not numbers */
			for (p++; isalnum((unsigned char)*p) || *p == '-' || *p == '_' || *p == '*'; p++)
				;
		} else if (isdigit((unsigned char)*p) ||
		    ((*p == '-' || *p == '+') && isdigit((unsigned char)p[1]))) {
			p = scan_number(p, &wide);
		} else {
			p++;
		}
		memcpy(o, start, (size_t)(p - start));
		o += p - start;
		if (wide)
			*o++ = 'L';
	}
	if (out != NULL)
		*o = '\0';
	return out;
}

static void
set_string(struct loader *ld, const struct opt *o, const config_setting_t *s,
    const char *value)
{
	char *copy = strdup(value);
	char **field = str_field(&ld->cfg, o);

	if (copy == NULL) {
		error_in(ld, s, "out of memory");
	} else {
		free(*field);
		*field = copy;
	}
}

static bool
apply_int(struct loader *ld, const struct opt *o, const config_setting_t *s)
{
	int type = config_setting_type(s);
	long long v;
	bool ok = false;

	if (type != CONFIG_TYPE_INT && type != CONFIG_TYPE_INT64) {
		error_in(ld, s, "\"%s\" must be an integer", o->key);
	} else {
		v = config_setting_get_int64(s);
		if (v < o->min || v > o->max) {
			error_in(ld, s, "\"%s\" must be between %lld and %lld, not %lld",
			    o->key, o->min, o->max, v);
		} else {
			*int_field(&ld->cfg, o) = (int)v;
			ok = true;
		}
	}
	return ok;
}

static bool
apply_string(struct loader *ld, const struct opt *o, const config_setting_t *s)
{
	const char *v;
	const char *problem = NULL;
	bool ok = false;

	if (config_setting_type(s) != CONFIG_TYPE_STRING) {
		error_in(ld, s, "\"%s\" must be a string", o->key);
	} else {
		v = config_setting_get_string(s);
		if (o->check != NULL)
			problem = o->check(v);
		if (problem != NULL) {
			error_in(ld, s, "\"%s\" %s", o->key, problem);
		} else {
			set_string(ld, o, s, v);
			ok = true;
		}
	}
	return ok;
}

static bool
apply_enum(struct loader *ld, const struct opt *o, const config_setting_t *s)
{
	const char *v;
	char list[128] = "";
	size_t used = 0;
	int found = -1;
	bool ok = false;

	if (config_setting_type(s) != CONFIG_TYPE_STRING) {
		error_in(ld, s, "\"%s\" must be a string", o->key);
	} else {
		v = config_setting_get_string(s);
		for (int i = 0; o->names[i] != NULL && found < 0; i++)
			if (strcmp(o->names[i], v) == 0)
				found = i;
		if (found >= 0) {
			*int_field(&ld->cfg, o) = found;
			ok = true;
		} else {
			for (int i = 0; o->names[i] != NULL && used < sizeof(list); i++)
				used += (size_t)snprintf(list + used, sizeof(list) - used,
				    "%s%s", i > 0 ? ", " : "", o->names[i]);
			error_in(ld, s, "\"%s\" must be one of %s, not \"%s\"",
			    o->key, list, v);
		}
	}
	return ok;
}

/* The most sentinels one file may list: Sentinel deployments run 3 or 5. */
#define LIST_MAX 16

static bool
apply_list(struct loader *ld, const struct opt *o, const config_setting_t *s)
{
	char *joined = NULL;
	size_t len = 0;
	FILE *out = NULL;
	int n = config_setting_length(s);
	bool ok = true;

	if (!config_setting_is_array(s) && !config_setting_is_list(s)) {
		error_in(ld, s, "\"%s\" must be a list of strings, e.g. "
		    "[ \"10.0.0.5:26379\", \"10.0.0.6:26379\" ]", o->key);
		return false;
	}
	if (n > LIST_MAX) {
		error_in(ld, s, "\"%s\" must have at most %d entries, not %d", o->key,
		    LIST_MAX, n);
		return false;
	}
	for (int i = 0; i < n; i++) {
		const config_setting_t *e = config_setting_get_elem(s, (unsigned)i);
		const char *problem;

		if (config_setting_type(e) != CONFIG_TYPE_STRING) {
			error_in(ld, e, "\"%s\" entry %d must be a string", o->key, i + 1);
			ok = false;
		} else if (o->check != NULL &&
		    (problem = o->check(config_setting_get_string(e))) != NULL) {
			error_in(ld, e, "\"%s\" entry %d (\"%s\") %s", o->key, i + 1,
			    config_setting_get_string(e), problem);
			ok = false;
		}
	}
	if (ok && (out = open_memstream(&joined, &len)) != NULL) {
		for (int i = 0; i < n; i++)
			fprintf(out, "%s%s", i > 0 ? "," : "",
			    config_setting_get_string(config_setting_get_elem(s, (unsigned)i)));
		if (fclose(out) != 0) {
			free(joined);
			joined = NULL;
		}
	}
	if (ok && joined == NULL) {
		error_in(ld, s, "out of memory");
		ok = false;
	}
	if (ok)
		set_string(ld, o, s, joined);
	free(joined);
	return ok;
}

static bool
apply_bool(struct loader *ld, const struct opt *o, const config_setting_t *s)
{
	if (config_setting_type(s) != CONFIG_TYPE_BOOL) {
		error_in(ld, s, "\"%s\" must be true or false", o->key);
		return false;
	}
	*bool_field(&ld->cfg, o) = config_setting_get_bool(s) != 0;
	return true;
}

static void
walk_group(struct loader *ld, const config_setting_t *group)
{
	const char *gname = config_setting_name(group);
	int n = config_setting_length(group);

	for (int i = 0; i < n; i++) {
		const config_setting_t *s = config_setting_get_elem(group, (unsigned)i);
		const char *name = config_setting_name(s);
		int idx = find_opt(gname, name);
		const struct opt *o;
		bool ok = false;

		if (idx < 0) {
			error_in(ld, s, "unknown setting \"%s.%s\"", gname, name);
			continue;
		}
		o = &opts[idx];
		ld->seen[idx] = s;
		switch (o->type) {
		case OPT_INT:
			ok = apply_int(ld, o, s);
			break;
		case OPT_STRING:
			ok = apply_string(ld, o, s);
			break;
		case OPT_ENUM:
			ok = apply_enum(ld, o, s);
			break;
		case OPT_BOOL:
			ok = apply_bool(ld, o, s);
			break;
		case OPT_LIST:
			ok = apply_list(ld, o, s);
			break;
		}
		ld->bad[idx] = !ok;
	}
}

static void
walk_root(struct loader *ld, const config_setting_t *root)
{
	int n = config_setting_length(root);

	for (int i = 0; i < n; i++) {
		const config_setting_t *s = config_setting_get_elem(root, (unsigned)i);
		const char *name = config_setting_name(s);

		if (!is_group(name))
			error_in(ld, s, "unknown setting \"%s\"", name);
		else if (!config_setting_is_group(s))
			error_in(ld, s, "\"%s\" must be a group", name);
		else
			walk_group(ld, s);
	}
}

/*
 * A required key that is missing is reported at its group's line when the
 * file has the group, which is where it goes; without the group no line
 * applies (0).
 */
static void
check_required(struct loader *ld, const config_setting_t *root)
{
	for (size_t i = 0; i < N_OPTS; i++) {
		const config_setting_t *group = NULL;
		char gname[64];

		if (opts[i].type != OPT_STRING || opts[i].def_str != NULL || ld->seen[i] != NULL)
			continue;
		snprintf(gname, sizeof(gname), "%.*s", (int)strcspn(opts[i].key, "."),
		    opts[i].key);
		group = config_setting_get_member(root, gname);
		if (group != NULL && config_setting_is_group(group))
			error_in(ld, group, "missing required setting \"%s\"", opts[i].key);
		else
			error_in(ld, NULL, "missing required setting \"%s\" (the file has no "
			    "\"%s\" group)", opts[i].key, gname);
	}
}

static void
check_rules(struct loader *ld)
{
	static const char *const wording[] = {
		[RULE_LT] = "less than",
		[RULE_LE] = "less than or equal to",
		[RULE_GE] = "greater than or equal to",
	};

	for (size_t i = 0; i < sizeof(rules) / sizeof(rules[0]); i++) {
		const struct rule *r = &rules[i];
		int li = find_key(r->left);
		int ri = find_key(r->right);
		int lv, rv;
		bool holds = false;
		const config_setting_t *where;

		/* A key already reported as invalid would only add noise here. */
		if (li < 0 || ri < 0 || ld->bad[li] || ld->bad[ri])
			continue;
		lv = *int_field(&ld->cfg, &opts[li]);
		rv = *int_field(&ld->cfg, &opts[ri]);
		switch (r->op) {
		case RULE_LT:
			holds = lv < rv;
			break;
		case RULE_LE:
			holds = lv <= rv;
			break;
		case RULE_GE:
			holds = lv >= rv;
			break;
		}
		if (!holds) {
			where = ld->seen[li] != NULL ? ld->seen[li] : ld->seen[ri];
			error_in(ld, where, "\"%s\" (%d) must be %s \"%s\" (%d)",
			    r->left, lv, wording[r->op], r->right, rv);
		}
	}
}

/*
 * Points at the host of an http(s) URL that check_url accepted and sets
 * *len to its length, brackets of an IPv6 address excluded.
 */
static const char *
url_host(const char *url, size_t *len)
{
	const char *rest = strstr(url, "://") + 3;
	size_t alen = strcspn(rest, "/?#");
	const char *at = memchr(rest, '@', alen);
	const char *host = at != NULL ? at + 1 : rest;
	const char *end = rest + alen;

	if (host[0] == '[') {
		host++;
		end = memchr(host, ']', (size_t)(end - host));
	} else {
		const char *colon = memchr(host, ':', (size_t)(end - host));

		if (colon != NULL)
			end = colon;
	}
	*len = (size_t)(end - host);
	return host;
}

/* localhost (RFC 6761, with its subdomains), 127.0.0.0/8 or ::1. */
static bool
host_is_loopback(const char *host, size_t len)
{
	char h[256];
	struct in_addr a4;
	struct in6_addr a6;

	if (len == 0 || len >= sizeof(h))
		return false;
	memcpy(h, host, len);
	h[len] = '\0';
	if (h[len - 1] == '.')
		h[--len] = '\0';
	if (strcasecmp(h, "localhost") == 0 ||
	    (len > 10 && strcasecmp(h + len - 10, ".localhost") == 0))
		return true;
	if (inet_pton(AF_INET, h, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, h, &a6) == 1)
		return IN6_IS_ADDR_LOOPBACK(&a6);
	return false;
}

bool
config_insecure_http(const char *url)
{
	size_t len;
	const char *host;

	if (url == NULL || strncmp(url, "http://", 7) != 0)
		return false;
	host = url_host(url, &len);
	return !host_is_loopback(host, len);
}

/*
 * The token and every charge would cross the network in clear text: only
 * with an explicit opt-in (a TLS-terminating sidecar on another address).
 * Credentials in the URL itself are refused whatever the scheme: they
 * would travel in every request line and show in libcurl's messages.
 */
static void
check_transport(struct loader *ld)
{
	int ui = find_key("billing_api.base_url");
	const char *url = ld->cfg.billing_api.base_url;
	const char *rest;

	if (ld->bad[ui] || ld->seen[ui] == NULL || url == NULL)
		return;
	rest = strstr(url, "://") + 3;
	if (memchr(rest, '@', strcspn(rest, "/?#")) != NULL)
		error_in(ld, ld->seen[ui], "\"billing_api.base_url\" must not hold a user "
		    "or password: the token comes from \"billing_api.token_file\"");
	else if (config_insecure_http(url) && !ld->cfg.billing_api.allow_insecure_http)
		error_in(ld, ld->seen[ui], "\"billing_api.base_url\" uses http:// to a host "
		    "that is not loopback: use https://, or set "
		    "\"billing_api.allow_insecure_http\" = true to send the token in clear text");
}

/*
 * Redis' ACL AUTH takes a user and a password, never a user alone: a
 * username without the password file is a mistake to report now rather
 * than as a refused connection later.  (A systemd credential
 * "redis-password" replaces the file's content; the key still says that a
 * password is meant.)
 */
static void
check_redis_auth(struct loader *ld)
{
	int ui = find_key("redis.username");

	if (ld->bad[ui] || ld->seen[ui] == NULL || ld->cfg.redis.username[0] == '\0')
		return;
	if (ld->cfg.redis.password_file[0] == '\0')
		error_in(ld, ld->seen[ui], "\"redis.username\" is set but "
		    "\"redis.password_file\" is not: Redis authenticates a user "
		    "only with a password");
}

/*
 * With sentinels the master is found by its name: sentinels without one
 * is a mistake.  Keys that are then not used (host, port and socket beside
 * sentinels, a name without them) are valid, but the operator should hear
 * before wondering why a changed port changes nothing.
 */
static void
check_redis_sentinels(struct loader *ld)
{
	static const char *const unused[] = { "redis.host", "redis.port", "redis.socket" };
	int si = find_key("redis.sentinels"), mi = find_key("redis.master_name");
	bool sentinels = ld->cfg.redis.sentinels != NULL && ld->cfg.redis.sentinels[0] != '\0';
	bool name = ld->cfg.redis.master_name != NULL && ld->cfg.redis.master_name[0] != '\0';

	if (ld->bad[si] || ld->bad[mi])
		return;
	if (sentinels && !name)
		error_in(ld, ld->seen[si], "\"redis.sentinels\" is set but \"redis.master_name\" "
		    "is not: the sentinels are asked for the master by its name");
	else if (name && !sentinels)
		warning_in(ld, ld->seen[mi], "\"redis.master_name\" is not used without "
		    "\"redis.sentinels\": Redis is at \"redis.host\" and \"redis.port\"");
	for (size_t i = 0; sentinels && i < sizeof(unused) / sizeof(unused[0]); i++) {
		int k = find_key(unused[i]);

		if (ld->seen[k] != NULL && !ld->bad[k])
			warning_in(ld, ld->seen[k], "\"%s\" is not used: with \"redis.sentinels\" "
			    "the master's address comes from the sentinels", unused[i]);
	}
}

/*
 * A poll takes at most as many items as there is room for calls, so a
 * batch larger than worker.concurrency is never taken whole: the setting
 * does nothing past that.  Said only when the file sets one of the two,
 * since the defaults (both 64) cannot disagree.
 */
static void
check_warnings(struct loader *ld)
{
	int bi = find_key("worker.batch_size"), ci = find_key("worker.concurrency");
	int batch = ld->cfg.worker.batch_size, conc = ld->cfg.worker.concurrency;

	if (ld->bad[bi] || ld->bad[ci] || (ld->seen[bi] == NULL && ld->seen[ci] == NULL))
		return;
	if (batch > conc)
		warning_in(ld, ld->seen[bi] != NULL ? ld->seen[bi] : ld->seen[ci],
		    "\"worker.batch_size\" (%d) is greater than \"worker.concurrency\" (%d): "
		    "a poll takes at most %d items", batch, conc, conc);
}

static void
set_defaults(struct loader *ld)
{
	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];

		if ((o->type == OPT_STRING || o->type == OPT_LIST) && o->def_str != NULL)
			set_string(ld, o, NULL, o->def_str);
		else if (o->type == OPT_BOOL)
			*bool_field(&ld->cfg, o) = o->def != 0;
		else if (o->type == OPT_INT || o->type == OPT_ENUM)
			*int_field(&ld->cfg, o) = (int)o->def;
	}
}

static void
loader_init(struct loader *ld, const char *name)
{
	memset(ld, 0, sizeof(*ld));
	ld->name = name;
	ld->out = open_memstream(&ld->text, &ld->len);
	ld->warn_out = open_memstream(&ld->warn_text, &ld->warn_len);
	ld->cfg.path = strdup(name);
	if (ld->cfg.path == NULL)
		error_in(ld, NULL, "out of memory");
	set_defaults(ld);
}

/* libconfig's own limit on nested @include, kept now that we expand them. */
#define INCLUDE_DEPTH_MAX 10
/* No configuration fragment is this large; a bigger file is a mistake. */
#define INCLUDE_SIZE_MAX (1024 * 1024)

/*
 * Where a line of the expanded text came from: lines from OUT_LINE on are
 * FILE's lines from FILE_LINE on, up to the next segment.
 */
struct segment {
	unsigned out_line;
	const char *file;               /* ld->name, or one of ld->files */
	unsigned file_line;
};

/* The text handed to libconfig, with every @include already in place. */
struct expansion {
	FILE *out;
	unsigned out_line;              /* the line being written, from 1 */
};

static void
add_segment(struct loader *ld, unsigned out_line, const char *file, unsigned file_line)
{
	struct segment *bigger;

	if (ld->nsegs == ld->capsegs) {
		size_t cap = ld->capsegs == 0 ? 16 : ld->capsegs * 2;

		if ((bigger = realloc(ld->segs, cap * sizeof(*bigger))) == NULL) {
			error_at(ld, file, file_line, "out of memory");
			return;
		}
		ld->segs = bigger;
		ld->capsegs = cap;
	}
	ld->segs[ld->nsegs++] = (struct segment){ out_line, file, file_line };
}

/* The file and line that line OUT_LINE of the expanded text came from. */
static void
source_of(const struct loader *ld, unsigned out_line, const char **file, unsigned *line)
{
	*file = ld->name;
	*line = out_line;
	if (out_line == 0)
		return;
	for (size_t i = 0; i < ld->nsegs; i++) {
		if (ld->segs[i].out_line > out_line)
			break;
		*file = ld->segs[i].file;
		*line = ld->segs[i].file_line + (out_line - ld->segs[i].out_line);
	}
}

static void
emit(struct expansion *ex, const char *p, size_t n)
{
	fwrite(p, 1, n, ex->out);
	for (size_t i = 0; i < n; i++)
		ex->out_line += p[i] == '\n';
}

/*
 * A relative @include names a file beside the one that includes it, as in
 * nginx and C: systemd starts the worker in /, and no operator means "the
 * working directory" when writing @include "conf.d/limits.conf".
 */
static char *
resolve_include(const char *including, const char *path)
{
	const char *slash = strrchr(including, '/');
	char *full = NULL;

	if (path[0] == '/' || slash == NULL)
		return strdup(path);
	if (asprintf(&full, "%.*s/%s", (int)(slash - including), including, path) == -1)
		return NULL;
	return full;
}

static void expand_text(struct loader *ld, struct expansion *ex, const char *text,
    const char *name, int depth);

/*
 * Puts the file an @include on NAME:LINE names in place of the directive.
 * Anything but a regular file is refused before anyone reads it: libconfig
 * 1.5's scanner calls exit() on a directory and blocks on a FIFO, which on
 * SIGHUP would end or freeze the daemon instead of keeping the running
 * configuration.
 */
static void
expand_include(struct loader *ld, struct expansion *ex, const char *name, unsigned line,
    const char *path, int depth)
{
	char *full = resolve_include(name, path);
	char *buf = NULL;
	char **files;
	FILE *f = NULL;
	struct stat sb;
	size_t n = 0;

	if (full == NULL) {
		error_at(ld, name, line, "out of memory");
	} else if (depth + 1 >= INCLUDE_DEPTH_MAX) {
		error_at(ld, name, line, "@include \"%s\" is nested more than %d deep",
		    path, INCLUDE_DEPTH_MAX);
	} else if (stat(full, &sb) == -1) {
		error_at(ld, name, line, "could not open @include file \"%s\": %s", full,
		    strerror(errno));
	} else if (!S_ISREG(sb.st_mode)) {
		error_at(ld, name, line, "@include \"%s\" is not a regular file", full);
	} else if ((f = fopen(full, "re")) == NULL) {
		error_at(ld, name, line, "could not open @include file \"%s\": %s", full,
		    strerror(errno));
	} else if ((buf = malloc(INCLUDE_SIZE_MAX + 1)) == NULL) {
		error_at(ld, name, line, "out of memory");
	} else if ((n = fread(buf, 1, INCLUDE_SIZE_MAX + 1, f)) > INCLUDE_SIZE_MAX) {
		error_at(ld, name, line, "@include file \"%s\" is larger than %d bytes", full,
		    INCLUDE_SIZE_MAX);
	} else if (ferror(f)) {
		error_at(ld, name, line, "could not read @include file \"%s\": %s", full,
		    strerror(errno));
	} else if (buf[n] = '\0', strlen(buf) != n) {
		error_at(ld, full, 0, "file contains a null byte");
	} else if ((files = realloc(ld->files, (ld->nfiles + 1) * sizeof(*files))) == NULL) {
		error_at(ld, name, line, "out of memory");
	} else {
		/* The segments point at the name: it lives as long as the loader. */
		ld->files = files;
		ld->files[ld->nfiles++] = full;
		expand_text(ld, ex, buf, full, depth + 1);
		full = NULL;
		if (n > 0 && buf[n - 1] != '\n')
			emit(ex, "\n", 1);
		/* the rest of the directive's line */
		add_segment(ld, ex->out_line, name, line);
	}
	if (f != NULL)
		fclose(f);
	free(buf);
	free(full);
}

/*
 * Copies TEXT (from NAME) to EX, each @include line (libconfig's rule: at
 * the start of a line, outside comments and strings) replaced by the file
 * it names.  libconfig 1.5 cannot be told where a relative path is, nor
 * named in its messages, so the expansion is ours; the segments it
 * records give every error its own file and line back.
 */
static void
expand_text(struct loader *ld, struct expansion *ex, const char *text, const char *name,
    int depth)
{
	const char *p = text, *next, *copied = text;
	unsigned line = 1;
	bool line_start = true;

	add_segment(ld, ex->out_line, name, 1);
	while (*p != '\0') {
		next = NULL;
		if (line_start) {
			p += strspn(p, " \t");
			if (strncmp(p, "@include", 8) == 0 && (p[8] == ' ' || p[8] == '\t') &&
			    p[8 + strspn(p + 8, " \t")] == '"') {
				char path[4096];
				size_t o = 0;

				emit(ex, copied, (size_t)(p - copied));
				next = p + 8 + strspn(p + 8, " \t") + 1;
				for (; *next != '\0' && *next != '"' && o + 1 < sizeof(path); next++) {
					if (*next == '\\' && next[1] != '\0')
						next++;
					path[o++] = *next;
				}
				path[o] = '\0';
				if (*next == '"')
					next++;
				expand_include(ld, ex, name, line, path, depth);
				copied = next;
			}
		}
		if (next == NULL)
			next = skip_comment_or_string(p);
		if (next == NULL)
			next = *p != '\0' ? p + 1 : p;
		for (; p < next; p++)
			line += *p == '\n';
		line_start = next > text && next[-1] == '\n';
	}
	emit(ex, copied, (size_t)(p - copied));
}

/*
 * libconfig 1.5 says only "duplicate setting name".  This walks the text
 * as its scanner would (names, "=" or ":", groups, lists and arrays) and
 * finds the first name set twice in one group, with both lines.  Returns
 * false when it finds none (then libconfig's words are all there is).
 */
#define DUP_DEPTH_MAX 32

struct dup_name {
	const char *name;
	size_t len;
	int depth;
	unsigned line;
};

static bool
find_duplicate(const char *text, char *key, size_t keylen, unsigned *line,
    unsigned *first_line)
{
	struct dup_name *names = NULL, *bigger;
	size_t n = 0, cap = 0;
	const char *scope[DUP_DEPTH_MAX];
	size_t scope_len[DUP_DEPTH_MAX];
	const char *last = NULL, *p = text, *next;
	size_t last_len = 0;
	unsigned at = 1;
	int depth = 0;
	bool found = false, after_assign = false;

	while (*p != '\0' && !found) {
		next = skip_comment_or_string(p);
		if (next != NULL) {
			after_assign = false;
		} else if (isalpha((unsigned char)*p) || *p == '*') {
			const char *q;

			for (next = p + 1; isalnum((unsigned char)*next) || *next == '-' ||
			    *next == '_' || *next == '*'; next++)
				;
			for (q = next; *q == ' ' || *q == '\t' || *q == '\r' || *q == '\n'; q++)
				;
			after_assign = false;
			if (*q == '=' || *q == ':') {
				for (size_t i = n; i > 0 && !found; i--) {
					const struct dup_name *d = &names[i - 1];

					if (d->depth == depth && d->len == (size_t)(next - p) &&
					    memcmp(d->name, p, d->len) == 0) {
						size_t o = 0;

						for (int s = 0; s < depth && s < DUP_DEPTH_MAX; s++)
							if (scope[s] != NULL && o < keylen)
								o += (size_t)snprintf(key + o, keylen - o,
								    "%.*s.", (int)scope_len[s], scope[s]);
						if (o < keylen)
							snprintf(key + o, keylen - o, "%.*s", (int)d->len, p);
						*line = at;
						*first_line = d->line;
						found = true;
					}
				}
				if (!found && n == cap) {
					cap = cap == 0 ? 64 : cap * 2;
					if ((bigger = realloc(names, cap * sizeof(*names))) == NULL)
						break;
					names = bigger;
				}
				if (!found)
					names[n++] = (struct dup_name){ p, (size_t)(next - p), depth, at };
				last = p;
				last_len = (size_t)(next - p);
				after_assign = true;
				next = q + 1;
			}
		} else if (*p == '{' || *p == '(' || *p == '[') {
			if (depth < DUP_DEPTH_MAX) {
				/* an element of a list has no name of its own */
				scope[depth] = after_assign ? last : NULL;
				scope_len[depth] = after_assign ? last_len : 0;
			}
			depth++;
			after_assign = false;
			next = p + 1;
		} else if (*p == '}' || *p == ')' || *p == ']') {
			while (n > 0 && names[n - 1].depth >= depth)
				n--;
			if (depth > 0)
				depth--;
			after_assign = false;
			next = p + 1;
		} else {
			if (!isspace((unsigned char)*p))
				after_assign = false;
			next = p + 1;
		}
		for (; p < next && *p != '\0'; p++)
			at += *p == '\n';
	}
	free(names);
	return found;
}

/* libconfig's parse error, in its file's terms, with what it leaves out. */
static void
parse_error(struct loader *ld, config_t *lc, const char *expanded)
{
	const char *text = config_error_text(lc);
	const char *file, *first_file;
	unsigned line, first_line, dline = 0, dfirst = 0;
	char key[256];

	source_of(ld, (unsigned)config_error_line(lc), &file, &line);
	if (text != NULL && strcmp(text, "duplicate setting name") == 0 &&
	    find_duplicate(expanded, key, sizeof(key), &dline, &dfirst)) {
		source_of(ld, dline, &file, &line);
		source_of(ld, dfirst, &first_file, &first_line);
		error_at(ld, file, line, "duplicate setting \"%s\" (first set at %s:%u)", key,
		    first_file, first_line);
	} else {
		error_at(ld, file, line, "%s", text != NULL ? text : "syntax error");
	}
}

/* Parses TEXT, then checks and stores every setting it holds. */
static void
load_text(struct loader *ld, const char *text)
{
	config_t lc;
	struct expansion ex = { NULL, 1 };
	char *expanded = NULL, *widened = NULL;
	size_t len = 0;
	int before = ld->nerrors;

	config_init(&lc);
	if ((ex.out = open_memstream(&expanded, &len)) != NULL) {
		expand_text(ld, &ex, text, ld->name, 0);
		if (fclose(ex.out) != 0) {
			free(expanded);
			expanded = NULL;
		}
	}
	if (expanded != NULL)
		widened = widen_integers(expanded);
	if (widened == NULL) {
		error_in(ld, NULL, "out of memory");
	} else if (ld->nerrors > before) {
		/* an @include that could not be put in place: reported above */
	} else if (config_read_string(&lc, widened) != CONFIG_TRUE) {
		parse_error(ld, &lc, expanded);
	} else {
		walk_root(ld, config_root_setting(&lc));
		check_required(ld, config_root_setting(&lc));
		check_rules(ld);
		check_transport(ld);
		check_redis_auth(ld);
		check_redis_sentinels(ld);
		check_warnings(ld);
	}
	config_destroy(&lc);
	free(widened);
	free(expanded);
}

/*
 * Reads PATH whole.  Reading it ourselves rather than through libconfig
 * gives errno for the message, and keeps a directory from reaching
 * libconfig's scanner, which exits the process on a read error.
 */
static char *
read_file(struct loader *ld, const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf = NULL;
	size_t len = 0;
	size_t cap = 0;
	bool failed = false;
	bool done = false;

	if (f == NULL) {
		error_at(ld, path, 0, "could not open file: %s", strerror(errno));
		failed = true;
	}
	while (!failed && !done) {
		char *bigger = buf;
		size_t n;

		/* Keep room for the terminating NUL. */
		if (cap - len < 2) {
			cap = cap == 0 ? 4096 : cap * 2;
			bigger = realloc(buf, cap);
		}
		if (bigger == NULL) {
			error_at(ld, path, 0, "out of memory");
			failed = true;
		} else {
			buf = bigger;
			n = fread(buf + len, 1, cap - len - 1, f);
			len += n;
			if (n == 0 && ferror(f)) {
				error_at(ld, path, 0, "could not read file: %s", strerror(errno));
				failed = true;
			}
			done = n == 0;
		}
	}
	if (!failed) {
		buf[len] = '\0';
		/* libconfig would stop at a NUL and silently ignore the rest */
		if (strlen(buf) != len) {
			unsigned line = 1;

			for (const char *p = buf; *p != '\0'; p++)
				line += *p == '\n';
			error_at(ld, path, line, "file contains a null byte");
			failed = true;
		}
	}
	if (failed) {
		free(buf);
		buf = NULL;
	}
	if (f != NULL)
		fclose(f);
	return buf;
}

/*
 * Hands the result to the caller: the struct on success, the error text
 * otherwise.  Returns the number of errors.
 */
static int
loader_finish(struct loader *ld, struct bw_config *cfg, char **errors)
{
	int n = ld->nerrors;
	char *text = NULL;

	if (ld->out != NULL && fclose(ld->out) == 0)
		text = ld->text;
	else
		free(ld->text);
	ld->text = NULL;
	/* Warnings are a nicety: without memory for them, there are none. */
	if (ld->warn_out != NULL && fclose(ld->warn_out) == 0 && ld->warn_len > 0)
		ld->cfg.warnings = ld->warn_text;
	else
		free(ld->warn_text);
	ld->warn_text = NULL;
	/* Every message is written by now: the names they came from can go. */
	for (size_t i = 0; i < ld->nfiles; i++)
		free(ld->files[i]);
	free(ld->files);
	free(ld->segs);
	ld->files = NULL;
	ld->segs = NULL;
	*errors = NULL;
	if (n == 0) {
		free(text);
		*cfg = ld->cfg;
	} else {
		config_free(&ld->cfg);
		memset(cfg, 0, sizeof(*cfg));
		*errors = text != NULL ? text : strdup("out of memory\n");
	}
	return n;
}

int
config_load(const char *path, struct bw_config *cfg, char **errors)
{
	struct loader ld;
	char *text;

	loader_init(&ld, path);
	text = read_file(&ld, path);
	if (text != NULL)
		load_text(&ld, text);
	free(text);
	return loader_finish(&ld, cfg, errors);
}

int
config_load_string(const char *text, const char *name, struct bw_config *cfg,
    char **errors)
{
	struct loader ld;

	loader_init(&ld, name);
	load_text(&ld, text);
	return loader_finish(&ld, cfg, errors);
}

void
config_free(struct bw_config *cfg)
{
	if (cfg != NULL) {
		for (size_t i = 0; i < N_OPTS; i++)
			if (opts[i].type == OPT_STRING || opts[i].type == OPT_LIST)
				free(*str_field(cfg, &opts[i]));
		free(cfg->path);
		free(cfg->warnings);
		memset(cfg, 0, sizeof(*cfg));
	}
}

/* Whether RUNNING and LOADED hold the same value for O's key. */
static bool
same_value(const struct bw_config *running, const struct bw_config *loaded,
    const struct opt *o)
{
	if (o->type == OPT_STRING || o->type == OPT_LIST)
		return strcmp(str_value(running, o), str_value(loaded, o)) == 0;
	if (o->type == OPT_BOOL)
		return *(const bool *)(const void *)((const char *)running + o->offset) ==
		    *(const bool *)(const void *)((const char *)loaded + o->offset);
	return *int_field_const(running, o) == *int_field_const(loaded, o);
}

int
config_restart_needed(const struct bw_config *running,
    const struct bw_config *loaded, char **names)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *out = open_memstream(&buf, &len);
	int n = 0;

	*names = NULL;
	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];

		if (o->reloadable || same_value(running, loaded, o))
			continue;
		if (out != NULL)
			fprintf(out, "%s%s", n > 0 ? ", " : "", o->key);
		n++;
	}
	if (out != NULL && fclose(out) == 0 && n > 0) {
		*names = buf;
		buf = NULL;
	}
	free(buf);
	return n;
}

int
config_apply_reloadable(struct bw_config *running, const struct bw_config *fresh,
    char **changed_names)
{
	/*
	 * Everything that can fail (the names, a copy of each changed string)
	 * happens before RUNNING is touched, so a failure leaves it whole
	 * rather than half the old file and half the new.
	 */
	bool changed[N_OPTS] = { false };
	char *copies[N_OPTS] = { NULL };
	char *buf = NULL;
	size_t len = 0;
	FILE *out = NULL;
	int n = 0, result = -1;

	if ((out = open_memstream(&buf, &len)) == NULL)
		goto done;
	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];

		if (!o->reloadable || same_value(running, fresh, o))
			continue;
		if ((o->type == OPT_STRING || o->type == OPT_LIST) &&
		    (copies[i] = strdup(str_value(fresh, o))) == NULL)
			goto done;
		if (fprintf(out, "%s%s", n > 0 ? ", " : "", o->key) < 0)
			goto done;
		changed[i] = true;
		n++;
	}
	if (fclose(out) != 0) {
		out = NULL;
		goto done;
	}
	out = NULL;

	for (size_t i = 0; i < N_OPTS; i++) {
		const struct opt *o = &opts[i];

		if (!changed[i])
			continue;
		if (o->type == OPT_STRING || o->type == OPT_LIST) {
			free(*str_field(running, o));
			*str_field(running, o) = copies[i];
			copies[i] = NULL;
		} else if (o->type == OPT_BOOL) {
			*bool_field(running, o) =
			    *(const bool *)(const void *)((const char *)fresh + o->offset);
		} else {
			*int_field(running, o) = *int_field_const(fresh, o);
		}
	}
	*changed_names = n > 0 ? buf : NULL;
	if (n > 0)
		buf = NULL;
	result = n;
done:
	if (out != NULL)
		fclose(out);
	for (size_t i = 0; i < N_OPTS; i++)
		free(copies[i]);
	free(buf);
	return result;
}

int
config_key_at(size_t i, const char **ret_name, bool *ret_reloadable)
{
	if (i >= N_OPTS)
		return -1;
	*ret_name = opts[i].key;
	*ret_reloadable = opts[i].reloadable;
	return 0;
}

const char *
config_lock_mode_name(enum lock_mode mode)
{
	const char *name = "unknown";

	if ((unsigned)mode < sizeof(lock_mode_names) / sizeof(lock_mode_names[0]) - 1)
		name = lock_mode_names[mode];
	return name;
}

int
config_resolve_worker_id(struct bw_config *cfg)
{
	char host[256], id[300];
	char *p;

	if (cfg->worker.id[0] != '\0')
		return 0;
	if (gethostname(host, sizeof(host)) == -1)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	snprintf(id, sizeof(id), "%s:%ld", host, (long)getpid());
	if ((p = strdup(id)) == NULL)
		return -1;
	free(cfg->worker.id);
	cfg->worker.id = p;
	return 0;
}

void
config_url_for_log(const char *url, char *buf, size_t len)
{
	const char *rest = strstr(url, "://");
	const char *at;
	size_t alen;

	if (rest == NULL) {
		snprintf(buf, len, "%s", url);
		return;
	}
	rest += 3;
	alen = strcspn(rest, "/?#");
	at = memchr(rest, '@', alen);
	if (at == NULL)
		snprintf(buf, len, "%s", url);
	else
		snprintf(buf, len, "%.*s%s", (int)(rest - url), url, at + 1);
}

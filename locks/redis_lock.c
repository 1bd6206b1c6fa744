#include "locks/redis_lock.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

#include <hiredis/hiredis.h>

#include "common/log.h"

/*
 * KEYS are the lock keys, ARGV[i] the token for KEYS[i], the last ARGV the
 * ttl in milliseconds.  Compare-and-set, -pexpire and -delete must be
 * atomic per key, which a script gives and a pipeline of GET/SET does not.
 */
/*
 * Acquire also spends the fleet's rate budget, in the same round trip:
 * ARGV after the ttl are the rate (calls per second, 0 = no limit), the
 * bucket size, this worker's id and the most keys to lock (the caller
 * offers more candidates than it wants, so that workers racing for the
 * same due items mostly find different free ones).  It locks at most as
 * many keys as the budget allows, and no key at all while a 429 pause is in force.  The
 * clock is Redis' own (TIME), so the hosts' clocks never matter.  Besides a
 * 0/1 per key it returns how long to wait before more may start and how
 * many workers asked within the last 10 s (the even share used while Redis
 * is unreachable).  ARGV[n + 6] is the fleet's key prefix, which starts
 * the bucket, pause and registry keys.  Keys outside KEYS make this
 * single-instance only.
 */
static const char script_acquire[] =
    "local n = #KEYS local ttl = ARGV[n + 1] "
    "local rate = tonumber(ARGV[n + 2]) local burst = tonumber(ARGV[n + 3]) "
    "local most = tonumber(ARGV[n + 5]) local pre = ARGV[n + 6] "
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
    "local allow, wait, tokens = math.min(n, most), 0, 0 "
    "local pause = tonumber(redis.call('GET', pre .. 'rate:pause') or '0') "
    "if pause > now then allow = 0 wait = pause - now "
    "elseif rate > 0 then "
    "  local b = redis.call('HMGET', pre .. 'rate:bucket', 'tokens', 'ts') "
    "  tokens = tonumber(b[1]) or burst "
    "  local ts = tonumber(b[2]) or now "
    "  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end "
    "  allow = math.min(allow, math.floor(tokens)) "
    "end "
    "local r = {} local got = 0 "
    "for i = 1, n do "
    "  if got < allow and redis.call('SET', KEYS[i], ARGV[i], 'NX', 'PX', ttl) then "
    "    r[i] = 1 got = got + 1 else r[i] = 0 end "
    "end "
    "if rate > 0 and pause <= now then "
    "  tokens = tokens - got "
    "  redis.call('HSET', pre .. 'rate:bucket', 'tokens', tostring(tokens), 'ts', now) "
    "  redis.call('PEXPIRE', pre .. 'rate:bucket', 60000) "
    "  if allow < n and tokens < 1 then wait = math.ceil((1 - tokens) * 1000 / rate) end "
    "end "
    "redis.call('ZADD', pre .. 'workers', now, ARGV[n + 4]) "
    "redis.call('ZREMRANGEBYSCORE', pre .. 'workers', 0, now - 10000) "
    "r[n + 1] = wait r[n + 2] = redis.call('ZCARD', pre .. 'workers') "
    "return r";

/*
 * Pauses every worker of the fleet for ARGV[1] ms (never shortens a
 * pause); ARGV[2] is the fleet's key prefix.
 */
static const char script_pause[] =
    "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
    "local untl = now + tonumber(ARGV[1]) local pre = ARGV[2] "
    "local cur = tonumber(redis.call('GET', pre .. 'rate:pause') or '0') "
    "if untl > cur then redis.call('SET', pre .. 'rate:pause', untl, 'PX', ARGV[1]) end "
    "return {0}";

static const char script_renew[] =
    "local ttl = ARGV[#KEYS + 1] local r = {} "
    "for i = 1, #KEYS do "
    "  if redis.call('GET', KEYS[i]) == ARGV[i] then "
    "    redis.call('PEXPIRE', KEYS[i], ttl) r[i] = 1 else r[i] = 0 end "
    "end return r";

static const char script_release[] =
    "local r = {} "
    "for i = 1, #KEYS do "
    "  if redis.call('GET', KEYS[i]) == ARGV[i] then "
    "    redis.call('DEL', KEYS[i]) r[i] = 1 else r[i] = 0 end "
    "end return r";

enum { SCRIPT_ACQUIRE, SCRIPT_RENEW, SCRIPT_RELEASE, SCRIPT_PAUSE, SCRIPT_COUNT };

static const char *const scripts[SCRIPT_COUNT] = {
	script_acquire, script_renew, script_release, script_pause,
};

struct redis_lock {
	char *host, *socket, *password, *username, *prefix;
	int port, db, connect_timeout_ms, command_timeout_ms;
	redisContext *ctx;
	char sha[SCRIPT_COUNT][48];
	char errmsg[256];
	/* argv buffers reused across calls */
	const char **argv;
	size_t *argvlen;
	size_t argcap;
};

static void
set_err(redis_lock *rl, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
set_err(redis_lock *rl, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(rl->errmsg, sizeof(rl->errmsg), fmt, ap);
	va_end(ap);
}

int
redis_lock_new(const struct redis_options *o, redis_lock **ret)
{
	redis_lock *rl;

	if ((rl = calloc(1, sizeof(*rl))) == NULL)
		return -1;
	rl->host = strdup(o->host ? o->host : "127.0.0.1");
	rl->socket = strdup(o->socket ? o->socket : "");
	rl->password = o->password && o->password[0] ? strdup(o->password) : NULL;
	rl->username = strdup(o->username ? o->username : "");
	rl->prefix = strdup(o->key_prefix ? o->key_prefix : "billing-worker:");
	rl->port = o->port;
	rl->db = o->db;
	rl->connect_timeout_ms = o->connect_timeout_ms;
	rl->command_timeout_ms = o->command_timeout_ms;
	if (rl->host == NULL || rl->socket == NULL || rl->username == NULL ||
	    rl->prefix == NULL ||
	    (o->password && o->password[0] && rl->password == NULL)) {
		redis_lock_free(rl);
		return -1;
	}
	*ret = rl;
	return 0;
}

void
redis_lock_free(redis_lock *rl)
{
	if (rl == NULL)
		return;
	if (rl->ctx != NULL)
		redisFree(rl->ctx);
	if (rl->password != NULL) {
		explicit_bzero(rl->password, strlen(rl->password));
		free(rl->password);
	}
	free(rl->host);
	free(rl->socket);
	free(rl->username);
	free(rl->prefix);
	free(rl->argv);
	free(rl->argvlen);
	free(rl);
}

bool
redis_lock_connected(const redis_lock *rl)
{
	return rl->ctx != NULL && rl->ctx->err == 0;
}

const char *
redis_lock_errmsg(const redis_lock *rl)
{
	return rl->errmsg;
}

static struct timeval
tv_of(int ms)
{
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };

	return tv;
}

/* Drops a broken connection so the next call reconnects. */
static void
drop(redis_lock *rl)
{
	if (rl->ctx != NULL) {
		set_err(rl, "%s", rl->ctx->errstr[0] ? rl->ctx->errstr : "connection lost");
		redisFree(rl->ctx);
		rl->ctx = NULL;
	}
}

int
redis_lock_connect(redis_lock *rl)
{
	redisReply *r;

	if (rl->ctx != NULL) {
		redisFree(rl->ctx);
		rl->ctx = NULL;
	}
	if (rl->socket[0] != '\0')
		rl->ctx = redisConnectUnixWithTimeout(rl->socket, tv_of(rl->connect_timeout_ms));
	else
		rl->ctx = redisConnectWithTimeout(rl->host, rl->port, tv_of(rl->connect_timeout_ms));
	if (rl->ctx == NULL) {
		set_err(rl, "out of memory");
		return -1;
	}
	if (rl->ctx->err) {
		drop(rl);
		return -1;
	}
	/* A dead server must not block the loop: bound every command. */
	redisSetTimeout(rl->ctx, tv_of(rl->command_timeout_ms));
	if (rl->socket[0] == '\0')
		redisEnableKeepAlive(rl->ctx);
	if (rl->password != NULL) {
		/* ACL (Redis 6): AUTH user password; otherwise the default user's. */
		if (rl->username[0] != '\0')
			r = redisCommand(rl->ctx, "AUTH %s %s", rl->username, rl->password);
		else
			r = redisCommand(rl->ctx, "AUTH %s", rl->password);
		if (r == NULL || r->type == REDIS_REPLY_ERROR) {
			/* The server's answer (WRONGPASS ...) never repeats the password. */
			if (rl->username[0] != '\0')
				set_err(rl, "authentication as user \"%s\" failed%s%s",
				    rl->username, r ? ": " : "", r ? r->str : "");
			else
				set_err(rl, "authentication failed%s%s", r ? ": " : "",
				    r ? r->str : "");
			freeReplyObject(r);
			redisFree(rl->ctx);
			rl->ctx = NULL;
			return -1;
		}
		freeReplyObject(r);
	}
	/*
	 * A new connection starts in database 0, so every connect, the first
	 * and each reconnect after an outage, selects ours again.
	 */
	if (rl->db != 0) {
		r = redisCommand(rl->ctx, "SELECT %d", rl->db);
		if (r == NULL || r->type == REDIS_REPLY_ERROR) {
			set_err(rl, "could not select database %d%s%s", rl->db,
			    r ? ": " : "", r ? r->str : "");
			freeReplyObject(r);
			redisFree(rl->ctx);
			rl->ctx = NULL;
			return -1;
		}
		freeReplyObject(r);
	}
	for (int i = 0; i < SCRIPT_COUNT; i++) {
		r = redisCommand(rl->ctx, "SCRIPT LOAD %s", scripts[i]);
		if (r == NULL || r->type != REDIS_REPLY_STRING) {
			if (r == NULL)
				drop(rl);
			else {
				set_err(rl, "could not load lock scripts: %s",
				    r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
				redisFree(rl->ctx);
				rl->ctx = NULL;
			}
			freeReplyObject(r);
			return -1;
		}
		snprintf(rl->sha[i], sizeof(rl->sha[i]), "%s", r->str);
		freeReplyObject(r);
	}
	if (rl->socket[0] != '\0')
		log_info("connected to redis at \"%s\" (database %d, keys \"%s*\")",
		    rl->socket, rl->db, rl->prefix);
	else
		log_info("connected to redis at \"%s:%d\" (database %d, keys \"%s*\")",
		    rl->host, rl->port, rl->db, rl->prefix);
	return 0;
}

/*
 * EVALSHA script N keys... tokens... args...; fills out[i] from the
 * reply's first N elements (0/1) and extra[j] from the NEXTRA integers that
 * follow.  A NOSCRIPT answer (a restarted server) loads the scripts again
 * once.
 */
static int
run_script(redis_lock *rl, int script, const char *const *keys,
    const char *const *tokens, size_t n, const char *const *args, size_t nargs,
    bool *out, long long *extra, size_t nextra)
{
	char nkeys[24];
	size_t argc = 3 + 2 * n + nargs;
	redisReply *r = NULL;
	int ret = -1;

	if (!redis_lock_connected(rl)) {
		set_err(rl, "not connected to redis");
		return -1;
	}
	if (argc > rl->argcap) {
		const char **a = realloc(rl->argv, argc * sizeof(*a));
		size_t *l;

		if (a == NULL)
			goto oom;
		rl->argv = a;
		if ((l = realloc(rl->argvlen, argc * sizeof(*l))) == NULL)
			goto oom;
		rl->argvlen = l;
		rl->argcap = argc;
	}
	snprintf(nkeys, sizeof(nkeys), "%zu", n);
	rl->argv[0] = "EVALSHA";
	rl->argv[1] = rl->sha[script];
	rl->argv[2] = nkeys;
	for (size_t i = 0; i < n; i++) {
		rl->argv[3 + i] = keys[i];
		rl->argv[3 + n + i] = tokens[i];
	}
	for (size_t i = 0; i < nargs; i++)
		rl->argv[3 + 2 * n + i] = args[i];
	for (size_t i = 0; i < argc; i++)
		rl->argvlen[i] = strlen(rl->argv[i]);

	for (int tries = 0; tries < 2; tries++) {
		r = redisCommandArgv(rl->ctx, (int)argc, rl->argv, rl->argvlen);
		if (r == NULL) {
			drop(rl);
			return -1;
		}
		if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0) {
			redisReply *l = redisCommand(rl->ctx, "SCRIPT LOAD %s", scripts[script]);

			if (l == NULL) {
				freeReplyObject(r);
				drop(rl);
				return -1;
			}
			freeReplyObject(l);
			freeReplyObject(r);
			r = NULL;
			continue;
		}
		break;
	}
	if (r == NULL || r->type != REDIS_REPLY_ARRAY || r->elements != n + nextra) {
		set_err(rl, "unexpected reply to lock script: %s",
		    r != NULL && r->type == REDIS_REPLY_ERROR ? r->str : "not an array of results");
		goto out;
	}
	for (size_t i = 0; i < n; i++)
		out[i] = r->element[i]->type == REDIS_REPLY_INTEGER && r->element[i]->integer == 1;
	for (size_t j = 0; j < nextra; j++)
		extra[j] = r->element[n + j]->type == REDIS_REPLY_INTEGER ?
		    r->element[n + j]->integer : 0;
	ret = 0;
	goto out;
oom:
	set_err(rl, "out of memory");
out:
	freeReplyObject(r);
	return ret;
}

int
redis_lock_acquire(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, const struct redis_rate *rate, bool *got,
    struct redis_rate_answer *ans)
{
	char ttl[24], rps[24], burst[24], most[24];
	const char *args[6] = { ttl, rps, burst, rate->member, most, rl->prefix };
	long long extra[2] = { 0, 0 };

	snprintf(ttl, sizeof(ttl), "%d", ttl_ms);
	snprintf(rps, sizeof(rps), "%d", rate->rate);
	snprintf(burst, sizeof(burst), "%d", rate->burst);
	snprintf(most, sizeof(most), "%zu", rate->max_keys);
	if (run_script(rl, SCRIPT_ACQUIRE, keys, tokens, n, args, 6, got, extra, 2) == -1)
		return -1;
	ans->wait_ms = extra[0];
	ans->workers = (int)extra[1];
	return 0;
}

int
redis_lock_renew(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, bool *held)
{
	char ttl[24];
	const char *args[1] = { ttl };

	if (n == 0)
		return 0;
	snprintf(ttl, sizeof(ttl), "%d", ttl_ms);
	return run_script(rl, SCRIPT_RENEW, keys, tokens, n, args, 1, held, NULL, 0);
}

int
redis_lock_release(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n)
{
	bool *done;
	int ret;

	if (n == 0)
		return 0;
	if ((done = calloc(n, sizeof(*done))) == NULL)
		return -1;
	ret = run_script(rl, SCRIPT_RELEASE, keys, tokens, n, NULL, 0, done, NULL, 0);
	free(done);
	return ret;
}

int
redis_lock_pause(redis_lock *rl, int pause_ms)
{
	char ms[24];
	const char *args[2] = { ms, rl->prefix };
	long long ignored;

	snprintf(ms, sizeof(ms), "%d", pause_ms > 0 ? pause_ms : 1);
	return run_script(rl, SCRIPT_PAUSE, NULL, NULL, 0, args, 2, NULL, &ignored, 1);
}

int
redis_lock_ping(redis_lock *rl, char *buf, size_t len)
{
	redisReply *r;
	int ret = -1;

	if (!redis_lock_connected(rl)) {
		set_err(rl, "not connected");
		return -1;
	}
	r = redisCommand(rl->ctx, "PING");
	if (r == NULL)
		drop(rl);
	else if (r->type == REDIS_REPLY_STATUS || r->type == REDIS_REPLY_STRING) {
		snprintf(buf, len, "%s", r->str);
		ret = 0;
	} else
		set_err(rl, "PING: %s", r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
	freeReplyObject(r);
	return ret;
}

#include "locks/redis_lock.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * KEYS are the lock keys, ARGV[i] the token for KEYS[i], then the ttl in
 * milliseconds.  Compare-and-set, -pexpire and -delete must be atomic per
 * key, which a script gives and a pipeline of GET/SET does not.  Acquire's
 * last ARGV is the most keys to lock: the caller offers more candidates
 * than it wants, so that workers racing for the same due items mostly find
 * different free ones.
 */
static const char script_acquire[] =
    "local n = #KEYS local ttl = ARGV[n + 1] local most = tonumber(ARGV[n + 2]) "
    "local r = {} local got = 0 "
    "for i = 1, n do "
    "  if got < most and redis.call('SET', KEYS[i], ARGV[i], 'NX', 'PX', ttl) then "
    "    r[i] = 1 got = got + 1 else r[i] = 0 end "
    "end "
    "return r";

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

struct redis_lock {
	redis_conn *conn;
	int acquire, renew, release;    /* script ids on conn */
	/* buffers reused across calls */
	const char **args;
	long long *out;
	size_t cap;
};

int
redis_lock_new(redis_conn *conn, redis_lock **ret)
{
	redis_lock *rl;

	if ((rl = calloc(1, sizeof(*rl))) == NULL)
		return -1;
	rl->conn = conn;
	if (redis_conn_script(conn, "lock", script_acquire, &rl->acquire) == -1 ||
	    redis_conn_script(conn, "lock", script_renew, &rl->renew) == -1 ||
	    redis_conn_script(conn, "lock", script_release, &rl->release) == -1) {
		free(rl);
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
	free(rl->args);
	free(rl->out);
	free(rl);
}

/*
 * Runs SCRIPT with the N KEYS, their TOKENS and then EXTRA (NEXTRA
 * arguments), and sets flags[i] from the reply's 0/1 for keys[i].
 */
static int
run(redis_lock *rl, int script, const char *const *keys, const char *const *tokens,
    size_t n, const char *const *extra, size_t nextra, bool *flags)
{
	size_t need = n + nextra;

	if (need > rl->cap || rl->args == NULL) {
		size_t cap = need < 64 ? 64 : need;
		const char **a = realloc(rl->args, cap * sizeof(*a));
		long long *o;

		if (a == NULL)
			return -1;
		rl->args = a;
		if ((o = realloc(rl->out, cap * sizeof(*o))) == NULL)
			return -1;
		rl->out = o;
		rl->cap = cap;
	}
	for (size_t i = 0; i < n; i++)
		rl->args[i] = tokens[i];
	for (size_t i = 0; i < nextra; i++)
		rl->args[n + i] = extra[i];
	if (redis_conn_eval(rl->conn, script, keys, n, rl->args, need, rl->out, n) == -1)
		return -1;
	for (size_t i = 0; i < n; i++)
		flags[i] = rl->out[i] == 1;
	return 0;
}

int
redis_lock_acquire(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, size_t max, bool *got)
{
	char ttl[24], most[24];
	const char *extra[2] = { ttl, most };

	snprintf(ttl, sizeof(ttl), "%d", ttl_ms);
	snprintf(most, sizeof(most), "%zu", max);
	return run(rl, rl->acquire, keys, tokens, n, extra, 2, got);
}

int
redis_lock_renew(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, bool *held)
{
	char ttl[24];
	const char *extra[1] = { ttl };

	if (n == 0)
		return 0;
	snprintf(ttl, sizeof(ttl), "%d", ttl_ms);
	return run(rl, rl->renew, keys, tokens, n, extra, 1, held);
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
	ret = run(rl, rl->release, keys, tokens, n, NULL, 0, done);
	free(done);
	return ret;
}

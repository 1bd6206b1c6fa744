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

/*
 * A script call sent without waiting: its keys and arguments are copied
 * here and kept until it is answered (a NOSCRIPT answer sends it again).
 */
struct sent_call {
	struct redis_job job;
	bool busy;
	char *text;                     /* every key and argument, NUL after each */
	size_t text_cap;
	const char **ptrs;              /* the keys, then the arguments */
	long long *out;
	size_t cap;                     /* of ptrs and of out */
	size_t n;                       /* keys */
};

/*
 * Releases in flight at once; more wait for their ttl.  The pool grows to
 * this as needed, one call at a time (the connection holds pointers to
 * their jobs, so none moves).  It was a fixed 16: a stop with more
 * batches' releases still unanswered (Redis slow for a moment) dropped
 * the rest, and their locks outlived the clean stop by their ttl, which
 * test_concurrency caught once as keys left behind.
 */
#define RELEASES_IN_FLIGHT 1024

struct redis_lock {
	redis_conn *conn;
	int acquire, renew, release;    /* script ids on conn */
	/* The acquire's buffers, reused across calls (releases and renewals copy theirs). */
	struct lock_buf {
		const char **args;
		long long *out;
		size_t cap;
	} acq;
	char ttl[24], most[24];         /* the acquire call's own arguments */
	struct sent_call **releases;    /* nreleases of them, each allocated once */
	size_t nreleases;
	struct sent_call renewal;
	char renew_ttl[24];
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

static void
sent_free(struct sent_call *sc)
{
	free(sc->text);
	free(sc->ptrs);
	free(sc->out);
}

void
redis_lock_free(redis_lock *rl)
{
	if (rl == NULL)
		return;
	free(rl->acq.args);
	free(rl->acq.out);
	for (size_t i = 0; i < rl->nreleases; i++) {
		sent_free(rl->releases[i]);
		free(rl->releases[i]);
	}
	free(rl->releases);
	sent_free(&rl->renewal);
	free(rl);
}

/*
 * Runs SCRIPT with the N KEYS, their TOKENS and then EXTRA (NEXTRA
 * arguments), and sets flags[i] from the reply's 0/1 for keys[i].
 */
static int
prepare(struct lock_buf *b, int script, const char *const *keys, const char *const *tokens,
    size_t n, const char *const *extra, size_t nextra, struct redis_eval *ev)
{
	size_t need = n + nextra;

	if (need > b->cap || b->args == NULL) {
		size_t cap = need < 64 ? 64 : need;
		const char **a = realloc(b->args, cap * sizeof(*a));
		long long *o;

		if (a == NULL)
			return -1;
		b->args = a;
		if ((o = realloc(b->out, cap * sizeof(*o))) == NULL)
			return -1;
		b->out = o;
		b->cap = cap;
	}
	for (size_t i = 0; i < n; i++)
		b->args[i] = tokens[i];
	for (size_t i = 0; i < nextra; i++)
		b->args[n + i] = extra[i];
	*ev = (struct redis_eval){ .id = script, .keys = keys, .nkeys = n, .args = b->args,
	    .nargs = need, .out = b->out, .nout = n };
	return 0;
}

/* The reply's 0/1 for keys[i] into flags[i]. */
static void
finish(const struct lock_buf *b, size_t n, bool *flags)
{
	for (size_t i = 0; i < n; i++)
		flags[i] = b->out[i] == 1;
}

int
redis_lock_acquire_call(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, size_t max, struct redis_eval *ev)
{
	const char *extra[2] = { rl->ttl, rl->most };

	snprintf(rl->ttl, sizeof(rl->ttl), "%d", ttl_ms);
	snprintf(rl->most, sizeof(rl->most), "%zu", max);
	return prepare(&rl->acq, rl->acquire, keys, tokens, n, extra, 2, ev);
}

void
redis_lock_acquire_done(const redis_lock *rl, size_t n, bool *got)
{
	finish(&rl->acq, n, got);
}

/*
 * Copies SCRIPT's call with the N KEYS, their TOKENS and EXTRA (NEXTRA
 * arguments) into SC and sends it.
 */
static int
sent_send(redis_lock *rl, struct sent_call *sc, int script, const char *const *keys,
    const char *const *tokens, size_t n, const char *const *extra, size_t nextra,
    int64_t now)
{
	size_t nptrs = 2 * n + nextra, len = 0, at = 0;
	void *p;

	for (size_t i = 0; i < nptrs; i++) {
		const char *v = i < n ? keys[i] : i < 2 * n ? tokens[i - n] : extra[i - 2 * n];

		len += strlen(v) + 1;
	}
	if (len > sc->text_cap) {
		if ((p = realloc(sc->text, len)) == NULL)
			return -1;
		sc->text = p;
		sc->text_cap = len;
	}
	if (nptrs > sc->cap) {
		if ((p = realloc(sc->ptrs, nptrs * sizeof(*sc->ptrs))) == NULL)
			return -1;
		sc->ptrs = p;
		if ((p = realloc(sc->out, nptrs * sizeof(*sc->out))) == NULL)
			return -1;
		sc->out = p;
		sc->cap = nptrs;
	}
	for (size_t i = 0; i < nptrs; i++) {
		const char *v = i < n ? keys[i] : i < 2 * n ? tokens[i - n] : extra[i - 2 * n];
		size_t l = strlen(v) + 1;

		memcpy(sc->text + at, v, l);
		sc->ptrs[i] = sc->text + at;
		at += l;
	}
	memset(&sc->job, 0, sizeof(sc->job));
	sc->job.evals[0] = (struct redis_eval){ .id = script, .keys = sc->ptrs, .nkeys = n,
	    .args = sc->ptrs + n, .nargs = n + nextra, .out = sc->out, .nout = n };
	sc->job.nevals = 1;
	sc->n = n;
	sc->busy = true;
	if (redis_conn_submit(rl->conn, &sc->job, now) == -1) {
		sc->busy = false;
		return -1;
	}
	return 0;
}

int
redis_lock_reap(redis_lock *rl)
{
	int ret = 0;

	for (size_t i = 0; i < rl->nreleases; i++) {
		struct sent_call *sc = rl->releases[i];

		if (!sc->busy || !redis_conn_job_done(&sc->job))
			continue;
		sc->busy = false;
		if (!sc->job.ok)
			ret = -1;
	}
	return ret;
}

int
redis_lock_release_send(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int64_t now)
{
	struct sent_call **grown, *sc;

	if (n == 0)
		return 0;
	for (size_t i = 0; i < rl->nreleases; i++)
		if (!rl->releases[i]->busy)
			return sent_send(rl, rl->releases[i], rl->release, keys, tokens, n, NULL, 0,
			    now);
	if (rl->nreleases == RELEASES_IN_FLIGHT)
		return 1;
	if ((grown = realloc(rl->releases, (rl->nreleases + 1) * sizeof(*grown))) == NULL)
		return 1;
	rl->releases = grown;
	if ((sc = calloc(1, sizeof(*sc))) == NULL)
		return 1;
	rl->releases[rl->nreleases++] = sc;
	return sent_send(rl, sc, rl->release, keys, tokens, n, NULL, 0, now);
}

int
redis_lock_renew_send(redis_lock *rl, const char *const *keys, const char *const *tokens,
    size_t n, int ttl_ms, int64_t now)
{
	const char *extra[1] = { rl->renew_ttl };

	if (rl->renewal.busy)
		return 1;
	snprintf(rl->renew_ttl, sizeof(rl->renew_ttl), "%d", ttl_ms);
	return sent_send(rl, &rl->renewal, rl->renew, keys, tokens, n, extra, 1, now);
}

bool
redis_lock_renew_pending(const redis_lock *rl)
{
	return rl->renewal.busy;
}

int
redis_lock_renew_take(redis_lock *rl, bool *held)
{
	struct sent_call *sc = &rl->renewal;

	if (!sc->busy)
		return -1;
	if (!redis_conn_job_done(&sc->job))
		return 0;
	sc->busy = false;
	if (!sc->job.ok)
		return -1;
	for (size_t i = 0; i < sc->n; i++)
		held[i] = sc->out[i] == 1;
	return 1;
}

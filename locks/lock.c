#include "locks/lock.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "common/clock.h"
#include "common/log.h"
#include "common/metrics.h"
#include "locks/redis_lock.h"

#define RECONNECT_MIN_MS 100
#define RECONNECT_MAX_MS 5000
/* The key prefix, "lock:", a kind and an id, with room to spare. */
#define LOCK_KEY_MAX (LOCK_KEY_PREFIX_MAX + 48)

struct lockmgr {
	enum lock_policy policy;
	int ttl_ms;
	char worker_id[ITEM_TOKEN_MAX - 34];
	/*
	 * Tokens are worker id, 64 random bits drawn once per process and a
	 * count of acquire calls, so no acquisition anywhere repeats one and
	 * a claim of many items costs no system call per item.
	 */
	uint64_t token_nonce, token_serial;
	char key_prefix[LOCK_KEY_PREFIX_MAX + 1];
	redis_conn *conn;               /* borrowed; NULL in skip-locked policy */
	redis_lock *redis;
	bool redis_down;                /* logged as unreachable, not yet back */
	int64_t next_reconnect_ms;
	int reconnect_delay_ms;
	char errmsg[512];
	/* scratch reused across calls */
	char (*keys)[LOCK_KEY_MAX];
	const char **keyp, **tokp;
	bool *flags;
	struct item **subset;
	size_t cap;
	/*
	 * The acquire's own: its call may be in flight on the connection
	 * while releases and renewals run, and must find its keys as it left
	 * them (a NOSCRIPT reply sends it again).
	 */
	char (*akeys)[LOCK_KEY_MAX];
	const char **akeyp, **atokp;
	size_t acap;
	/*
	 * The renewal in flight: which items it names, so its answer finds
	 * them among those still in flight then.
	 */
	enum item_kind *rkinds;
	int64_t *rids;
	char (*rtokens)[ITEM_TOKEN_MAX];
	size_t nrenewal, rcap;
};

static void note_redis_failure(lockmgr *lm);

static const char *const policy_names[] = { "redis", "skip-locked", "auto" };

const char *
lock_policy_name(enum lock_policy policy)
{
	if ((unsigned)policy < sizeof(policy_names) / sizeof(policy_names[0]))
		return policy_names[policy];
	return "unknown";
}

static int
grow(lockmgr *lm, size_t n)
{
	size_t cap = lm->cap ? lm->cap : 64;
	void *p;

	if (n <= lm->cap)
		return 0;
	while (cap < n)
		cap *= 2;
#define GROW(field) \
	do { \
		if ((p = realloc(lm->field, cap * sizeof(*lm->field))) == NULL) \
			return -1; \
		lm->field = p; \
	} while (0)
	GROW(keys);
	GROW(keyp);
	GROW(tokp);
	GROW(flags);
	GROW(subset);
#undef GROW
	lm->cap = cap;
	return 0;
}

int
lock_new(const struct lock_options *o, redis_conn *conn, lockmgr **ret)
{
	lockmgr *lm;
	const char *prefix = conn != NULL ? redis_conn_prefix(conn) : "";

	if ((o->policy != LOCK_POLICY_SKIP_LOCKED && conn == NULL) ||
	    strlen(prefix) > LOCK_KEY_PREFIX_MAX)
		return -1;
	if ((lm = calloc(1, sizeof(*lm))) == NULL)
		return -1;
	lm->policy = o->policy;
	lm->ttl_ms = o->ttl_ms;
	lm->reconnect_delay_ms = RECONNECT_MIN_MS;
	snprintf(lm->worker_id, sizeof(lm->worker_id), "%s", o->worker_id);
	snprintf(lm->key_prefix, sizeof(lm->key_prefix), "%s", prefix);
	if (getrandom(&lm->token_nonce, sizeof(lm->token_nonce), 0) !=
	    (ssize_t)sizeof(lm->token_nonce)) {
		/* Cannot happen after boot; fall back to something still unique enough. */
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		lm->token_nonce = ((uint64_t)ts.tv_sec << 32) ^ (uint64_t)ts.tv_nsec ^
		    ((uint64_t)getpid() << 48);
	}
	metrics_set_lock_mode(lock_policy_name(lm->policy));
	if (lm->policy != LOCK_POLICY_SKIP_LOCKED) {
		lm->conn = conn;
		if (redis_lock_new(conn, &lm->redis) == -1) {
			free(lm);
			return -1;
		}
	}
	*ret = lm;
	return 0;
}

void
lock_free(lockmgr *lm)
{
	if (lm == NULL)
		return;
	redis_lock_free(lm->redis);
	free(lm->keys);
	free(lm->keyp);
	free(lm->tokp);
	free(lm->akeys);
	free(lm->akeyp);
	free(lm->atokp);
	free(lm->rkinds);
	free(lm->rids);
	free(lm->rtokens);
	free(lm->flags);
	free(lm->subset);
	free(lm);
}

void
lock_set_ttl(lockmgr *lm, int ttl_ms)
{
	lm->ttl_ms = ttl_ms;
}

bool
lock_redis_down(const lockmgr *lm)
{
	/* A connect under way counts: claims wait for it without a warning each. */
	return lm->redis_down || (lm->redis != NULL && !redis_conn_connected(lm->conn));
}

const char *
lock_errmsg(const lockmgr *lm)
{
	return lm->errmsg;
}

/*
 * PREFIX "lock:" KIND ":" ID.  The fleet's prefix keeps fleets sharing one
 * Redis off each other's locks.  Built by hand, not by snprintf: a claim
 * builds one per candidate.  LOCK_KEY_MAX holds the longest: a prefix of
 * LOCK_KEY_PREFIX_MAX, "lock:redemption:" and 20 digits.
 */
static void
lock_key(const lockmgr *lm, char *buf, size_t len, enum item_kind kind, int64_t id)
{
	const char *name = item_kind_name(kind);
	size_t lp = strlen(lm->key_prefix), ln = strlen(name), n = 0;
	char digits[24];
	int nd = 0;
	uint64_t v = id < 0 ? (uint64_t)0 - (uint64_t)id : (uint64_t)id;

	if (lp + ln + 5 + 2 + 21 > len) {   /* cannot happen with LOCK_KEY_MAX */
		snprintf(buf, len, "%slock:%s:%" PRId64, lm->key_prefix, name, id);
		return;
	}
	do {
		digits[nd++] = (char)('0' + v % 10);
		v /= 10;
	} while (v != 0);
	memcpy(buf, lm->key_prefix, lp);
	n = lp;
	memcpy(buf + n, "lock:", 5);
	n += 5;
	memcpy(buf + n, name, ln);
	n += ln;
	buf[n++] = ':';
	if (id < 0)
		buf[n++] = '-';
	while (nd > 0)
		buf[n++] = digits[--nd];
	buf[n] = '\0';
}

/*
 * A token no other claim anywhere will ever hold: worker id, the process'
 * nonce and the serial of this acquire call.  Every key of one call shares
 * it: each key's lock is still told apart by its key, and the next call,
 * for any key, holds another token.
 */
static void
make_token(lockmgr *lm, char *buf, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	char tail[34];
	uint64_t serial = ++lm->token_serial;

	for (int i = 0; i < 16; i++) {
		tail[i] = hex[(lm->token_nonce >> (60 - 4 * i)) & 0xf];
		tail[17 + i] = hex[(serial >> (60 - 4 * i)) & 0xf];
	}
	tail[16] = '-';
	tail[33] = '\0';
	snprintf(buf, len, "%s:%s", lm->worker_id, tail);
}

/*
 * Redis just failed to connect or dropped: say what happens now, once per
 * outage, and space out the reconnects.
 */
static void
mark_redis_down(lockmgr *lm)
{
	if (!lm->redis_down)
		log_warnx("redis unreachable: %s%s", redis_conn_errmsg(lm->conn),
		    lm->policy == LOCK_POLICY_AUTO ?
		    "; claiming with FOR UPDATE SKIP LOCKED until it returns" :
		    "; no new items are taken until it returns");
	lm->redis_down = true;
	metrics_set_redis_up(false);
	lm->next_reconnect_ms = clock_ms() + lm->reconnect_delay_ms;
	lm->reconnect_delay_ms = lm->reconnect_delay_ms * 2 > RECONNECT_MAX_MS ?
	    RECONNECT_MAX_MS : lm->reconnect_delay_ms * 2;
}

/* Redis answered a connect: the return is logged once, the backoff starts over. */
static void
note_redis_connected(lockmgr *lm)
{
	if (lm->redis_down) {
		metrics_reconnect(METRICS_PEER_REDIS);
		log_info("redis reachable again%s", lm->policy == LOCK_POLICY_AUTO ?
		    ": back to redis locks" : "");
	}
	lm->redis_down = false;
	lm->reconnect_delay_ms = RECONNECT_MIN_MS;
	metrics_set_redis_up(true);
}

/*
 * True when Redis can be used now; billing_worker_redis_up follows the
 * connection at every look.  It never connects: the loop does, without
 * blocking (lock_redis_may_connect and the notes below), except at start
 * (lock_start), before there is anything to stall.
 */
static bool
redis_usable(lockmgr *lm)
{
	if (lm->redis == NULL)
		return false;
	metrics_set_redis_up(redis_conn_connected(lm->conn));
	return redis_conn_connected(lm->conn);
}

bool
lock_redis_may_connect(const lockmgr *lm, int64_t now_ms)
{
	return lm->redis != NULL && !redis_conn_connected(lm->conn) &&
	    now_ms >= lm->next_reconnect_ms;
}

int64_t
lock_redis_retry_at(const lockmgr *lm)
{
	if (lm->redis == NULL || redis_conn_connected(lm->conn))
		return INT64_MAX;
	return lm->next_reconnect_ms;
}

void
lock_redis_connected(lockmgr *lm)
{
	if (lm->redis != NULL)
		note_redis_connected(lm);
}

void
lock_redis_connect_failed(lockmgr *lm)
{
	if (lm->redis != NULL)
		mark_redis_down(lm);
}

/*
 * The first connect waits for its answer: the loop has not started, no
 * call is in flight, and a wrong address shows in the log at once.
 */
void
lock_start(lockmgr *lm)
{
	if (lm->redis == NULL || redis_usable(lm))
		return;
	if (redis_conn_connect(lm->conn) == 0)
		note_redis_connected(lm);
	else
		mark_redis_down(lm);
}

enum lock_way
lock_now(lockmgr *lm)
{
	lm->errmsg[0] = '\0';
	if (lm->policy == LOCK_POLICY_SKIP_LOCKED)
		return LOCK_WAY_SKIP_LOCKED;
	if (redis_usable(lm))
		return LOCK_WAY_REDIS;
	if (lm->policy == LOCK_POLICY_AUTO)
		return LOCK_WAY_SKIP_LOCKED;
	snprintf(lm->errmsg, sizeof(lm->errmsg), "redis unreachable: %s",
	    redis_conn_errmsg(lm->conn));
	return LOCK_WAY_NONE;
}

static void
note_redis_failure(lockmgr *lm)
{
	if (!redis_conn_connected(lm->conn))
		mark_redis_down(lm);
	else
		log_warnx("redis lock command failed: %s", redis_conn_errmsg(lm->conn));
}

void
lock_redis_failed(lockmgr *lm)
{
	if (lm->redis == NULL)
		return;
	if (!redis_conn_connected(lm->conn))
		mark_redis_down(lm);
	else
		log_warnx("redis command failed: %s", redis_conn_errmsg(lm->conn));
	snprintf(lm->errmsg, sizeof(lm->errmsg), "redis: %s", redis_conn_errmsg(lm->conn));
}

/* Room for N items in the renewal's record (flags, its answer, is grow()'s). */
static int
grow_renewal(lockmgr *lm, size_t n)
{
	void *p;

	if (n <= lm->rcap)
		return 0;
	if ((p = realloc(lm->rkinds, n * sizeof(*lm->rkinds))) == NULL)
		return -1;
	lm->rkinds = p;
	if ((p = realloc(lm->rids, n * sizeof(*lm->rids))) == NULL)
		return -1;
	lm->rids = p;
	if ((p = realloc(lm->rtokens, n * sizeof(*lm->rtokens))) == NULL)
		return -1;
	lm->rtokens = p;
	lm->rcap = n;
	return 0;
}

/* Room for N keys in the acquire's scratch. */
static int
grow_acquire(lockmgr *lm, size_t n)
{
	size_t cap = lm->acap ? lm->acap : 64;
	void *p;

	if (n <= lm->acap)
		return 0;
	while (cap < n)
		cap *= 2;
	if ((p = realloc(lm->akeys, cap * sizeof(*lm->akeys))) == NULL)
		return -1;
	lm->akeys = p;
	if ((p = realloc(lm->akeyp, cap * sizeof(*lm->akeyp))) == NULL)
		return -1;
	lm->akeyp = p;
	if ((p = realloc(lm->atokp, cap * sizeof(*lm->atokp))) == NULL)
		return -1;
	lm->atokp = p;
	lm->acap = cap;
	return 0;
}

int
lock_acquire_call(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids, size_t n,
    size_t max, char (*tokens)[ITEM_TOKEN_MAX], bool *got, struct redis_eval *ev)
{
	lm->errmsg[0] = '\0';
	if (lm->redis == NULL) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "redis: not used in skip-locked mode");
		return -1;
	}
	if (grow_acquire(lm, n) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "out of memory");
		return -1;
	}
	size_t toklen = 0;

	if (n > 0) {
		make_token(lm, tokens[0], sizeof(tokens[0]));
		toklen = strlen(tokens[0]) + 1;
	}
	for (size_t i = 0; i < n; i++) {
		lock_key(lm, lm->akeys[i], sizeof(lm->akeys[i]), kinds[i], ids[i]);
		if (i > 0)
			memcpy(tokens[i], tokens[0], toklen);
		lm->akeyp[i] = lm->akeys[i];
		lm->atokp[i] = tokens[i];
		got[i] = false;
	}
	if (redis_lock_acquire_call(lm->redis, lm->akeyp, lm->atokp, n, lm->ttl_ms, max,
	    ev) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "out of memory");
		return -1;
	}
	return 0;
}

void
lock_acquire_done(lockmgr *lm, size_t n, bool *got)
{
	redis_lock_acquire_done(lm->redis, n, got);
}

void
lock_acquire_failed(lockmgr *lm)
{
	note_redis_failure(lm);
	snprintf(lm->errmsg, sizeof(lm->errmsg), "redis: %s", redis_conn_errmsg(lm->conn));
}

int
lock_acquire(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids, size_t n,
    size_t max, char (*tokens)[ITEM_TOKEN_MAX], bool *got)
{
	struct redis_eval ev;

	if (lock_acquire_call(lm, kinds, ids, n, max, tokens, got, &ev) == -1)
		return -1;
	if (redis_conn_eval_many(lm->conn, &ev, 1) == -1) {
		lock_acquire_failed(lm);
		return -1;
	}
	lock_acquire_done(lm, n, got);
	return 0;
}

/*
 * Sends the release of the N keys in keyp with TOKENS, without waiting;
 * the releases answered since the last one are reaped first, and a
 * failure among them is noted as a failed lock command would be.
 */
static void
release_send(lockmgr *lm, const char *const *tokens, size_t n)
{
	int r;

	if (!redis_conn_connected(lm->conn))
		return;
	if (redis_lock_reap(lm->redis) == -1)
		note_redis_failure(lm);
	if (!redis_conn_connected(lm->conn))
		return;
	if ((r = redis_lock_release_send(lm->redis, lm->keyp, tokens, n, clock_ms())) == -1)
		note_redis_failure(lm);
	else if (r == 1)
		log_debug("redis: %zu locks not released (releases still in flight); they expire "
		    "in %d ms", n, lm->ttl_ms);
}

void
lock_give_back(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids,
    const char *const *tokens, size_t n)
{
	if (lm->redis == NULL || n == 0 || grow(lm, n) == -1)
		return;
	for (size_t i = 0; i < n; i++) {
		lock_key(lm, lm->keys[i], sizeof(lm->keys[i]), kinds[i], ids[i]);
		lm->keyp[i] = lm->keys[i];
	}
	release_send(lm, tokens, n);
}

void
lock_renew(lockmgr *lm, struct item *const *items, size_t n)
{
	size_t m = 0;

	if (lm->redis == NULL || redis_lock_renew_pending(lm->redis) || grow(lm, n) == -1 ||
	    grow_renewal(lm, n) == -1)
		return;
	for (size_t i = 0; i < n; i++) {
		if (items[i]->token[0] == '\0' || items[i]->lock_lost)
			continue;
		lock_key(lm, lm->keys[m], sizeof(lm->keys[m]), items[i]->kind, items[i]->id);
		lm->keyp[m] = lm->keys[m];
		lm->tokp[m] = items[i]->token;
		lm->rkinds[m] = items[i]->kind;
		lm->rids[m] = items[i]->id;
		snprintf(lm->rtokens[m], sizeof(lm->rtokens[m]), "%s", items[i]->token);
		m++;
	}
	if (m == 0 || !redis_usable(lm))
		return;
	lm->nrenewal = m;
	if (redis_lock_renew_send(lm->redis, lm->keyp, lm->tokp, m, lm->ttl_ms, clock_ms()) == -1)
		note_redis_failure(lm);
}

bool
lock_renewing(const lockmgr *lm)
{
	return lm->redis != NULL && redis_lock_renew_pending(lm->redis);
}

void
lock_renew_poll(lockmgr *lm, struct item *const *items, size_t n)
{
	int r;

	if (!lock_renewing(lm) || (r = redis_lock_renew_take(lm->redis, lm->flags)) == 0)
		return;
	if (r == -1) {
		note_redis_failure(lm);
		return;
	}
	for (size_t i = 0; i < lm->nrenewal; i++) {
		if (lm->flags[i])
			continue;
		metrics_lock(METRICS_LOCK_LOST_REDIS, 1);
		log_warnx("%s %" PRId64 ": redis lock lost (expired or taken over); "
		    "no longer renewed, the database lease still fences its completion",
		    item_kind_name(lm->rkinds[i]), lm->rids[i]);
		/* Its item, if still in flight under that lock, renews it no more. */
		for (size_t j = 0; j < n; j++)
			if (items[j]->kind == lm->rkinds[i] && items[j]->id == lm->rids[i] &&
			    strcmp(items[j]->token, lm->rtokens[i]) == 0)
				items[j]->token[0] = '\0';
	}
}

void
lock_release(lockmgr *lm, struct item *const *items, size_t n)
{
	size_t m = 0;

	if (lm->redis == NULL || grow(lm, n) == -1)
		return;
	for (size_t i = 0; i < n; i++) {
		if (items[i]->token[0] == '\0')
			continue;
		lock_key(lm, lm->keys[m], sizeof(lm->keys[m]), items[i]->kind, items[i]->id);
		lm->keyp[m] = lm->keys[m];
		lm->tokp[m] = items[i]->token;
		m++;
	}
	if (m > 0)
		release_send(lm, lm->tokp, m);
}

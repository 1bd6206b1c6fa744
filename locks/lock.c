#include "locks/lock.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "common/log.h"
#include "common/metrics.h"

#define RECONNECT_MIN_MS 100
#define RECONNECT_MAX_MS 5000

struct lockmgr {
	enum lock_mode mode;
	int ttl_ms;
	char worker_id[ITEM_TOKEN_MAX - 34];
	store *st;
	redis_lock *redis;
	bool redis_down;                /* logged as unreachable, not yet back */
	int64_t next_reconnect_ms;
	int reconnect_delay_ms;
	char errmsg[512];
	/* scratch reused across calls */
	int64_t *ids;
	bool *flags;
	char (*keys)[ITEM_KEY_MAX + 32];
	char (*tokens)[ITEM_TOKEN_MAX];
	const char **keyp, **tokp;
	struct item **subset;
	size_t cap;
};

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
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
	GROW(ids);
	GROW(flags);
	GROW(keys);
	GROW(tokens);
	GROW(keyp);
	GROW(tokp);
	GROW(subset);
#undef GROW
	lm->cap = cap;
	return 0;
}

int
lock_new(const struct lock_options *o, store *st, lockmgr **ret)
{
	lockmgr *lm;

	if ((lm = calloc(1, sizeof(*lm))) == NULL)
		return -1;
	lm->mode = o->mode;
	lm->ttl_ms = o->ttl_ms;
	lm->st = st;
	lm->reconnect_delay_ms = RECONNECT_MIN_MS;
	snprintf(lm->worker_id, sizeof(lm->worker_id), "%s", o->worker_id);
	if (lm->mode != LOCK_MODE_SKIP_LOCKED &&
	    redis_lock_new(&o->redis, &lm->redis) == -1) {
		free(lm);
		return -1;
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
	free(lm->ids);
	free(lm->flags);
	free(lm->keys);
	free(lm->tokens);
	free(lm->keyp);
	free(lm->tokp);
	free(lm->subset);
	free(lm);
}

void
lock_set_ttl(lockmgr *lm, int ttl_ms)
{
	lm->ttl_ms = ttl_ms;
}

const char *
lock_errmsg(const lockmgr *lm)
{
	return lm->errmsg;
}

static void
lock_key(char *buf, size_t len, enum item_kind kind, int64_t id)
{
	snprintf(buf, len, "billing-worker:lock:%s:%" PRId64, item_kind_name(kind), id);
}

/* A token no other claim anywhere will ever hold: worker id + 128 random bits. */
static void
make_token(const lockmgr *lm, char *buf, size_t len)
{
	unsigned char r[16];
	char hex[33];

	if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
		/* Cannot happen after boot; fall back to something still unique enough. */
		struct timespec ts;

		clock_gettime(CLOCK_REALTIME, &ts);
		memcpy(r, &ts, sizeof(ts) < sizeof(r) ? sizeof(ts) : sizeof(r));
	}
	for (int i = 0; i < 16; i++)
		snprintf(hex + 2 * i, 3, "%02x", r[i]);
	snprintf(buf, len, "%s:%s", lm->worker_id, hex);
}

/*
 * Redis just failed to connect or dropped: say what happens now, once per
 * outage, and space out the reconnects.
 */
static void
mark_redis_down(lockmgr *lm)
{
	if (!lm->redis_down)
		log_warnx("redis unreachable: %s%s", redis_lock_errmsg(lm->redis),
		    lm->mode == LOCK_MODE_AUTO ?
		    "; claiming with FOR UPDATE SKIP LOCKED until it returns" :
		    "; no new items are taken until it returns");
	lm->redis_down = true;
	lm->next_reconnect_ms = now_ms() + lm->reconnect_delay_ms;
	lm->reconnect_delay_ms = lm->reconnect_delay_ms * 2 > RECONNECT_MAX_MS ?
	    RECONNECT_MAX_MS : lm->reconnect_delay_ms * 2;
}

/*
 * True when Redis can be used now.  Reconnects are spaced out with backoff
 * so a dead Redis costs one connect attempt per few seconds, not one per
 * poll.  State changes are logged once each way.
 */
static bool
redis_usable(lockmgr *lm)
{
	int64_t now;

	if (lm->redis == NULL)
		return false;
	if (redis_lock_connected(lm->redis))
		return true;
	now = now_ms();
	if (now < lm->next_reconnect_ms)
		return false;
	if (redis_lock_connect(lm->redis) == 0) {
		if (lm->redis_down) {
			metrics_reconnect(METRICS_PEER_REDIS);
			log_info("redis reachable again%s", lm->mode == LOCK_MODE_AUTO ?
			    ": back to redis locks" : "");
		}
		lm->redis_down = false;
		lm->reconnect_delay_ms = RECONNECT_MIN_MS;
		return true;
	}
	mark_redis_down(lm);
	return false;
}

static void
note_redis_failure(lockmgr *lm)
{
	if (!redis_lock_connected(lm->redis))
		mark_redis_down(lm);
	else
		log_warnx("redis lock command failed: %s", redis_lock_errmsg(lm->redis));
}

static int
claim_skip_locked(lockmgr *lm, enum item_kind kind, size_t limit,
    struct item *items, size_t *ret_n, bool *more)
{
	if (store_claim(lm->st, kind, NULL, 0, limit, lm->ttl_ms, items, ret_n) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", store_errmsg(lm->st));
		return -1;
	}
	*more = *ret_n == limit;
	metrics_lock(METRICS_LOCK_ACQUIRED, *ret_n);
	return 0;
}

static int
claim_redis(lockmgr *lm, enum item_kind kind, size_t limit, struct item *items,
    size_t *ret_n, bool *more)
{
	size_t ndue = 0, ngot = 0, nclaimed = 0, nback = 0;

	if (grow(lm, limit) == -1)
		goto oom;
	if (store_due_ids(lm->st, kind, limit, lm->ids, &ndue) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", store_errmsg(lm->st));
		return -1;
	}
	*more = ndue == limit;
	*ret_n = 0;
	if (ndue == 0)
		return 0;
	for (size_t i = 0; i < ndue; i++) {
		lock_key(lm->keys[i], sizeof(lm->keys[i]), kind, lm->ids[i]);
		make_token(lm, lm->tokens[i], sizeof(lm->tokens[i]));
		lm->keyp[i] = lm->keys[i];
		lm->tokp[i] = lm->tokens[i];
	}
	if (redis_lock_acquire(lm->redis, lm->keyp, lm->tokp, ndue, lm->ttl_ms, lm->flags) == -1) {
		note_redis_failure(lm);
		if (lm->mode == LOCK_MODE_AUTO)
			return claim_skip_locked(lm, kind, limit, items, ret_n, more);
		snprintf(lm->errmsg, sizeof(lm->errmsg), "redis: %s", redis_lock_errmsg(lm->redis));
		return -1;
	}
	/* Compact to the ids we locked, keeping key and token beside each. */
	for (size_t i = 0; i < ndue; i++) {
		if (!lm->flags[i])
			continue;
		lm->ids[ngot] = lm->ids[i];
		lm->keyp[ngot] = lm->keyp[i];
		lm->tokp[ngot] = lm->tokp[i];
		ngot++;
	}
	if (ngot == 0) {
		metrics_lock(METRICS_LOCK_CONTENDED, ndue);
		return 0;
	}
	if (store_claim(lm->st, kind, lm->ids, ngot, limit, lm->ttl_ms, items, &nclaimed) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", store_errmsg(lm->st));
		(void)redis_lock_release(lm->redis, lm->keyp, lm->tokp, ngot);
		return -1;
	}
	/*
	 * Give each claimed item its token; the locks of ids the database did
	 * not give us (finished or leased meanwhile) go back at once.
	 */
	for (size_t i = 0; i < ngot; i++) {
		bool claimed = false;

		for (size_t j = 0; j < nclaimed && !claimed; j++) {
			if (items[j].id == lm->ids[i]) {
				snprintf(items[j].token, sizeof(items[j].token), "%s", lm->tokp[i]);
				claimed = true;
			}
		}
		if (!claimed) {
			lm->keyp[nback] = lm->keyp[i];
			lm->tokp[nback] = lm->tokp[i];
			nback++;
		}
	}
	if (nback > 0)
		(void)redis_lock_release(lm->redis, lm->keyp, lm->tokp, nback);
	metrics_lock(METRICS_LOCK_CONTENDED, (ndue - ngot) + nback);
	metrics_lock(METRICS_LOCK_ACQUIRED, nclaimed);
	*ret_n = nclaimed;
	return 0;
oom:
	snprintf(lm->errmsg, sizeof(lm->errmsg), "out of memory");
	return -1;
}

int
lock_claim(lockmgr *lm, enum item_kind kind, size_t limit, struct item *items,
    size_t *ret_n, bool *more)
{
	*ret_n = 0;
	*more = false;
	if (limit == 0)
		return 0;
	if (lm->mode == LOCK_MODE_SKIP_LOCKED)
		return claim_skip_locked(lm, kind, limit, items, ret_n, more);
	if (redis_usable(lm))
		return claim_redis(lm, kind, limit, items, ret_n, more);
	if (lm->mode == LOCK_MODE_AUTO)
		return claim_skip_locked(lm, kind, limit, items, ret_n, more);
	snprintf(lm->errmsg, sizeof(lm->errmsg), "redis unreachable: %s",
	    redis_lock_errmsg(lm->redis));
	return -1;
}

static void
renew_redis(lockmgr *lm, struct item *const *items, size_t n)
{
	size_t m = 0;
	char key[ITEM_KEY_MAX + 32];

	if (lm->redis == NULL || grow(lm, n) == -1)
		return;
	for (size_t i = 0; i < n; i++) {
		if (items[i]->token[0] == '\0' || items[i]->lock_lost)
			continue;
		lock_key(key, sizeof(key), items[i]->kind, items[i]->id);
		memcpy(lm->keys[m], key, sizeof(key));
		lm->keyp[m] = lm->keys[m];
		lm->tokp[m] = items[i]->token;
		lm->subset[m] = items[i];
		m++;
	}
	if (m == 0 || !redis_usable(lm))
		return;
	if (redis_lock_renew(lm->redis, lm->keyp, lm->tokp, m, lm->ttl_ms, lm->flags) == -1) {
		note_redis_failure(lm);
		return;
	}
	for (size_t i = 0; i < m; i++) {
		if (lm->flags[i])
			continue;
		metrics_lock(METRICS_LOCK_LOST_REDIS, 1);
		log_warnx("%s %" PRId64 ": redis lock lost (expired or taken over); "
		    "no longer renewed, the database lease still fences its completion",
		    item_kind_name(lm->subset[i]->kind), lm->subset[i]->id);
		lm->subset[i]->token[0] = '\0';
	}
}

int
lock_renew(lockmgr *lm, struct item *const *items, size_t n)
{
	int ret = 0;

	if (grow(lm, n) == -1)
		return -1;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		size_t m = 0;

		for (size_t i = 0; i < n; i++)
			if (items[i]->kind == (enum item_kind)k && !items[i]->lock_lost)
				lm->subset[m++] = items[i];
		if (m == 0)
			continue;
		if (store_renew(lm->st, k, lm->subset, m, lm->ttl_ms) == -1) {
			snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", store_errmsg(lm->st));
			ret = -1;
			continue;
		}
		for (size_t i = 0; i < m; i++) {
			if (!lm->subset[i]->lock_lost)
				continue;
			metrics_lock(METRICS_LOCK_LOST_LEASE, 1);
			log_warnx("%s %" PRId64 ": lease lost to another worker; its result "
			    "will not be recorded unless the fenced completion accepts it",
			    item_kind_name(k), lm->subset[i]->id);
		}
	}
	renew_redis(lm, items, n);
	return ret;
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
		lock_key(lm->keys[m], sizeof(lm->keys[m]), items[i]->kind, items[i]->id);
		lm->keyp[m] = lm->keys[m];
		lm->tokp[m] = items[i]->token;
		m++;
	}
	if (m == 0 || !redis_lock_connected(lm->redis))
		return;
	if (redis_lock_release(lm->redis, lm->keyp, lm->tokp, m) == -1)
		note_redis_failure(lm);
}

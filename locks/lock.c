#include "locks/lock.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "billing/pace.h"
#include "common/clock.h"
#include "common/jitter.h"
#include "common/log.h"
#include "common/metrics.h"

/* The rate budget may bank this much time's worth of calls. */
#define RATE_BURST_MS 50
/*
 * Redis mode offers the lock script this many times more due candidates
 * than it wants, shuffled: workers polling at the same moment then mostly
 * lock different items instead of all fighting for the oldest ones.
 */
#define CANDIDATE_FACTOR 4
#define CANDIDATE_MAX 8192
/* A claim that found every candidate taken backs off up to this long. */
#define CONTENDED_BACKOFF_MS 10
#define RECONNECT_MIN_MS 100
#define RECONNECT_MAX_MS 5000
/* The key prefix, "lock:", a kind and an id, with room to spare. */
#define LOCK_KEY_MAX (CONFIG_REDIS_KEY_PREFIX_MAX + 48)

/* An id and where it sits among the locked candidates. */
struct id_pos {
	int64_t id;
	size_t pos;
};

struct lockmgr {
	enum lock_mode mode;
	int ttl_ms;
	int park_ms;                    /* a row the database refuses to claim rests this long */
	char worker_id[ITEM_TOKEN_MAX - 34];
	char key_prefix[CONFIG_REDIS_KEY_PREFIX_MAX + 1];
	store *st;
	redis_lock *redis;
	bool redis_down;                /* logged as unreachable, not yet back */
	int64_t next_reconnect_ms;
	int reconnect_delay_ms;
	char errmsg[512];
	/*
	 * The rate budget: shared in Redis while it answers; otherwise this
	 * process's even share, rate / the workers last seen there.
	 */
	int rate;
	int workers_seen;
	struct pace pace;
	int64_t wait_ms;                /* from the last claim: until calls may start */
	struct jitter rng;              /* shuffles candidates; not for secrets */
	/* scratch reused across calls */
	int64_t *ids;
	enum item_kind *kinds;
	bool *flags;
	char (*keys)[LOCK_KEY_MAX];
	char (*tokens)[ITEM_TOKEN_MAX];
	const char **keyp, **tokp;
	struct item **subset;
	struct id_pos *index;
	size_t cap;
};

static void note_redis_failure(lockmgr *lm);


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
	GROW(kinds);
	GROW(flags);
	GROW(keys);
	GROW(tokens);
	GROW(keyp);
	GROW(tokp);
	GROW(subset);
	GROW(index);
#undef GROW
	lm->cap = cap;
	return 0;
}

void
lock_redis_options(const struct bw_config *cfg, const char *password,
    struct redis_options *out)
{
	memset(out, 0, sizeof(*out));
	out->host = cfg->redis.host;
	out->port = cfg->redis.port;
	out->socket = cfg->redis.socket;
	out->password = password;
	out->username = cfg->redis.username;
	out->db = cfg->redis.db;
	out->key_prefix = cfg->redis.key_prefix;
	out->connect_timeout_ms = cfg->redis.connect_timeout_ms;
	out->command_timeout_ms = cfg->redis.command_timeout_ms;
}

int
lock_new(const struct lock_options *o, store *st, lockmgr **ret)
{
	lockmgr *lm;

	if ((lm = calloc(1, sizeof(*lm))) == NULL)
		return -1;
	lm->mode = o->mode;
	lm->ttl_ms = o->ttl_ms;
	lm->park_ms = o->park_ms;
	lm->st = st;
	lm->reconnect_delay_ms = RECONNECT_MIN_MS;
	lm->workers_seen = 1;
	jitter_seed(&lm->rng);
	pace_init(&lm->pace, 0, RATE_BURST_MS, clock_ms());
	snprintf(lm->worker_id, sizeof(lm->worker_id), "%s", o->worker_id);
	snprintf(lm->key_prefix, sizeof(lm->key_prefix), "%s",
	    o->redis.key_prefix != NULL ? o->redis.key_prefix : "billing-worker:");
	metrics_set_lock_mode(config_lock_mode_name(lm->mode));
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
	free(lm->kinds);
	free(lm->flags);
	free(lm->keys);
	free(lm->tokens);
	free(lm->keyp);
	free(lm->tokp);
	free(lm->subset);
	free(lm->index);
	free(lm);
}

void
lock_set_ttl(lockmgr *lm, int ttl_ms)
{
	lm->ttl_ms = ttl_ms;
}

void
lock_set_park_delay(lockmgr *lm, int delay_ms)
{
	lm->park_ms = delay_ms;
}

/* The local fallback bucket, at this process's share of the fleet's rate. */
static void
pace_reset(lockmgr *lm)
{
	int64_t paused = lm->pace.paused_until_ms;
	double share = lm->rate > 0 ? (double)lm->rate / lm->workers_seen : 0;

	pace_init(&lm->pace, share, RATE_BURST_MS, clock_ms());
	pace_pause(&lm->pace, paused);
}

void
lock_set_rate(lockmgr *lm, int calls_per_second)
{
	lm->rate = calls_per_second;
	pace_reset(lm);
}

bool
lock_redis_down(const lockmgr *lm)
{
	return lm->redis_down;
}

int64_t
lock_wait_ms(const lockmgr *lm)
{
	return lm->wait_ms;
}

void
lock_pause(lockmgr *lm, int pause_ms)
{
	pace_pause(&lm->pace, clock_ms() + pause_ms);
	if (lm->redis != NULL && redis_lock_connected(lm->redis) &&
	    redis_lock_pause(lm->redis, pause_ms) == -1)
		note_redis_failure(lm);
}

const char *
lock_errmsg(const lockmgr *lm)
{
	return lm->errmsg;
}

/* The fleet's prefix keeps fleets sharing one Redis off each other's locks. */
static void
lock_key(const lockmgr *lm, char *buf, size_t len, enum item_kind kind, int64_t id)
{
	snprintf(buf, len, "%slock:%s:%" PRId64, lm->key_prefix, item_kind_name(kind), id);
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
	metrics_set_redis_up(false);
	lm->next_reconnect_ms = clock_ms() + lm->reconnect_delay_ms;
	lm->reconnect_delay_ms = lm->reconnect_delay_ms * 2 > RECONNECT_MAX_MS ?
	    RECONNECT_MAX_MS : lm->reconnect_delay_ms * 2;
}

/*
 * True when Redis can be used now.  Reconnects are spaced out with backoff
 * so a dead Redis costs one connect attempt per few seconds, not one per
 * poll.  State changes are logged once each way; billing_worker_redis_up
 * follows the connection at every look.
 */
static bool
redis_usable(lockmgr *lm)
{
	int64_t now;

	if (lm->redis == NULL)
		return false;
	metrics_set_redis_up(redis_lock_connected(lm->redis));
	if (redis_lock_connected(lm->redis))
		return true;
	now = clock_ms();
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
		metrics_set_redis_up(true);
		return true;
	}
	mark_redis_down(lm);
	return false;
}

void
lock_start(lockmgr *lm)
{
	if (lm->mode != LOCK_MODE_SKIP_LOCKED)
		(void)redis_usable(lm);
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
id_pos_cmp(const void *a, const void *b)
{
	const struct id_pos *x = a, *y = b;

	return x->id < y->id ? -1 : x->id > y->id;
}

/*
 * Indexes the N locked ids starting at START by id, so each claimed item
 * finds its token by binary search instead of a scan of the batch.
 */
static void
index_ids(lockmgr *lm, size_t start, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		lm->index[i].id = lm->ids[start + i];
		lm->index[i].pos = start + i;
	}
	qsort(lm->index, n, sizeof(*lm->index), id_pos_cmp);
}

static ssize_t
find_id(const lockmgr *lm, size_t n, int64_t id)
{
	struct id_pos key = { id, 0 };
	const struct id_pos *hit = bsearch(&key, lm->index, n, sizeof(key), id_pos_cmp);

	return hit != NULL ? (ssize_t)hit->pos : -1;
}

/* Swaps candidates A and B: id, kind, lock flag, key and token pointers. */
static void
swap_candidates(lockmgr *lm, size_t a, size_t b)
{
	int64_t id = lm->ids[a];
	enum item_kind kind = lm->kinds[a];
	bool flag = lm->flags[a];
	const char *key = lm->keyp[a], *tok = lm->tokp[a];

	lm->ids[a] = lm->ids[b];
	lm->kinds[a] = lm->kinds[b];
	lm->flags[a] = lm->flags[b];
	lm->keyp[a] = lm->keyp[b];
	lm->tokp[a] = lm->tokp[b];
	lm->ids[b] = id;
	lm->kinds[b] = kind;
	lm->flags[b] = flag;
	lm->keyp[b] = key;
	lm->tokp[b] = tok;
}

/*
 * Why each kind's claim failed, when it did: kept until the other kind's
 * claim is done, so one kind's failure never stops the other.
 */
struct claim_failures {
	bool any;
	char msg[ITEM_KIND_COUNT][512];
};

/* Remembers the store's error as the reason KIND could not be claimed. */
static void
note_kind_failure(lockmgr *lm, struct claim_failures *f, enum item_kind kind)
{
	f->any = true;
	snprintf(f->msg[kind], sizeof(f->msg[kind]), "%s", store_errmsg(lm->st));
}

/*
 * The end of a claim of both kinds.  Nothing claimed and something failed:
 * -1, and the first failure is lock_errmsg() for the caller to report.  Some
 * items claimed: 0, and each kind that failed is logged here, since the
 * caller hears only of success.  A broken connection is not logged here:
 * the next statement finds it, and the loop reports and reconnects.
 */
static int
claim_end(lockmgr *lm, const struct claim_failures *f, size_t got)
{
	if (!f->any)
		return 0;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		if (f->msg[k][0] == '\0')
			continue;
		if (got == 0) {
			if (lm->errmsg[0] == '\0')
				snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", f->msg[k]);
		} else if (store_connected(lm->st)) {
			log_warnx("could not claim %ss: %s", item_kind_name(k), f->msg[k]);
		}
	}
	return got == 0 ? -1 : 0;
}

/*
 * The claim of KIND's candidates among [FROM, TO) failed on the data: some
 * row refuses its fence bump (a fence at INT64_MAX), a constraint or a
 * producer's trigger.  Claims those candidates one at a time, so that row
 * cannot hold the others back, and parks each row that refuses its own
 * claim, so it is not claimed again in a spin.  Each id claimed gets
 * flags[i] set and, with TOKENS, its Redis lock's token.  Up to LIMIT items
 * go to ITEMS; *ret_n says how many, also on -1 (a claim failed otherwise,
 * e.g. the connection: the ids not yet tried are left alone).
 */
static int
claim_each(lockmgr *lm, enum item_kind kind, size_t from, size_t to, bool tokens,
    size_t limit, struct item *items, size_t *ret_n)
{
	size_t got = 0, n;
	char reason[600];
	bool parked;
	int ret = 0;

	for (size_t i = from; i < to && got < limit; i++) {
		if (lm->kinds[i] != kind)
			continue;
		if (store_claim(lm->st, kind, &lm->ids[i], 1, 1, lm->ttl_ms, items + got, &n) == 0) {
			if (n == 1) {
				if (tokens)
					snprintf(items[got].token, sizeof(items[got].token), "%s",
					    lm->tokp[i]);
				lm->flags[i] = true;
				got++;
			}
			continue;       /* n == 0: finished or taken meanwhile */
		}
		if (!store_connected(lm->st) || !store_failed_on_data(lm->st)) {
			ret = -1;
			break;
		}
		snprintf(reason, sizeof(reason), "could not be claimed: %s", store_errmsg(lm->st));
		if (store_park_unclaimed(lm->st, kind, lm->ids[i], lm->park_ms, reason,
		    &parked) == -1) {
			if (!store_connected(lm->st)) {
				ret = -1;
				break;
			}
			/* Still due: tried again at the next poll, after the others. */
			log_error("%s %" PRId64 ": %s; could not park it either (%s)",
			    item_kind_name(kind), lm->ids[i], reason, store_errmsg(lm->st));
		}
	}
	*ret_n = got;
	return ret;
}

/* Claims, with FOR UPDATE SKIP LOCKED, as many of each kind as were due. */
static int
claim_skip_locked(lockmgr *lm, size_t ndue, size_t limit, struct item *items,
    size_t *ret_n)
{
	size_t due[ITEM_KIND_COUNT] = { 0, 0 }, got = 0, n;
	struct claim_failures failures = { 0 };
	int64_t now = clock_ms();
	int granted = pace_take(&lm->pace, (int)(ndue < limit ? ndue : limit), now);

	if ((size_t)granted < limit)
		limit = (size_t)granted;
	if (limit == 0) {
		lm->wait_ms = pace_wait_ms(&lm->pace, now);
		*ret_n = 0;
		return 0;
	}
	for (size_t i = 0; i < ndue; i++)
		due[lm->kinds[i]]++;
	for (int k = 0; k < ITEM_KIND_COUNT && got < limit; k++) {
		size_t want = due[k] < limit - got ? due[k] : limit - got;

		if (want == 0)
			continue;
		if (store_claim(lm->st, k, NULL, 0, want, lm->ttl_ms, items + got, &n) == 0) {
			got += n;
			continue;
		}
		/* The rows this claim took are among the oldest due ones store_due listed. */
		if (store_connected(lm->st) && store_failed_on_data(lm->st)) {
			int r = claim_each(lm, k, 0, ndue, false, want, items + got, &n);

			got += n;
			if (r == 0)
				continue;
		}
		note_kind_failure(lm, &failures, k);
	}
	metrics_lock(METRICS_LOCK_ACQUIRED, got);
	*ret_n = got;
	return claim_end(lm, &failures, got);
}

/* Fisher-Yates over the first N candidates. */
static void
shuffle_candidates(lockmgr *lm, size_t n)
{
	for (size_t i = n; i > 1; i--)
		swap_candidates(lm, i - 1, (size_t)(jitter_next(&lm->rng) % i));
}

/*
 * Redis mode: lock every due candidate in one script call, claim the ones
 * we got in PostgreSQL (one statement per kind), hand each claimed item its
 * token, and give back at once the locks of ids the database did not give
 * us (finished or leased meanwhile by a skip-locked worker).
 */
static int
claim_redis(lockmgr *lm, size_t ndue, size_t limit, struct item *items, size_t *ret_n)
{
	size_t got = 0, nlocked = 0, nback = 0, locked = 0, contended = 0;
	struct redis_rate rate;
	struct redis_rate_answer answer;
	struct claim_failures failures = { 0 };

	/* The flags are swapped along with their candidates: they must hold a value. */
	memset(lm->flags, 0, ndue * sizeof(*lm->flags));
	shuffle_candidates(lm, ndue);
	for (size_t i = 0; i < ndue; i++) {
		lock_key(lm, lm->keys[i], sizeof(lm->keys[i]), lm->kinds[i], lm->ids[i]);
		make_token(lm, lm->tokens[i], sizeof(lm->tokens[i]));
		lm->keyp[i] = lm->keys[i];
		lm->tokp[i] = lm->tokens[i];
	}
	rate.rate = lm->rate;
	rate.burst = lm->rate * RATE_BURST_MS / 1000 > 1 ? lm->rate * RATE_BURST_MS / 1000 : 1;
	rate.member = lm->worker_id;
	rate.max_keys = limit;
	if (redis_lock_acquire(lm->redis, lm->keyp, lm->tokp, ndue, lm->ttl_ms, &rate,
	    lm->flags, &answer) == -1) {
		note_redis_failure(lm);
		if (lm->mode == LOCK_MODE_AUTO)
			return claim_skip_locked(lm, ndue, limit, items, ret_n);
		snprintf(lm->errmsg, sizeof(lm->errmsg), "redis: %s", redis_lock_errmsg(lm->redis));
		return -1;
	}
	lm->wait_ms = answer.wait_ms;
	for (size_t i = 0; i < ndue; i++)
		locked += lm->flags[i];
	/* Every candidate was tried only when we got fewer than we wanted, unthrottled. */
	if (locked < limit && answer.wait_ms == 0)
		contended = ndue - locked;
	if (answer.workers > 0 && answer.workers != lm->workers_seen) {
		lm->workers_seen = answer.workers;
		pace_reset(lm);
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		size_t start = nlocked, n = 0;
		int r;

		/* This kind's locked candidates, moved to [start, nlocked). */
		for (size_t i = start; i < ndue; i++)
			if (lm->flags[i] && lm->kinds[i] == (enum item_kind)k)
				swap_candidates(lm, i, nlocked++);
		if (nlocked == start)
			continue;
		r = store_claim(lm->st, k, lm->ids + start, nlocked - start, limit - got,
		    lm->ttl_ms, items + got, &n);
		/*
		 * From here flags[] in [start, nlocked) means "claimed": whatever
		 * fails below, every lock left unclaimed is given back after the loop.
		 */
		for (size_t i = start; i < nlocked; i++)
			lm->flags[i] = false;
		if (r == -1) {
			if (store_connected(lm->st) && store_failed_on_data(lm->st)) {
				r = claim_each(lm, k, start, nlocked, true, limit - got, items + got, &n);
				got += n;
				if (r == 0)
					continue;
			}
			note_kind_failure(lm, &failures, k);
			continue;
		}
		index_ids(lm, start, nlocked - start);
		for (size_t j = got; j < got + n; j++) {
			ssize_t i = find_id(lm, nlocked - start, items[j].id);

			if (i < 0)
				continue;   /* cannot happen: we only claim ids we locked */
			snprintf(items[j].token, sizeof(items[j].token), "%s", lm->tokp[i]);
			lm->flags[i] = true;
		}
		got += n;
	}
	for (size_t i = 0; i < nlocked; i++) {
		if (lm->flags[i])
			continue;
		lm->keyp[nback] = lm->keyp[i];
		lm->tokp[nback] = lm->tokp[i];
		nback++;
	}
	if (nback > 0)
		(void)redis_lock_release(lm->redis, lm->keyp, lm->tokp, nback);
	if (got == 0 && !failures.any && lm->wait_ms == 0)
		lm->wait_ms = 1 + (int64_t)(jitter_next(&lm->rng) % CONTENDED_BACKOFF_MS);
	/*
	 * Contended: offered candidates another worker held in Redis, plus those
	 * we locked but the database had already given to someone else.  The
	 * candidates left unlocked by the rate budget or our own limit are not.
	 */
	metrics_lock(METRICS_LOCK_CONTENDED, contended + nback);
	metrics_lock(METRICS_LOCK_ACQUIRED, got);
	*ret_n = got;
	return claim_end(lm, &failures, got);
}

int
lock_claim(lockmgr *lm, size_t limit, struct item *items, size_t *ret_n, bool *more)
{
	size_t ndue = 0, window;
	int ret;

	*ret_n = 0;
	*more = false;
	lm->errmsg[0] = '\0';
	lm->wait_ms = 0;
	if (limit == 0)
		return 0;
	window = lm->mode == LOCK_MODE_SKIP_LOCKED ? limit : limit * CANDIDATE_FACTOR;
	if (window > CANDIDATE_MAX)
		window = limit > CANDIDATE_MAX ? limit : CANDIDATE_MAX;
	if (grow(lm, window) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "out of memory");
		return -1;
	}
	/*
	 * A lost Redis is retried at every poll (spaced by the reconnect
	 * backoff), not only when items are due, so an idle auto-mode worker
	 * also returns to Redis.  Connected, this costs nothing.
	 */
	if (lm->mode != LOCK_MODE_SKIP_LOCKED)
		(void)redis_usable(lm);
	if (store_due(lm->st, window, lm->kinds, lm->ids, &ndue) == -1) {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "%s", store_errmsg(lm->st));
		return -1;
	}
	*more = ndue == window;
	if (ndue == 0)
		return 0;
	if (lm->mode == LOCK_MODE_SKIP_LOCKED)
		ret = claim_skip_locked(lm, ndue, limit, items, ret_n);
	else if (redis_usable(lm))
		ret = claim_redis(lm, ndue, limit, items, ret_n);
	else if (lm->mode == LOCK_MODE_AUTO)
		ret = claim_skip_locked(lm, ndue, limit, items, ret_n);
	else {
		snprintf(lm->errmsg, sizeof(lm->errmsg), "redis unreachable: %s",
		    redis_lock_errmsg(lm->redis));
		return -1;
	}
	/*
	 * A full claim with candidates left over: the rest are due now and wait
	 * only for room, not for the next poll.  In redis mode the window is
	 * 4 x LIMIT, so a backlog's last 4 x LIMIT items would otherwise go one
	 * claim per poll_interval_ms.  A claim that found every candidate held
	 * elsewhere got nothing, so this never makes it spin; its backoff is
	 * lock_wait_ms().
	 */
	if (ret == 0 && *ret_n == limit && ndue > *ret_n)
		*more = true;
	return ret;
}

static void
renew_redis(lockmgr *lm, struct item *const *items, size_t n)
{
	size_t m = 0;
	char key[LOCK_KEY_MAX];

	if (lm->redis == NULL || grow(lm, n) == -1)
		return;
	for (size_t i = 0; i < n; i++) {
		if (items[i]->token[0] == '\0' || items[i]->lock_lost)
			continue;
		lock_key(lm, key, sizeof(key), items[i]->kind, items[i]->id);
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
		lock_key(lm, lm->keys[m], sizeof(lm->keys[m]), items[i]->kind, items[i]->id);
		lm->keyp[m] = lm->keys[m];
		lm->tokp[m] = items[i]->token;
		m++;
	}
	if (m == 0 || !redis_lock_connected(lm->redis))
		return;
	if (redis_lock_release(lm->redis, lm->keyp, lm->tokp, m) == -1)
		note_redis_failure(lm);
}

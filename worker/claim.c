#include "worker/claim.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/jitter.h"
#include "common/log.h"
#include "common/metrics.h"

/*
 * Redis mode offers the lock manager this many times more due candidates
 * than it wants, shuffled: workers polling at the same moment then mostly
 * lock different items instead of all fighting for the oldest ones.
 */
#define CANDIDATE_FACTOR 4
#define CANDIDATE_MAX 8192
/* A claim that found every candidate taken backs off up to this long. */
#define CONTENDED_BACKOFF_MS 10

_Static_assert(CONFIG_REDIS_KEY_PREFIX_MAX <= LOCK_KEY_PREFIX_MAX,
    "the lock manager must take every key prefix the configuration accepts");

/* An id and where it sits among the locked candidates. */
struct id_pos {
	int64_t id;
	size_t pos;
};

struct claimer {
	enum lock_policy policy;
	int ttl_ms;
	int park_ms;                    /* a row the database refuses to claim rests this long */
	store *st;
	lockmgr *lm;
	fleet *fleet;
	char errmsg[512];
	int64_t wait_ms;                /* from the last claim: until calls may start */
	struct jitter rng;              /* shuffles candidates; not for secrets */
	/* scratch reused across calls: the candidates, in step */
	int64_t *ids;
	enum item_kind *kinds;
	bool *flags;
	char (*tokens)[ITEM_TOKEN_MAX];
	const char **tokp;
	struct item **subset;
	struct id_pos *index;
	size_t cap;
};

void
claim_redis_options(const struct bw_config *cfg, const char *password,
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

enum lock_policy
claim_lock_policy(enum lock_mode mode)
{
	switch (mode) {
	case LOCK_MODE_SKIP_LOCKED:
		return LOCK_POLICY_SKIP_LOCKED;
	case LOCK_MODE_AUTO:
		return LOCK_POLICY_AUTO;
	case LOCK_MODE_REDIS:
	default:
		return LOCK_POLICY_REDIS;
	}
}

static int
grow(claimer *c, size_t n)
{
	size_t cap = c->cap ? c->cap : 64;
	void *p;

	if (n <= c->cap)
		return 0;
	while (cap < n)
		cap *= 2;
#define GROW(field) \
	do { \
		if ((p = realloc(c->field, cap * sizeof(*c->field))) == NULL) \
			return -1; \
		c->field = p; \
	} while (0)
	GROW(ids);
	GROW(kinds);
	GROW(flags);
	GROW(tokens);
	GROW(tokp);
	GROW(subset);
	GROW(index);
#undef GROW
	c->cap = cap;
	return 0;
}

int
claim_new(const struct claim_options *o, store *st, lockmgr *lm, fleet *fl, claimer **ret)
{
	claimer *c;

	if ((c = calloc(1, sizeof(*c))) == NULL)
		return -1;
	c->policy = o->policy;
	c->ttl_ms = o->ttl_ms;
	c->park_ms = o->park_ms;
	c->st = st;
	c->lm = lm;
	c->fleet = fl;
	jitter_seed(&c->rng);
	*ret = c;
	return 0;
}

void
claim_free(claimer *c)
{
	if (c == NULL)
		return;
	free(c->ids);
	free(c->kinds);
	free(c->flags);
	free(c->tokens);
	free(c->tokp);
	free(c->subset);
	free(c->index);
	free(c);
}

void
claim_set_ttl(claimer *c, int ttl_ms)
{
	c->ttl_ms = ttl_ms;
	lock_set_ttl(c->lm, ttl_ms);
}

void
claim_set_park_delay(claimer *c, int delay_ms)
{
	c->park_ms = delay_ms;
}

int64_t
claim_wait_ms(const claimer *c)
{
	return c->wait_ms;
}

const char *
claim_errmsg(const claimer *c)
{
	return c->errmsg;
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
index_ids(claimer *c, size_t start, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		c->index[i].id = c->ids[start + i];
		c->index[i].pos = start + i;
	}
	qsort(c->index, n, sizeof(*c->index), id_pos_cmp);
}

static ssize_t
find_id(const claimer *c, size_t n, int64_t id)
{
	struct id_pos key = { id, 0 };
	const struct id_pos *hit = bsearch(&key, c->index, n, sizeof(key), id_pos_cmp);

	return hit != NULL ? (ssize_t)hit->pos : -1;
}

/* Swaps candidates A and B: id, kind, lock flag and token pointer. */
static void
swap_candidates(claimer *c, size_t a, size_t b)
{
	int64_t id = c->ids[a];
	enum item_kind kind = c->kinds[a];
	bool flag = c->flags[a];
	const char *tok = c->tokp[a];

	c->ids[a] = c->ids[b];
	c->kinds[a] = c->kinds[b];
	c->flags[a] = c->flags[b];
	c->tokp[a] = c->tokp[b];
	c->ids[b] = id;
	c->kinds[b] = kind;
	c->flags[b] = flag;
	c->tokp[b] = tok;
}

/* Fisher-Yates over the first N candidates. */
static void
shuffle_candidates(claimer *c, size_t n)
{
	for (size_t i = n; i > 1; i--)
		swap_candidates(c, i - 1, (size_t)(jitter_next(&c->rng) % i));
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
note_kind_failure(claimer *c, struct claim_failures *f, enum item_kind kind)
{
	f->any = true;
	snprintf(f->msg[kind], sizeof(f->msg[kind]), "%s", store_errmsg(c->st));
}

/*
 * The end of a claim of both kinds.  Nothing claimed and something failed:
 * -1, and the first failure is claim_errmsg() for the caller to report.
 * Some items claimed: 0, and each kind that failed is logged here, since
 * the caller hears only of success.  A broken connection is not logged
 * here: the next statement finds it, and the loop reports and reconnects.
 */
static int
claim_end(claimer *c, const struct claim_failures *f, size_t got)
{
	if (!f->any)
		return 0;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		if (f->msg[k][0] == '\0')
			continue;
		if (got == 0) {
			if (c->errmsg[0] == '\0')
				snprintf(c->errmsg, sizeof(c->errmsg), "%s", f->msg[k]);
		} else if (store_connected(c->st)) {
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
claim_each(claimer *c, enum item_kind kind, size_t from, size_t to, bool tokens,
    size_t limit, struct item *items, size_t *ret_n)
{
	size_t got = 0, n;
	char reason[600];
	bool parked;
	int ret = 0;

	for (size_t i = from; i < to && got < limit; i++) {
		if (c->kinds[i] != kind)
			continue;
		if (store_claim(c->st, kind, &c->ids[i], 1, 1, c->ttl_ms, items + got, &n) == 0) {
			if (n == 1) {
				if (tokens)
					snprintf(items[got].token, sizeof(items[got].token), "%s",
					    c->tokp[i]);
				c->flags[i] = true;
				got++;
			}
			continue;       /* n == 0: finished or taken meanwhile */
		}
		if (!store_connected(c->st) || !store_failed_on_data(c->st)) {
			ret = -1;
			break;
		}
		snprintf(reason, sizeof(reason), "could not be claimed: %s", store_errmsg(c->st));
		if (store_park_unclaimed(c->st, kind, c->ids[i], c->park_ms, reason,
		    &parked) == -1) {
			if (!store_connected(c->st)) {
				ret = -1;
				break;
			}
			/* Still due: tried again at the next poll, after the others. */
			log_error("%s %" PRId64 ": %s; could not park it either (%s)",
			    item_kind_name(kind), c->ids[i], reason, store_errmsg(c->st));
		}
	}
	*ret_n = got;
	return ret;
}

/* Claims, with FOR UPDATE SKIP LOCKED, as many of each kind as were due. */
static int
claim_skip_locked(claimer *c, size_t ndue, size_t limit, struct item *items,
    size_t *ret_n)
{
	size_t due[ITEM_KIND_COUNT] = { 0, 0 }, got = 0, n;
	struct claim_failures failures = { 0 };
	size_t granted;

	/* Not shared, the grant cannot fail. */
	if (fleet_grant(c->fleet, false, ndue < limit ? ndue : limit, ndue, &granted) == -1)
		granted = 0;
	if (granted < limit)
		limit = granted;
	if (limit == 0) {
		c->wait_ms = fleet_wait_ms(c->fleet);
		*ret_n = 0;
		return 0;
	}
	for (size_t i = 0; i < ndue; i++)
		due[c->kinds[i]]++;
	for (int k = 0; k < ITEM_KIND_COUNT && got < limit; k++) {
		size_t want = due[k] < limit - got ? due[k] : limit - got;

		if (want == 0)
			continue;
		if (store_claim(c->st, k, NULL, 0, want, c->ttl_ms, items + got, &n) == 0) {
			got += n;
			continue;
		}
		/* The rows this claim took are among the oldest due ones store_due listed. */
		if (store_connected(c->st) && store_failed_on_data(c->st)) {
			int r = claim_each(c, k, 0, ndue, false, want, items + got, &n);

			got += n;
			if (r == 0)
				continue;
		}
		note_kind_failure(c, &failures, k);
	}
	metrics_lock(METRICS_LOCK_ACQUIRED, got);
	*ret_n = got;
	return claim_end(c, &failures, got);
}

/*
 * Redis mode: ask the fleet's budget for as many calls as we want, lock a
 * shuffled share of the due candidates, at most that many, in one round
 * trip, and give the calls whose items we could not lock back to the
 * budget.  Then claim the ones we got in PostgreSQL (one statement per
 * kind), hand each claimed item its token, and give back at once the locks
 * of ids the database did not give us (finished or leased meanwhile by a
 * skip-locked worker).  Redis failing in either step falls back to
 * skip-locked in auto mode, with this process's share of the budget.
 */
static int
claim_redis(claimer *c, size_t ndue, size_t limit, struct item *items, size_t *ret_n)
{
	size_t got = 0, nlocked = 0, nback = 0, locked = 0, contended = 0, granted;
	struct claim_failures failures = { 0 };

	if (fleet_grant(c->fleet, true, ndue < limit ? ndue : limit, ndue, &granted) == -1) {
		lock_redis_failed(c->lm);
		if (c->policy == LOCK_POLICY_AUTO)
			return claim_skip_locked(c, ndue, limit, items, ret_n);
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", lock_errmsg(c->lm));
		return -1;
	}
	c->wait_ms = fleet_wait_ms(c->fleet);
	if (granted == 0) {
		/* The budget is spent or a 429 pause holds: no lock is worth taking. */
		*ret_n = 0;
		return 0;
	}

	/*
	 * Flags and token pointers are swapped along with their candidates:
	 * they must hold a value.  The tokens come with the locks.
	 */
	for (size_t i = 0; i < ndue; i++) {
		c->flags[i] = false;
		c->tokp[i] = NULL;
	}
	shuffle_candidates(c, ndue);
	if (lock_acquire(c->lm, c->kinds, c->ids, ndue, granted, c->tokens, c->flags) == -1) {
		fleet_give_back(c->fleet, granted);
		c->wait_ms = 0;
		if (c->policy == LOCK_POLICY_AUTO)
			return claim_skip_locked(c, ndue, limit, items, ret_n);
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", lock_errmsg(c->lm));
		return -1;
	}
	for (size_t i = 0; i < ndue; i++) {
		c->tokp[i] = c->tokens[i];
		locked += c->flags[i];
	}
	if (locked < granted) {
		fleet_give_back(c->fleet, granted - locked);
		c->wait_ms = fleet_wait_ms(c->fleet);
	}
	/* Every candidate was tried only when we got fewer than we wanted, unthrottled. */
	if (locked < limit && c->wait_ms == 0)
		contended = ndue - locked;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		size_t start = nlocked, n = 0;
		int r;

		/* This kind's locked candidates, moved to [start, nlocked). */
		for (size_t i = start; i < ndue; i++)
			if (c->flags[i] && c->kinds[i] == (enum item_kind)k)
				swap_candidates(c, i, nlocked++);
		if (nlocked == start)
			continue;
		r = store_claim(c->st, k, c->ids + start, nlocked - start, limit - got,
		    c->ttl_ms, items + got, &n);
		/*
		 * From here flags[] in [start, nlocked) means "claimed": whatever
		 * fails below, every lock left unclaimed is given back after the loop.
		 */
		for (size_t i = start; i < nlocked; i++)
			c->flags[i] = false;
		if (r == -1) {
			if (store_connected(c->st) && store_failed_on_data(c->st)) {
				r = claim_each(c, k, start, nlocked, true, limit - got, items + got, &n);
				got += n;
				if (r == 0)
					continue;
			}
			note_kind_failure(c, &failures, k);
			continue;
		}
		index_ids(c, start, nlocked - start);
		for (size_t j = got; j < got + n; j++) {
			ssize_t i = find_id(c, nlocked - start, items[j].id);

			if (i < 0)
				continue;   /* cannot happen: we only claim ids we locked */
			snprintf(items[j].token, sizeof(items[j].token), "%s", c->tokp[i]);
			c->flags[i] = true;
		}
		got += n;
	}
	for (size_t i = 0; i < nlocked; i++) {
		if (c->flags[i])
			continue;
		c->ids[nback] = c->ids[i];
		c->kinds[nback] = c->kinds[i];
		c->tokp[nback] = c->tokp[i];
		nback++;
	}
	lock_give_back(c->lm, c->kinds, c->ids, c->tokp, nback);
	if (got == 0 && !failures.any && c->wait_ms == 0)
		c->wait_ms = 1 + (int64_t)(jitter_next(&c->rng) % CONTENDED_BACKOFF_MS);
	/*
	 * Contended: offered candidates another worker held in Redis, plus those
	 * we locked but the database had already given to someone else.  The
	 * candidates left unlocked by the rate budget or our own limit are not.
	 */
	metrics_lock(METRICS_LOCK_CONTENDED, contended + nback);
	metrics_lock(METRICS_LOCK_ACQUIRED, got);
	*ret_n = got;
	return claim_end(c, &failures, got);
}

int
claim_take(claimer *c, size_t limit, struct item *items, size_t *ret_n, bool *more)
{
	size_t ndue = 0, window;
	enum lock_way way;
	int ret;

	*ret_n = 0;
	*more = false;
	c->errmsg[0] = '\0';
	c->wait_ms = 0;
	if (limit == 0)
		return 0;
	window = c->policy == LOCK_POLICY_SKIP_LOCKED ? limit : limit * CANDIDATE_FACTOR;
	if (window > CANDIDATE_MAX)
		window = limit > CANDIDATE_MAX ? limit : CANDIDATE_MAX;
	if (grow(c, window) == -1) {
		snprintf(c->errmsg, sizeof(c->errmsg), "out of memory");
		return -1;
	}
	/*
	 * Asked at every poll, not only when items are due, so an idle
	 * auto-mode worker also returns to Redis once it is back.
	 */
	way = lock_now(c->lm);
	if (store_due(c->st, window, c->kinds, c->ids, &ndue) == -1) {
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
		return -1;
	}
	*more = ndue == window;
	if (ndue == 0)
		return 0;
	switch (way) {
	case LOCK_WAY_REDIS:
		ret = claim_redis(c, ndue, limit, items, ret_n);
		break;
	case LOCK_WAY_SKIP_LOCKED:
		ret = claim_skip_locked(c, ndue, limit, items, ret_n);
		break;
	case LOCK_WAY_NONE:
	default:
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", lock_errmsg(c->lm));
		return -1;
	}
	/*
	 * A full claim with candidates left over: the rest are due now and wait
	 * only for room, not for the next poll.  In redis mode the window is
	 * 4 x LIMIT, so a backlog's last 4 x LIMIT items would otherwise go one
	 * claim per poll_interval_ms.  A claim that found every candidate held
	 * elsewhere got nothing, so this never makes it spin; its backoff is
	 * claim_wait_ms().
	 */
	if (ret == 0 && *ret_n == limit && ndue > *ret_n)
		*more = true;
	return ret;
}

int
claim_renew(claimer *c, struct item *const *items, size_t n)
{
	int ret = 0;

	c->errmsg[0] = '\0';
	if (grow(c, n) == -1) {
		snprintf(c->errmsg, sizeof(c->errmsg), "out of memory");
		return -1;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		size_t m = 0;

		for (size_t i = 0; i < n; i++)
			if (items[i]->kind == (enum item_kind)k && !items[i]->lock_lost)
				c->subset[m++] = items[i];
		if (m == 0)
			continue;
		if (store_renew(c->st, k, c->subset, m, c->ttl_ms) == -1) {
			snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
			ret = -1;
			continue;
		}
		for (size_t i = 0; i < m; i++) {
			if (!c->subset[i]->lock_lost)
				continue;
			metrics_lock(METRICS_LOCK_LOST_LEASE, 1);
			log_warnx("%s %" PRId64 ": lease lost to another worker; its result "
			    "will not be recorded unless the fenced completion accepts it",
			    item_kind_name(k), c->subset[i]->id);
		}
	}
	lock_renew(c->lm, items, n);
	return ret;
}

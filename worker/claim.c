#include "worker/claim.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/clock.h"
#include "common/jitter.h"
#include "common/log.h"
#include "common/metrics.h"

/*
 * Redis mode offers the lock manager up to this many times more due
 * candidates than it wants, shuffled: workers polling at the same moment
 * then mostly lock different items instead of all fighting for the oldest
 * ones.  As many times as there are workers in the fleet's registry, up to
 * this: a worker alone has no one to avoid, and with a window of 4 x it
 * locked a random quarter of it, so the oldest items stayed behind and the
 * due query returned and walked four claims' worth: 1.77 ms and 256 rows a
 * poll against 0.68 ms and 66 now, one process, make bench's e2e, side by
 * side (test_due_plan.py).
 */
#define CANDIDATE_FACTOR 4
#define CANDIDATE_MAX 8192
/* A claim that found every candidate taken backs off up to this long. */
#define CONTENDED_BACKOFF_MS 10

_Static_assert(CONFIG_REDIS_KEY_PREFIX_MAX <= LOCK_KEY_PREFIX_MAX,
    "the lock manager must take every key prefix the configuration accepts");

/* What the claim step waits for between turns. */
enum claim_phase {
	CLAIM_IDLE,
	CLAIM_DUE,              /* the due query is in flight */
	CLAIM_LOCKING,          /* redis mode: the grant and the locks are */
	CLAIM_CLAIMING,         /* the claims are, one per kind */
};

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
	redis_conn *redis;
	char errmsg[512];
	int64_t wait_ms;                /* from the last claim: until calls may start */
	struct jitter rng;              /* shuffles candidates; not for secrets */
	/* scratch reused across calls: the candidates, in step */
	int64_t *ids;
	enum item_kind *kinds;
	bool *flags;
	char (*tokens)[ITEM_TOKEN_MAX];
	const char **tokp;
	struct id_pos *index;
	size_t cap;
	struct item **subset;           /* claim_renew's, apart: a claim may be in flight */
	size_t subset_cap;

	/* The claim in flight (claim_start to claim_poll), between turns. */
	enum claim_phase phase;
	enum lock_way way;
	size_t limit, window, ndue;
	size_t nlocked, contended;      /* redis mode */
	struct redis_job lock_job;      /* the grant and the locks, in one round trip */
	bool more;
	struct kind_claim {
		bool sent;              /* its claim went to the database */
		bool taken;             /* and its answer came back */
		int result;             /* 0: claimed, -1: failed */
		bool data_failure;      /* failed on a row's data (claim_each) */
		char msg[512];          /* why it failed */
		size_t start, end;      /* redis mode: its locked candidates */
		size_t offset, want;    /* where its items go, how many at most */
		size_t n;               /* how many it claimed */
	} kc[ITEM_KIND_COUNT];
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
	out->sentinels = cfg->redis.sentinels;
	out->master_name = cfg->redis.master_name;
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
	c->redis = o->redis;
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

/* Remembers MSG as the reason KIND could not be claimed. */
static void
note_kind_failure(struct claim_failures *f, enum item_kind kind, const char *msg)
{
	f->any = true;
	snprintf(f->msg[kind], sizeof(f->msg[kind]), "%s", msg);
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

/*
 * Sends KIND's claim, as kc[KIND] describes it: of IDS (NIDS of them) in
 * redis mode, of the oldest due with SKIP LOCKED when IDS is NULL.  A
 * claim that cannot even be sent is that kind's failure.
 */
static void
send_kind(claimer *c, enum item_kind kind, const int64_t *ids, size_t nids)
{
	struct kind_claim *k = &c->kc[kind];

	k->sent = true;
	if (store_claim_send(c->st, kind, ids, nids, k->want, c->ttl_ms) == 0)
		return;
	k->taken = true;
	k->result = -1;
	k->data_failure = false;
	snprintf(k->msg, sizeof(k->msg), "%s", store_errmsg(c->st));
}

/*
 * Skip-locked mode: as many of each kind as were due, up to the grant.
 * Both kinds' claims go at once; each has its own share of ITEMS.
 * Returns 0 when there is nothing to claim, 1 when claims were sent.
 */
static int
skip_locked_send(claimer *c)
{
	size_t due[ITEM_KIND_COUNT] = { 0, 0 }, offset = 0, granted, limit = c->limit;
	int sent = 0;

	/* Not shared, the grant cannot fail. */
	if (fleet_grant(c->fleet, false, c->ndue < limit ? c->ndue : limit, c->ndue,
	    &granted) == -1)
		granted = 0;
	if (granted < limit)
		limit = granted;
	if (limit == 0) {
		c->wait_ms = fleet_wait_ms(c->fleet);
		return 0;
	}
	c->way = LOCK_WAY_SKIP_LOCKED;
	for (size_t i = 0; i < c->ndue; i++)
		due[c->kinds[i]]++;
	for (int k = 0; k < ITEM_KIND_COUNT && offset < limit; k++) {
		size_t want = due[k] < limit - offset ? due[k] : limit - offset;

		if (want == 0)
			continue;
		c->kc[k].offset = offset;
		c->kc[k].want = want;
		send_kind(c, k, NULL, 0);
		offset += want;
		sent = 1;
	}
	return sent;
}

/* Moves KIND's N items from its share of ITEMS down to *GOT, and counts them. */
static void
gather(const struct kind_claim *k, struct item *items, size_t n, size_t *got)
{
	if (n > 0 && k->offset != *got)
		memmove(items + *got, items + k->offset, n * sizeof(*items));
	*got += n;
}

/* The answers of skip-locked mode's claims: ITEMS compacted, failures noted. */
static int
skip_locked_end(claimer *c, struct item *items, size_t *ret_n)
{
	struct claim_failures failures = { 0 };
	size_t got = 0, n;

	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		struct kind_claim *kc = &c->kc[k];

		if (!kc->sent)
			continue;
		if (kc->result == 0) {
			gather(kc, items, kc->n, &got);
			continue;
		}
		/* The rows this claim took are among the oldest due ones store_due listed. */
		if (kc->data_failure) {
			int r = claim_each(c, k, 0, c->ndue, false, kc->want, items + got, &n);

			got += n;
			if (r == 0)
				continue;
			snprintf(kc->msg, sizeof(kc->msg), "%s", store_errmsg(c->st));
		}
		note_kind_failure(&failures, k, kc->msg);
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
/* Redis failed under the claim: skip-locked in auto mode, else the claim fails. */
static int
redis_failed(claimer *c)
{
	c->wait_ms = 0;
	if (c->policy == LOCK_POLICY_AUTO)
		return skip_locked_send(c);
	snprintf(c->errmsg, sizeof(c->errmsg), "%s", lock_errmsg(c->lm));
	return -1;
}

/*
 * Redis mode, before the locks: flags and token pointers are swapped along
 * with their candidates, so they must hold a value; the tokens come with
 * the locks.  The candidates are shuffled.
 */
static void
redis_prepare(claimer *c)
{
	for (size_t i = 0; i < c->ndue; i++) {
		c->flags[i] = false;
		c->tokp[i] = NULL;
	}
	shuffle_candidates(c, c->ndue);
}

/*
 * The grant and the locks answered in one round trip (lock_job): whatever
 * was locked beyond the grant (a pause was in force) is given back at
 * once.  Returns *GRANTED.
 */
static size_t
grant_and_locks_answered(claimer *c)
{
	size_t ndue = c->ndue, granted = 0, locked = 0, nback = 0;

	fleet_grant_done(c->fleet, &granted);
	lock_acquire_done(c->lm, ndue, c->flags);
	for (size_t i = 0; i < ndue; i++) {
		if (!c->flags[i])
			continue;
		if (++locked <= granted)
			continue;
		c->flags[i] = false;
		c->ids[ndue + nback] = c->ids[i];
		c->kinds[ndue + nback] = c->kinds[i];
		c->tokp[ndue + nback] = c->tokens[i];
		nback++;
	}
	/* Past the candidates, so the give-back leaves them in place. */
	lock_give_back(c->lm, c->kinds + ndue, c->ids + ndue, c->tokp + ndue, nback);
	return granted;
}

/*
 * Without a rate limit the grant only honours a 429 pause and keeps the
 * registry, so it grants everything nearly always: it goes with the locks
 * in one round trip, sent here and answered at a later turn, the locks
 * capped at what we want.  -1 when it could not be sent.
 */
static int
grant_and_locks_send(claimer *c)
{
	size_t want = c->ndue < c->limit ? c->ndue : c->limit;
	struct redis_job *job = &c->lock_job;

	memset(job, 0, sizeof(*job));
	fleet_grant_call(c->fleet, want, c->ndue, &job->evals[0]);
	if (lock_acquire_call(c->lm, c->kinds, c->ids, c->ndue, want, c->tokens, c->flags,
	    &job->evals[1]) == -1)
		return -1;
	job->nevals = 2;
	if (redis_conn_submit(c->redis, job, clock_ms()) == -1) {
		lock_acquire_failed(c->lm);
		return -1;
	}
	return 0;
}

/*
 * Redis mode once the locks are in (GRANTED calls granted): the grant's
 * unused part back to the budget, and the claims sent, one per kind, of
 * the candidates locked.  Returns 0 when there is nothing to claim, 1
 * when the claims are on their way (or, with nothing locked, when the end
 * needs no answer).
 */
static int
redis_locked(claimer *c, size_t granted)
{
	size_t ndue = c->ndue, limit = c->limit, locked = 0;

	for (size_t i = 0; i < ndue; i++) {
		c->tokp[i] = c->tokens[i];
		locked += c->flags[i];
	}
	if (granted == 0)
		return 0;           /* a 429 pause holds: whatever was locked went back */
	if (locked < granted) {
		fleet_give_back(c->fleet, granted - locked);
		c->wait_ms = fleet_wait_ms(c->fleet);
	}
	/* Every candidate was tried only when we got fewer than we wanted, unthrottled. */
	c->contended = locked < limit && c->wait_ms == 0 ? ndue - locked : 0;
	c->nlocked = 0;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		struct kind_claim *kc = &c->kc[k];

		/* This kind's locked candidates, moved to [start, end). */
		kc->start = c->nlocked;
		for (size_t i = kc->start; i < ndue; i++)
			if (c->flags[i] && c->kinds[i] == (enum item_kind)k)
				swap_candidates(c, i, c->nlocked++);
		kc->end = c->nlocked;
		if (kc->end == kc->start)
			continue;
		/*
		 * From here flags[] in [start, end) means "claimed": whatever
		 * fails, every lock left unclaimed is given back at the end.
		 * Locked <= granted <= limit: each kind's share of ITEMS is as
		 * many as it locked.
		 */
		for (size_t i = kc->start; i < kc->end; i++)
			c->flags[i] = false;
		kc->offset = kc->start;
		kc->want = kc->end - kc->start;
		send_kind(c, k, c->ids + kc->start, kc->want);
	}
	return 1;
}

/*
 * Redis mode under a rate limit: the grant first (what it grants bounds
 * the locks), then the locks, each a round trip waited for.  Returns as
 * redis_locked(), or -1 when it failed (claim_errmsg()).
 */
static int
redis_limited(claimer *c)
{
	size_t want = c->ndue < c->limit ? c->ndue : c->limit, granted;

	if (fleet_grant(c->fleet, true, want, c->ndue, &granted) == -1) {
		lock_redis_failed(c->lm);
		return redis_failed(c);
	}
	c->wait_ms = fleet_wait_ms(c->fleet);
	if (granted == 0)
		return 0;   /* the budget is spent or a 429 pause holds: no lock is worth taking */
	if (lock_acquire(c->lm, c->kinds, c->ids, c->ndue, granted, c->tokens, c->flags) == -1) {
		fleet_give_back(c->fleet, granted);
		return redis_failed(c);
	}
	return redis_locked(c, granted);
}

/* The answers of redis mode's claims: tokens handed out, unclaimed locks given back. */
static int
redis_end(claimer *c, struct item *items, size_t *ret_n)
{
	struct claim_failures failures = { 0 };
	size_t got = 0, nback = 0, n;

	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		struct kind_claim *kc = &c->kc[k];

		if (!kc->sent)
			continue;
		if (kc->result == -1) {
			if (kc->data_failure) {
				int r = claim_each(c, k, kc->start, kc->end, true, kc->want,
				    items + got, &n);

				got += n;
				if (r == 0)
					continue;
				snprintf(kc->msg, sizeof(kc->msg), "%s", store_errmsg(c->st));
			}
			note_kind_failure(&failures, k, kc->msg);
			continue;
		}
		index_ids(c, kc->start, kc->end - kc->start);
		for (size_t j = kc->offset; j < kc->offset + kc->n; j++) {
			ssize_t i = find_id(c, kc->end - kc->start, items[j].id);

			if (i < 0)
				continue;   /* cannot happen: we only claim ids we locked */
			snprintf(items[j].token, sizeof(items[j].token), "%s", c->tokp[i]);
			c->flags[i] = true;
		}
		gather(kc, items, kc->n, &got);
	}
	for (size_t i = 0; i < c->nlocked; i++) {
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
	metrics_lock(METRICS_LOCK_CONTENDED, c->contended + nback);
	metrics_lock(METRICS_LOCK_ACQUIRED, got);
	*ret_n = got;
	return claim_end(c, &failures, got);
}

/* How many times the claim's size the due query offers the locks. */
static size_t
candidate_factor(const claimer *c)
{
	int workers = c->fleet != NULL ? fleet_workers(c->fleet) : 1;

	/*
	 * Not counted yet (the first claim, when a fleet that starts together
	 * would otherwise all offer the same oldest items): as in a fleet.
	 */
	if (workers < 1 || workers > CANDIDATE_FACTOR)
		return CANDIDATE_FACTOR;
	return (size_t)workers;
}

int
claim_start(claimer *c, size_t limit)
{
	c->errmsg[0] = '\0';
	c->wait_ms = 0;
	if (c->phase != CLAIM_IDLE) {
		snprintf(c->errmsg, sizeof(c->errmsg), "a claim is in flight already");
		return -1;
	}
	if (limit == 0)
		return 0;
	c->limit = limit;
	c->window = c->policy == LOCK_POLICY_SKIP_LOCKED ? limit : limit * candidate_factor(c);
	if (c->window > CANDIDATE_MAX)
		c->window = limit > CANDIDATE_MAX ? limit : CANDIDATE_MAX;
	/* Twice the window: a grant short of the locks lists their give-back past it. */
	if (grow(c, c->window * 2) == -1) {
		snprintf(c->errmsg, sizeof(c->errmsg), "out of memory");
		return -1;
	}
	/*
	 * Asked at every poll, not only when items are due, so an idle
	 * auto-mode worker also returns to Redis once it is back.
	 */
	c->way = lock_now(c->lm);
	if (c->way == LOCK_WAY_NONE) {
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", lock_errmsg(c->lm));
		return -1;
	}
	if (store_due_send(c->st, c->window) == -1) {
		snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
		return -1;
	}
	c->phase = CLAIM_DUE;
	return 0;
}

bool
claim_busy(const claimer *c)
{
	return c->phase != CLAIM_IDLE;
}

/* The due query answered: on to the locks and the claims. */
static int
due_answered(claimer *c)
{
	int r;

	c->more = c->ndue == c->window;
	if (c->ndue == 0)
		return 0;
	memset(c->kc, 0, sizeof(c->kc));
	if (c->way != LOCK_WAY_REDIS) {
		r = skip_locked_send(c);
	} else {
		redis_prepare(c);
		if (fleet_limited(c->fleet) || c->redis == NULL) {
			r = redis_limited(c);
		} else if (grant_and_locks_send(c) == 0) {
			c->phase = CLAIM_LOCKING;
			return 1;
		} else {
			r = redis_failed(c);
		}
	}
	if (r == 1)
		c->phase = CLAIM_CLAIMING;
	return r;
}

/* Takes each kind's answer once it is in; true when every one is. */
static bool
claims_answered(claimer *c, struct item *items)
{
	bool all = true;

	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		struct kind_claim *kc = &c->kc[k];
		int r;

		if (!kc->sent || kc->taken)
			continue;
		if ((r = store_claim_take(c->st, k, items + kc->offset, &kc->n)) == 0) {
			all = false;
			continue;
		}
		kc->taken = true;
		kc->result = r == 1 ? 0 : -1;
		if (r == -1) {
			kc->data_failure = store_connected(c->st) && store_failed_on_data(c->st);
			snprintf(kc->msg, sizeof(kc->msg), "%s", store_errmsg(c->st));
		}
	}
	return all;
}

int
claim_poll(claimer *c, struct item *items, size_t *ret_n, bool *more)
{
	int r = -1;

	*ret_n = 0;
	*more = false;
	switch (c->phase) {
	case CLAIM_IDLE:
		return 1;
	case CLAIM_DUE:
		if ((r = store_due_take(c->st, c->kinds, c->ids, &c->ndue)) == 0)
			return 0;
		if (r == -1) {
			snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
			c->phase = CLAIM_IDLE;
			return -1;
		}
		c->phase = CLAIM_IDLE;
		if ((r = due_answered(c)) <= 0) {
			*more = c->more;
			return r == 0 ? 1 : -1;
		}
		if (c->phase == CLAIM_CLAIMING)
			goto claiming;
		return 0;
	case CLAIM_LOCKING:
		if (!redis_conn_job_done(&c->lock_job))
			return 0;
		c->phase = CLAIM_IDLE;
		if (!c->lock_job.ok) {
			/* Locks it may have taken expire: they only ever saved work. */
			lock_acquire_failed(c->lm);
			r = redis_failed(c);
		} else {
			size_t granted = grant_and_locks_answered(c);

			c->wait_ms = fleet_wait_ms(c->fleet);
			r = redis_locked(c, granted);
		}
		if (r <= 0) {
			*more = c->more;
			return r == 0 ? 1 : -1;
		}
		c->phase = CLAIM_CLAIMING;
		/* FALLTHROUGH */
	case CLAIM_CLAIMING:
	claiming:
		if (!claims_answered(c, items))
			return 0;
		c->phase = CLAIM_IDLE;
		r = c->way == LOCK_WAY_REDIS ? redis_end(c, items, ret_n) :
		    skip_locked_end(c, items, ret_n);
		break;
	}
	*more = c->more;
	/*
	 * A full claim with candidates left over: the rest are due now and wait
	 * only for room, not for the next poll.  In redis mode the window is
	 * 4 x LIMIT, so a backlog's last 4 x LIMIT items would otherwise go one
	 * claim per poll_interval_ms.  A claim that found every candidate held
	 * elsewhere got nothing, so this never makes it spin; its backoff is
	 * claim_wait_ms().
	 */
	if (r == 0 && *ret_n == c->limit && c->ndue > *ret_n)
		*more = true;
	return r == 0 ? 1 : -1;
}

int
claim_renew_start(claimer *c, struct item *const *items, size_t n)
{
	int ret = 0;

	c->errmsg[0] = '\0';
	if (n > c->subset_cap) {
		struct item **p = realloc(c->subset, n * sizeof(*p));

		if (p == NULL) {
			snprintf(c->errmsg, sizeof(c->errmsg), "out of memory");
			return -1;
		}
		c->subset = p;
		c->subset_cap = n;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		size_t m = 0;

		if (store_renew_pending(c->st, k))
			continue;       /* the last one is not answered yet */
		for (size_t i = 0; i < n; i++)
			if (items[i]->kind == (enum item_kind)k && !items[i]->lock_lost)
				c->subset[m++] = items[i];
		if (m == 0)
			continue;
		if (store_renew_send(c->st, k, c->subset, m, c->ttl_ms) == -1) {
			snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
			ret = -1;
		}
	}
	lock_renew(c->lm, items, n);
	return ret;
}

bool
claim_renewing(const claimer *c)
{
	if (lock_renewing(c->lm))
		return true;
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (store_renew_pending(c->st, k))
			return true;
	return false;
}

/* The item of ITEMS that is KIND's ID under FENCE, or NULL: it finished meanwhile. */
static struct item *
item_of(struct item *const *items, size_t n, enum item_kind kind, int64_t id, int64_t fence)
{
	for (size_t i = 0; i < n; i++)
		if (items[i]->kind == kind && items[i]->id == id && items[i]->fence == fence)
			return items[i];
	return NULL;
}

int
claim_renew_poll(claimer *c, struct item *const *items, size_t n)
{
	const int64_t *ids, *fences;
	size_t nlost;
	int ret = 0;

	lock_renew_poll(c->lm, items, n);

	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		int r;

		if (!store_renew_pending(c->st, k))
			continue;
		if ((r = store_renew_take(c->st, k, &ids, &fences, &nlost)) == 0)
			continue;
		if (r == -1) {
			snprintf(c->errmsg, sizeof(c->errmsg), "%s", store_errmsg(c->st));
			ret = -1;
			continue;
		}
		for (size_t i = 0; i < nlost; i++) {
			struct item *it = item_of(items, n, k, ids[i], fences[i]);

			if (it == NULL || it->lock_lost)
				continue;
			it->lock_lost = true;
			metrics_lock(METRICS_LOCK_LOST_LEASE, 1);
			log_warnx("%s %" PRId64 ": lease lost to another worker; its result "
			    "will not be recorded unless the fenced completion accepts it",
			    item_kind_name(k), ids[i]);
		}
	}
	return ret;
}

#ifndef BW_CLAIM_H
#define BW_CLAIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "billing/fleet.h"
#include "common/item.h"
#include "common/redis.h"
#include "config/config.h"
#include "locks/lock.h"
#include "store/store.h"

/*
 * The claim step: due items become this worker's.  The loop's helper that
 * drives the store, the fleet's rate budget and the lock manager in turn,
 * so none knows the others: the store lists what is due, the budget grants
 * how many calls may start, the lock manager locks at most that many in
 * Redis (or nothing, in skip-locked mode), and the store claims what was
 * locked, bumping each item's fence and setting its lease, whatever the
 * mode, so correctness never rests on Redis.
 */
typedef struct claimer claimer;

struct claim_options {
	enum lock_policy policy;        /* as the lock manager was made with */
	int ttl_ms;                     /* the lease (locks.ttl_ms) */
	/*
	 * How long a row the database refuses to claim is left alone
	 * (billing_api.backoff_max_ms, as for a row it refuses to complete).
	 */
	int park_ms;
	/*
	 * The one Redis connection the lock manager and the fleet's budget
	 * share (NULL in skip-locked mode): the claim step sends the grant and
	 * the locks on it in one round trip where it can.
	 */
	redis_conn *redis;
};

/*
 * The Redis connection CFG describes, with PASSWORD (NULL: no AUTH), into
 * OUT; the strings stay CFG's and PASSWORD's.  The one place the config's
 * redis group becomes connection options, for the daemon and for
 * check-config --connect alike.
 */
void claim_redis_options(const struct bw_config *cfg, const char *password,
    struct redis_options *out);

/* The lock manager's policy for the configuration's locks.mode. */
enum lock_policy claim_lock_policy(enum lock_mode mode);

/*
 * ST, LM and FL are borrowed and must outlive the claimer: the loop owns
 * them, and hands the claim step the store, the lock manager and the
 * fleet's rate budget it drives in turn.
 */
int claim_new(const struct claim_options *o, store *st, lockmgr *lm, fleet *fl,
    claimer **ret)
	__attribute__((warn_unused_result));
void claim_free(claimer *c);

/* The lease of later claims and renewals, and the Redis locks' ttl with it. */
void claim_set_ttl(claimer *c, int ttl_ms);
void claim_set_park_delay(claimer *c, int delay_ms);

/*
 * Claims up to LIMIT due items, of either kind, oldest first, without
 * waiting for the database: claim_start() sends the due query (in redis
 * mode the locks are taken when it answers), and claim_poll(), called at
 * every turn while claim_busy(), takes the answers and sends the next
 * statements.  It returns 0 while they are not in, and 1 once the claim
 * is done: *RET_N items in ITEMS (capacity LIMIT, passed at every poll,
 * so the caller may move its buffer in between), which the caller then
 * owns; *MORE tells whether more items may be due right now (LIMIT
 * claimed and more were due, or the due query filled its window).  Each
 * kind is claimed on its own, both at once: one kind's failure is logged
 * and does not stop the other.  A row the database refuses to claim on
 * its data is found by claiming the candidates one by one, and parked
 * (store_park_unclaimed) so it holds back nothing.  Both return -1 when
 * nothing could be claimed because something failed (the database or, in
 * redis mode, Redis); claim_errmsg() says why.  One claim at a time.
 */
int claim_start(claimer *c, size_t limit) __attribute__((warn_unused_result));
bool claim_busy(const claimer *c);
int claim_poll(claimer *c, struct item *items, size_t *ret_n, bool *more)
	__attribute__((warn_unused_result));

/*
 * After a claim: how long until more calls may start (the rate budget
 * is spent or a 429 pause is in force, or every candidate was held
 * elsewhere), 0 when the next claim may come as the loop sees fit.
 */
int64_t claim_wait_ms(const claimer *c);

/*
 * Extends the claims of ITEMS (any mix of kinds), without waiting: the
 * Redis lock of each that has one now, the database lease of each by a
 * statement per kind whose answer claim_renew_poll() takes at a later
 * turn (a kind whose last renewal is still unanswered is skipped).  A lost
 * Redis lock alone is logged and no longer renewed (the lease still
 * fences it).  -1 when a kind's renewal could not be sent (claim_errmsg()).
 */
int claim_renew_start(claimer *c, struct item *const *items, size_t n);
bool claim_renewing(const claimer *c);
/*
 * Takes the answers of the renewals in flight: each of ITEMS (those in
 * flight now; an item finished meanwhile is simply not among them) whose
 * lease went to another worker gets lock_lost set and is logged.  -1 when
 * a renewal failed (claim_errmsg()).
 */
int claim_renew_poll(claimer *c, struct item *const *items, size_t n);

const char *claim_errmsg(const claimer *c);

#endif

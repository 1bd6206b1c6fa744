#ifndef BW_LOCK_H
#define BW_LOCK_H

#include <stdbool.h>
#include <stddef.h>

#include "common/item.h"
#include "config/config.h"
#include "locks/redis_lock.h"
#include "store/store.h"

/*
 * How a worker takes items, behind one interface for the three lock modes.
 *
 * Every claim ends in the database (store_claim): it bumps the item's
 * fence and sets a lease, whatever the mode, so correctness never rests on
 * Redis.  In redis mode the candidates are first locked in Redis, so
 * workers split the due items among themselves instead of contending for
 * the same rows; in skip-locked mode the database alone picks them with
 * FOR UPDATE SKIP LOCKED; auto is redis while Redis answers and skip-locked
 * while it does not.
 */
typedef struct lockmgr lockmgr;

struct lock_options {
	enum lock_mode mode;
	int ttl_ms;
	/*
	 * How long a row the database refuses to claim is left alone
	 * (billing_api.backoff_max_ms, as for a row it refuses to complete).
	 */
	int park_ms;
	const char *worker_id;          /* copied; part of every token */
	struct redis_options redis;     /* unused in skip-locked mode */
};

/*
 * The Redis connection CFG describes, with PASSWORD (NULL: no AUTH), into
 * OUT; the strings stay CFG's and PASSWORD's.  The one place the config's
 * redis group becomes connection options, for the daemon and for
 * check-config --connect alike.
 */
void lock_redis_options(const struct bw_config *cfg, const char *password,
    struct redis_options *out);

/* ST is borrowed and must outlive the manager. */
int lock_new(const struct lock_options *o, store *st, lockmgr **ret)
	__attribute__((warn_unused_result));
void lock_free(lockmgr *lm);

void lock_set_ttl(lockmgr *lm, int ttl_ms);
void lock_set_park_delay(lockmgr *lm, int delay_ms);

/*
 * The fleet's API call budget (billing_api.max_requests_per_second, 0 =
 * none).  Claims take no more items than it allows: shared through Redis
 * while it answers, this process's even share of it otherwise.
 */
void lock_set_rate(lockmgr *lm, int calls_per_second);

/*
 * After a claim: how long until more calls may start (the rate budget is
 * spent or a 429 pause is in force), 0 when they may start now.
 */
int64_t lock_wait_ms(const lockmgr *lm);

/* True while Redis is unreachable (the outage is logged once, here). */
bool lock_redis_down(const lockmgr *lm);

/* A 429: no worker of the fleet starts a call for PAUSE_MS. */
void lock_pause(lockmgr *lm, int pause_ms);

/*
 * Connects to Redis now (redis and auto modes), so a wrong address shows in
 * the log at start rather than at the first due item.  Never fails: an
 * unreachable Redis is logged and retried as the mode says.
 */
void lock_start(lockmgr *lm);

/*
 * Claims up to LIMIT due items, of either kind, oldest first, into ITEMS
 * (capacity LIMIT), which the caller then owns.  *MORE tells whether more
 * items may be due right now (LIMIT claimed and more were due, or the due
 * query filled its window).  Each kind is claimed on its own: one kind's
 * failure is logged and does not stop the other.  A row the database
 * refuses to claim on its data is found by claiming the candidates one by
 * one, and parked (store_park_unclaimed) so it holds back nothing.  Returns
 * -1 when nothing could be claimed because something failed (the database
 * or, in redis mode, Redis); lock_errmsg() says why.
 */
int lock_claim(lockmgr *lm, size_t limit, struct item *items, size_t *ret_n, bool *more)
	__attribute__((warn_unused_result));

/*
 * Extends the claims of ITEMS (any mix of kinds): the database lease of
 * each, and the Redis lock of each that has one.  An item whose lease went
 * to another worker gets lock_lost set and is logged; a lost Redis lock
 * alone is logged and no longer renewed (the lease still fences it).
 */
int lock_renew(lockmgr *lm, struct item *const *items, size_t n);

/* Gives back the Redis locks of ITEMS, best effort (they expire anyway). */
void lock_release(lockmgr *lm, struct item *const *items, size_t n);

const char *lock_errmsg(const lockmgr *lm);

#endif

#ifndef BW_LOCK_H
#define BW_LOCK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/item.h"
#include "common/redis.h"

/*
 * Per-item locks in Redis, behind the three lock policies: keys, tokens
 * and their expiry, nothing else.  The lock manager never knows what it
 * protects: the claim that follows a lock (a fence and a lease in the
 * database, which is what correctness rests on) is the caller's.  In redis
 * policy every item is locked here first, so workers split the due items
 * between them instead of contending for the same rows; in skip-locked
 * policy Redis is not used at all; auto is redis while Redis answers and
 * skip-locked while it does not.
 */
typedef struct lockmgr lockmgr;

enum lock_policy {
	LOCK_POLICY_REDIS,
	LOCK_POLICY_SKIP_LOCKED,
	LOCK_POLICY_AUTO,
};

/* How items are to be taken now, under the policy and Redis' health. */
enum lock_way {
	LOCK_WAY_REDIS,         /* lock in Redis, then claim */
	LOCK_WAY_SKIP_LOCKED,   /* claim with FOR UPDATE SKIP LOCKED, no Redis */
	LOCK_WAY_NONE,          /* redis policy and Redis is unreachable: take nothing */
};

/*
 * The longest key prefix lock_new() accepts.  Every lock key starts with
 * the connection's prefix, so fleets sharing one Redis never touch each
 * other's locks.
 */
#define LOCK_KEY_PREFIX_MAX 64

struct lock_options {
	enum lock_policy policy;
	int ttl_ms;
	const char *worker_id;          /* copied; part of every token */
};

/* "redis", "skip-locked" or "auto", as the configuration spells them. */
const char *lock_policy_name(enum lock_policy policy);

/*
 * CONN is the loop's connection to Redis, borrowed (it must outlive the
 * manager), NULL only in skip-locked policy.  The manager decides when it
 * is reconnected, since its policy says what an outage means.
 */
int lock_new(const struct lock_options *o, redis_conn *conn, lockmgr **ret)
	__attribute__((warn_unused_result));
void lock_free(lockmgr *lm);

void lock_set_ttl(lockmgr *lm, int ttl_ms);

/*
 * Connects to Redis now (redis and auto policies), so a wrong address
 * shows in the log at start rather than at the first due item.  Never
 * fails: an unreachable Redis is logged and retried as the policy says.
 */
void lock_start(lockmgr *lm);

/*
 * Which way to take items now, under the policy and whether Redis is
 * connected.  Never connects (the loop does: below).  Costs nothing.
 */
enum lock_way lock_now(lockmgr *lm);

/*
 * True while Redis cannot be used: unreachable (the outage is logged
 * once) or its reconnect still under way.
 */
bool lock_redis_down(const lockmgr *lm);

/*
 * For the loop, which reconnects Redis without blocking
 * (redis_conn_connect_start, then redis_conn_drive from its poll): whether
 * a connect may start now (not connected, and the backoff allows: a dead
 * Redis costs one attempt per few seconds, not one per poll); when the
 * next may (INT64_MAX when none is needed); and the end of each attempt,
 * which logs the outage and the return once each and keeps the metrics.
 */
bool lock_redis_may_connect(const lockmgr *lm, int64_t now_ms);
int64_t lock_redis_retry_at(const lockmgr *lm);
void lock_redis_connected(lockmgr *lm);
void lock_redis_connect_failed(lockmgr *lm);

/*
 * Another user of the connection found Redis failing: logs the outage
 * (once) when the connection is gone, as a failed lock command would, and
 * makes the reason lock_errmsg().
 */
void lock_redis_failed(lockmgr *lm);

/*
 * Locks, in one round trip, at most MAX of the N candidates (KINDS[i],
 * IDS[i]), trying them in order.  Each candidate gets a fresh token in
 * TOKENS[i] (capacity N); GOT[i] says whether its lock is now ours for the
 * ttl.  Returns -1 when Redis failed (logged here, once per outage), with
 * the reason in lock_errmsg().
 */
int lock_acquire(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids,
    size_t n, size_t max, char (*tokens)[ITEM_TOKEN_MAX], bool *got)
	__attribute__((warn_unused_result));

/*
 * The same in steps, for a caller that sends it in one round trip with
 * another script call on the same connection (redis_conn_eval_many): the
 * call into EV (TOKENS are made here; the buffers are LM's until it ran),
 * then its answer into GOT, or, when the round trip failed,
 * lock_acquire_failed() to count the failure as lock_acquire() does.
 */
int lock_acquire_call(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids, size_t n,
    size_t max, char (*tokens)[ITEM_TOKEN_MAX], bool *got, struct redis_eval *ev)
	__attribute__((warn_unused_result));
void lock_acquire_done(lockmgr *lm, size_t n, bool *got);
void lock_acquire_failed(lockmgr *lm);

/*
 * Gives back the locks of the N candidates (KINDS[i], IDS[i]) that hold
 * TOKENS[i], best effort (they expire anyway), without waiting: the
 * release is sent and its answer read in a later drive of the connection.
 */
void lock_give_back(lockmgr *lm, const enum item_kind *kinds, const int64_t *ids,
    const char *const *tokens, size_t n);

/*
 * Extends the Redis lock of each of ITEMS that has one (a token) and has
 * not lost its claim, without waiting: one renewal in flight at a time
 * (lock_renewing(); a renewal asked for meanwhile is skipped).
 * lock_renew_poll() takes its answer at a later turn: a lock found gone
 * is logged, counted and no longer renewed (the token of its item, among
 * ITEMS, those in flight then, is cleared): the caller's lease still
 * fences it.
 */
void lock_renew(lockmgr *lm, struct item *const *items, size_t n);
bool lock_renewing(const lockmgr *lm);
void lock_renew_poll(lockmgr *lm, struct item *const *items, size_t n);

/* Gives back the Redis locks of ITEMS, best effort (they expire anyway), without waiting. */
void lock_release(lockmgr *lm, struct item *const *items, size_t n);

const char *lock_errmsg(const lockmgr *lm);

#endif

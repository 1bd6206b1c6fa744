#ifndef BW_FLEET_H
#define BW_FLEET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/redis.h"

/*
 * The fleet's API call budget (billing_api.max_requests_per_second), one
 * for every worker: a token bucket in Redis, on Redis' clock, with the
 * fleet-wide pause a 429 sets and the registry of live workers.  While
 * Redis cannot be asked each process paces itself at its even share,
 * rate / the workers last seen in the registry (struct pace).  The key
 * names ("rate:bucket", "rate:pause", "workers" after the prefix) and
 * their meaning are those of earlier releases, so a fleet in the middle of
 * an upgrade shares one budget.
 */
typedef struct fleet fleet;

/*
 * CONN is the loop's connection, borrowed (it must outlive the handle), or
 * NULL for a process that never asks Redis (skip-locked mode); MEMBER,
 * this worker's id in the registry, is copied.
 */
int fleet_new(redis_conn *conn, const char *member, fleet **ret)
	__attribute__((warn_unused_result));
void fleet_free(fleet *f);

/* Calls per second for the whole fleet; 0 = no limit. */
void fleet_set_rate(fleet *f, int calls_per_second);

/*
 * Grants up to WANT calls that may start now, out of OFFERED due items,
 * and spends them.  SHARED: from the fleet's bucket in Redis (honouring a
 * 429 pause, and counting this worker in the registry); otherwise from
 * this process's even share.  Returns -1 when Redis failed: nothing was
 * granted, the reason is redis_conn_errmsg(), and the caller may fall back
 * to a grant that is not shared.
 */
int fleet_grant(fleet *f, bool shared, size_t want, size_t offered, size_t *ret_granted)
	__attribute__((warn_unused_result));

/*
 * The shared grant in two steps, for a caller that sends it in one round
 * trip with another script call (redis_conn_eval_many): fleet_grant_call()
 * describes the call into EV (its buffers are F's until the next call);
 * after it ran, fleet_grant_done() reads its answer as fleet_grant() does.
 * While it failed, the caller falls back as for a failed fleet_grant().
 */
void fleet_grant_call(fleet *f, size_t want, size_t offered, struct redis_eval *ev);
void fleet_grant_done(fleet *f, size_t *ret_granted);

/* True when billing_api.max_requests_per_second sets a budget at all. */
bool fleet_limited(const fleet *f);

/*
 * How many workers asked for a grant within the last 10 s, this one
 * included, as the last shared grant counted them; 0 before the first.
 */
int fleet_workers(const fleet *f);

/*
 * At a clean stop: this worker out of the registry, so the others' share
 * of the rate and their candidate window follow at once rather than 10 s
 * later.  Waits for Redis (redis.command_timeout_ms at most); best effort.
 */
void fleet_leave(fleet *f);

/*
 * After a shared grant of which UNUSED calls were not started (their items
 * could not be locked): puts them back in the fleet's bucket, so a claim
 * spends only the calls it makes.  Best effort; no-op when UNUSED is 0.
 */
void fleet_give_back(fleet *f, size_t unused);

/*
 * After fleet_grant() (and fleet_give_back()): how long until more calls
 * may start (the budget is spent or a 429 pause is in force), 0 now.
 */
int64_t fleet_wait_ms(const fleet *f);

/*
 * A 429: no worker of the fleet starts a call for PAUSE_MS; this process
 * honours it even when Redis cannot be told.
 */
void fleet_pause(fleet *f, int pause_ms);

#endif

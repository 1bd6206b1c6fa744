#ifndef BW_METRICS_H
#define BW_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "common/item.h"

/*
 * What this process has done, as Prometheus counters, gauges and two
 * histograms.  Process-wide state, like the log: the worker is one thread,
 * so the increments are plain additions, and any module may count without
 * a handle being passed down to it.  Every series exists from the start
 * with value 0, so rate() and absent() work before the first event.
 *
 * Nothing here does I/O; worker/metrics_http.c serves metrics_render().
 */

/* An item's outcome was recorded: DONE is paid / redeemed, else failed. */
void metrics_item_finished(enum item_kind kind, bool done);
/* An item was recorded as pending again, with a retry scheduled. */
void metrics_retry_scheduled(enum item_kind kind);
/* A fenced completion matched no row: the claim had gone to another worker. */
void metrics_completion_rejected(enum item_kind kind);

/* One finished API call: its HTTP status (0 when none came) and latency. */
void metrics_api_call(long http_status, double latency_ms);

/*
 * One turn of the event loop took SECONDS outside its wait (from the
 * return of the poll to the next one): the time no API answer is read and
 * no timer is looked at.  Also keeps the longest seen.
 */
void metrics_loop_stall(double seconds);

enum metrics_lock_event {
	METRICS_LOCK_ACQUIRED,          /* a claim taken (lease in the database) */
	METRICS_LOCK_CONTENDED,         /* a due item another worker took first */
	METRICS_LOCK_LOST_LEASE,        /* a held claim's lease went to another worker */
	METRICS_LOCK_LOST_REDIS,        /* a held Redis lock expired or was taken */
	METRICS_LOCK_EVENT_COUNT,
};
void metrics_lock(enum metrics_lock_event ev, size_t n);

enum metrics_peer {
	METRICS_PEER_DATABASE,
	METRICS_PEER_REDIS,
	METRICS_PEER_COUNT,
};
/* A connection to PEER came back after it had been lost. */
void metrics_reconnect(enum metrics_peer peer);

void metrics_set_in_flight(int n);
void metrics_set_concurrency(int n);
void metrics_set_database_up(bool up);
/* Whether the billing API refuses this worker (401, 403, 404, 405) now. */
void metrics_set_api_blocked(bool blocked);
/* Whether the fleet's billing of KIND is paused (billing-worker pause). */
void metrics_set_paused(enum item_kind kind, bool paused);
/*
 * Whether this process's Redis connection is up.  Never set in skip-locked
 * mode, where it stays 0: billing_worker_lock_mode tells the two apart.
 */
void metrics_set_redis_up(bool up);
/*
 * The lock mode in force, as config_lock_mode_name() spells it.  NAME must
 * live as long as the process (a string literal); rendered as
 * billing_worker_lock_mode{mode="NAME"} 1, absent until set.
 */
void metrics_set_lock_mode(const char *name);
/*
 * A claim round succeeded (whether or not it found items), at UNIX_S
 * seconds since the epoch: the wall clock, since the value is compared with
 * Prometheus' time().  0 until the first one.
 */
void metrics_set_last_poll(int64_t unix_s);
/*
 * The backlog of KIND: items due now (capped by the query that counts
 * them) and the age of the oldest pending item in seconds.
 */
void metrics_set_backlog(enum item_kind kind, int64_t due, double oldest_pending_s);

/*
 * Renders every metric in the Prometheus text exposition format (0.0.4)
 * into a malloc'd, NUL-terminated buffer the caller frees.  Returns 0, or
 * -1 without memory.
 */
int metrics_render(char **ret, size_t *ret_len) __attribute__((warn_unused_result));

/* Back to zero; for tests. */
void metrics_reset(void);

#endif

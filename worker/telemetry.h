#ifndef BW_TELEMETRY_H
#define BW_TELEMETRY_H

#include <stdbool.h>
#include <stdint.h>

#include "billing/api.h"
#include "config/config.h"
#include "store/store.h"

/*
 * What the outside sees of a running worker, kept out of the event loop's
 * way: systemd notifications (worker/notify.c), the metrics endpoint
 * (worker/metrics_http.c) and the gauges that cost a query (the backlog).
 * The loop calls these at a few points; each is cheap when its feature is
 * off (no $NOTIFY_SOCKET, metrics.listen empty).
 */
typedef struct telemetry telemetry;

/*
 * Sets up notifications and, unless ONCE, the metrics endpoint on
 * metrics.listen.  Returns -1 (logged) when the endpoint cannot listen.
 */
int telemetry_new(const struct bw_config *cfg, bool once, telemetry **ret)
	__attribute__((warn_unused_result));
/*
 * The backlog gauges cost a query, which the loop runs: wanted when a
 * scrape or the status line found the last answer stale; asked for when
 * the loop sent it; and the answer, when it came, in store_backlog()'s
 * form.  Meanwhile the gauges keep the last answer.
 */
bool telemetry_backlog_wanted(const telemetry *t);
void telemetry_backlog_asked(telemetry *t, int64_t now_ms);
void telemetry_backlog(telemetry *t, const int64_t due[ITEM_KIND_COUNT],
    const double oldest_pending_s[ITEM_KIND_COUNT]);
void telemetry_free(telemetry *t);

/* Connected and the schema checked: READY=1. */
void telemetry_ready(telemetry *t, int64_t now_ms);
/* Still waiting for the database at start; keeps the watchdog fed. */
void telemetry_waiting(telemetry *t, int64_t now_ms, const char *why);
/* Once per loop turn: watchdog, gauges, the STATUS= line. */
void telemetry_tick(telemetry *t, int64_t now_ms, int in_flight, int concurrency,
    bool db_up);
/*
 * Counts one outcome the store was asked to record: ACCEPTED false means
 * the fenced completion matched no row (the claim had passed on).
 */
void telemetry_recorded(enum item_kind kind, enum completion_state state, bool accepted);
void telemetry_reloading(telemetry *t);
void telemetry_reloaded(telemetry *t);
void telemetry_stopping(telemetry *t, int in_flight);
/*
 * The billing API refuses this worker for REASON (copied), or with NULL no
 * longer does: the systemd status line says so from now on.
 */
void telemetry_api_refused(telemetry *t, const char *reason);
/* The fleet's billing of KIND is paused (NOTE, copied), or with NULL resumed. */
void telemetry_paused(telemetry *t, enum item_kind kind, const char *note);

/*
 * Adds the descriptors to wait on to FDS (room for at least 1) and returns
 * how many; lowers *WAIT_MS to the longest the loop may sleep.
 */
unsigned telemetry_wait_fds(telemetry *t, int64_t now_ms, struct api_waitfd *fds,
    int *wait_ms);
/* After every wait: serves scrapes that are ready. */
void telemetry_after_wait(telemetry *t);

#endif

#include "worker/telemetry.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/metrics.h"
#include "worker/metrics_http.h"
#include "worker/notify.h"

/*
 * How stale the backlog may be: a scrape refreshes it at most this often,
 * so several Prometheus servers scraping every few seconds cost one query;
 * the systemd STATUS line refreshes it on its own, more rarely.
 */
#define BACKLOG_SCRAPE_MAX_AGE_MS 5000
#define BACKLOG_STATUS_MAX_AGE_MS 15000
#define STATUS_EVERY_MS 2000

struct telemetry {
	metrics_http *http;
	bool stopping;
	bool backlog_known;
	bool backlog_wanted;    /* stale: the loop is to ask the database */
	int64_t backlog_at_ms;  /* when it was last asked for */
	int64_t due[ITEM_KIND_COUNT];
	double oldest_s[ITEM_KIND_COUNT];
	int64_t status_at_ms;
	int64_t now_ms;         /* the loop's clock at the last tick */
	int in_flight, concurrency;
	char refused[600];      /* why the billing API refuses this worker; "" if it does not */
	char paused[ITEM_KIND_COUNT][600]; /* why each kind is paused; "" if it is not */
};

/*
 * Wants the backlog asked for again when it was last asked for more than
 * MAX_AGE_MS ago.  The loop runs the query (telemetry_backlog_asked()) and
 * hands the answer in when it comes (telemetry_backlog()); meanwhile the
 * gauges show the last answer.  A query that failed or never came back is
 * not asked again before MAX_AGE_MS either.
 */
static void
refresh_backlog(telemetry *t, int64_t now, int64_t max_age_ms)
{
	if (t->backlog_at_ms != 0 && now - t->backlog_at_ms < max_age_ms)
		return;
	t->backlog_wanted = true;
}

bool
telemetry_backlog_wanted(const telemetry *t)
{
	return t->backlog_wanted;
}

void
telemetry_backlog_asked(telemetry *t, int64_t now_ms)
{
	t->backlog_wanted = false;
	t->backlog_at_ms = now_ms;
}

void
telemetry_backlog(telemetry *t, const int64_t due[ITEM_KIND_COUNT],
    const double oldest_pending_s[ITEM_KIND_COUNT])
{
	t->backlog_known = true;
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		t->due[k] = due[k];
		t->oldest_s[k] = oldest_pending_s[k];
		metrics_set_backlog(k, due[k], oldest_pending_s[k]);
	}
}

static void
on_scrape(void *arg)
{
	telemetry *t = arg;

	/* The tick's clock is at most one loop turn old: close enough for a 5 s cache. */
	refresh_backlog(t, t->now_ms, BACKLOG_SCRAPE_MAX_AGE_MS);
}

int
telemetry_new(const struct bw_config *cfg, bool once, telemetry **ret)
{
	telemetry *t;
	char err[256];

	if ((t = calloc(1, sizeof(*t))) == NULL) {
		log_error("out of memory");
		return -1;
	}
	notify_init();
	if (!once && cfg->metrics.listen[0] != '\0') {
		if (metrics_http_start(cfg->metrics.listen, on_scrape, t, &t->http, err,
		    sizeof(err)) == -1) {
			log_error("metrics endpoint: %s", err);
			free(t);
			return -1;
		}
		log_info("serving metrics on http://%s/metrics", cfg->metrics.listen);
	}
	*ret = t;
	return 0;
}

void
telemetry_free(telemetry *t)
{
	if (t == NULL)
		return;
	metrics_http_stop(t->http);
	free(t);
}

static void
send_status(telemetry *t, int64_t now)
{
	char backlog[160] = "";

	if (!notify_enabled() || now - t->status_at_ms < STATUS_EVERY_MS)
		return;
	t->status_at_ms = now;
	if (t->stopping) {
		notify_status("stopping: %d in flight", t->in_flight);
		return;
	}
	if (t->refused[0] != '\0') {
		notify_status("taking no new items: the billing API refuses this worker: %s; "
		    "probing with backoff", t->refused);
		return;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		if (t->paused[k][0] == '\0')
			continue;
		notify_status("paused: %ss: %s%s; in flight %d", item_kind_name(k), t->paused[k],
		    t->paused[1 - k][0] != '\0' ? " (both kinds)" : "", t->in_flight);
		return;
	}
	refresh_backlog(t, now, BACKLOG_STATUS_MAX_AGE_MS);
	if (t->backlog_known)
		snprintf(backlog, sizeof(backlog), "; due: %" PRId64 " invoices, %" PRId64
		    " redemptions; oldest pending %.0f s", t->due[ITEM_INVOICE],
		    t->due[ITEM_REDEMPTION], t->oldest_s[ITEM_INVOICE] > t->oldest_s[ITEM_REDEMPTION] ?
		    t->oldest_s[ITEM_INVOICE] : t->oldest_s[ITEM_REDEMPTION]);
	notify_status("in flight %d of %d%s", t->in_flight, t->concurrency, backlog);
}

void
telemetry_ready(telemetry *t, int64_t now_ms)
{
	notify_ready();
	t->status_at_ms = now_ms - STATUS_EVERY_MS;     /* the first STATUS at once */
	metrics_set_database_up(true);
}

void
telemetry_waiting(telemetry *t, int64_t now_ms, const char *why)
{
	notify_watchdog(now_ms);
	notify_status("waiting for the database: %s", why);
	/* The start-up wait polls every 50 ms: scrapes are answered, with database_up 0. */
	metrics_set_database_up(false);
	telemetry_after_wait(t);
}

void
telemetry_tick(telemetry *t, int64_t now_ms, int in_flight, int concurrency, bool db_up)
{
	notify_watchdog(now_ms);
	t->now_ms = now_ms;
	t->in_flight = in_flight;
	t->concurrency = concurrency;
	metrics_set_in_flight(in_flight);
	metrics_set_concurrency(concurrency);
	metrics_set_database_up(db_up);
	send_status(t, now_ms);
}

void
telemetry_recorded(enum item_kind kind, enum completion_state state, bool accepted)
{
	if (!accepted)
		metrics_completion_rejected(kind);
	else if (state == COMPLETION_RETRY)
		metrics_retry_scheduled(kind);
	else
		metrics_item_finished(kind, state == COMPLETION_DONE);
}

void
telemetry_api_refused(telemetry *t, const char *reason)
{
	snprintf(t->refused, sizeof(t->refused), "%s", reason != NULL ? reason : "");
	t->status_at_ms = t->now_ms - STATUS_EVERY_MS;  /* the next tick tells systemd */
}

void
telemetry_paused(telemetry *t, enum item_kind kind, const char *note)
{
	snprintf(t->paused[kind], sizeof(t->paused[kind]), "%s", note != NULL ? note : "");
	t->status_at_ms = t->now_ms - STATUS_EVERY_MS;
}

void
telemetry_reloading(telemetry *t)
{
	(void)t;
	notify_reloading();
}

void
telemetry_reloaded(telemetry *t)
{
	(void)t;
	notify_ready();
}

void
telemetry_stopping(telemetry *t, int in_flight)
{
	t->stopping = true;
	t->in_flight = in_flight;
	notify_stopping();
	notify_status("stopping: %d in flight", in_flight);
}

unsigned
telemetry_wait_fds(telemetry *t, int64_t now_ms, struct api_waitfd *fds, int *wait_ms)
{
	int w = notify_watchdog_wait_ms(now_ms);

	if (w >= 0 && w < *wait_ms)
		*wait_ms = w;
	if (t->http == NULL)
		return 0;
	w = metrics_http_wait_ms(t->http);
	if (w >= 0 && w < *wait_ms)
		*wait_ms = w;
	fds[0].fd = metrics_http_fd(t->http);
	fds[0].events = POLLIN;
	fds[0].revents = 0;
	return 1;
}

void
telemetry_after_wait(telemetry *t)
{
	if (t->http != NULL)
		metrics_http_run(t->http);
}

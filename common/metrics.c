#include "common/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Buckets of the API latency histogram, in seconds (le), ending in +Inf. */
static const double latency_le[] = {
	0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
};
#define N_LE (sizeof(latency_le) / sizeof(latency_le[0]))

/*
 * Buckets of the loop stall histogram: a healthy turn is tens of
 * microseconds to a few milliseconds, a statement waiting on a frozen peer
 * is seconds, so 0.1 ms to 10 s in steps of about 2.5.
 */
static const double stall_le[] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
	1, 2.5, 5, 10,
};
#define N_STALL_LE (sizeof(stall_le) / sizeof(stall_le[0]))

enum api_class {
	CLASS_2XX,
	CLASS_4XX,
	CLASS_5XX,
	CLASS_OTHER,            /* 1xx, 3xx: the API never sends them */
	CLASS_NONE,             /* no HTTP answer: refused, timed out, cut */
	CLASS_COUNT,
};

static const char *const class_names[CLASS_COUNT] = { "2xx", "4xx", "5xx", "other", "none" };
static const char *const done_names[ITEM_KIND_COUNT] = { "paid", "redeemed" };
static const char *const lock_names[METRICS_LOCK_EVENT_COUNT] = {
	"acquisitions", "contentions", "lease", "redis",
};
static const char *const peer_names[METRICS_PEER_COUNT] = { "database", "redis" };

static struct {
	uint64_t finished[ITEM_KIND_COUNT][2];  /* [kind][0 failed, 1 done] */
	uint64_t retries[ITEM_KIND_COUNT];
	uint64_t rejected[ITEM_KIND_COUNT];
	uint64_t calls[CLASS_COUNT];
	uint64_t latency_bucket[N_LE + 1];      /* not cumulative; last is +Inf */
	double latency_sum_s;
	uint64_t stall_bucket[N_STALL_LE + 1];  /* not cumulative; last is +Inf */
	double stall_sum_s;
	double stall_max_s;
	uint64_t locks[METRICS_LOCK_EVENT_COUNT];
	uint64_t reconnects[METRICS_PEER_COUNT];
	int in_flight;
	int concurrency;
	bool database_up;
	bool api_blocked;
	bool paused[ITEM_KIND_COUNT];
	bool redis_up;
	const char *lock_mode;                  /* static; NULL until set */
	int64_t last_poll_s;
	bool backlog_known[ITEM_KIND_COUNT];
	int64_t backlog[ITEM_KIND_COUNT];
	double oldest_pending_s[ITEM_KIND_COUNT];
} m;

void
metrics_reset(void)
{
	memset(&m, 0, sizeof(m));
}

void
metrics_item_finished(enum item_kind kind, bool done)
{
	m.finished[kind][done ? 1 : 0]++;
}

void
metrics_retry_scheduled(enum item_kind kind)
{
	m.retries[kind]++;
}

void
metrics_completion_rejected(enum item_kind kind)
{
	m.rejected[kind]++;
}

void
metrics_api_call(long http_status, double latency_ms)
{
	enum api_class c = CLASS_OTHER;
	double s = latency_ms / 1000.0;
	size_t b = 0;

	if (http_status == 0)
		c = CLASS_NONE;
	else if (http_status >= 200 && http_status < 300)
		c = CLASS_2XX;
	else if (http_status >= 400 && http_status < 500)
		c = CLASS_4XX;
	else if (http_status >= 500 && http_status < 600)
		c = CLASS_5XX;
	m.calls[c]++;
	while (b < N_LE && s > latency_le[b])
		b++;
	m.latency_bucket[b]++;
	m.latency_sum_s += s;
}

void
metrics_loop_stall(double seconds)
{
	size_t b = 0;

	if (seconds < 0)
		seconds = 0;
	while (b < N_STALL_LE && seconds > stall_le[b])
		b++;
	m.stall_bucket[b]++;
	m.stall_sum_s += seconds;
	if (seconds > m.stall_max_s)
		m.stall_max_s = seconds;
}

void
metrics_lock(enum metrics_lock_event ev, size_t n)
{
	m.locks[ev] += n;
}

void
metrics_reconnect(enum metrics_peer peer)
{
	m.reconnects[peer]++;
}

void
metrics_set_in_flight(int n)
{
	m.in_flight = n;
}

void
metrics_set_concurrency(int n)
{
	m.concurrency = n;
}

void
metrics_set_api_blocked(bool blocked)
{
	m.api_blocked = blocked;
}

void
metrics_set_paused(enum item_kind kind, bool paused)
{
	m.paused[kind] = paused;
}

void
metrics_set_redis_up(bool up)
{
	m.redis_up = up;
}

void
metrics_set_lock_mode(const char *name)
{
	m.lock_mode = name;
}

void
metrics_set_last_poll(int64_t unix_s)
{
	m.last_poll_s = unix_s;
}

void
metrics_set_database_up(bool up)
{
	m.database_up = up;
}

void
metrics_set_backlog(enum item_kind kind, int64_t due, double oldest_pending_s)
{
	m.backlog_known[kind] = true;
	m.backlog[kind] = due;
	m.oldest_pending_s[kind] = oldest_pending_s;
}

static void
head(FILE *out, const char *name, const char *type, const char *help)
{
	fprintf(out, "# HELP billing_worker_%s %s\n# TYPE billing_worker_%s %s\n",
	    name, help, name, type);
}

static void
render_items(FILE *out)
{
	head(out, "items_finished_total", "counter",
	    "Items whose final outcome this process recorded, by kind and outcome.");
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		fprintf(out, "billing_worker_items_finished_total{kind=\"%s\",outcome=\"%s\"} %llu\n",
		    item_kind_name(k), done_names[k], (unsigned long long)m.finished[k][1]);
		fprintf(out, "billing_worker_items_finished_total{kind=\"%s\",outcome=\"failed\"} %llu\n",
		    item_kind_name(k), (unsigned long long)m.finished[k][0]);
	}
	head(out, "retries_scheduled_total", "counter",
	    "Attempts recorded as pending again with a retry scheduled, by kind.");
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		fprintf(out, "billing_worker_retries_scheduled_total{kind=\"%s\"} %llu\n",
		    item_kind_name(k), (unsigned long long)m.retries[k]);
	head(out, "completions_rejected_total", "counter",
	    "Fenced completions that matched no row because the claim had passed to "
	    "another worker, by kind.");
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		fprintf(out, "billing_worker_completions_rejected_total{kind=\"%s\"} %llu\n",
		    item_kind_name(k), (unsigned long long)m.rejected[k]);
}

/* The _bucket, _sum and _count lines of histogram NAME from its raw buckets. */
static void
render_histogram(FILE *out, const char *name, const double *le, size_t n_le,
    const uint64_t *bucket, double sum)
{
	uint64_t cum = 0;

	for (size_t b = 0; b < n_le; b++) {
		cum += bucket[b];
		fprintf(out, "billing_worker_%s_bucket{le=\"%g\"} %llu\n", name, le[b],
		    (unsigned long long)cum);
	}
	cum += bucket[n_le];
	fprintf(out, "billing_worker_%s_bucket{le=\"+Inf\"} %llu\n", name,
	    (unsigned long long)cum);
	fprintf(out, "billing_worker_%s_sum %.6f\n", name, sum);
	fprintf(out, "billing_worker_%s_count %llu\n", name, (unsigned long long)cum);
}

static void
render_api(FILE *out)
{

	head(out, "api_calls_total", "counter",
	    "Billing API calls finished, by HTTP status class (none: no HTTP answer).");
	for (int c = 0; c < CLASS_COUNT; c++)
		fprintf(out, "billing_worker_api_calls_total{class=\"%s\"} %llu\n",
		    class_names[c], (unsigned long long)m.calls[c]);
	head(out, "api_call_duration_seconds", "histogram",
	    "Billing API call latency, from start to the last byte or the error.");
	render_histogram(out, "api_call_duration_seconds", latency_le, N_LE, m.latency_bucket,
	    m.latency_sum_s);
}

static void
render_loop(FILE *out)
{
	head(out, "loop_stall_seconds", "histogram",
	    "Time the event loop spent on each turn outside its wait: statements, Redis "
	    "commands and bookkeeping, during which no API answer is read.");
	render_histogram(out, "loop_stall_seconds", stall_le, N_STALL_LE, m.stall_bucket,
	    m.stall_sum_s);
	head(out, "loop_stall_max_seconds", "gauge",
	    "The longest turn of the event loop outside its wait since the process started.");
	fprintf(out, "billing_worker_loop_stall_max_seconds %.6f\n", m.stall_max_s);
}

static void
render_locks(FILE *out)
{
	head(out, "lock_acquisitions_total", "counter",
	    "Items claimed (fenced lease taken in the database).");
	fprintf(out, "billing_worker_lock_acquisitions_total %llu\n",
	    (unsigned long long)m.locks[METRICS_LOCK_ACQUIRED]);
	head(out, "lock_contentions_total", "counter",
	    "Due items this process tried to take that another worker held.");
	fprintf(out, "billing_worker_lock_contentions_total %llu\n",
	    (unsigned long long)m.locks[METRICS_LOCK_CONTENDED]);
	head(out, "lock_losses_total", "counter",
	    "Claims lost while held: the database lease, or the Redis lock alone.");
	for (int e = METRICS_LOCK_LOST_LEASE; e <= METRICS_LOCK_LOST_REDIS; e++)
		fprintf(out, "billing_worker_lock_losses_total{lock=\"%s\"} %llu\n",
		    lock_names[e], (unsigned long long)m.locks[e]);
	head(out, "reconnects_total", "counter",
	    "Connections re-established after being lost, by peer.");
	for (int p = 0; p < METRICS_PEER_COUNT; p++)
		fprintf(out, "billing_worker_reconnects_total{peer=\"%s\"} %llu\n",
		    peer_names[p], (unsigned long long)m.reconnects[p]);
}

static void
render_gauges(FILE *out)
{
	/*
	 * The "info" pattern: a constant 1 whose label says which build
	 * runs, so a dashboard can join it to any other series by instance
	 * and tell which hosts a rollout has reached.
	 */
	head(out, "build_info", "gauge", "The version of this billing-worker binary (always 1).");
	fprintf(out, "billing_worker_build_info{version=\"%s\"} 1\n", BW_VERSION);
	head(out, "in_flight", "gauge", "Items claimed by this process and not yet recorded.");
	fprintf(out, "billing_worker_in_flight %d\n", m.in_flight);
	head(out, "concurrency", "gauge", "worker.concurrency now in force.");
	fprintf(out, "billing_worker_concurrency %d\n", m.concurrency);
	head(out, "database_up", "gauge", "1 while the database connection is up.");
	fprintf(out, "billing_worker_database_up %d\n", m.database_up ? 1 : 0);
	head(out, "api_blocked", "gauge", "1 while the billing API refuses this worker "
	    "(401, 403, 404, 405): no new items are taken.");
	fprintf(out, "billing_worker_api_blocked %d\n", m.api_blocked ? 1 : 0);
	head(out, "paused", "gauge", "1 while the fleet's billing of this kind is paused "
	    "(billing-worker pause), as this process last saw it.");
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		fprintf(out, "billing_worker_paused{kind=\"%s\"} %d\n", item_kind_name(k),
		    m.paused[k] ? 1 : 0);
	head(out, "redis_up", "gauge", "1 while the Redis connection is up "
	    "(always 0 in skip-locked mode).");
	fprintf(out, "billing_worker_redis_up %d\n", m.redis_up ? 1 : 0);
	head(out, "lock_mode", "gauge", "The lock mode in force (locks.mode), as a label; "
	    "always 1.");
	if (m.lock_mode != NULL)
		fprintf(out, "billing_worker_lock_mode{mode=\"%s\"} 1\n", m.lock_mode);
	head(out, "last_poll_timestamp_seconds", "gauge",
	    "Unix time of the last successful claim round, items found or not (0: none yet).");
	fprintf(out, "billing_worker_last_poll_timestamp_seconds %lld\n",
	    (long long)m.last_poll_s);
	head(out, "backlog", "gauge",
	    "Items due now and not yet claimed, fleet-wide, by kind (counted up to a cap).");
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (m.backlog_known[k])
			fprintf(out, "billing_worker_backlog{kind=\"%s\"} %lld\n",
			    item_kind_name(k), (long long)m.backlog[k]);
	head(out, "oldest_pending_age_seconds", "gauge",
	    "Age of the oldest pending item, fleet-wide, by kind (0 when none).");
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (m.backlog_known[k])
			fprintf(out, "billing_worker_oldest_pending_age_seconds{kind=\"%s\"} %.1f\n",
			    item_kind_name(k), m.oldest_pending_s[k]);
}

int
metrics_render(char **ret, size_t *ret_len)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *out = open_memstream(&buf, &len);

	if (out == NULL)
		return -1;
	render_items(out);
	render_api(out);
	render_loop(out);
	render_locks(out);
	render_gauges(out);
	if (fclose(out) != 0) {
		free(buf);
		return -1;
	}
	*ret = buf;
	*ret_len = len;
	return 0;
}

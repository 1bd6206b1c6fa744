/*
 * Unit tests for worker/loop.c's bookkeeping: flights and their slots, the
 * flush and its backoff, claim sizing, worker-level refusals.  The loop is
 * linked against small fakes of the modules it drives (the store, the lock
 * manager, the Redis connection, the fleet's rate budget, the claim step,
 * the API client, telemetry, secrets), defined
 * below: a scripted backlog of invoices that the fake claim step hands
 * out, an API that answers every call at the next turn, a store that
 * records completions and can refuse them.  Real outcome, config, log and metrics modules.
 */

#include <inttypes.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "billing/api.h"
#include "common/clock.h"
#include "common/log.h"
#include "locks/lock.h"
#include "store/store.h"
#include "worker/claim.h"
#include "worker/loop.h"
#include "worker/secret.h"
#include "store/report.h"
#include "worker/telemetry.h"

#define BACKLOG_MAX 256
#define CALLS_MAX 1024
#define ANSWERED_MAX 4096

/* The claim and the completion batch in flight (the asynchronous fakes below). */
static size_t claim_limit;
static bool claim_pending, claim_looked;
static const struct completion *sent_batch;
static size_t sent_n;
static bool sent_pending;
static int sent_looked;
static int64_t sent_at_ms;
static size_t reserve_n;
static bool reserve_pending;
static int reserve_looked;

/* The scripted world the fakes share; reset by world_reset(). */
static struct {
	int64_t due[BACKLOG_MAX];       /* ids still due, oldest first */
	size_t ndue;
	int64_t poison[8];              /* completions of these fail on the data */
	size_t npoison;
	long answer_status;             /* the API's answer to every call */
	int64_t refuse_flush_until_ms;  /* completions fail (not on data) until then */
	bool data_error;                /* the last store failure was on the data */

	int calls[CALLS_MAX];           /* tags of calls in flight, FIFO */
	size_t ncalls;
	size_t in_flight_max;
	size_t busy_items;              /* claimed, not yet recorded or parked */
	size_t answered_items;          /* of those, the ones whose call is over */
	size_t calls_while_recording;   /* most calls in flight seen while a batch was */
	int64_t call_ids[CALLS_MAX];    /* the items of calls[] */
	bool answered[ANSWERED_MAX];    /* by item id */
	size_t busy_max;
	size_t claim_over_limit;        /* claims that asked beyond free room */
	int batch_looks;                /* looks before a batch is answered (default 1) */

	size_t recorded_done, recorded_retry, parked, complete_calls, api_started, zero_waits;
	size_t aborted;
	int shutdown_timeout_ms;        /* worker.shutdown_timeout_ms; 0: 30 s, -1: 0 */
	bool hold_answers;              /* the API answers nothing until it is cleared */
	bool whole_waits;               /* held answers: a wait sleeps all it is given, not 50 ms */
	size_t refuse_after;            /* answers before the API refuses the worker (0: never) */
	size_t answers;                 /* calls answered so far */
	size_t started_after_refusal;   /* calls started once a refusal was answered */
	int poll_interval_ms;           /* worker.poll_interval_ms; 0: 10 */
	int reserve_looks;              /* looks before a reservation is answered (default 1) */
	int64_t lost_first, lost_last;  /* redemptions whose claim is lost before their hold */
	int64_t lost_at_ms;             /* when their reservation was answered */
	int64_t started_ms[ANSWERED_MAX];       /* when each item's call started, by id */
	size_t stop_at_call;            /* SIGTERM as this call starts (0: never) */
	int concurrency;
	int ahead;                      /* how far claims may run ahead of the calls */
	size_t calls_over_limit;        /* calls started beyond concurrency */
	size_t claims_ahead;            /* claims for more than the free call slots */
	size_t answers_per_wait;        /* the API answers at most this many a wait (0: all) */
	int batch_ms;                   /* a batch is answered this long after it was sent (0: by looks) */
	size_t spins_while_recording;   /* waits of 0 ms with nothing to wait for but a batch */
	size_t answered_this_wait;
	size_t waits_without_claim;     /* waits with work due and room, but no claim out */
	int call_ms;                    /* a call is answered this long after it started (0: next wait) */
	int64_t call_started_ms[CALLS_MAX];     /* of calls[] */
	size_t spins_while_calling;     /* waits of 0 ms with only calls to wait for, none due */
} w;

/*
 * An item's call is over (answered or aborted): the loop no longer counts
 * it against worker.concurrency, only against its flights (twice that).
 */
static void
settle(int64_t id)
{
	assert_true(id >= 0 && id < ANSWERED_MAX);
	if (!w.answered[id]) {
		w.answered[id] = true;
		w.answered_items++;
	}
}

/* Its outcome is recorded or parked: the flight is free. */
static void
unsettle(int64_t id)
{
	if (id >= 0 && id < ANSWERED_MAX && w.answered[id]) {
		w.answered[id] = false;
		w.answered_items--;
	}
}

static void
world_reset(void)
{
	memset(&w, 0, sizeof(w));
	claim_pending = sent_pending = false;
	reserve_pending = false;
	w.answer_status = 200;
}

static bool
is_poison(int64_t id)
{
	for (size_t i = 0; i < w.npoison; i++)
		if (w.poison[i] == id)
			return true;
	return false;
}

/* ---- the store ---- */

struct store {
	int unused;
};
static struct store the_store;

int
store_new(const char *conninfo, const char *worker_id, store **ret)
{
	(void)conninfo;
	(void)worker_id;
	*ret = &the_store;
	return 0;
}

void store_free(store *st) { (void)st; }
void store_set_query_timeout(store *st, int ms) { (void)st; (void)ms; }
void store_set_history(store *st, bool on) { (void)st; (void)on; }
void store_set_pooling(store *st, bool transaction) { (void)st; (void)transaction; }
void store_set_pipeline(store *st, bool on) { (void)st; (void)on; }
int store_prune_history(store *st, int d, int l, int *n) { (void)st; (void)d; (void)l; *n = 0; return 0; }
int store_connect(store *st) { (void)st; return 0; }
int store_connect_start(store *st) { (void)st; return -1; }
bool store_connecting(const store *st) { (void)st; return false; }
int store_connect_fd(const store *st) { (void)st; return -1; }
short store_connect_events(const store *st) { (void)st; return 0; }
int64_t store_connect_deadline(const store *st) { (void)st; return INT64_MAX; }
int store_connect_drive(store *st, short r, int64_t now) { (void)st; (void)r; (void)now; return -1; }
bool store_connected(const store *st) { (void)st; return true; }
const char *store_errmsg(const store *st) { (void)st; return "fake store error"; }
uint64_t store_retries(const store *st) { (void)st; return 0; }
int store_check_schema(store *st) { (void)st; return 0; }
bool store_failed_on_data(const store *st) { (void)st; return w.data_error; }
const char *store_pause_note(const store *st, enum item_kind k) { (void)st; (void)k; return ""; }

int
store_worker_seen(store *st, const struct worker_info *wi, const char *refused)
{
	(void)st;
	(void)wi;
	(void)refused;
	return 0;
}

int store_worker_gone(store *st, const char *id) { (void)st; (void)id; return 0; }

int
store_complete(store *st, const struct completion *c, size_t n, bool *accepted)
{
	(void)st;
	w.complete_calls++;
	w.data_error = false;
	if (clock_ms() < w.refuse_flush_until_ms)
		return -1;
	for (size_t i = 0; i < n; i++) {
		if (is_poison(c[i].id)) {
			w.data_error = true;
			return -1;
		}
	}
	for (size_t i = 0; i < n; i++) {
		accepted[i] = true;
		w.busy_items--;
		unsettle(c[i].id);
		if (c[i].state == COMPLETION_DONE)
			w.recorded_done++;
		else if (c[i].state == COMPLETION_RETRY)
			w.recorded_retry++;
		if (c[i].state == COMPLETION_RETRY && w.ndue < BACKLOG_MAX)
			w.due[w.ndue++] = c[i].id;     /* due again */
	}
	return 0;
}

/*
 * The asynchronous batch: sent now, answered at the first look after a
 * later turn's wait, as a real connection answers after the loop polled.
 */

int
store_complete_send(store *st, const struct completion *c, size_t n)
{
	(void)st;
	/* One batch in flight at a time: a second would overwrite the first. */
	if (sent_pending)
		fail_msg("a completion batch sent while another is in flight");
	sent_batch = c;
	sent_n = n;
	sent_pending = true;
	sent_looked = 0;
	sent_at_ms = clock_ms();
	return 0;
}

bool store_complete_pending(const store *st) { (void)st; return sent_pending; }

int
store_complete_take(store *st, bool *accepted)
{
	if (w.batch_ms > 0 ? clock_ms() < sent_at_ms + w.batch_ms :
	    sent_looked < (w.batch_looks > 0 ? w.batch_looks : 1)) {
		sent_looked++;
		return 0;
	}
	sent_pending = false;
	return store_complete(st, sent_batch, sent_n, accepted) == 0 ? 1 : -1;
}

int store_fd(const store *st) { (void)st; return -1; }
short store_events(const store *st) { (void)st; return 0; }
/*
 * An answer in flight (a batch, a claim) comes at a later look: due now.
 * A batch answered by the clock (batch_ms) wakes the loop as its socket
 * would, when it comes.
 */
int64_t
store_deadline(const store *st)
{
	(void)st;
	if (claim_pending)
		return clock_ms();
	if (sent_pending)
		return w.batch_ms > 0 ? sent_at_ms + w.batch_ms : clock_ms();
	return INT64_MAX;
}
void store_drive(store *st, short r, int64_t now) { (void)st; (void)r; (void)now; }

int
store_park(store *st, const struct completion *c, int64_t delay_ms, const char *reason,
    bool *ret_parked)
{
	(void)st;
	(void)c;
	(void)delay_ms;
	(void)reason;
	w.parked++;
	w.busy_items--;
	unsettle(c->id);
	*ret_parked = true;
	return 0;
}

/* Reservations: every one holds, answered at the second look. */
int
store_reserve_send(store *st, struct item *const *items, size_t n)
{
	(void)st;
	(void)items;
	reserve_n = n;
	reserve_pending = true;
	reserve_looked = 0;
	return 0;
}

bool store_reserve_pending(const store *st) { (void)st; return reserve_pending; }

int
store_reserve_take(store *st, enum reserve_result *results)
{
	(void)st;
	/* Answered at a later look, as a claim is: the claim sent with it may come first. */
	if (reserve_looked < (w.reserve_looks > 0 ? w.reserve_looks : 1)) {
		reserve_looked++;
		return 0;
	}
	reserve_pending = false;
	for (size_t i = 0; i < reserve_n; i++) {
		results[i] = RESERVE_HELD;
		if (w.lost_last != 0) {
			/* Every redemption here is one whose claim was lost: it leaves us. */
			results[i] = RESERVE_LOST;
			w.lost_at_ms = clock_ms();
			w.busy_items--;
		}
	}
	return 1;
}

struct store_listener {
	int unused;
};

int store_listener_new(const char *c, store_listener **ret) { (void)c; *ret = NULL; return 0; }
void store_listener_free(store_listener *sl) { (void)sl; }
int store_listener_connect(store_listener *sl) { (void)sl; return -1; }
void store_listener_close(store_listener *sl) { (void)sl; }
int store_listener_fd(const store_listener *sl) { (void)sl; return -1; }
bool store_listener_active(const store_listener *sl) { (void)sl; return false; }
short store_listener_events(const store_listener *sl) { (void)sl; return 0; }
int64_t store_listener_deadline(const store_listener *sl) { (void)sl; return INT64_MAX; }

int
store_listener_drive(store_listener *sl, short revents, int64_t now, bool *listening)
{
	(void)sl;
	(void)revents;
	(void)now;
	*listening = false;
	return -1;
}
const char *store_listener_errmsg(const store_listener *sl) { (void)sl; return ""; }

int
store_listener_backlog_send(store_listener *sl, int timeout_ms, int64_t now)
{
	(void)sl;
	(void)timeout_ms;
	(void)now;
	return 1;
}

int
store_listener_backlog(store_listener *sl, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT])
{
	(void)sl;
	(void)due;
	(void)oldest_pending_s;
	return 0;
}

int
store_backlog(store *st, int64_t due[ITEM_KIND_COUNT], double oldest_pending_s[ITEM_KIND_COUNT])
{
	(void)st;
	(void)due;
	(void)oldest_pending_s;
	return -1;
}

/* ---- the lock manager and the claim step ---- */

struct lockmgr {
	int unused;
};
static struct lockmgr the_locks;

int
lock_new(const struct lock_options *o, redis_conn *conn, lockmgr **ret)
{
	(void)o;
	(void)conn;
	*ret = &the_locks;
	return 0;
}

void lock_free(lockmgr *lm) { (void)lm; }
bool lock_redis_down(const lockmgr *lm) { (void)lm; return false; }
void lock_start(lockmgr *lm) { (void)lm; }
bool lock_redis_may_connect(const lockmgr *lm, int64_t now_ms) { (void)lm; (void)now_ms; return false; }
int64_t lock_redis_retry_at(const lockmgr *lm) { (void)lm; return INT64_MAX; }
void lock_redis_connected(lockmgr *lm) { (void)lm; }
void lock_redis_connect_failed(lockmgr *lm) { (void)lm; }
void lock_release(lockmgr *lm, struct item *const *items, size_t n)
{
	(void)lm;
	(void)items;
	(void)n;
}

/* The Redis connection and the fleet's budget: never asked, no limit. */
struct redis_conn {
	int unused;
};
static struct redis_conn the_redis;

int
redis_conn_new(const struct redis_options *o, redis_conn **ret)
{
	(void)o;
	*ret = &the_redis;
	return 0;
}

void redis_conn_free(redis_conn *rc) { (void)rc; }
/* Always up: the loop never reconnects it. */
bool redis_conn_connected(const redis_conn *rc) { (void)rc; return true; }
bool redis_conn_connecting(const redis_conn *rc) { (void)rc; return false; }
int redis_conn_connect_start(redis_conn *rc, int64_t now_ms) { (void)rc; (void)now_ms; return -1; }
int redis_conn_fd(const redis_conn *rc) { (void)rc; return -1; }
bool redis_conn_busy(const redis_conn *rc) { (void)rc; return false; }
short redis_conn_events(const redis_conn *rc) { (void)rc; return 0; }
int64_t redis_conn_deadline(const redis_conn *rc) { (void)rc; return INT64_MAX; }
void redis_conn_drive(redis_conn *rc, short revents, int64_t now_ms)
{
	(void)rc;
	(void)revents;
	(void)now_ms;
}

struct fleet {
	int unused;
};
static struct fleet the_fleet;

int
fleet_new(redis_conn *conn, const char *member, fleet **ret)
{
	(void)conn;
	(void)member;
	*ret = &the_fleet;
	return 0;
}

void fleet_free(fleet *f) { (void)f; }
void fleet_set_rate(fleet *f, int r) { (void)f; (void)r; }
void fleet_pause(fleet *f, int ms) { (void)f; (void)ms; }
void fleet_leave(fleet *f) { (void)f; }

/* The claim step as a whole: the scripted backlog, oldest first. */
struct claimer {
	int unused;
};
static struct claimer the_claims;

void
claim_redis_options(const struct bw_config *cfg, const char *password, struct redis_options *out)
{
	(void)cfg;
	(void)password;
	memset(out, 0, sizeof(*out));
}

enum lock_policy claim_lock_policy(enum lock_mode m) { (void)m; return LOCK_POLICY_REDIS; }

int
claim_new(const struct claim_options *o, store *st, lockmgr *lm, fleet *fl, claimer **ret)
{
	(void)o;
	(void)st;
	(void)lm;
	(void)fl;
	*ret = &the_claims;
	return 0;
}

void claim_free(claimer *c) { (void)c; }
void claim_set_ttl(claimer *c, int ttl_ms) { (void)c; (void)ttl_ms; }
void claim_set_park_delay(claimer *c, int ms) { (void)c; (void)ms; }
int64_t claim_wait_ms(const claimer *c) { (void)c; return 0; }
const char *claim_errmsg(const claimer *c) { (void)c; return "fake claim error"; }

int
claim_renew_start(claimer *c, struct item *const *items, size_t n)
{
	(void)c;
	(void)items;
	(void)n;
	return 0;
}

bool claim_renewing(const claimer *c) { (void)c; return false; }

int
claim_renew_poll(claimer *c, struct item *const *items, size_t n)
{
	(void)c;
	(void)items;
	(void)n;
	return 0;
}

/*
 * The claim: started at one turn, answered at the poll of a later one, as
 * the database answers after the loop's wait.
 */

int
claim_start(claimer *c, size_t limit)
{
	(void)c;
	if (claim_pending)
		w.claim_over_limit++;   /* one claim at a time */
	/*
	 * Items claimed and not yet answered within concurrency plus the
	 * run-ahead (two batches, at most the concurrency); flights within three times it.
	 */
	if (w.busy_items - w.answered_items + limit > (size_t)(w.concurrency + w.ahead) ||
	    w.busy_items + limit > 3 * (size_t)w.concurrency)
		w.claim_over_limit++;
	if (w.busy_items - w.answered_items + limit > (size_t)w.concurrency)
		w.claims_ahead++;
	claim_limit = limit;
	claim_pending = true;
	claim_looked = false;
	return 0;
}

bool claim_busy(const claimer *c) { (void)c; return claim_pending; }

int
claim_poll(claimer *c, struct item *items, size_t *ret_n, bool *more)
{
	size_t n = 0, limit = claim_limit;

	(void)c;
	*ret_n = 0;
	*more = false;
	if (!claim_looked) {
		claim_looked = true;
		return 0;
	}
	claim_pending = false;
	while (n < limit && w.ndue > 0) {
		struct item *it = &items[n++];

		memset(it, 0, sizeof(*it));
		it->kind = ITEM_INVOICE;
		it->id = w.due[0];
		it->fence = 1;
		it->amount_cents = 100;
		if (it->id >= w.lost_first && it->id <= w.lost_last) {
			it->kind = ITEM_REDEMPTION;
			it->subsidy_id = 1;
		}
		assert_int_equal(item_set_strings(it, "cus_1", "usd"), 0);
		memmove(w.due, w.due + 1, --w.ndue * sizeof(w.due[0]));
		w.busy_items++;
	}
	if (w.busy_items > w.busy_max)
		w.busy_max = w.busy_items;
	*ret_n = n;
	*more = w.ndue > 0;
	return 1;
}

/* ---- the API client: every call is answered at the next wait ---- */

struct api_client {
	int unused;
};
static struct api_client the_api;

int
api_client_new(const struct api_options *o, api_client **ret, char *err, size_t errlen)
{
	(void)o;
	(void)err;
	(void)errlen;
	*ret = &the_api;
	return 0;
}

void api_client_free(api_client *api) { (void)api; }
int api_client_set_token(api_client *api, const char *t) { (void)api; (void)t; return 0; }
void api_client_set_limits(api_client *api, long a, long b, int c)
{
	(void)api;
	(void)a;
	(void)b;
	(void)c;
}
int api_in_flight(const api_client *api) { (void)api; return (int)w.ncalls; }
bool api_send_started(api_client *api) { (void)api; return false; }

void
api_abort(api_client *api, int tag)
{
	(void)api;
	for (size_t i = 0; i < w.ncalls; i++) {
		if (w.calls[i] != tag)
			continue;
		settle(w.call_ids[i]);
		memmove(w.calls + i, w.calls + i + 1, (w.ncalls - i - 1) * sizeof(w.calls[0]));
		memmove(w.call_ids + i, w.call_ids + i + 1,
		    (w.ncalls - i - 1) * sizeof(w.call_ids[0]));
		memmove(w.call_started_ms + i, w.call_started_ms + i + 1,
		    (w.ncalls - i - 1) * sizeof(w.call_started_ms[0]));
		w.ncalls--;
		w.aborted++;
		return;
	}
	fail_msg("api_abort of tag %d, which is not in flight", tag);
}

int
api_start(api_client *api, const struct item *it, int tag)
{
	(void)api;
	assert_true(w.ncalls < CALLS_MAX);
	w.call_ids[w.ncalls] = it->id;
	w.call_started_ms[w.ncalls] = clock_ms();
	if (it->id >= 0 && it->id < ANSWERED_MAX)
		w.started_ms[it->id] = clock_ms();
	w.calls[w.ncalls++] = tag;
	if (w.ncalls > (size_t)w.concurrency)
		w.calls_over_limit++;
	if (sent_pending && w.ncalls > w.calls_while_recording)
		w.calls_while_recording = w.ncalls;
	w.api_started++;
	if (w.refuse_after != 0 && w.answers > w.refuse_after)
		w.started_after_refusal++;
	if (w.ncalls > w.in_flight_max)
		w.in_flight_max = w.ncalls;
	if (w.stop_at_call != 0 && w.api_started == w.stop_at_call)
		raise(SIGTERM);
	return 0;
}

/*
 * Nothing in flight: sleeps as asked (at most 50 ms), so a loop that does
 * not mean to spin does not, and counts the waits of 0 ms with nothing to
 * wait for: a spinning loop shows as thousands of them.
 */
int
api_wait(api_client *api, struct api_waitfd *extra, unsigned nextra, int timeout_ms)
{
	(void)api;
	(void)nextra;
	w.answered_this_wait = 0;
	/* Work due and room for a claim of one, but none out: a round trip lost. */
	if (!claim_pending && w.ndue > 0 &&
	    w.busy_items - w.answered_items + 1 <= (size_t)(w.concurrency + w.ahead) &&
	    w.busy_items + 1 <= 3 * (size_t)w.concurrency)
		w.waits_without_claim++;
	if (w.ncalls == 0 && sent_pending && !claim_pending && timeout_ms == 0)
		w.spins_while_recording++;
	if ((w.ncalls == 0 || w.hold_answers) && timeout_ms == 0)
		w.zero_waits++;
	if (w.whole_waits && w.hold_answers && timeout_ms > 0) {
		/* As the real wait: to its end, unless a descriptor (the signal pipe) wakes it. */
		struct pollfd pfd[8];
		unsigned at[8];
		nfds_t n = 0;

		for (unsigned i = 0; i < nextra && n < 8; i++) {
			if (extra[i].fd < 0 || extra[i].events == 0)
				continue;
			at[n] = i;
			pfd[n++] = (struct pollfd){ .fd = extra[i].fd, .events = extra[i].events };
		}
		if (poll(pfd, n, timeout_ms) > 0)
			for (nfds_t i = 0; i < n; i++)
				extra[at[i]].revents = pfd[i].revents;
	} else if ((w.ncalls == 0 || w.hold_answers) && timeout_ms > 0) {
		usleep((useconds_t)(timeout_ms < 50 ? timeout_ms : 50) * 1000);
	}
	/* Calls answered by the clock: sleeps until the first is due, as its socket would wake us. */
	if (w.call_ms > 0 && w.ncalls > 0 && !w.hold_answers) {
		int64_t due = w.call_started_ms[0] + w.call_ms - clock_ms();

		if (due > 0 && timeout_ms == 0 && !claim_pending && !sent_pending && !reserve_pending)
			w.spins_while_calling++;
		if (due > 0 && timeout_ms > 0)
			usleep((useconds_t)(due < timeout_ms ? due : timeout_ms) * 1000);
	}
	return 0;
}

int
api_next_result(api_client *api, int *tag, struct api_verdict *v, double *latency_ms,
    long *http_status)
{
	(void)api;
	if (w.ncalls == 0 || w.hold_answers)
		return 0;
	if (w.answers_per_wait != 0 && w.answered_this_wait++ >= w.answers_per_wait)
		return 0;
	if (w.call_ms > 0 && clock_ms() < w.call_started_ms[0] + w.call_ms)
		return 0;
	*tag = w.calls[0];
	settle(w.call_ids[0]);
	memmove(w.calls, w.calls + 1, (w.ncalls - 1) * sizeof(w.calls[0]));
	memmove(w.call_ids, w.call_ids + 1, (w.ncalls - 1) * sizeof(w.call_ids[0]));
	memmove(w.call_started_ms, w.call_started_ms + 1, (w.ncalls - 1) * sizeof(w.call_started_ms[0]));
	w.ncalls--;
	memset(v, 0, sizeof(*v));
	v->retry_after_s = -1;
	*latency_ms = 1;
	*http_status = w.refuse_after != 0 && w.answers >= w.refuse_after ? 401 : w.answer_status;
	w.answers++;
	if (*http_status == 200) {
		v->cls = API_SUCCESS;
		snprintf(v->id, sizeof(v->id), "ch_fake");
	} else {
		v->cls = API_WORKER;
		snprintf(v->error, sizeof(v->error), "unauthorized: bad token");
	}
	return 1;
}

/* ---- telemetry and secrets ---- */

struct telemetry {
	int unused;
};
static struct telemetry the_telemetry;

int
telemetry_new(const struct bw_config *cfg, bool once, telemetry **ret)
{
	(void)cfg;
	(void)once;
	*ret = &the_telemetry;
	return 0;
}

void telemetry_free(telemetry *t) { (void)t; }
void telemetry_ready(telemetry *t, int64_t now) { (void)t; (void)now; }
void telemetry_waiting(telemetry *t, int64_t now, const char *why)
{
	(void)t;
	(void)now;
	(void)why;
}
void telemetry_tick(telemetry *t, int64_t now, int a, int b, bool up)
{
	(void)t;
	(void)now;
	(void)a;
	(void)b;
	(void)up;
}
void telemetry_recorded(enum item_kind k, enum completion_state s, bool a)
{
	(void)k;
	(void)s;
	(void)a;
}
void telemetry_reloading(telemetry *t) { (void)t; }
void telemetry_reloaded(telemetry *t) { (void)t; }
void telemetry_stopping(telemetry *t, int n) { (void)t; (void)n; }
void telemetry_api_refused(telemetry *t, const char *r) { (void)t; (void)r; }
void telemetry_paused(telemetry *t, enum item_kind k, const char *n)
{
	(void)t;
	(void)k;
	(void)n;
}
unsigned telemetry_wait_fds(telemetry *t, int64_t now, struct api_waitfd *fds, int *wait)
{
	(void)t;
	(void)now;
	(void)fds;
	(void)wait;
	return 0;
}
void telemetry_after_wait(telemetry *t) { (void)t; }
bool telemetry_backlog_wanted(const telemetry *t) { (void)t; return false; }
void telemetry_backlog_asked(telemetry *t, int64_t now) { (void)t; (void)now; }
void
telemetry_backlog(telemetry *t, const int64_t due[ITEM_KIND_COUNT],
    const double oldest_pending_s[ITEM_KIND_COUNT])
{
	(void)t;
	(void)due;
	(void)oldest_pending_s;
}

int
secret_api_token(const struct bw_config *cfg, char *buf, size_t len)
{
	(void)cfg;
	snprintf(buf, len, "token");
	return 0;
}

/* ---- the tests ---- */

static void
load_config(struct bw_config *cfg, int concurrency, int batch, const char *extra)
{
	char text[1024];
	char *errors = NULL;

	snprintf(text, sizeof(text),
	    "worker = { id = \"unit\"; concurrency = %d; batch_size = %d; poll_interval_ms = %d;"
	    " once_patience_ms = 1000; shutdown_timeout_ms = %d; };\n"
	    "database = { conninfo = \"dbname=none\"; };\n"
	    "locks = { mode = \"skip-locked\"; };\n"
	    "billing_api = { base_url = \"http://127.0.0.1:9\"; backoff_initial_ms = 1;"
	    " backoff_max_ms = 5; };\n"
	    "log = { level = \"error\"; };\n%s", concurrency, batch,
	    w.poll_interval_ms != 0 ? w.poll_interval_ms : 10,
	    w.shutdown_timeout_ms < 0 ? 0 : w.shutdown_timeout_ms != 0 ? w.shutdown_timeout_ms :
	    30000, extra);
	memset(cfg, 0, sizeof(*cfg));
	if (config_load_string(text, "unit.conf", cfg, &errors) != 0)
		fail_msg("config: %s", errors ? errors : "?");
	free(errors);
	w.concurrency = concurrency;
	w.ahead = 2 * batch < concurrency ? 2 * batch : concurrency;
	log_init("unit", LOG_LEVEL_ERROR);
}

static void
backlog(int64_t first, size_t n)
{
	for (size_t i = 0; i < n; i++)
		w.due[w.ndue++] = first + (int64_t)i;
}

/*
 * Rows the database refuses to complete are parked, one at a time, and
 * their flights must go back on the free stack: with concurrency 2 and two
 * such rows first in line, the old record_one_by_one left no free slot,
 * and every later item was dropped unrecorded, never called.
 */
static void
test_parked_rows_give_their_slots_back(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 2, 2, "");
	backlog(1, 8);
	w.poison[w.npoison++] = 1;
	w.poison[w.npoison++] = 2;
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.parked, 2);
	assert_int_equal(w.recorded_done, 6);
	assert_int_equal(w.api_started, 8);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/* A claim never asks for more than the free room, nor more than a batch. */
static void
test_claims_fit_the_free_room(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 4, 3, "");
	backlog(100, 50);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 50);
	assert_int_equal(w.claim_over_limit, 0);
	assert_true(w.busy_max <= 2 * 4);
	assert_true(w.in_flight_max <= 4);
	config_free(&cfg);
}

/*
 * A flush refused for a reason other than the data backs off: over 600 ms
 * of refusals it is tried a handful of times (200 ms, doubling), not at
 * every turn of the loop, and nothing is lost when it goes through.
 */
static void
test_refused_flush_backs_off(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 4, 4, "");
	backlog(1, 4);
	w.refuse_flush_until_ms = clock_ms() + 600;
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 4);
	assert_int_equal(w.api_started, 4);
	assert_in_range(w.complete_calls, 2, 6);
	/* The outcomes waited for the retry; the loop slept meanwhile. */
	assert_true(w.zero_waits < 50);
	config_free(&cfg);
}

/*
 * A worker-level answer (401) stops new claims: after the first batch's
 * answers, only one probe item at a time, spaced out, and once gives up
 * after its patience with exit 1.  No item is recorded done, none lost.
 */
static void
test_refused_worker_probes_one_at_a_time(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 4, 4, "");
	backlog(1, 40);
	w.answer_status = 401;
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 1);
	assert_int_equal(w.recorded_done, 0);
	/*
	 * The first batch (no claim runs ahead before the API has let a call
	 * in), then one probe after 1 s; patience is 1 s.
	 */
	assert_in_range(w.api_started, 4, 4 + 2);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/*
 * Many answers at once are recorded in few transactions: 64 items at
 * concurrency 16 take a handful of completions, not one per item.
 */
static void
test_outcomes_are_recorded_in_batches(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 16, 16, "");
	backlog(1, 64);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 64);
	assert_in_range(w.complete_calls, 4, 8);
	config_free(&cfg);
}

/*
 * Claims of 2 into 16 slots, and a database slower than the loop (a batch
 * answered six turns after it was sent): outcomes come in while a batch is
 * being recorded.  They wait for the next batch: one batch in flight at a
 * time, every outcome recorded once, and no claim beyond the free room.
 */
static void
test_one_batch_in_flight_at_a_time(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.batch_looks = 6;
	load_config(&cfg, 16, 2, "");
	backlog(1, 64);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 64);
	assert_int_equal(w.claim_over_limit, 0);
	assert_true(w.complete_calls < 32);     /* outcomes did gather meanwhile */
	config_free(&cfg);
}

/*
 * Calls never wait for the database.  With concurrency 4, claims of 4 and a
 * database slower than the loop: outcomes being recorded hold no call
 * slot, so calls fill all 4 slots while a batch is being recorded (when
 * they counted against concurrency, none started then); and claims run
 * ahead of the calls by up to two batches (here 4, the concurrency), so claims ask for more than the free
 * call slots at times (before, never).  Never more than 4 calls, nor a
 * claim beyond its room.
 */
static void
test_calls_never_wait_for_the_database(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.batch_looks = 6;
	w.answers_per_wait = 1;     /* calls take a few turns, so they pile up to 4 */
	load_config(&cfg, 4, 4, "");
	backlog(1, 64);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 64);
	assert_int_equal(w.claim_over_limit, 0);
	assert_int_equal(w.calls_over_limit, 0);
	assert_int_equal(w.calls_while_recording, 4);
	assert_true(w.claims_ahead > 0);
	assert_true(w.busy_max <= 3 * 4);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/*
 * With more due and room left, the next claim goes out in the turn the
 * last one answered, before the wait that sends its calls: its round trips
 * then overlap them.  Before, it went out a turn later, after the calls,
 * and one process against a fast API spent every claim's round trips
 * with the database idle or the API idle, never both busy: one wait
 * without a claim out per claim (15 here), now none.
 */
static void
test_next_claim_goes_out_with_the_calls(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.answers_per_wait = 2;     /* calls last a few turns, so room stays */
	load_config(&cfg, 8, 4, "");
	backlog(1, 64);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 64);
	assert_int_equal(w.claim_over_limit, 0);
	assert_int_equal(w.waits_without_claim, 0);
	config_free(&cfg);
}

/*
 * Outcomes that come in while a batch is being recorded wait for its
 * answer, which wakes the loop: meanwhile the loop sleeps.  With a batch
 * taking 100 ms and outcomes queued behind it, the loop used to take the
 * retry time of a failed flush (long past) as due and spin at 0 ms waits
 * until the answer came: about a hundred thousand turns a second, 100 %
 * of a core.
 */
static void
test_waiting_for_a_batch_does_not_spin(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.batch_ms = 100;
	w.answers_per_wait = 1;     /* the first outcome goes alone; the rest queue behind it */
	load_config(&cfg, 8, 8, "");
	backlog(1, 8);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 8);
	assert_true(w.complete_calls >= 2);
	print_message("spins while recording: %zu\n", w.spins_while_recording);
	assert_true(w.spins_while_recording < 20);
	config_free(&cfg);
}

/*
 * Items claimed ahead wait for a slot while every slot's call is out: the
 * loop sleeps until an answer frees one.  It took the end of our own 429
 * pause (0, long past when there is none) as a time to wake, and with
 * claims running ahead of a slow API spun at 0 ms waits, about 200 000
 * turns a second in make bench's 100 ms API row; here thousands of spins
 * in 200 ms of calls, now none but the turns the claims answer in.
 */
static void
test_items_waiting_for_a_slot_do_not_spin(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.call_ms = 20;
	load_config(&cfg, 4, 4, "");
	backlog(1, 40);
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.recorded_done, 40);
	assert_true(w.claims_ahead > 0);       /* items did wait for slots */
	print_message("spins while calling: %zu\n", w.spins_while_calling);
	assert_true(w.spins_while_calling < 20);
	config_free(&cfg);
}

/*
 * SIGTERM with calls in flight: no new item is taken, the calls in flight
 * are answered and recorded, and the run ends cleanly with nothing left
 * claimed.
 */
static void
test_stop_records_the_calls_in_flight(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 4, 4, "");
	backlog(1, 40);
	w.stop_at_call = 4;         /* as the first batch's last call starts */
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.api_started, 4);
	assert_int_equal(w.recorded_done, 4);
	assert_int_equal(w.aborted, 0);
	assert_int_equal(w.busy_items, 0);
	assert_int_equal(w.ndue, 36);
	config_free(&cfg);
}

/*
 * SIGTERM while the API answers nothing: at worker.shutdown_timeout_ms the
 * calls are abandoned and recorded as retries under the same key (they
 * may have charged), and the run ends within the bound, not at the API's
 * pleasure.
 */
static void
test_stop_abandons_calls_at_the_deadline(void **state)
{
	struct bw_config cfg;
	int64_t start;

	(void)state;
	world_reset();
	w.shutdown_timeout_ms = 200;
	load_config(&cfg, 4, 4, "");
	backlog(1, 40);
	w.hold_answers = true;
	w.stop_at_call = 4;
	start = clock_ms();
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_in_range(clock_ms() - start, 200, 200 + 500);
	assert_int_equal(w.api_started, 4);
	assert_int_equal(w.aborted, 4);
	assert_int_equal(w.ncalls, 0);
	assert_int_equal(w.recorded_done, 0);
	assert_int_equal(w.recorded_retry, 4);
	assert_int_equal(w.busy_items, 0);
	/* It slept while it waited for the answers, it did not spin. */
	assert_true(w.zero_waits < 50);
	config_free(&cfg);
}

/*
 * The deadline comes while a batch is in flight (a call answered in the
 * deadline's turn sent it): the calls abandoned then queue behind it, and
 * must still be recorded once it is answered.  They were not: the last
 * flush only took answers, and the worker exited with two outcomes only
 * its memory held, their leases left to run out and the calls repeated.
 */
static void
test_stop_records_abandoned_calls_behind_a_batch(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	w.shutdown_timeout_ms = -1;     /* 0: the deadline is the stop's own turn */
	load_config(&cfg, 4, 4, "");
	backlog(1, 4);
	w.answers_per_wait = 2;         /* two answered, two still out at the deadline */
	w.stop_at_call = 4;
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	assert_int_equal(w.aborted, 2);
	assert_int_equal(w.recorded_done, 2);
	assert_int_equal(w.recorded_retry, 2);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/*
 * A stop ends at worker.shutdown_timeout_ms even when the API answers
 * nothing and every wait is slept to its end: the wait is cut at the
 * deadline.  It was not, and a stop overran its bound by up to a second.
 */
static void
test_stop_wait_ends_at_the_deadline(void **state)
{
	struct bw_config cfg;
	int64_t start, took;

	(void)state;
	world_reset();
	w.shutdown_timeout_ms = 200;
	load_config(&cfg, 4, 4, "");
	backlog(1, 40);
	w.hold_answers = true;
	w.whole_waits = true;
	w.stop_at_call = 4;
	start = clock_ms();
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	took = clock_ms() - start;
	print_message("stop took %" PRId64 " ms (deadline 200 ms)\n", took);
	assert_in_range(took, 200, 200 + 100);
	assert_int_equal(w.aborted, 4);
	assert_int_equal(w.recorded_retry, 4);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/*
 * The API starts refusing the worker (a token revoked) while items are
 * claimed ahead: those are put back, not called one after another as each
 * refusal comes back.  After the refusal only probes call, the first a
 * second later; once's patience is a second.
 */
static void
test_refusal_puts_back_the_items_claimed_ahead(void **state)
{
	struct bw_config cfg;

	(void)state;
	world_reset();
	load_config(&cfg, 8, 4, "");
	backlog(1, 200);
	w.answers_per_wait = 1;         /* calls last a few turns, so claims run ahead */
	w.refuse_after = 12;
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 1);
	print_message("calls started after the refusal: %zu (of %zu)\n",
	    w.started_after_refusal, w.api_started);
	assert_true(w.started_after_refusal <= 2);
	assert_int_equal(w.busy_items, 0);
	config_free(&cfg);
}

/*
 * A redemption whose claim was lost before its funds were reserved gives
 * its slot back with no outcome to record: the items claimed ahead and
 * waiting take it at once, not at the next poll or a call's answer.
 */
static void
test_a_lost_reservation_gives_its_slot_to_the_items_waiting(void **state)
{
	struct bw_config cfg;
	int64_t waited;

	(void)state;
	world_reset();
	w.poll_interval_ms = 2000;
	load_config(&cfg, 2, 2, "");
	backlog(1, 6);
	w.lost_first = 4;               /* 1, 2: invoices, which let the API prove us */
	w.lost_last = 4;                /* 3 calls, 4 is lost; 5, 6 wait for their slots */
	w.call_ms = 300;                /* 3's call is still out meanwhile */
	w.reserve_looks = 2;            /* the claim of 5 and 6, sent after it, comes first */
	assert_int_equal(loop_run(&cfg, "token", NULL, true), 0);
	waited = w.started_ms[5] - w.lost_at_ms;
	print_message("item 5 called %" PRId64 " ms after the lost reservation\n", waited);
	assert_true(w.lost_at_ms != 0);
	assert_in_range(waited, 0, 100);
	assert_int_equal(w.recorded_done, 5);
	config_free(&cfg);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parked_rows_give_their_slots_back),
		cmocka_unit_test(test_claims_fit_the_free_room),
		cmocka_unit_test(test_refused_flush_backs_off),
		cmocka_unit_test(test_refused_worker_probes_one_at_a_time),
		cmocka_unit_test(test_outcomes_are_recorded_in_batches),
		cmocka_unit_test(test_one_batch_in_flight_at_a_time),
		cmocka_unit_test(test_calls_never_wait_for_the_database),
		cmocka_unit_test(test_waiting_for_a_batch_does_not_spin),
		cmocka_unit_test(test_next_claim_goes_out_with_the_calls),
		cmocka_unit_test(test_items_waiting_for_a_slot_do_not_spin),
		cmocka_unit_test(test_stop_records_the_calls_in_flight),
		cmocka_unit_test(test_stop_abandons_calls_at_the_deadline),
		cmocka_unit_test(test_stop_records_abandoned_calls_behind_a_batch),
		cmocka_unit_test(test_stop_wait_ends_at_the_deadline),
		cmocka_unit_test(test_refusal_puts_back_the_items_claimed_ahead),
		cmocka_unit_test(test_a_lost_reservation_gives_its_slot_to_the_items_waiting),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}

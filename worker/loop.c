#include "worker/loop.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "billing/api.h"
#include "billing/fleet.h"
#include "billing/outcome.h"
#include "common/backoff.h"
#include "common/clock.h"
#include "common/item.h"
#include "common/jitter.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/redis.h"
#include "locks/lock.h"
#include "store/report.h"
#include "store/store.h"
#include "worker/claim.h"
#include "worker/secret.h"
#include "worker/telemetry.h"

#define DB_RETRY_MIN_MS 200
#define DB_RETRY_MAX_MS 10000
/* Longest sleep in poll, so flags and deadlines are looked at regularly. */
#define WAIT_MAX_MS 1000
/*
 * A notification moves the next claim to within this many milliseconds,
 * at random: every worker hears every notification, and the jitter keeps
 * them from all querying at the same instant; notifications arriving
 * inside the window fold into that one claim.
 */
#define NOTIFY_JITTER_MS 4
/* Outcomes that could not be recorded are tried again with this backoff. */
#define FLUSH_RETRY_MIN_MS 200
#define FLUSH_RETRY_MAX_MS 10000
/*
 * A worker the billing API refuses (401, 403, 404, 405) probes it again
 * with one item after this long, doubling up to the maximum.
 */
#define PROBE_MIN_MS 1000
#define PROBE_MAX_MS 30000
/*
 * A redemption whose subsidy row (or own row) another transaction holds is
 * put back, pending, for this long plus up to BUSY_JITTER_MS at random:
 * long enough not to spin on a lock a producer keeps for seconds, short
 * enough that another worker's reservation of a few milliseconds costs
 * little, and spread so the redemptions of one subsidy do not all come
 * back in the same claim.
 */
#define BUSY_DEFER_MS 200
#define BUSY_JITTER_MS 300
/* Each worker says it is alive in the fleet's registry this often. */
#define HEARTBEAT_MS 10000
#ifndef BW_VERSION
#define BW_VERSION "unknown"
#endif

enum flight_state {
	FLIGHT_FREE,
	FLIGHT_READY,           /* claimed ahead, waiting for a call slot */
	FLIGHT_TO_RESERVE,      /* a redemption whose funds are to be reserved before its call */
	FLIGHT_RESERVING,       /* its reservation sent, the answer not yet in */
	FLIGHT_CALLING,         /* API call in flight */
	FLIGHT_DONE,            /* outcome queued, waiting to be recorded */
	FLIGHT_RECORDING,       /* outcome sent to the database, its answer not yet in */
};

/* One claimed item, from its claim until its completion is recorded. */
struct flight {
	enum flight_state state;
	struct item item;
	struct completion done;
	double latency_ms;
	long http_status;
	int64_t started_unix_ms;        /* for the history */
	bool busy;                      /* put back, its rows locked: a debug line */
};

struct loop {
	struct bw_config *cfg;
	bool once;
	store *st;
	store_listener *listener;   /* NULL in once runs */
	bool listening;             /* its LISTEN took effect */
	int64_t next_listen_try_ms;
	struct backoff listen_backoff;
	/*
	 * One connection to Redis (NULL in skip-locked mode), which the lock
	 * manager and the fleet's rate budget share; the claim step drives
	 * the store, the budget and the locks in turn.
	 */
	redis_conn *redis;
	lockmgr *locks;
	fleet *fleet;
	claimer *claims;
	api_client *api;
	telemetry *tm;
	struct retry_policy policy;

	struct flight *flights;
	int nflights;           /* capacity: the largest concurrency seen */
	int *free_slots;        /* stack of FREE flights */
	int nfree;
	int busy;               /* flights not FREE */
	/*
	 * Of those, the ones whose call is over (DONE, RECORDING): they wait
	 * for the database, not for the API, so they do not count against
	 * worker.concurrency.  Flights are three times the concurrency (the
	 * calls, the run-ahead, the outcomes being recorded), so a batch being
	 * recorded never keeps calls from starting.
	 */
	int settling;
	/*
	 * Claims run ahead of the calls by up to ahead_of_calls() items, so a
	 * slot that frees is refilled at once instead of after the next
	 * claim's round trips: those wait as READY, oldest first, in ready_q.
	 */
	int ready;
	int *ready_q;           /* ring of flight slots, capacity nflights */
	int ready_head;
	int64_t calls_paused_until_ms;  /* after our own 429: no READY item starts before */

	struct item *claimed;   /* claim scratch, capacity batch */
	size_t claimed_cap;
	struct completion *batch;   /* the outcomes sent, or being sent */
	size_t nbatch;              /* how many, while their answer is not in */
	bool *accepted;
	int *batch_flight;
	struct item **itemp;
	enum reserve_result *reserved;
	int *reserve_slot;          /* the flights of the reservation in flight */
	size_t nreserve;
	size_t nto_reserve;         /* flights waiting to be sent for reservation */

	int64_t next_poll_ms;
	int64_t next_renew_ms;
	int64_t next_flush_ms;          /* after a failed flush: not before */
	struct backoff flush_backoff;
	int64_t flush_failing_since_ms; /* 0 while outcomes get recorded */
	int64_t claim_failing_since_ms; /* 0 while claims work */
	int64_t next_prune_ms;          /* history.retention_days */
	int64_t next_seen_ms;           /* the registry's heartbeat */
	char host[256];

	/*
	 * The billing API refuses this worker (a worker-level answer): no new
	 * items are taken but one probe item now and then; calls in flight
	 * finish and are recorded.
	 */
	struct {
		bool on;
		int64_t since_ms;
		int64_t probe_at_ms;
		struct backoff probe_backoff;
		int64_t recorded_at_ms;     /* last write of the registry for a probe */
		char reason[600];
	} refused;
	bool paused[ITEM_KIND_COUNT];   /* as the last due query saw the fleet */
	int64_t next_db_try_ms;
	struct backoff db_backoff;
	int64_t db_down_since_ms;
	bool db_outage_logged;
	int64_t db_connected_at_ms;     /* the last connect */
	bool db_flapping;               /* connections die young: keep backing off */
	bool db_proven;                 /* a statement worked on this connection */
	bool api_proven;                /* the billing API let a call of this process in */
	/*
	 * A call slot freed after this turn's start_ready (a call ended as the
	 * turn sent its calls, a redemption's claim was lost before its hold):
	 * the wait is 0, so the next turn collects it and fills the slot.
	 */
	bool slot_freed_late;
	bool db_seen;           /* connected once: later connects are reconnects */
	struct jitter rng;

	bool stopping;
	int64_t stop_deadline_ms;
	double turn_start_s;            /* when the loop last left its wait */

	/* what this process did, for the exit line */
	uint64_t n_done, n_failed, n_retry, n_rejected, n_calls;
};

static volatile sig_atomic_t got_stop, got_reload;
static int wake_pipe[2] = { -1, -1 };

static void
on_signal(int sig)
{
	int saved = errno;
	char c = 0;

	if (sig == SIGHUP)
		got_reload = 1;
	else
		got_stop = 1;
	/* Wakes the poll at once; the pipe is non-blocking, a full one is fine. */
	if (write(wake_pipe[1], &c, 1) == -1) {
		/* nothing to do in a handler */
	}
	errno = saved;
}

static int
signals_setup(void)
{
	struct sigaction sa;

	/*
	 * Nothing could have set the flags before the handlers exist (the
	 * default action ends the process); a second run in one process (the
	 * unit tests) starts from a clean slate.
	 */
	got_stop = got_reload = 0;
	if (wake_pipe[0] == -1 && pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) == -1)
		return -1;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	if (sigaction(SIGTERM, &sa, NULL) == -1 || sigaction(SIGINT, &sa, NULL) == -1 ||
	    sigaction(SIGHUP, &sa, NULL) == -1)
		return -1;
	sa.sa_handler = SIG_IGN;
	return sigaction(SIGPIPE, &sa, NULL);
}

static void
drain_wake_pipe(void)
{
	char buf[64];

	while (read(wake_pipe[0], buf, sizeof(buf)) > 0)
		;
}


static void
policy_from(struct retry_policy *p, const struct bw_config *cfg)
{
	p->max_attempts = cfg->billing_api.max_attempts;
	p->backoff_initial_ms = cfg->billing_api.backoff_initial_ms;
	p->backoff_max_ms = cfg->billing_api.backoff_max_ms;
	p->key_ttl_ms = (int64_t)cfg->billing_api.idempotency_key_ttl_s * 1000;
}

/* The READY ring to CAP slots, its order kept (it only grows). */
static int
ready_q_grow(struct loop *l, int cap)
{
	int *q = malloc((size_t)cap * sizeof(*q));

	if (q == NULL)
		return -1;
	for (int i = 0; i < l->ready; i++)
		q[i] = l->ready_q[(l->ready_head + i) % l->nflights];
	free(l->ready_q);
	l->ready_q = q;
	l->ready_head = 0;
	return 0;
}

/* Makes room for FLIGHTS flights and a batch of BATCH claims. */
static int
reserve(struct loop *l, int flights, int batch)
{
	void *p;
	size_t need;

	if (flights > l->nflights) {
#define GROW(field, n) \
		do { \
			if ((p = realloc(l->field, (size_t)(n) * sizeof(*l->field))) == NULL) \
				return -1; \
			l->field = p; \
		} while (0)
		GROW(free_slots, flights);
		if (ready_q_grow(l, flights) == -1)
			return -1;
		if ((p = realloc(l->flights, (size_t)flights * sizeof(*l->flights))) == NULL)
			return -1;
		l->flights = p;
		memset(l->flights + l->nflights, 0,
		    (size_t)(flights - l->nflights) * sizeof(*l->flights));
		/* New slots go under the old free ones: lowest index on top. */
		for (int i = flights - 1; i >= l->nflights; i--)
			l->free_slots[l->nfree++] = i;
		l->nflights = flights;
		GROW(batch, flights);
		GROW(accepted, flights);
		GROW(batch_flight, flights);
		GROW(itemp, flights);
		GROW(reserved, flights);
		GROW(reserve_slot, flights);
	}
	need = (size_t)batch;
	if (need > l->claimed_cap) {
		GROW(claimed, need);
		l->claimed_cap = need;
	}
#undef GROW
	return 0;
}

/* Every change of a flight's state, so the counts always agree with the flights. */
static void
set_state(struct loop *l, struct flight *f, enum flight_state to)
{
	bool was = f->state == FLIGHT_DONE || f->state == FLIGHT_RECORDING;
	bool is = to == FLIGHT_DONE || to == FLIGHT_RECORDING;

	l->settling += (int)is - (int)was;
	l->ready += (int)(to == FLIGHT_READY) - (int)(f->state == FLIGHT_READY);
	f->state = to;
}

/* Calls in flight or about to be (reserving): what worker.concurrency bounds. */
static int
calls_active(const struct loop *l)
{
	return l->busy - l->settling - l->ready;
}

/*
 * How far claims may run ahead of the calls: two batches, at most the
 * concurrency.  At least a whole batch, so the claim sent the moment the
 * last one has launched its calls (take_work) is a full one: with half
 * the concurrency, the default 64 / 64 claimed 32 at a time ahead, and
 * four processes made 0.85-0.88 x the items/s of 2886861 beside them,
 * against 0.99-1.01 x with a full batch (medians of 3-4 alternating
 * runs).  Two, where the concurrency allows (256 / 64), because answers
 * come back in the bursts their claims launched them in: a burst of one
 * batch used up one batch ahead, and the next burst's slots waited out
 * a claim.  In the 100 ms API row (256 / 64), medians of 4 alternating
 * runs: 94.6 % of concurrency / latency with one batch ahead, 95.4 % with
 * two.  The default 64 / 64 is unchanged: at most the concurrency.  None
 * before the API has let one of our calls in: a worker
 * started with a wrong token or base URL calls one batch, not two, before
 * the refusal stops it.  None while outcomes cannot be recorded: then no
 * more is taken than calls can be made, and the outcomes waiting count as
 * calls, so no more calls are made than before whose outcomes only memory
 * holds.
 */
static int
ahead_of_calls(const struct loop *l)
{
	int batch = l->cfg->worker.batch_size;

	if (!l->api_proven || l->flush_failing_since_ms != 0)
		return 0;
	return 2 * batch < l->cfg->worker.concurrency ? 2 * batch : l->cfg->worker.concurrency;
}

/* What a claim's room is measured against: the calls, the items ahead of them. */
static int
calls_held(const struct loop *l)
{
	return l->flush_failing_since_ms != 0 ? l->busy : l->busy - l->settling;
}

/* Room for a claim: within concurrency plus the run-ahead, and a free flight for each. */
static int
claim_room(const struct loop *l)
{
	int room = l->cfg->worker.concurrency + ahead_of_calls(l) - calls_held(l);

	return room < l->nfree ? room : l->nfree;
}

/* A free flight in O(1): free ones are kept on a stack. */
static int
free_flight(struct loop *l)
{
	return l->nfree > 0 ? l->free_slots[--l->nfree] : -1;
}

/*
 * The one way a flight ends, whatever became of its item: the slot goes
 * back on the free stack, so busy and the stack always agree.  The Redis
 * lock, if any, must have been given back (or left to expire) first.
 */
static void
release_flight(struct loop *l, int slot)
{
	item_clear(&l->flights[slot].item);
	set_state(l, &l->flights[slot], FLIGHT_FREE);
	l->free_slots[l->nfree++] = slot;
	l->busy--;
}

/*
 * One line per outcome.  The JSON form carries the outcome, attempt, HTTP
 * status and latency as fields of their own (log_item), each only when
 * known: no call was made, no status or latency.
 */
static void
log_outcome(const struct flight *f, bool accepted)
{
	const struct item *it = &f->item;
	const struct completion *c = &f->done;
	int attempt = it->attempts + c->calls;
	struct log_item_fields lf = {
		.kind = item_kind_name(it->kind),
		.id = it->id,
		.attempt = attempt,
		.http_status = c->calls > 0 ? f->http_status : 0,
		.latency_ms = c->calls > 0 ? f->latency_ms : -1,
	};

	if (!accepted) {
		lf.outcome = "not_recorded";
		log_item(LOG_WARN, &lf, "outcome not recorded: the claim (fence %" PRId64
		    ") was lost to another worker, whose result stands (attempt %d)",
		    it->fence, attempt);
		return;
	}
	switch (c->state) {
	case COMPLETION_DONE:
		lf.outcome = it->kind == ITEM_INVOICE ? "paid" : "redeemed";
		log_item(LOG_INFO, &lf, "%s, id \"%s\" (attempt %d, http %ld, %.1f ms)",
		    lf.outcome, c->result_id, attempt, f->http_status, f->latency_ms);
		break;
	case COMPLETION_FAILED:
		lf.outcome = "failed";
		if (c->calls == 0)
			log_item(LOG_WARN, &lf, "failed before any call: %s", c->error);
		else
			log_item(LOG_WARN, &lf, "failed: %s (attempt %d, http %ld, %.1f ms)",
			    c->error, attempt, f->http_status, f->latency_ms);
		break;
	case COMPLETION_RETRY:
		if (c->operator_note[0] != '\0') {
			lf.outcome = "needs_operator";
			log_item(LOG_ERROR, &lf, "left pending for an operator (see status): %s%s%s",
			    c->operator_note, c->error[0] != '\0' ? "; last answer: " : "",
			    c->error);
		} else if (c->blocked) {
			lf.outcome = "blocked";
			log_item(LOG_DEBUG, &lf, "pending again, the billing API refused this "
			    "worker: %s (attempt %d, http %ld)", c->error, attempt, f->http_status);
		} else {
			lf.outcome = "retry";
			/* A redemption put back behind a lock: routine, and frequent. */
			log_item(f->busy ? LOG_DEBUG : LOG_INFO, &lf, "retry in %" PRId64
			    " ms%s: %s (attempt %d, http %ld, %.1f ms)", c->delay_ms,
			    c->ambiguous ? " (may have taken effect)" : "", c->error, attempt,
			    f->http_status, f->latency_ms);
		}
		break;
	}
}

static void
note_db_failure(struct loop *l, const char *what)
{
	if (store_connected(l->st)) {
		log_warnx("%s: %s", what, store_errmsg(l->st));
		return;
	}
	if (l->db_down_since_ms == 0) {
		int64_t now = clock_ms();
		/*
		 * A connection lost before any statement on it worked (a
		 * read-only server, one that drops every session) is not a new
		 * outage each time: the reconnects keep backing off, and it is
		 * logged once.
		 */
		bool young = l->db_connected_at_ms != 0 && !l->db_proven;

		if (!young || !l->db_flapping)
			log_warnx("%s: %s; reconnecting%s", what, store_errmsg(l->st), young ?
			    " (again and again, with backoff, while connections die this young)" : "");
		if (young)
			(void)backoff_take(&l->db_backoff);
		else
			backoff_reset(&l->db_backoff);
		l->db_flapping = young;
		l->db_outage_logged = true;
		l->db_down_since_ms = now;
		l->next_db_try_ms = now + backoff_peek(&l->db_backoff);
	}
}

/* A connect succeeded: the outage, if any, is over. */
static void
db_up(struct loop *l, int64_t now)
{
	if (!l->db_flapping && (backoff_peek(&l->db_backoff) > DB_RETRY_MIN_MS ||
	    l->db_outage_logged))
		log_info("database reachable again after %.1f s",
		    (double)(now - l->db_down_since_ms) / 1000.0);
	l->db_outage_logged = false;
	l->db_down_since_ms = 0;
	l->db_connected_at_ms = now;
	l->db_proven = false;
	if (!l->db_flapping)
		backoff_reset(&l->db_backoff);
	/*
	 * A reconnect may have found another host (a failover, with
	 * target_session_attrs=read-write): the LISTEN connection
	 * follows, or it could stay up on the old primary, read-only,
	 * and never hear an insert again.
	 */
	if (l->db_seen && l->listener != NULL && store_listener_active(l->listener)) {
		store_listener_close(l->listener);
		l->listening = false;
		l->next_listen_try_ms = now;
	}
	if (l->db_seen)
		metrics_reconnect(METRICS_PEER_DATABASE);
	l->db_seen = true;
}

/* A connect failed: the next one waits longer. */
static void
db_connect_failed(struct loop *l, int64_t now)
{
	int64_t delay = backoff_take(&l->db_backoff);

	log_warnx("%s (retrying in %" PRId64 " ms)", store_errmsg(l->st), delay);
	l->next_db_try_ms = now + delay;
}

/*
 * Connects to the database when the connection is gone, with backoff,
 * blocking: for the start, when nothing is in flight yet.  Returns true
 * when connected.
 */
static bool
db_ready(struct loop *l)
{
	int64_t now = clock_ms();

	if (store_connected(l->st))
		return true;
	if (l->db_down_since_ms == 0)
		l->db_down_since_ms = now;
	if (now < l->next_db_try_ms)
		return false;
	if (store_connect(l->st) == 0) {
		db_up(l, now);
		return true;
	}
	db_connect_failed(l, now);
	return false;
}

/*
 * The loop's reconnect, which never blocks: starts a connect when the
 * backoff allows, and advances it with what the poll saw on its socket
 * (REVENTS, 0 when nothing).  A server that accepts the connection and
 * then does not answer costs its connect timeout here, while the calls
 * in flight are read as usual.
 */
static void
db_reconnect(struct loop *l, short revents)
{
	int64_t now = clock_ms();

	if (store_connected(l->st))
		return;
	if (l->db_down_since_ms == 0)
		l->db_down_since_ms = now;
	if (!store_connecting(l->st)) {
		if (now < l->next_db_try_ms)
			return;
		if (store_connect_start(l->st) == -1) {
			db_connect_failed(l, now);
			return;
		}
		revents = 0;
	}
	switch (store_connect_drive(l->st, revents, now)) {
	case 1:
		db_up(l, now);
		break;
	case -1:
		db_connect_failed(l, now);
		break;
	default:
		break;
	}
}

/*
 * The statements in flight: sent, answers read, deadlines kept (REVENTS:
 * what the poll saw on the connection).  A connection lost under them is
 * an outage, said once, and the reconnect follows.
 */
static void
db_drive(struct loop *l, short revents)
{
	bool up = store_connected(l->st);

	store_drive(l->st, revents, clock_ms());
	if (up && !store_connected(l->st))
		note_db_failure(l, "lost the database connection");
}

/*
 * Redis on the loop's poll, which never blocks either (REVENTS: what the
 * poll saw on its socket, 0 when nothing).  Connected, the commands in
 * flight are sent and answered.  Down, when the lock manager says its
 * backoff allows, a connect starts (sentinels, connect, AUTH, SELECT,
 * scripts: each a step with its own deadline) and advances here.  A
 * redis-server that is frozen costs its timeouts, while the calls in
 * flight are read as usual.
 */
static void
redis_service(struct loop *l, short revents)
{
	int64_t now = clock_ms();

	if (l->redis == NULL)
		return;
	if (redis_conn_connected(l->redis)) {
		/* Up: the commands in flight (the claim's locks) sent and answered. */
		redis_conn_drive(l->redis, revents, now);
		return;
	}
	if (!redis_conn_connecting(l->redis)) {
		if (!lock_redis_may_connect(l->locks, now))
			return;
		if (redis_conn_connect_start(l->redis, now) == -1) {
			lock_redis_connect_failed(l->locks);
			return;
		}
		revents = 0;
	}
	redis_conn_drive(l->redis, revents, now);
	if (redis_conn_connected(l->redis))
		lock_redis_connected(l->locks);
	else if (!redis_conn_connecting(l->redis))
		lock_redis_connect_failed(l->locks);
}

/* What the poll waits for on Redis' socket, connecting or connected. */
static int
redis_wait_fd(const struct loop *l, short *events)
{
	*events = 0;
	if (l->redis == NULL || redis_conn_fd(l->redis) < 0)
		return -1;
	*events = redis_conn_events(l->redis);
	return redis_conn_fd(l->redis);
}

/* The latest the loop may sleep for Redis: a connect's deadline, or the next attempt. */
static int64_t
redis_wake_at(const struct loop *l)
{
	if (l->redis == NULL)
		return INT64_MAX;
	if (redis_conn_connecting(l->redis) || redis_conn_connected(l->redis))
		return redis_conn_deadline(l->redis);
	return lock_redis_retry_at(l->locks);
}

/*
 * The batch's completion failed on the data: some row refuses it.  Records
 * the outcomes one at a time so that row cannot hold the others back, and
 * parks each row that refuses its own (pending, with the reason, retried
 * after backoff_max_ms).  Compacts the batch to the outcomes recorded or
 * turned away by their fence, and returns how many; those that failed for
 * any other reason (the connection) stay queued for the next flush, and
 * *LEFT says how many did.
 */
static size_t
record_one_by_one(struct loop *l, size_t n, size_t *left)
{
	size_t m = 0;

	*left = 0;

	for (size_t j = 0; j < n; j++) {
		struct flight *f = &l->flights[l->batch_flight[j]];
		char reason[600];
		bool parked = false;

		if (store_complete(l->st, &l->batch[j], 1, &l->accepted[j]) == 0) {
			l->batch[m] = l->batch[j];
			l->accepted[m] = l->accepted[j];
			l->batch_flight[m++] = l->batch_flight[j];
			continue;
		}
		if (!store_connected(l->st) || !store_failed_on_data(l->st)) {
			(*left)++;
			continue;
		}
		snprintf(reason, sizeof(reason), "could not record the outcome (%s%s): %s",
		    f->done.state == COMPLETION_DONE ? "done, id " :
		    f->done.state == COMPLETION_FAILED ? "failed: " : "retry",
		    f->done.state == COMPLETION_DONE ? f->done.result_id :
		    f->done.state == COMPLETION_FAILED ? f->done.error : "", store_errmsg(l->st));
		if (store_park(l->st, &f->done, l->cfg->billing_api.backoff_max_ms, reason,
		    &parked) == -1) {
			if (!store_connected(l->st)) {
				(*left)++;      /* queued: recorded when the database returns */
				continue;
			}
			log_error("%s %" PRId64 ": %s; could not park it either (%s): dropped, "
			    "its lease runs out and it is retried", item_kind_name(f->item.kind),
			    f->item.id, reason, store_errmsg(l->st));
		} else {
			log_error("%s %" PRId64 ": %s; %s", item_kind_name(f->item.kind), f->item.id,
			    reason, parked ? "left pending for an operator (see status), retried "
			    "later" : "the claim was lost meanwhile");
		}
		l->itemp[0] = &f->item;
		lock_release(l->locks, l->itemp, 1);
		release_flight(l, l->batch_flight[j]);
	}
	return m;
}

/*
 * Records every queued outcome in one transaction, then frees their
 * flights and gives back their Redis locks.  When the database is down the
 * outcomes stay queued and are tried again; if the leases run out first,
 * another worker repeats the calls under the same keys and the fenced
 * completion turns ours away.
 */
/*
 * The batch could not be recorded, for a reason other than its data (the
 * connection, a read-only server after a failover, permissions, a full
 * disk): the outcomes stay queued and the flush is tried again with
 * backoff, logged once per outage instead of once per try.
 */
static void
flush_failed(struct loop *l, size_t n, int64_t now)
{
	if (!store_connected(l->st)) {
		note_db_failure(l, "could not record outcomes");
	} else if (l->flush_failing_since_ms == 0) {
		log_warnx("could not record %zu outcome%s: %s; keeping them, retrying with "
		    "backoff", n, n == 1 ? "" : "s", store_errmsg(l->st));
	}
	if (l->flush_failing_since_ms == 0) {
		l->flush_failing_since_ms = now;
		backoff_reset(&l->flush_backoff);
	}
	l->next_flush_ms = now + backoff_take(&l->flush_backoff);
}

/*
 * True when queued outcomes can be sent now: the loop must not sleep.  A
 * batch already in flight is answered first.
 */
static bool
flush_due(const struct loop *l, int64_t now)
{
	return now >= l->next_flush_ms && store_connected(l->st) &&
	    !store_complete_pending(l->st);
}

/*
 * Sends every queued outcome as one batch, without waiting: the loop
 * reads API answers while it commits.  Their flights stay taken, as
 * RECORDING, until flush_answer() has the database's answer.
 */
static void
flush_send(struct loop *l, int64_t now)
{
	size_t n = 0;

	if (!flush_due(l, now))
		return;
	for (int i = 0; i < l->nflights; i++) {
		if (l->flights[i].state != FLIGHT_DONE)
			continue;
		l->batch[n] = l->flights[i].done;
		/* Outcomes decided without a call: "not called" in the history. */
		if (l->batch[n].started_unix_ms == 0)
			l->batch[n].started_unix_ms = l->flights[i].started_unix_ms;
		l->batch_flight[n] = i;
		n++;
	}
	if (n == 0)
		return;
	l->nbatch = n;
	if (store_complete_send(l->st, l->batch, n) == -1) {
		flush_failed(l, n, now);
		return;
	}
	for (size_t j = 0; j < n; j++)
		set_state(l, &l->flights[l->batch_flight[j]], FLIGHT_RECORDING);
}

/*
 * The batch in flight could not be recorded: its outcomes are queued
 * again, as they were before it was sent.
 */
static void
flush_requeue(struct loop *l, size_t n)
{
	for (size_t j = 0; j < n; j++)
		set_state(l, &l->flights[l->batch_flight[j]], FLIGHT_DONE);
}

/* Takes the answer to the batch in flight, when it is in. */
static void
flush_answer(struct loop *l)
{
	int64_t now = clock_ms();
	size_t n = l->nbatch;
	int r;

	if (!store_complete_pending(l->st) || (r = store_complete_take(l->st, l->accepted)) == 0)
		return;
	l->nbatch = 0;
	flush_requeue(l, n);
	if (r == -1) {
		size_t left;

		if (!store_connected(l->st) || !store_failed_on_data(l->st)) {
			flush_failed(l, n, now);
			return;
		}
		n = record_one_by_one(l, n, &left);
		if (left > 0)
			flush_failed(l, left, now);
		else if (l->flush_failing_since_ms != 0)
			l->flush_failing_since_ms = 0;
	} else if (l->flush_failing_since_ms != 0) {
		log_info("recording outcomes again after %.1f s",
		    (double)(now - l->flush_failing_since_ms) / 1000.0);
		l->flush_failing_since_ms = 0;
		l->next_flush_ms = 0;
	}
	l->db_proven = true;
	for (size_t j = 0; j < n; j++) {
		struct flight *f = &l->flights[l->batch_flight[j]];

		log_outcome(f, l->accepted[j]);
		telemetry_recorded(f->item.kind, f->done.state, l->accepted[j]);
		if (!l->accepted[j])
			l->n_rejected++;
		else if (f->done.state == COMPLETION_DONE)
			l->n_done++;
		else if (f->done.state == COMPLETION_FAILED)
			l->n_failed++;
		else
			l->n_retry++;
		l->itemp[j] = &f->item;
	}
	lock_release(l->locks, l->itemp, n);
	for (size_t j = 0; j < n; j++)
		release_flight(l, l->batch_flight[j]);
}

static void
flush(struct loop *l)
{
	flush_answer(l);
	flush_send(l, clock_ms());
}

/*
 * The flush of a loop that ends: sends what is queued and waits for the
 * answer, within the statement's deadline, the one wait outside the
 * loop's poll, made once nothing else is left to do.  Each answer is
 * followed by the next send: the outcomes queued behind a batch in flight
 * (the calls abandoned at the deadline among them) go out after it.  It
 * ends, since a failed batch is retried only after a delay (flush_due).
 */
static void
flush_waiting(struct loop *l)
{
	flush(l);
	while (store_complete_pending(l->st)) {
		struct pollfd pfd = { .fd = store_fd(l->st), .events = store_events(l->st) };
		int64_t wait = store_deadline(l->st) - clock_ms();

		if (!store_connected(l->st))
			break;
		if (poll(&pfd, 1, wait < 0 ? 0 : wait > 1000 ? 1000 : (int)wait) == -1 &&
		    errno != EINTR)
			break;
		store_drive(l->st, pfd.revents, clock_ms());
		flush(l);
	}
}

/* How the history names the answer to a call (attempts.class). */
static const char *
history_class(enum item_kind kind, enum api_class cls)
{
	switch (cls) {
	case API_SUCCESS: return kind == ITEM_INVOICE ? "paid" : "redeemed";
	case API_DECLINED: return "declined";
	case API_REFUSED: return "refused";
	case API_KEY_REUSED: return "key reused";
	case API_WORKER: return "worker-level";
	case API_IN_PROGRESS: return "in progress";
	case API_TRANSIENT: return "transient";
	case API_AMBIGUOUS: return "ambiguous";
	}
	return "unknown";
}

/* The history's view of a completion: when it started, what answered. */
static void
stamp_history(struct flight *f, long http_status, const char *cls)
{
	f->done.started_unix_ms = f->started_unix_ms;
	f->done.http_status = http_status;
	f->done.history_class = cls;
}

/* Takes IT into a free flight; NULL when none is free. */
static struct flight *
take_flight(struct loop *l, struct item *it)
{
	int slot = free_flight(l);
	struct flight *f;

	if (slot == -1) {
		/* Cannot happen: claims never exceed free flights.  The lease runs out. */
		log_error("%s %" PRId64 ": no free slot", item_kind_name(it->kind), it->id);
		item_clear(it);
		return NULL;
	}
	f = &l->flights[slot];
	f->item = *it;
	memset(it, 0, sizeof(*it));
	f->latency_ms = 0;
	f->http_status = 0;
	f->started_unix_ms = clock_wall_ms();
	f->busy = false;
	l->busy++;
	return f;
}

/*
 * Starts F's call, or queues its refusal (REFUSE: failed with that
 * reason, no call) or its deferral (DEFER: pending again shortly, no
 * call, e.g. its hold could not be written because the database failed).
 */
static void
start_flight(struct loop *l, struct flight *f, const char *refuse, const char *defer)
{
	int slot = (int)(f - l->flights);
	const char *reason;

	/* For the history: a redemption's call starts after its reservation. */
	f->started_unix_ms = clock_wall_ms();
	if (refuse != NULL) {
		outcome_refused(&f->item, refuse, &f->done);
		set_state(l, f, FLIGHT_DONE);
		return;
	}
	if (defer != NULL) {
		outcome_abandoned(&f->item, defer, &f->done);
		f->done.calls = 0;
		f->done.ambiguous = f->item.ambiguous;
		f->done.delay_ms = l->cfg->worker.poll_interval_ms;
		set_state(l, f, FLIGHT_DONE);
		return;
	}
	if (item_validate(&f->item, &reason) == -1) {
		if (f->item.ambiguous) {
			/*
			 * An earlier attempt may have charged and the row has
			 * changed since: failing it could leave a charge without
			 * a record.  Keep it pending and overdue for a human.
			 */
			log_error("%s %" PRId64 ": %s, but an earlier attempt may have taken "
			    "effect; left pending for an operator (see status)",
			    item_kind_name(f->item.kind), f->item.id, reason);
			outcome_abandoned(&f->item, reason, &f->done);
			f->done.calls = 0;
			f->done.delay_ms = l->cfg->billing_api.backoff_max_ms;
			snprintf(f->done.operator_note, sizeof(f->done.operator_note),
			    "an earlier attempt may have taken effect and the row has changed "
			    "since (%s): it is not sent again as it is", reason);
		} else {
			outcome_refused(&f->item, reason, &f->done);
		}
		set_state(l, f, FLIGHT_DONE);
		return;
	}
	if (outcome_before_call(&f->item, &l->policy, &f->done)) {
		set_state(l, f, FLIGHT_DONE);     /* logged with its outcome */
		return;
	}
	if (api_start(l->api, &f->item, slot) == -1) {
		/* Never sent: try again soon, nothing ambiguous about it. */
		struct api_verdict v = { .cls = API_TRANSIENT, .retry_after_s = -1 };

		snprintf(v.error, sizeof(v.error), "could not start the API call");
		outcome_after_call(&f->item, &v, &l->policy, jitter_next(&l->rng), &f->done);
		f->done.calls = 0;
		stamp_history(f, 0, NULL);
		set_state(l, f, FLIGHT_DONE);
		return;
	}
	l->n_calls++;
	set_state(l, f, FLIGHT_CALLING);
	log_debug("%s %" PRId64 ": calling the billing API (attempt %d, fence %" PRId64 ")",
	    item_kind_name(f->item.kind), f->item.id, f->item.attempts + 1, f->item.fence);
}

/*
 * Whether a call may start now: within worker.concurrency, one at a time
 * while the API refuses this worker, none during our own 429's pause.
 */
static bool
slot_free(const struct loop *l, int64_t now)
{
	if (now < l->calls_paused_until_ms)
		return false;
	return l->refused.on ? calls_active(l) == 0 : calls_active(l) < l->cfg->worker.concurrency;
}

/* F, claimed ahead, waits for a call slot behind those already waiting. */
static void
wait_for_slot(struct loop *l, struct flight *f)
{
	l->ready_q[(l->ready_head + l->ready) % l->nflights] = (int)(f - l->flights);
	set_state(l, f, FLIGHT_READY);
}

/*
 * A claimed item on its way: a redemption that needs funds set aside waits
 * for its reservation; everything else starts (or is refused) now.
 */
static void
begin(struct loop *l, struct flight *f)
{
	const char *reason;

	if (f->item.kind == ITEM_REDEMPTION && !f->item.held &&
	    item_validate(&f->item, &reason) == 0) {
		set_state(l, f, FLIGHT_TO_RESERVE);
		l->nto_reserve++;
		return;
	}
	start_flight(l, f, NULL, NULL);
}

/*
 * The items claimed ahead, oldest first, into the slots that freed.  They
 * are claimed: as any claimed item, they get their call even when the
 * worker is stopping (within its shutdown deadline, see abandon_calls()).
 */
static void
start_ready(struct loop *l, int64_t now)
{
	while (l->ready > 0 && slot_free(l, now)) {
		struct flight *f = &l->flights[l->ready_q[l->ready_head]];

		l->ready_head = (l->ready_head + 1) % l->nflights;
		begin(l, f);
	}
}

#define REFUSED_PUT_BACK "not called: the billing API refuses this worker"

/*
 * F, claimed and not called, goes back to pending as it is, due again at
 * once (for another worker, or a later claim): no call made, no attempt
 * counted, the ambiguous flag kept (start_flight).
 */
static void
put_back(struct loop *l, struct flight *f, const char *why)
{
	start_flight(l, f, NULL, why);
	f->done.delay_ms = 0;
}

/*
 * A freshly claimed item into a flight: begun when a call slot is free,
 * else waiting for one (claims run ahead of the calls); refusals and
 * deferrals at once.  See start_flight().
 */
static void
launch(struct loop *l, struct item *it, const char *refuse, const char *defer)
{
	/* Asked before the flight is taken, which counts it as a call. */
	bool wait = l->ready > 0 || !slot_free(l, clock_ms());
	struct flight *f = take_flight(l, it);

	if (f == NULL)
		return;
	if (refuse != NULL || defer != NULL)
		start_flight(l, f, refuse, defer);
	else if (!wait)
		begin(l, f);
	else if (l->refused.on) {
		/*
		 * Refused, a slot is only for a probe: the rest of a claim sent
		 * before the refusal goes back, as the items claimed ahead did
		 * (api_refused).
		 */
		put_back(l, f, REFUSED_PUT_BACK);
	} else {
		wait_for_slot(l, f);
	}
}

/*
 * A redemption whose reservation met a row another transaction holds:
 * pending again in a few hundred milliseconds, with no call made, so its
 * attempts (and max_attempts) are untouched; its ambiguous flag is kept
 * (the completion only ever sets it), and it has no hold to lose, since
 * one that had a hold was never sent to be reserved.
 */
static void
defer_busy(struct loop *l, struct flight *f)
{
	start_flight(l, f, NULL, "funds not reserved yet: the subsidy's row or the "
	    "redemption's is locked by another transaction");
	f->busy = true;
	f->done.delay_ms = BUSY_DEFER_MS + (int64_t)(jitter_next(&l->rng) % BUSY_JITTER_MS);
	log_debug("redemption %" PRId64 ": subsidy %" PRId64 " or the redemption's row is "
	    "locked by another transaction; tried again in %" PRId64 " ms, no call made",
	    f->item.id, f->item.subsidy_id, f->done.delay_ms);
}

#define RESERVE_FAILED "funds could not be reserved: database error"

/*
 * Sends the reservation of every redemption waiting for one, unless one
 * is in flight: its answer comes at a later turn (reservations_answered).
 */
static void
reservations_send(struct loop *l)
{
	size_t m = 0;

	if (l->nto_reserve == 0 || store_reserve_pending(l->st))
		return;
	l->nto_reserve = 0;
	for (int i = 0; i < l->nflights; i++) {
		if (l->flights[i].state != FLIGHT_TO_RESERVE)
			continue;
		l->reserve_slot[m] = i;
		l->itemp[m++] = &l->flights[i].item;
	}
	if (m == 0)
		return;
	if (store_reserve_send(l->st, l->itemp, m) == -1) {
		note_db_failure(l, "could not reserve funds");
		for (size_t j = 0; j < m; j++)
			start_flight(l, &l->flights[l->reserve_slot[j]], NULL, RESERVE_FAILED);
		return;
	}
	l->nreserve = m;
	for (size_t j = 0; j < m; j++)
		set_state(l, &l->flights[l->reserve_slot[j]], FLIGHT_RESERVING);
}

/*
 * The reservation's answer: a hold goes on to its call; a claim found
 * stale is dropped without a word to the database; one whose rows another
 * transaction holds is put back for a moment, so no lock anyone keeps can
 * stall the loop; too little money is a refusal.
 */
static void
reservations_answered(struct loop *l)
{
	int r;

	if (!store_reserve_pending(l->st) || (r = store_reserve_take(l->st, l->reserved)) == 0)
		return;
	if (r == -1)
		note_db_failure(l, "could not reserve funds");
	for (size_t j = 0; j < l->nreserve; j++) {
		struct flight *f = &l->flights[l->reserve_slot[j]];

		if (r == -1) {
			start_flight(l, f, NULL, RESERVE_FAILED);
			continue;
		}
		switch (l->reserved[j]) {
		case RESERVE_HELD:
			f->item.held = true;
			start_flight(l, f, NULL, NULL);
			break;
		case RESERVE_LOST:
			log_warnx("redemption %" PRId64 ": claim lost before its funds were "
			    "reserved; left to its new holder", f->item.id);
			l->itemp[0] = &f->item;
			lock_release(l->locks, l->itemp, 1);
			release_flight(l, l->reserve_slot[j]);
			/* No outcome to wake us: the items claimed ahead take its slot now. */
			l->slot_freed_late = true;
			break;
		case RESERVE_BUSY:
			defer_busy(l, f);
			break;
		case RESERVE_INSUFFICIENT:
		default:
			start_flight(l, f, "insufficient funds", NULL);
			break;
		}
	}
	l->nreserve = 0;
}

/* Reservations: the answer in, the next batch out. */
static void
reservations(struct loop *l)
{
	reservations_answered(l);
	reservations_send(l);
}

/*
 * Redemptions: set the money aside before calling the API (the escrow
 * step).  Items already holding funds from an earlier attempt go straight
 * on, and bad rows are refused before any hold; the others wait in their
 * flights for their reservation (claimed ahead, for a call slot first).
 */
static void
reserve_then_launch(struct loop *l, size_t n)
{
	for (size_t i = 0; i < n; i++)
		launch(l, &l->claimed[i], NULL, NULL);
	reservations_send(l);
}

/* A claim failed: said once per outage, and tried again at the next poll. */
static void
claim_failed(struct loop *l)
{
	if (!store_connected(l->st))
		note_db_failure(l, "could not claim items");
	else if (!lock_redis_down(l->locks))
		log_warnx("could not claim items: %s", claim_errmsg(l->claims));
	/* A Redis outage is logged once, by the lock manager, not every poll. */
	if (l->claim_failing_since_ms == 0)
		l->claim_failing_since_ms = clock_ms();
}

/*
 * Starts claiming up to a batch of due items of both kinds, as many as
 * there is room for; the claim step answers at a later turn.  Returns 0,
 * or -1 when the claim could not start.
 */
static int
claim_begin(struct loop *l)
{
	int room = l->refused.on ? 1 : claim_room(l);
	size_t want;

	if (room <= 0)
		return 0;
	want = (size_t)room < (size_t)l->cfg->worker.batch_size ?
	    (size_t)room : (size_t)l->cfg->worker.batch_size;
	if (claim_start(l->claims, want) == -1) {
		claim_failed(l);
		return -1;
	}
	return 0;
}

/*
 * The claim is in: invoices go straight to their calls; redemptions first
 * reserve funds.  Returns 1 when more may be due now, else 0.
 */
static int
claimed(struct loop *l, size_t n, bool more)
{
	size_t nred = 0;

	l->claim_failing_since_ms = 0;
	l->db_proven = true;
	metrics_set_last_poll(time(NULL));
	for (size_t i = 0; i < n; i++) {
		if (l->claimed[i].kind == ITEM_INVOICE) {
			launch(l, &l->claimed[i], NULL, NULL);
		} else {
			struct item tmp = l->claimed[nred];

			l->claimed[nred++] = l->claimed[i];
			l->claimed[i] = tmp;
		}
	}
	reserve_then_launch(l, nred);
	return more ? 1 : 0;
}

/*
 * Writes this worker's row of the fleet's registry: who it is, that it is
 * alive, whether the API refuses it.  Best effort: the next heartbeat
 * writes it again.
 */
static void
worker_seen(struct loop *l, int64_t now)
{
	struct worker_info wi = {
		.id = l->cfg->worker.id,
		.host = l->host,
		.version = BW_VERSION,
		.lock_mode = config_lock_mode_name(l->cfg->locks.mode),
	};

	l->next_seen_ms = now + HEARTBEAT_MS;
	l->refused.recorded_at_ms = now;
	if (!store_connected(l->st))
		return;
	if (store_worker_seen(l->st, &wi, l->refused.on ? l->refused.reason : NULL) == -1)
		log_warnx("%s", store_errmsg(l->st));
}

/* Every item claimed ahead and not called yet goes back (put_back). */
static void
put_back_ready(struct loop *l, const char *why)
{
	while (l->ready > 0) {
		struct flight *f = &l->flights[l->ready_q[l->ready_head]];

		l->ready_head = (l->ready_head + 1) % l->nflights;
		put_back(l, f, why);
	}
}

/*
 * The billing API answered 401, 403, 404 or 405: the token or the base URL
 * is wrong, for every item alike.  Stop taking items (each would only get
 * the same answer) and say so once; the items stay pending, and one item
 * now and then probes whether the API lets the worker in again.
 */
static void
api_refused(struct loop *l, const struct api_verdict *v, long status, int64_t now)
{
	char url[512];

	if (l->refused.on) {
		/* A probe's answer: when it was, for status. */
		if (now - l->refused.recorded_at_ms >= PROBE_MIN_MS)
			worker_seen(l, now);
		return;
	}
	config_url_for_log(l->cfg->billing_api.base_url, url, sizeof(url));
	l->refused.on = true;
	l->refused.since_ms = now;
	backoff_reset(&l->refused.probe_backoff);
	l->refused.probe_at_ms = now + backoff_peek(&l->refused.probe_backoff);
	snprintf(l->refused.reason, sizeof(l->refused.reason), "http %ld from the billing API "
	    "at \"%s\" (%s)", status, url, v->error);
	log_error("the billing API at \"%s\" answered http %ld (%s): the token "
	    "(billing_api.token_file) or billing_api.base_url is wrong, or a proxy is in the "
	    "way; taking no new items and keeping every item pending, probing again with "
	    "backoff (at most every %d s); after fixing the token, SIGHUP probes at once",
	    url, status, v->error, PROBE_MAX_MS / 1000);
	metrics_set_api_blocked(true);
	telemetry_api_refused(l->tm, l->refused.reason);
	worker_seen(l, now);
	/*
	 * Each would get the same answer, and slot_free() lets one start as
	 * each refusal comes back: up to two batches of calls in a row, with
	 * no backoff, which the probes are there to avoid.
	 */
	put_back_ready(l, REFUSED_PUT_BACK);
}

/* An answer that got past authentication and routing: the worker is let in. */
static void
api_admitted(struct loop *l, long status, int64_t now)
{
	l->api_proven = true;
	if (!l->refused.on)
		return;
	log_info("the billing API lets this worker in again (http %ld) after %.1f s; taking "
	    "new items", status, (double)(now - l->refused.since_ms) / 1000.0);
	l->refused.on = false;
	metrics_set_api_blocked(false);
	telemetry_api_refused(l->tm, NULL);
	worker_seen(l, now);
}

/*
 * The due query reads the fleet's pauses (billing-worker pause): a change
 * is logged once and shown in the metrics and the systemd status line.
 * Claims of a paused kind take nothing; calls in flight finish.
 */
static void
note_pauses(struct loop *l)
{
	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		const char *note = store_pause_note(l->st, k);
		bool paused = note[0] != '\0';

		if (paused == l->paused[k])
			continue;
		if (paused)
			log_warnx("billing of %ss is paused fleet-wide: %s; taking none until "
			    "billing-worker resume", item_kind_name(k), note);
		else
			log_info("billing of %ss resumed", item_kind_name(k));
		l->paused[k] = paused;
		metrics_set_paused(k, paused);
		telemetry_paused(l->tm, k, paused ? note : NULL);
	}
}

/*
 * Whether claims may run now.  While the API refuses the worker, only a
 * probe: one item, once nothing is in flight, when the probe's time comes.
 */
static bool
may_claim(const struct loop *l, int64_t now)
{
	if (!l->refused.on)
		return true;
	return l->busy == 0 && now >= l->refused.probe_at_ms;
}

/* A probe was sent: the next one waits longer, up to PROBE_MAX_MS. */
static void
probe_sent(struct loop *l, int64_t now)
{
	l->refused.probe_at_ms = now + backoff_take(&l->refused.probe_backoff);
}

static void
collect(struct loop *l)
{
	struct api_verdict v;
	double latency;
	long status;
	int tag;

	while (api_next_result(l->api, &tag, &v, &latency, &status) == 1) {
		struct flight *f = &l->flights[tag];

		f->latency_ms = latency;
		f->http_status = status;
		metrics_api_call(status, latency);
		outcome_after_call(&f->item, &v, &l->policy, jitter_next(&l->rng), &f->done);
		stamp_history(f, status, history_class(f->item.kind, v.cls));
		if (v.cls == API_WORKER)
			api_refused(l, &v, status, clock_ms());
		else if (api_class_admitted(v.cls))
			api_admitted(l, status, clock_ms());
		if (status == 429) {
			/* The API is over its limit for everyone: the whole fleet waits. */
			int pause_ms = v.retry_after_s > 0 ? v.retry_after_s * 1000 : 1000;

			fleet_pause(l->fleet, pause_ms);
			l->calls_paused_until_ms = clock_ms() + pause_ms;
			log_info("billing API answered 429: no worker starts a call for %d ms",
			    pause_ms);
		}
		if (v.cls == API_KEY_REUSED)
			log_error("%s %" PRId64 ": the billing API says its idempotency key was "
			    "used with a different body; the row changed after an attempt, "
			    "which is a bug in a producer: %s", item_kind_name(f->item.kind),
			    f->item.id, v.error);
		set_state(l, f, FLIGHT_DONE);
	}
}

/*
 * history.retention_days: a thousand rows at most per statement, so no
 * prune holds a lock for long; again after a second while a batch comes
 * back full, else after a minute.  Only the daemon prunes.
 */
#define PRUNE_BATCH 1000
#define PRUNE_EVERY_MS 60000
static void
prune_history(struct loop *l, int64_t now)
{
	int n = 0;

	if (l->once || l->cfg->history.retention_days == 0 || now < l->next_prune_ms ||
	    !store_connected(l->st))
		return;
	if (store_prune_history(l->st, l->cfg->history.retention_days, PRUNE_BATCH, &n) == -1) {
		log_warnx("%s", store_errmsg(l->st));
		n = 0;
	} else if (n > 0) {
		log_debug("history: pruned %d attempt%s of items finished more than %d days ago",
		    n, n == 1 ? "" : "s", l->cfg->history.retention_days);
	}
	l->next_prune_ms = now + (n == PRUNE_BATCH ? 1000 : PRUNE_EVERY_MS);
}

/* The items in flight whose leases are kept, into itemp; how many. */
static size_t
leased_items(struct loop *l)
{
	size_t n = 0;

	/* Not those being recorded: their rows may be finished already. */
	for (int i = 0; i < l->nflights; i++)
		if (l->flights[i].state != FLIGHT_FREE && l->flights[i].state != FLIGHT_RECORDING)
			l->itemp[n++] = &l->flights[i].item;
	return n;
}

/* Sends the renewal of every lease in flight; its answer comes at a later turn. */
static void
renew(struct loop *l)
{
	size_t n = leased_items(l);

	if (n > 0 && store_connected(l->st) && claim_renew_start(l->claims, l->itemp, n) == -1)
		note_db_failure(l, "could not renew leases");
}

/* Takes the renewals' answers, once in: the items whose lease was lost are marked. */
static void
renewed(struct loop *l)
{
	if (claim_renewing(l->claims) &&
	    claim_renew_poll(l->claims, l->itemp, leased_items(l)) == -1)
		note_db_failure(l, "could not renew leases");
}

/*
 * SIGHUP reads the API token again, so a rotation needs no restart; a
 * worker the API refused probes at once with it.  A token that cannot be
 * read keeps the running one.
 */
static void
reload_token(struct loop *l)
{
	static char token[SECRET_MAX];

	if (secret_api_token(l->cfg, token, sizeof(token)) == -1) {
		log_warnx("reload: keeping the running API token");
		return;
	}
	if (api_client_set_token(l->api, token) == -1)
		log_warnx("reload: out of memory; keeping the running API token");
	explicit_bzero(token, sizeof(token));
	if (l->refused.on) {
		l->refused.probe_at_ms = clock_ms();
		backoff_reset(&l->refused.probe_backoff);
		log_info("reload: API token read again; probing the billing API now");
	}
}

/* SIGHUP: load the file again; apply what can change live, keep the rest. */
static void
reload(struct loop *l)
{
	struct bw_config *fresh;
	char *errors = NULL, *names = NULL, *changed = NULL;
	int nerr, nchanged;

	if ((fresh = calloc(1, sizeof(*fresh))) == NULL) {
		log_warnx("reload: out of memory; keeping the running configuration");
		return;
	}
	telemetry_reloading(l->tm);
	nerr = config_load(l->cfg->path, fresh, &errors);
	if (nerr == 0 && config_resolve_worker_id(fresh) == -1) {
		log_warnx("reload: out of memory; keeping the running configuration");
		config_free(fresh);
		free(fresh);
		telemetry_reloaded(l->tm);
		return;
	}
	if (nerr != 0) {
		log_warnx("reload: \"%s\" has %d error%s; keeping the running configuration:\n%s",
		    l->cfg->path, nerr, nerr == 1 ? "" : "s", errors ? errors : "");
		free(errors);
		config_free(fresh);
		free(fresh);
		telemetry_reloaded(l->tm);
		return;
	}
	if (config_restart_needed(l->cfg, fresh, &names) > 0)
		log_warnx("reload: changes to %s need a restart; running values kept", names);
	free(names);
	if (reserve(l, 3 * fresh->worker.concurrency, fresh->worker.batch_size) == -1) {
		log_warnx("reload: out of memory; keeping the running configuration");
		config_free(fresh);
		free(fresh);
		telemetry_reloaded(l->tm);
		return;
	}
	if ((nchanged = config_apply_reloadable(l->cfg, fresh, &changed)) == -1) {
		log_warnx("reload: out of memory; keeping the running configuration");
		config_free(fresh);
		free(fresh);
		telemetry_reloaded(l->tm);
		return;
	}
	config_free(fresh);
	free(fresh);

	policy_from(&l->policy, l->cfg);
	api_client_set_limits(l->api, l->cfg->billing_api.timeout_ms,
	    l->cfg->billing_api.connect_timeout_ms, l->cfg->worker.concurrency);
	claim_set_ttl(l->claims, l->cfg->locks.ttl_ms);
	store_set_history(l->st, l->cfg->history.enabled);
	claim_set_park_delay(l->claims, l->cfg->billing_api.backoff_max_ms);
	fleet_set_rate(l->fleet, l->cfg->billing_api.max_requests_per_second);
	log_set_level((int)l->cfg->log.level);
	log_set_json(l->cfg->log.format == LOG_FORMAT_JSON);
	reload_token(l);
	telemetry_reloaded(l->tm);
	log_info("configuration reloaded (concurrency %d, batch %d, poll %d ms; changed: %s)",
	    l->cfg->worker.concurrency, l->cfg->worker.batch_size,
	    l->cfg->worker.poll_interval_ms, nchanged > 0 ? changed : "nothing");
	free(changed);
}

/*
 * At the shutdown deadline: stop the calls still running; they may have
 * charged.  Items claimed ahead and never called go back to pending as
 * they are, due again at once.
 */
static void
abandon_calls(struct loop *l)
{
	put_back_ready(l, "not called before the shutdown deadline");
	for (int i = 0; i < l->nflights; i++) {
		struct flight *f = &l->flights[i];

		if (f->state != FLIGHT_CALLING)
			continue;
		api_abort(l->api, i);
		outcome_abandoned(&f->item, "call abandoned at shutdown", &f->done);
		stamp_history(f, 0, "abandoned");
		set_state(l, f, FLIGHT_DONE);
		log_warnx("%s %" PRId64 ": call abandoned at the shutdown deadline; "
		    "due again at once under the same key", item_kind_name(f->item.kind), f->item.id);
	}
}

/*
 * The LISTEN connection could not be opened, or was lost: said, and tried
 * again after a backoff, or soon when it had been up.
 */
static void
listen_lost(struct loop *l, int64_t now, bool was_up)
{
	l->listening = false;
	log_warnx("%s; polling every %d ms until it returns",
	    store_listener_errmsg(l->listener), l->cfg->worker.poll_interval_ms);
	l->next_listen_try_ms = now + (was_up ? backoff_peek(&l->listen_backoff) :
	    backoff_take(&l->listen_backoff));
}

/*
 * Keeps the LISTEN connection up: reconnects with backoff when it is down,
 * turns what arrived on it into an early claim, and hands the backlog
 * query's answer (backlog_service) to telemetry.  Polling every
 * poll_interval_ms goes on regardless, so nothing waits on this.
 */
static void
listen_service(struct loop *l, short revents)
{
	int64_t now = clock_ms();
	bool was_listening = l->listening, now_listening;
	int64_t due[ITEM_KIND_COUNT];
	double oldest[ITEM_KIND_COUNT];
	int n;

	if (l->listener == NULL)
		return;
	if (!store_listener_active(l->listener)) {
		if (now < l->next_listen_try_ms || !store_connected(l->st))
			return;
		if (store_listener_connect(l->listener) == -1) {
			listen_lost(l, now, false);
			return;
		}
		revents = 0;        /* a connect just started: nothing to read yet */
	}
	n = store_listener_drive(l->listener, revents, now, &now_listening);
	if (n == -1) {
		/* A connect that failed backs off; a connection that was up retries soon. */
		listen_lost(l, now, was_listening);
		return;
	}
	if (now_listening) {
		l->listening = true;
		log_info("listening for new items");
		backoff_reset(&l->listen_backoff);
	}
	switch (store_listener_backlog(l->listener, due, oldest)) {
	case 1:
		telemetry_backlog(l->tm, due, oldest);
		break;
	case -1:
		log_warnx("%s", store_listener_errmsg(l->listener));
		break;
	default:
		break;
	}
	if (n > 0) {
		int64_t at = now + (int64_t)(jitter_next(&l->rng) % (NOTIFY_JITTER_MS + 1));

		if (at < l->next_poll_ms)
			l->next_poll_ms = at;
	}
}

/*
 * The backlog gauges' query, when telemetry wants it: on the LISTEN
 * connection, whose answer listen_service() hands over, so that a slow one
 * (a pinned xmin horizon makes it walk every row version since the pin)
 * holds up neither the loop nor the claims and completions queued on our
 * own connection.  While that connection is down (reconnecting, or its
 * last backlog query missed the deadline) the gauges keep their last
 * answer: the query that took it down would take ours down next.  Without
 * one at all (a once run, a transaction pooler and no
 * database.listen_conninfo) it runs on our own, as a statement the loop
 * waits for, bounded by its deadline.
 */
static void
backlog_service(struct loop *l, int64_t now)
{
	int64_t due[ITEM_KIND_COUNT];
	double oldest[ITEM_KIND_COUNT];
	int r;

	if (!telemetry_backlog_wanted(l->tm))
		return;
	if (l->listener != NULL) {
		/* The main connection's client deadline: the server's timeout and 1 s. */
		r = store_listener_backlog_send(l->listener, l->cfg->database.query_timeout_ms + 1000,
		    now);
		if (r == 1)
			return;     /* not listening, or the last one still out */
		telemetry_backlog_asked(l->tm, now);
		if (r == -1)
			listen_lost(l, now, true);
		return;
	}
	telemetry_backlog_asked(l->tm, now);
	if (store_connected(l->st) && store_backlog(l->st, due, oldest) == 0)
		telemetry_backlog(l->tm, due, oldest);
}

/*
 * The conninfo the LISTEN connection uses, or NULL for none (once runs).
 * A transaction pooler hands each transaction to any server connection, so
 * a LISTEN through it hears nothing: it needs database.listen_conninfo,
 * a direct connection, or there is none and the poll finds new items.
 */
static const char *
listen_conninfo(const struct loop *l)
{
	const struct bw_config *cfg = l->cfg;

	if (l->once)
		return NULL;
	if (cfg->database.listen_conninfo[0] != '\0')
		return cfg->database.listen_conninfo;
	return cfg->database.pooling == DB_POOLING_TRANSACTION ? NULL : cfg->database.conninfo;
}

static int
loop_setup(struct loop *l, const char *token, const char *redis_password)
{
	const struct bw_config *cfg = l->cfg;
	struct api_options ao = {
		.base_url = cfg->billing_api.base_url,
		.token = token,
		.timeout_ms = cfg->billing_api.timeout_ms,
		.connect_timeout_ms = cfg->billing_api.connect_timeout_ms,
		.max_connections = cfg->worker.concurrency,
		.ca_file = cfg->billing_api.ca_file,
	};
	struct lock_options lo = {
		.policy = claim_lock_policy(cfg->locks.mode),
		.ttl_ms = cfg->locks.ttl_ms,
		.worker_id = cfg->worker.id,
	};
	struct redis_options ro;
	struct claim_options co = {
		.policy = lo.policy,
		.ttl_ms = cfg->locks.ttl_ms,
		.park_ms = cfg->billing_api.backoff_max_ms,
	};
	char err[256];

	claim_redis_options(cfg, redis_password, &ro);
	jitter_seed(&l->rng);
	policy_from(&l->policy, cfg);
	if (gethostname(l->host, sizeof(l->host)) == -1)
		snprintf(l->host, sizeof(l->host), "localhost");
	l->host[sizeof(l->host) - 1] = '\0';
	backoff_init(&l->db_backoff, DB_RETRY_MIN_MS, DB_RETRY_MAX_MS);
	backoff_init(&l->listen_backoff, DB_RETRY_MIN_MS, DB_RETRY_MAX_MS);
	backoff_init(&l->flush_backoff, FLUSH_RETRY_MIN_MS, FLUSH_RETRY_MAX_MS);
	backoff_init(&l->refused.probe_backoff, PROBE_MIN_MS, PROBE_MAX_MS);
	if (reserve(l, 3 * cfg->worker.concurrency, cfg->worker.batch_size) == -1) {
		log_error("out of memory");
		return -1;
	}
	if (store_new(cfg->database.conninfo, cfg->worker.id, &l->st) == -1 ||
	    (listen_conninfo(l) != NULL &&
	    store_listener_new(listen_conninfo(l), &l->listener) == -1) ||
	    (lo.policy != LOCK_POLICY_SKIP_LOCKED && redis_conn_new(&ro, &l->redis) == -1) ||
	    lock_new(&lo, l->redis, &l->locks) == -1 ||
	    fleet_new(l->redis, cfg->worker.id, &l->fleet) == -1 ||
	    (co.redis = l->redis, claim_new(&co, l->st, l->locks, l->fleet, &l->claims)) == -1) {
		log_error("out of memory");
		return -1;
	}
	if (!l->once && listen_conninfo(l) == NULL)
		log_info("database.pooling is \"transaction\" and database.listen_conninfo is "
		    "not set: a transaction pooler cannot keep a LISTEN, so new items are "
		    "found by polling every %d ms (worker.poll_interval_ms)",
		    cfg->worker.poll_interval_ms);
	store_set_query_timeout(l->st, cfg->database.query_timeout_ms);
	store_set_pooling(l->st, cfg->database.pooling == DB_POOLING_TRANSACTION);
	store_set_pipeline(l->st, true);
	store_set_history(l->st, cfg->history.enabled);
	fleet_set_rate(l->fleet, cfg->billing_api.max_requests_per_second);
	if (telemetry_new(cfg, l->once, &l->tm) == -1)
		return -1;
	if (api_client_new(&ao, &l->api, err, sizeof(err)) == -1) {
		log_error("could not set up the billing API client: %s", err);
		return -1;
	}
	if (signals_setup() == -1) {
		log_warn("could not install signal handlers");
		return -1;
	}
	return 0;
}

static void
loop_teardown(struct loop *l)
{
	for (int i = 0; i < l->nflights; i++)
		item_clear(&l->flights[i].item);
	free(l->flights);
	free(l->free_slots);
	free(l->ready_q);
	free(l->claimed);
	free(l->batch);
	free(l->accepted);
	free(l->batch_flight);
	free(l->itemp);
	free(l->reserved);
	free(l->reserve_slot);
	api_client_free(l->api);
	telemetry_free(l->tm);
	/*
	 * The connection first: a job still in flight on it (the claim's
	 * locks, a lock release) belongs to the modules freed after, and the
	 * connection marks them failed as it closes.
	 */
	redis_conn_free(l->redis);
	claim_free(l->claims);
	fleet_free(l->fleet);
	lock_free(l->locks);
	store_listener_free(l->listener);
	store_free(l->st);
}

/*
 * A once run must end, whatever is wrong: it has worker.once_patience_ms of
 * patience for a database or Redis it cannot reach, for claims that keep
 * failing, for outcomes it cannot record and for an API that refuses it,
 * then gives up (logged, with the reason) and exits 1.  Returns 0 while it
 * is patient, 1 when the run should stop taking items and end once its
 * calls in flight are recorded, 2 when it should end now (nothing it waits
 * for can be recorded).
 */
static int
once_out_of_patience(struct loop *l, int64_t now)
{
	const char *why = NULL, *detail = "";
	int64_t since = 0;
	int verdict = 1;

	if (l->db_down_since_ms != 0) {
		why = "the database was unreachable";
		since = l->db_down_since_ms;
		detail = store_errmsg(l->st);
		verdict = 2;
	} else if (l->claim_failing_since_ms != 0) {
		why = "claims kept failing";
		since = l->claim_failing_since_ms;
		detail = claim_errmsg(l->claims);
	} else if (l->flush_failing_since_ms != 0) {
		why = "outcomes could not be recorded";
		since = l->flush_failing_since_ms;
		detail = store_errmsg(l->st);
		verdict = 2;
	} else if (l->refused.on) {
		why = "the billing API refused this worker";
		since = l->refused.since_ms;
		detail = l->refused.reason;
	}
	if (why == NULL || now - since <= l->cfg->worker.once_patience_ms)
		return 0;
	if (verdict == 2)
		log_error("%s for %.1f s (worker.once_patience_ms): %s; ending this once run with "
		    "%d item%s unrecorded (their leases run out and they are retried)", why,
		    (double)(now - since) / 1000.0, detail[0] != '\0' ? detail : "no detail",
		    l->busy, l->busy == 1 ? "" : "s");
	else
		log_error("%s for %.1f s (worker.once_patience_ms): %s; ending this once run: no "
		    "new items, %d call%s in flight still recorded", why,
		    (double)(now - since) / 1000.0, detail[0] != '\0' ? detail : "no detail",
		    l->busy, l->busy == 1 ? "" : "s");
	return verdict;
}

/*
 * Seconds on the monotonic clock, to the microsecond: clock_ms() is too
 * coarse for the loop's stall, whose healthy turns are under a millisecond.
 */
static double
stall_clock_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Waits for the database at start; false when a once run should give up. */
static bool
first_connect(struct loop *l)
{
	int64_t start = clock_ms();

	for (;;) {
		if (got_stop)
			return false;
		if (db_ready(l)) {
			if (store_check_schema(l->st) == 0)
				return true;
			log_error("%s", store_errmsg(l->st));
			return false;
		}
		telemetry_waiting(l->tm, clock_ms(), store_errmsg(l->st));
		if (l->once && clock_ms() - start > l->cfg->worker.once_patience_ms) {
			log_error("database unreachable for %.1f s (worker.once_patience_ms); "
			    "giving up this run", (double)l->cfg->worker.once_patience_ms / 1000.0);
			return false;
		}
		usleep(50 * 1000);
	}
}

/* SIGTERM/SIGINT: no new items, a bounded wait for calls in flight.  SIGHUP: reload. */
static void
take_signals(struct loop *l, int64_t now)
{
	if (got_stop && !l->stopping) {
		l->stopping = true;
		l->stop_deadline_ms = now + l->cfg->worker.shutdown_timeout_ms;
		log_info("stopping: no new items; waiting up to %d ms for %d call%s in flight",
		    l->cfg->worker.shutdown_timeout_ms, api_in_flight(l->api),
		    api_in_flight(l->api) == 1 ? "" : "s");
		telemetry_stopping(l->tm, l->busy);
	}
	if (got_reload) {
		got_reload = 0;
		reload(l);
	}
}

/* What comes due by the clock: lease renewals, history pruning, the heartbeat. */
static void
maintain(struct loop *l, int64_t now)
{
	renewed(l);
	if (now >= l->next_renew_ms) {
		renew(l);
		l->next_renew_ms = now + l->cfg->locks.renew_interval_ms;
	}
	prune_history(l, now);
	if (now >= l->next_seen_ms)
		worker_seen(l, now);
}

/*
 * After a claim (R: 1 when more may be due, 0 when not, -1 when it
 * failed): when to look again.  Returns true when a once run has nothing
 * left to do.
 */
static bool
claim_after(struct loop *l, int64_t now, int r)
{
	int64_t hold = claim_wait_ms(l->claims);

	note_pauses(l);
	if (l->refused.on && l->busy > 0)
		probe_sent(l, now);
	if (hold > 0)
		l->next_poll_ms = now + hold;       /* rate budget spent or a 429 pause */
	else if (r == 1)
		l->next_poll_ms = now;              /* more due: take them as room frees */
	else if (!store_connected(l->st))
		l->next_poll_ms = l->next_db_try_ms; /* the claim lost the connection: claim at the reconnect */
	else
		l->next_poll_ms = now + l->cfg->worker.poll_interval_ms;
	if (r == 0 && hold == 0 && l->once && l->busy == 0) {
		log_info("nothing due; once run finished");
		return true;
	}
	return false;
}

/*
 * Claims what is due when there is room: takes the answer of the claim in
 * flight, or starts one.  Returns true when a once run has nothing left
 * to do.
 */
static bool
take_work(struct loop *l, int64_t now)
{
	size_t n;
	bool more;
	int r;

	if (claim_busy(l->claims)) {
		if ((r = claim_poll(l->claims, l->claimed, &n, &more)) == 0)
			return false;
		if (r == -1)
			claim_failed(l);
		else
			r = claimed(l, n, more);
		now = clock_ms();
		if (claim_after(l, now, r))
			return true;
		/*
		 * More due and room left: the next claim goes out in this turn,
		 * before the wait that sends the calls just launched, so its
		 * round trips overlap them instead of following them.
		 */
	}
	/* A stop signalled during this turn takes nothing new either. */
	if (l->stopping || got_stop || now < l->next_poll_ms || claim_room(l) <= 0 ||
	    !may_claim(l, now) || !store_connected(l->st))
		return false;
	if (claim_begin(l) == -1)
		return claim_after(l, now, -1);
	/* Nothing to wait for (no room after all): as after an empty claim. */
	if (!claim_busy(l->claims))
		return claim_after(l, now, 0);
	return false;
}

/*
 * A once run's patience (once_out_of_patience): ends it now (true, with
 * *STATUS 1), or turns it into a stop that records its calls in flight.
 */
static bool
keep_patience(struct loop *l, int64_t now, int *status)
{
	int give_up;

	if (!l->once || (l->stopping && l->db_down_since_ms == 0))
		return false;
	give_up = once_out_of_patience(l, now);
	if (give_up != 0)
		*status = 1;
	if (give_up == 2)
		return true;
	if (give_up == 1 && !l->stopping) {
		l->stopping = true;
		l->stop_deadline_ms = now + l->cfg->worker.shutdown_timeout_ms;
	}
	return false;
}

/*
 * While stopping: true once every flight is recorded, or at the deadline,
 * after abandoning the calls still running and one last flush.
 */
static bool
stopped(struct loop *l, int64_t now)
{
	if (!l->stopping)
		return false;
	if (l->busy == 0 && !claim_busy(l->claims))
		return true;
	if (now < l->stop_deadline_ms)
		return false;
	abandon_calls(l);
	flush_waiting(l);
	if (l->busy > 0)
		log_warnx("%d outcome%s could not be recorded before exit; their leases run out "
		    "and the calls are repeated under the same keys", l->busy,
		    l->busy == 1 ? "" : "s");
	return true;
}

/* How long the loop may sleep: until the next thing the clock brings. */
static int
wait_budget_ms(const struct loop *l, int64_t now)
{
	int64_t wait = WAIT_MAX_MS;

	/* A claim in flight: its answer wakes us, not the clock. */
	if (!l->stopping && claim_room(l) > 0 && !claim_busy(l->claims) &&
	    (!l->refused.on || l->busy == 0)) {
		/* Refused with calls in flight: their answers wake us, not the clock. */
		int64_t at = l->next_poll_ms;

		if (l->refused.on && l->refused.probe_at_ms > at)
			at = l->refused.probe_at_ms;
		/*
		 * No claim before the database is back: not before the next
		 * connect, and not while one is under way (its socket and its
		 * deadline wake the loop).
		 */
		if (store_connecting(l->st))
			at = now + WAIT_MAX_MS;
		else if (!store_connected(l->st) && l->next_db_try_ms > at)
			at = l->next_db_try_ms;
		if (at - now < wait)
			wait = at - now;
	}
	if (l->next_renew_ms - now < wait)
		wait = l->next_renew_ms - now;
	if (l->db_down_since_ms != 0 && !store_connecting(l->st) && l->next_db_try_ms - now < wait)
		wait = l->next_db_try_ms - now;
	/*
	 * A connect in progress, the statements in flight and the LISTEN
	 * connection have deadlines of their own.
	 */
	if (store_connecting(l->st) && store_connect_deadline(l->st) - now < wait)
		wait = store_connect_deadline(l->st) - now;
	if (!store_connecting(l->st) && store_deadline(l->st) - now < wait)
		wait = store_deadline(l->st) - now;
	if (l->listener != NULL && store_listener_active(l->listener) &&
	    store_listener_deadline(l->listener) - now < wait)
		wait = store_listener_deadline(l->listener) - now;
	if (redis_wake_at(l) - now < wait)
		wait = redis_wake_at(l) - now;
	/* Stopping: the deadline is kept whether or not anything answers. */
	if (l->stopping && l->stop_deadline_ms - now < wait)
		wait = l->stop_deadline_ms - now;
	/*
	 * Items claimed ahead, held back by our 429's pause: at its end.  Not
	 * paused, they wait for a slot, and an answer frees it and wakes us:
	 * taking the pause's end (0, long past) as a reason to wake spun the
	 * loop at 0 ms waits whenever claims ran ahead of a slow API, about
	 * 200 000 turns a second, a core the database and the API's host
	 * shared with it.
	 */
	if (l->ready > 0 && l->calls_paused_until_ms > now && l->calls_paused_until_ms - now < wait)
		wait = l->calls_paused_until_ms - now;
	for (int i = 0; i < l->nflights; i++) {
		if (l->flights[i].state != FLIGHT_DONE)
			continue;
		/*
		 * Queued outcomes: now if they can be tried, else at the retry.
		 * Behind a batch in flight, its answer wakes us (its socket, its
		 * deadline): the retry time of a failed flush, long past, is not a
		 * reason to wake, and taking it as one spun the loop at 0 ms waits
		 * for as long as a batch took.
		 */
		if (flush_due(l, now))
			wait = 0;
		else if (store_connected(l->st) && !store_complete_pending(l->st) &&
		    l->next_flush_ms - now < wait)
			wait = l->next_flush_ms - now;
		break;
	}
	return wait < 0 ? 0 : (int)wait;
}

/*
 * With calls in flight and nothing due sooner, a turn lasts at least
 * worker.gather_us: the answers that arrive meanwhile are then taken in
 * one turn instead of one turn each.  A turn costs the same for one answer
 * as for twenty (the poll, the clock, the statements' and Redis' upkeep),
 * so this is what keeps the CPU per item flat when the API answers fast;
 * it adds at most gather_us to a call's time in its slot.  Only the API's
 * answers are gathered: the sleep is a poll on the other descriptors
 * (WAKE, the signal pipe first), so a statement's or a Redis command's
 * answer, or a signal, ends it at once.  A claim is three round trips
 * (due query, locks, claims) and each used to wait out a whole gather
 * behind the calls in flight, which bounded what one process could claim
 * against a fast API.
 */
static void
gather(struct loop *l, const struct api_waitfd *wake, unsigned nwake, int wait_ms)
{
	struct pollfd pfd[8];
	struct timespec ts;
	double left;
	unsigned n = 0;

	if (l->cfg->worker.gather_us <= 0 || wait_ms <= 0 || api_in_flight(l->api) == 0)
		return;
	/*
	 * Items claimed ahead wait for a slot: the slots, not the turns, bound
	 * the items per second now, and each answer frees one for them.
	 */
	if (l->ready > 0)
		return;
	left = l->turn_start_s + l->cfg->worker.gather_us / 1e6 - stall_clock_s();
	if (left > wait_ms / 1000.0)
		left = wait_ms / 1000.0;
	if (left <= 0)
		return;
	for (unsigned i = 0; i < nwake && n < sizeof(pfd) / sizeof(pfd[0]); i++) {
		if (wake[i].fd < 0 || wake[i].events == 0)
			continue;
		pfd[n].fd = wake[i].fd;
		pfd[n].events = wake[i].events;
		pfd[n].revents = 0;
		n++;
	}
	ts.tv_sec = (time_t)left;
	ts.tv_nsec = (long)((left - (double)ts.tv_sec) * 1e9);
	/* EINTR (a signal) ends it as an answer would; the wait after sees why. */
	(void)ppoll(pfd, n, &ts, NULL);
}

/*
 * The one place the loop sleeps: on the API's sockets, the signal pipe,
 * the LISTEN connection and telemetry's descriptors, for at most WAIT_MS.
 */
static void
wait_for_events(struct loop *l, int64_t now, int wait_ms)
{
	struct api_waitfd wake[6];
	unsigned nwake;

	wake[0].fd = wake_pipe[0];
	wake[0].events = POLLIN;
	wake[0].revents = 0;
	wake[1].fd = l->listener != NULL ? store_listener_fd(l->listener) : -1;
	wake[1].events = l->listener != NULL ? store_listener_events(l->listener) : 0;
	wake[1].revents = 0;
	wake[2].fd = store_connecting(l->st) ? store_connect_fd(l->st) : store_fd(l->st);
	wake[2].events = store_connecting(l->st) ? store_connect_events(l->st) : store_events(l->st);
	wake[2].revents = 0;
	wake[3].fd = redis_wait_fd(l, &wake[3].events);
	wake[3].revents = 0;
	nwake = 4 + telemetry_wait_fds(l->tm, now, &wake[4], &wait_ms);
	/*
	 * The stall is each turn's time outside api_wait, the loop's only
	 * deliberate sleep: every statement and Redis command runs in it, and
	 * no API answer is read meanwhile, so a frozen peer shows here and an
	 * idle loop does not.
	 */
	metrics_loop_stall(stall_clock_s() - l->turn_start_s);
	/*
	 * The calls started this turn go out before the gather, not after
	 * it: they would otherwise sit unsent for up to worker.gather_us.
	 */
	if (api_send_started(l->api) || l->slot_freed_late)
		wait_ms = 0;
	l->slot_freed_late = false;
	gather(l, wake, nwake, wait_ms);
	if (api_wait(l->api, wake, nwake, wait_ms) == -1)
		log_warnx("waiting on the billing API calls failed");
	l->turn_start_s = stall_clock_s();
	if (wake[0].revents & POLLIN)
		drain_wake_pipe();
	if (store_connecting(l->st))
		db_reconnect(l, wake[2].fd >= 0 ? wake[2].revents : 0);
	else
		db_drive(l, wake[2].fd >= 0 ? wake[2].revents : 0);
	redis_service(l, wake[3].fd >= 0 ? wake[3].revents : 0);
	listen_service(l, wake[1].fd >= 0 ? wake[1].revents : 0);
	telemetry_after_wait(l->tm);
	backlog_service(l, clock_ms());
}

/*
 * One turn: signals, answers in, new work, outcomes recorded, upkeep, then
 * the wait.  Returns true when the loop should end.
 */
static bool
turn(struct loop *l, int *status)
{
	int64_t now = clock_ms();
	bool done;

	take_signals(l, now);
	db_reconnect(l, 0);
	redis_service(l, 0);
	collect(l);
	start_ready(l, now);
	/*
	 * The calls just started go out now, before the claim and the batch
	 * are built and sent: each of them waits on its slot for the API,
	 * which a 100 ms API makes the bound.
	 */
	l->slot_freed_late = api_send_started(l->api);
	/*
	 * New work before the outcomes: the claim's statements then go ahead
	 * of the completion batch on the connection, and the calls they
	 * allow wait for the database's answer to the claim only, not for a
	 * batch of completions besides (about 1 ms each against a fast API).
	 */
	done = take_work(l, now);
	flush(l);
	reservations(l);
	telemetry_tick(l->tm, now, calls_active(l), l->cfg->worker.concurrency, store_connected(l->st));
	maintain(l, now);
	if (done || keep_patience(l, now, status) || stopped(l, now))
		return true;
	wait_for_events(l, now, wait_budget_ms(l, now));
	return false;
}

/*
 * At exit: the Redis commands still in flight (lock releases) answered,
 * within their deadline, so no lock is left to expire behind a clean stop.
 */
static void
redis_drain(struct loop *l)
{
	while (l->redis != NULL && redis_conn_connected(l->redis) && redis_conn_busy(l->redis)) {
		struct pollfd pfd = { .fd = redis_conn_fd(l->redis),
		    .events = redis_conn_events(l->redis) };
		int64_t wait = redis_conn_deadline(l->redis) - clock_ms();

		if (poll(&pfd, 1, wait < 0 ? 0 : wait > 1000 ? 1000 : (int)wait) == -1 &&
		    errno != EINTR)
			break;
		redis_conn_drive(l->redis, pfd.revents, clock_ms());
	}
}

/* At exit: the Redis locks still held go back, the registry row goes, one summary line. */
static void
finish(struct loop *l)
{
	size_t n = 0;

	/* Whatever is still claimed (an outage at exit): give back the Redis locks. */
	for (int i = 0; i < l->nflights; i++)
		if (l->flights[i].state != FLIGHT_FREE)
			l->itemp[n++] = &l->flights[i].item;
	lock_release(l->locks, l->itemp, n);
	redis_drain(l);
	if (l->fleet != NULL)
		fleet_leave(l->fleet);
	if (store_connected(l->st) && store_worker_gone(l->st, l->cfg->worker.id) == -1)
		log_warnx("%s", store_errmsg(l->st));
	log_info("stopped: %" PRIu64 " done, %" PRIu64 " failed, %" PRIu64 " to retry, %" PRIu64
	    " not recorded (claim lost), %" PRIu64 " API calls, %" PRIu64 " transaction retries",
	    l->n_done, l->n_failed, l->n_retry, l->n_rejected, l->n_calls,
	    l->st ? store_retries(l->st) : 0);
}

/* Connected, schema checked: the first connection to Redis, LISTEN, readiness. */
static void
start(struct loop *l)
{
	lock_start(l->locks);
	listen_service(l, 0);
	l->next_renew_ms = clock_ms() + l->cfg->locks.renew_interval_ms;
	telemetry_ready(l->tm, clock_ms());
	l->turn_start_s = stall_clock_s();
}

int
loop_run(struct bw_config *cfg, const char *token, const char *redis_password, bool once)
{
	struct loop l;
	int status = 1;

	memset(&l, 0, sizeof(l));
	l.cfg = cfg;
	l.once = once;
	if (loop_setup(&l, token, redis_password) == -1)
		goto out;
	log_info("starting (%s, lock mode %s, concurrency %d, batch %d, version " BW_VERSION ")",
	    once ? "once" : "run", config_lock_mode_name(cfg->locks.mode),
	    cfg->worker.concurrency, cfg->worker.batch_size);
	if (!first_connect(&l)) {
		/* A stop asked for while waiting is a clean exit (systemctl stop). */
		if (got_stop) {
			log_info("stopped while waiting for the database");
			status = 0;
		}
		goto out;
	}
	status = 0;
	start(&l);
	while (!turn(&l, &status))
		;
	finish(&l);
out:
	loop_teardown(&l);
	return status;
}

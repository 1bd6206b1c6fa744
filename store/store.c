#include "store/store.h"

#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "common/clock.h"
#include "common/log.h"
#include "store/conninfo.h"
#include "store/store_int.h"

/*
 * The handle: its connection, the session's settings, the prepared
 * statements, and the error of the last failure.  What the handle does
 * lives beside it: claim.c, complete.c, reserve.c and the rest.
 */

void
store_errorf(store *st, const char *fmt, ...)
{
	char raw[2048];
	va_list ap;
	size_t n;

	st->sqlstate[0] = '\0';
	va_start(ap, fmt);
	vsnprintf(raw, sizeof(raw), fmt, ap);
	va_end(ap);
	/* Messages of libpq and the server may echo the conninfo's password. */
	conninfo_redact(raw, st->password, st->errmsg, sizeof(st->errmsg));
	explicit_bzero(raw, sizeof(raw));
	/* libpq messages end in a newline; ours are one line. */
	n = strlen(st->errmsg);
	while (n > 0 && (st->errmsg[n - 1] == '\n' || st->errmsg[n - 1] == ' '))
		st->errmsg[--n] = '\0';
}


int
store_new(const char *conninfo, const char *worker_id, store **ret)
{
	store *st;

	if ((st = calloc(1, sizeof(*st))) == NULL)
		return -1;
	st->query_timeout_ms = 30000;
	st->history = true;
	st->conninfo = strdup(conninfo);
	st->worker_id = strdup(worker_id);
	st->conninfo_unparsable = conninfo_password(conninfo, &st->password) == -1;
	if (st->conninfo == NULL || st->worker_id == NULL) {
		store_free(st);
		return -1;
	}
	*ret = st;
	return 0;
}

void
store_free(store *st)
{
	if (st == NULL)
		return;
	if (st->conn != NULL)
		PQfinish(st->conn);
	pq_free(st->engine);
	if (st->conninfo != NULL) {
		/* The conninfo may hold a password. */
		explicit_bzero(st->conninfo, strlen(st->conninfo));
		free(st->conninfo);
	}
	if (st->password != NULL) {
		explicit_bzero(st->password, strlen(st->password));
		free(st->password);
	}
	free(st->worker_id);
	for (size_t i = 0; i < st->n_unnamed; i++)
		free(st->unnamed[i].sql);
	for (size_t i = 0; i < sizeof(st->arr) / sizeof(st->arr[0]); i++)
		free(st->arr[i].data);
	store_complete_free(st);
	store_claims_free(st);
	store_renewals_free(st);
	store_workers_free(st);
	store_reserve_free(st);
	free(st);
}

void
store_set_history(store *st, bool on)
{
	st->history = on;
}

void
store_set_query_timeout(store *st, int timeout_ms)
{
	st->query_timeout_ms = timeout_ms;
}

void
store_set_pooling(store *st, bool transaction)
{
	st->txn_pooling = transaction;
}

int
store_client_deadline_ms(const store *st)
{
	return st->query_timeout_ms + 1000;
}

bool
store_plans_once(const store *st)
{
	return st->pipeline && !st->txn_pooling;
}

bool
store_connected(const store *st)
{
	if (st->conn != NULL)
		return PQstatus(st->conn) == CONNECTION_OK;
	return st->engine != NULL && pq_state(st->engine) == PQ_READY;
}

/* The live connection, whichever way it runs, or NULL. */
static PGconn *
live_conn(const store *st)
{
	if (st->conn != NULL)
		return st->conn;
	return store_connected(st) ? pq_raw_conn(st->engine) : NULL;
}

void
store_set_pipeline(store *st, bool on)
{
	st->pipeline = on;
}

void
store_target(const store *st, char *buf, size_t len)
{
	if (!store_connected(st))
		snprintf(buf, len, "%s", "");
	else
		snprintf(buf, len, "host \"%s\", port \"%s\", database \"%s\"",
		    PQhost(live_conn(st)), PQport(live_conn(st)), PQdb(live_conn(st)));
}

const char *
store_pause_note(const store *st, enum item_kind kind)
{
	return st->pause_note[kind];
}

const char *
store_errmsg(const store *st)
{
	return st->errmsg;
}

uint64_t
store_retries(const store *st)
{
	return st->retries;
}

PGconn *
store_conn(store *st)
{
	return live_conn(st);
}

void
store_set_error(store *st, const char *what, const PGresult *res)
{
	const char *msg = res != NULL ? PQresultErrorMessage(res) : "";

	if ((msg == NULL || msg[0] == '\0') && st->conn != NULL)
		msg = PQerrorMessage(st->conn);
	else if ((msg == NULL || msg[0] == '\0') && st->engine != NULL && pq_errmsg(st->engine)[0])
		msg = pq_errmsg(st->engine);
	else if (msg == NULL || msg[0] == '\0')
		msg = "not connected";
	store_errorf(st, "%s: %s", what, msg);
	if (res != NULL && PQresultErrorField(res, PG_DIAG_SQLSTATE) != NULL)
		snprintf(st->sqlstate, sizeof(st->sqlstate), "%s",
		    PQresultErrorField(res, PG_DIAG_SQLSTATE));
	/*
	 * 25006, read-only transaction: this server is a standby, or a primary
	 * demoted after a failover.  Every write fails on it, so retrying on
	 * this connection is a loop: drop it, and the next connect (with
	 * target_session_attrs=read-write in a multi-host conninfo) looks for
	 * the writable host, with the loop's reconnect backoff.
	 */
	if (strcmp(st->sqlstate, "25006") == 0 && store_connected(st)) {
		store_errorf(st, "%s: %s (the server is read-only: dropping the connection to "
		    "look for the writable one)", what, msg);
		snprintf(st->sqlstate, sizeof(st->sqlstate), "25006");
		if (st->conn != NULL)
			PQfinish(st->conn);
		st->conn = NULL;
		if (st->engine != NULL)
			pq_drop(st->engine, "the server is read-only");
		st->prepared = false;
		st->in_tx = false;
	}
}

bool
store_failed_on_data(const store *st)
{
	/* 22 data exception, 23 integrity constraint, P0 raised by a trigger. */
	return strncmp(st->sqlstate, "22", 2) == 0 || strncmp(st->sqlstate, "23", 2) == 0 ||
	    strncmp(st->sqlstate, "P0", 2) == 0;
}

/*
 * In the order they were always prepared, so a schema that lacks
 * something fails on the same statement with the same message.
 */
int
store_prepare_all(store *st)
{
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		if (store_prepare_claims(st, k) == -1 || store_prepare_complete(st, k) == -1)
			return -1;
	if (store_prepare_reserve(st) == -1 || store_prepare_due(st) == -1)
		return -1;
	st->prepared = true;
	return 0;
}

/*
 * What the server says on a session besides answers (a trigger's RAISE
 * WARNING, "terminating connection due to administrator command") goes
 * through the log: libpq's default prints it raw on stderr, which breaks
 * JSON logs and the journal's priorities.  Warnings are warnings; notices
 * (CREATE ... IF NOT EXISTS skipping) are for debugging.
 */
static void
notice_to_log(void *arg, const PGresult *res)
{
	const char *severity = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
	const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);

	(void)arg;
	if (msg == NULL)
		msg = PQresultErrorMessage(res);
	if (severity != NULL && strcmp(severity, "WARNING") == 0)
		log_warnx("the database warns: %s", msg);
	else
		log_debug("the database says (%s): %s", severity != NULL ? severity : "notice", msg);
}

/*
 * Our defaults come first so the operator's conninfo overrides them:
 * bounded connect time and TCP keepalives so a dead peer is noticed
 * instead of blocking the loop forever.
 */
static const char *const conn_keys[] = { "connect_timeout", "keepalives", "keepalives_idle",
    "keepalives_interval", "keepalives_count", "tcp_user_timeout",
    "application_name", "dbname", NULL };
#define CONNECT_TIMEOUT_S "5"

/* The values for conn_keys: our defaults, then the operator's conninfo. */
#define CONN_VALUES(conninfo, application_name) { CONNECT_TIMEOUT_S, "1", "10", "5", "3", \
	"20000", (application_name), (conninfo), NULL }

PGconn *
store_open_conn(const char *conninfo, const char *application_name)
{
	const char *vals[] = CONN_VALUES(conninfo, application_name);
	PGconn *conn = PQconnectdbParams(conn_keys, vals, 1);

	if (conn != NULL)
		PQsetNoticeReceiver(conn, notice_to_log, NULL);
	return conn;
}

int
store_start_conn(pq *c, const char *conninfo, const char *application_name)
{
	const char *vals[] = CONN_VALUES(conninfo, application_name);

	if (pq_connect_start(c, conn_keys, vals, atoi(CONNECT_TIMEOUT_S) * 1000) == -1)
		return -1;
	PQsetNoticeReceiver(pq_raw_conn(c), notice_to_log, NULL);
	return 0;
}

/*
 * The connection is up: the session's settings, and one line saying where
 * it went.
 */
static int
session_setup(store *st)
{
	char settings[384];
	int lock_ms;

	/*
	 * A statement that hangs (lock waits, a stuck server) must not stall the
	 * loop.  synchronous_commit is set, not inherited: a claim and a hold
	 * allow an API call, so they must be on disk before it is made, and a
	 * server or role may default to off.  Only the completions opt out, per
	 * transaction (COMPLETE_INPUT): a completion lost in a crash is replayed.
	 *
	 * Behind a transaction pooler a SET would stay on whichever server
	 * connection ran it, for other clients to inherit, and be missing from
	 * the next one we are given.  There the same values are set with
	 * set_config(..., true) at the start of every transaction (exec.c):
	 * they apply to that transaction only.  They cannot be folded into the
	 * statements themselves: statement_timeout is read before a statement
	 * starts, so one setting it inside would run without it.
	 */
	lock_ms = st->query_timeout_ms < 10000 ? st->query_timeout_ms : 10000;
	snprintf(st->tx_settings, sizeof(st->tx_settings), "SELECT "
	    "set_config('synchronous_commit', 'on', true), "
	    "set_config('statement_timeout', '%d', true), "
	    "set_config('lock_timeout', '%d', true), "
	    "set_config('idle_in_transaction_session_timeout', '60s', true)",
	    st->query_timeout_ms, lock_ms);
	if (!st->txn_pooling) {
		/*
		 * One statement, so it can go as one job of a pipeline too.
		 *
		 * The daemon's session plans each statement once, for any values.
		 * PostgreSQL plans a prepared statement anew at every run (a custom
		 * plan) for as long as plans for the parameters' values look
		 * cheaper than one plan for any, and on a table of some size (any
		 * production table, analyzed or not) the due query's always did:
		 * 0.9-1.7 ms of planning at every poll against 0.2 ms of running,
		 * on the path every claim waits for, where a small new table's
		 * settled after five runs (BENCHMARKS.md).  Its statements are
		 * written to be served by the same indexes whatever the values.
		 * The few better planned for their values (custom_plan: the
		 * history's prune) say so, and set it back for their own
		 * transaction.  Under transaction pooling every statement is
		 * unnamed and planned at every run anyway; the commands' sessions
		 * (status, audit) keep the default.
		 */
		snprintf(settings, sizeof(settings), "SELECT "
		    "set_config('synchronous_commit', 'on', false), "
		    "set_config('statement_timeout', '%d', false), "
		    "set_config('lock_timeout', '%d', false), "
		    "set_config('idle_in_transaction_session_timeout', '60s', false)%s",
		    st->query_timeout_ms, lock_ms, store_plans_once(st) ?
		    ", set_config('plan_cache_mode', 'force_generic_plan', false)" : "");
		if (store_run(st, &(const struct store_stmt){ .send = STORE_SIMPLE,
		    .text = settings, .what = "could not configure the session",
		    .want = PGRES_TUPLES_OK }, 0, NULL, NULL) == -1)
			return -1;
	}
	log_info("connected to the database (host \"%s\", port \"%s\", database \"%s\"%s)",
	    PQhost(live_conn(st)), PQport(live_conn(st)), PQdb(live_conn(st)), st->txn_pooling ?
	    "; transaction pooling: unnamed statements, settings per transaction" : "");
	return 0;
}

/* Closes what is open, and refuses a conninfo whose error could show a password. */
static int
connect_begin(store *st)
{
	if (st->conn != NULL) {
		PQfinish(st->conn);
		st->conn = NULL;
	}
	if (st->engine != NULL)
		pq_drop(st->engine, NULL);
	st->prepared = false;
	st->in_tx = false;
	if (st->conninfo_unparsable && conninfo_may_hold_secret(st->conninfo)) {
		store_errorf(st, "could not connect to the database: \"database.conninfo\" is not "
		    "a valid connection string (libpq's message is not shown: it may quote the "
		    "password)");
		return -1;
	}
	return 0;
}

/* store_connect() of the daemon: the pipeline connection, waited for. */
static int
connect_waiting(store *st)
{
	int r;

	if (store_connect_start(st) == -1)
		return -1;
	while ((r = store_connect_drive(st, 0, clock_ms())) == 0) {
		struct pollfd pfd = { .fd = pq_fd(st->engine), .events = pq_events(st->engine) };
		int64_t wait = pq_deadline(st->engine) - clock_ms();

		if (poll(&pfd, 1, wait < 0 ? 0 : wait > 1000 ? 1000 : (int)wait) > 0 &&
		    (r = store_connect_drive(st, pfd.revents, clock_ms())) != 0)
			break;
	}
	return r == 1 ? 0 : -1;
}

int
store_connect(store *st)
{
	if (st->pipeline)
		return connect_waiting(st);
	if (connect_begin(st) == -1)
		return -1;
	st->conn = store_open_conn(st->conninfo, "billing-worker");
	if (st->conn == NULL) {
		store_errorf(st, "could not connect to the database: out of memory");
		return -1;
	}
	if (PQstatus(st->conn) != CONNECTION_OK) {
		store_errorf(st, "could not connect to the database: %s", PQerrorMessage(st->conn));
		return -1;
	}
	return session_setup(st);
}

int
store_connect_start(store *st)
{
	if (connect_begin(st) == -1)
		return -1;
	if (st->engine == NULL && pq_new(&st->engine) == -1) {
		store_errorf(st, "could not connect to the database: out of memory");
		return -1;
	}
	if (store_start_conn(st->engine, st->conninfo, "billing-worker") == -1) {
		store_errorf(st, "could not connect to the database: %s",
		    pq_errmsg(st->engine));
		return -1;
	}
	return 0;
}

bool
store_connecting(const store *st)
{
	return st->engine != NULL && pq_state(st->engine) == PQ_CONNECTING;
}

int
store_connect_fd(const store *st)
{
	return store_connecting(st) ? pq_fd(st->engine) : -1;
}

short
store_connect_events(const store *st)
{
	return store_connecting(st) ? pq_events(st->engine) : 0;
}

int64_t
store_connect_deadline(const store *st)
{
	return store_connecting(st) ? pq_deadline(st->engine) : INT64_MAX;
}

int
store_connect_drive(store *st, short revents, int64_t now)
{
	if (st->engine == NULL)
		return -1;
	pq_drive(st->engine, revents, now);
	switch (pq_state(st->engine)) {
	case PQ_CONNECTING:
		return 0;
	case PQ_DOWN:
		store_errorf(st, "could not connect to the database: %s",
		    pq_errmsg(st->engine));
		return -1;
	case PQ_READY:
		break;
	}
	/*
	 * Up: it stays in pipeline mode, and the store's statements run on it
	 * as jobs, the loop's asynchronously, the rare ones waited for.
	 */
	return session_setup(st) == 0 ? 1 : -1;
}

int
store_fd(const store *st)
{
	return st->conn == NULL && st->engine != NULL ? pq_fd(st->engine) : -1;
}

short
store_events(const store *st)
{
	return st->conn == NULL && st->engine != NULL ? pq_events(st->engine) : 0;
}

int64_t
store_deadline(const store *st)
{
	return st->conn == NULL && st->engine != NULL ? pq_deadline(st->engine) : INT64_MAX;
}

void
store_drive(store *st, short revents, int64_t now)
{
	if (st->conn != NULL || st->engine == NULL || pq_state(st->engine) != PQ_READY)
		return;
	pq_drive(st->engine, revents, now);
	/* Lost under the statements in flight: why, for whoever reports it. */
	if (pq_state(st->engine) != PQ_READY) {
		store_errorf(st, "%s", pq_errmsg(st->engine));
		st->prepared = false;
		st->in_tx = false;
	}
}

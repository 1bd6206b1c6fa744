#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "store/conninfo.h"
#include "store/report.h"
#include "store/store_int.h"

/*
 * The LISTEN connection: the second and last PostgreSQL connection of a
 * worker.  It only waits: its socket joins the loop's poll, and each
 * notification on billing_worker (sent by the insert triggers) tells the
 * loop to claim now instead of at the next poll.
 *
 * It never blocks the loop, connecting included: it is a store/pq.c
 * connection, opened with PQconnectStartParams and driven by the loop's
 * poll, so a server that accepts the TCP connection and then does not
 * answer (a frozen postmaster, a host cut off mid-handshake) costs this
 * connection its connect timeout, and the calls in flight nothing.
 *
 * It also runs the backlog gauges' query (store_sql_backlog), when the
 * loop asks.  On the worker's own connection that query stalled the loop
 * for as long as it ran, and held up the claims and completions queued
 * behind it: with the xmin horizon pinned, its index walks meet every row
 * version since the pin, 38 ms after 200 000 items and growing with each
 * one (tests/integration/test_ops.py).  Here only notifications wait
 * behind it, and the poll finds new items meanwhile.
 */
#define LISTEN_TIMEOUT_MS 10000

struct store_listener {
	char *conninfo;
	char *password;             /* redacted from every message; may be NULL */
	pq *pq;
	struct pq_job listen;       /* LISTEN billing_worker, once connected */
	bool listening;
	struct pq_job backlog;      /* the backlog query, when the loop asks */
	char backlog_cap[16];
	const char *backlog_params[1];
	char errmsg[512];
};

int
store_listener_new(const char *conninfo, store_listener **ret)
{
	store_listener *sl;

	if ((sl = calloc(1, sizeof(*sl))) == NULL)
		return -1;
	if ((sl->conninfo = strdup(conninfo)) == NULL || pq_new(&sl->pq) == -1) {
		free(sl->conninfo);
		free(sl);
		return -1;
	}
	/* The store already refuses a conninfo it cannot parse; no password then. */
	if (conninfo_password(conninfo, &sl->password) == -1)
		sl->password = NULL;
	sl->listen.stmts[0].sql = "LISTEN billing_worker";
	sl->listen.nstmts = 1;
	snprintf(sl->backlog_cap, sizeof(sl->backlog_cap), "%d", STORE_BACKLOG_CAP);
	sl->backlog_params[0] = sl->backlog_cap;
	sl->backlog.stmts[0].sql = store_sql_backlog;
	sl->backlog.stmts[0].nparams = 1;
	sl->backlog.stmts[0].params = sl->backlog_params;
	sl->backlog.nstmts = 1;
	*ret = sl;
	return 0;
}

static void
drop(store_listener *sl)
{
	pq_drop(sl->pq, NULL);
	pq_job_clear(&sl->listen);
	pq_job_clear(&sl->backlog);
	sl->listening = false;
}

void
store_listener_free(store_listener *sl)
{
	if (sl == NULL)
		return;
	drop(sl);
	pq_free(sl->pq);
	explicit_bzero(sl->conninfo, strlen(sl->conninfo));
	free(sl->conninfo);
	if (sl->password != NULL) {
		explicit_bzero(sl->password, strlen(sl->password));
		free(sl->password);
	}
	free(sl);
}

const char *
store_listener_errmsg(const store_listener *sl)
{
	return sl->errmsg;
}

/* The server and libpq may echo the password: it never reaches errmsg. */
static void
set_err(store_listener *sl, const char *what, const char *detail)
{
	char raw[512];
	size_t n;

	snprintf(raw, sizeof(raw), "%s: %s", what, detail != NULL && detail[0] != '\0' ?
	    detail : "connection lost");
	conninfo_redact(raw, sl->password, sl->errmsg, sizeof(sl->errmsg));
	n = strlen(sl->errmsg);
	while (n > 0 && (sl->errmsg[n - 1] == '\n' || sl->errmsg[n - 1] == ' '))
		sl->errmsg[--n] = '\0';
}

int
store_listener_connect(store_listener *sl)
{
	drop(sl);
	if (store_start_conn(sl->pq, sl->conninfo, "billing-worker listen") == -1) {
		set_err(sl, "could not open the LISTEN connection", pq_errmsg(sl->pq));
		return -1;
	}
	return 0;
}

void
store_listener_close(store_listener *sl)
{
	drop(sl);
}

bool
store_listener_active(const store_listener *sl)
{
	return pq_state(sl->pq) != PQ_DOWN;
}

int
store_listener_fd(const store_listener *sl)
{
	return pq_fd(sl->pq);
}

short
store_listener_events(const store_listener *sl)
{
	return pq_events(sl->pq);
}

int64_t
store_listener_deadline(const store_listener *sl)
{
	return pq_deadline(sl->pq);
}

int
store_listener_drive(store_listener *sl, short revents, int64_t now, bool *ret_listening_now)
{
	enum pq_state before = pq_state(sl->pq);
	PGconn *conn;
	PGnotify *n;
	int count = 0;

	*ret_listening_now = false;
	if (before == PQ_DOWN)
		return -1;
	pq_drive(sl->pq, revents, now);
	if (pq_state(sl->pq) == PQ_DOWN) {
		set_err(sl, before == PQ_CONNECTING ? "could not open the LISTEN connection" :
		    "LISTEN connection lost", pq_errmsg(sl->pq));
		drop(sl);
		return -1;
	}
	if (pq_state(sl->pq) != PQ_READY)
		return 0;           /* still connecting */
	if (sl->listen.state == PQ_JOB_IDLE) {
		/* Bounded like every statement: a frozen server must not stall the loop. */
		if (pq_submit(sl->pq, &sl->listen, LISTEN_TIMEOUT_MS, now) == -1) {
			set_err(sl, "LISTEN failed", pq_errmsg(sl->pq));
			drop(sl);
			return -1;
		}
		return 0;
	}
	if (sl->listen.state == PQ_JOB_DONE && !sl->listening) {
		if (!sl->listen.ok) {
			set_err(sl, "LISTEN failed", sl->listen.res[0] != NULL ?
			    PQresultErrorMessage(sl->listen.res[0]) : pq_errmsg(sl->pq));
			drop(sl);
			return -1;
		}
		sl->listening = true;
		*ret_listening_now = true;
	}
	/* pq_drive read what arrived; the notifications wait in libpq. */
	conn = pq_raw_conn(sl->pq);
	while ((n = PQnotifies(conn)) != NULL) {
		count++;
		PQfreemem(n);
	}
	return count;
}

int
store_listener_backlog_send(store_listener *sl, int timeout_ms, int64_t now)
{
	if (!sl->listening || pq_state(sl->pq) != PQ_READY || sl->backlog.state != PQ_JOB_IDLE)
		return 1;
	if (pq_submit(sl->pq, &sl->backlog, timeout_ms, now) == -1) {
		set_err(sl, "the backlog query could not be sent", pq_errmsg(sl->pq));
		drop(sl);
		return -1;
	}
	return 0;
}

int
store_listener_backlog(store_listener *sl, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT])
{
	int ret = 1;

	if (sl->backlog.state != PQ_JOB_DONE)
		return 0;
	if (sl->backlog.ok && sl->backlog.res[0] != NULL) {
		store_backlog_read(sl->backlog.res[0], due, oldest_pending_s);
	} else {
		set_err(sl, "the backlog query failed", sl->backlog.res[0] != NULL ?
		    PQresultErrorMessage(sl->backlog.res[0]) : pq_errmsg(sl->pq));
		ret = -1;
	}
	pq_job_clear(&sl->backlog);
	return ret;
}

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include "common/log.h"
#include "common/clock.h"
#include "store/store_int.h"

/*
 * Statements with a deadline on the client side.
 *
 * statement_timeout is enforced by the server, so it cannot end a wait on
 * a server that is frozen (SIGSTOP, a swapped-out VM) or whose host the
 * network cut off while its kernel still acknowledges our bytes: TCP
 * keepalives are answered and tcp_user_timeout never fires, and a plain
 * PQexec() then waits forever.  These send the statement asynchronously and
 * poll the socket against a deadline.  When it passes, the socket is shut
 * down: libpq reads end-of-file, the connection turns bad, the caller sees
 * an ordinary "connection lost" failure and reconnects.
 */


/*
 * Waits until libpq can hand over CONN's next result without blocking, or
 * until DEADLINE (clock_ms()) when TIMEOUT_MS is not negative; then the
 * socket is shut down and *CUT set, and libpq reports the connection lost.
 */
static void
wait_result(PGconn *conn, int timeout_ms, int64_t deadline, bool *cut)
{
	while (!*cut && PQisBusy(conn)) {
		struct pollfd p = { .fd = PQsocket(conn), .events = POLLIN };
		/* -1 without a deadline: poll() then waits as long as it takes. */
		int64_t left = timeout_ms < 0 ? -1 : deadline - clock_ms();
		int r;

		if ((timeout_ms >= 0 && left <= 0) || (r = poll(&p, 1, (int)left)) == 0) {
			log_warnx("the database did not answer within %d ms; dropping the "
			    "connection", timeout_ms);
			shutdown(PQsocket(conn), SHUT_RDWR);
			*cut = true;
			break;
		}
		if (r == -1 && errno != EINTR)
			break;
		if (PQconsumeInput(conn) == 0)
			break;
	}
}

/*
 * Waits until the statement sent on CONN has its whole answer, or the
 * deadline, if TIMEOUT_MS is not negative.  Returns the result PQexec
 * would have returned (the first error, else the last result), or NULL
 * when libpq had nothing at all.
 */
static PGresult *
collect(PGconn *conn, int timeout_ms)
{
	int64_t deadline = clock_ms() + timeout_ms;
	PGresult *res, *keep = NULL;
	bool cut = false;

	for (;;) {
		wait_result(conn, timeout_ms, deadline, &cut);
		if ((res = PQgetResult(conn)) == NULL)
			break;
		if (keep != NULL && PQresultStatus(keep) == PGRES_FATAL_ERROR) {
			PQclear(res);
			continue;
		}
		PQclear(keep);
		keep = res;
		if (PQstatus(conn) == CONNECTION_BAD)
			break;
	}
	return keep;
}

/* A failed send: a result that carries libpq's message, as PQexec gives. */
static PGresult *
send_failed(PGconn *conn)
{
	return PQmakeEmptyPGresult(conn, PGRES_FATAL_ERROR);
}

PGresult *
store_exec_bounded(PGconn *conn, int timeout_ms, const char *sql)
{
	if (PQsendQuery(conn, sql) == 0)
		return send_failed(conn);
	return collect(conn, timeout_ms);
}

PGresult *
store_exec_prepared_bounded(PGconn *conn, int timeout_ms, const char *name,
    int nparams, const char *const *values)
{
	if (PQsendQueryPrepared(conn, name, nparams, values, NULL, NULL, 0) == 0)
		return send_failed(conn);
	return collect(conn, timeout_ms);
}

PGresult *
store_exec_params_bounded(PGconn *conn, int timeout_ms, const char *sql, int nparams,
    const char *const *values)
{
	if (PQsendQueryParams(conn, sql, nparams, NULL, values, NULL, NULL, 0) == 0)
		return send_failed(conn);
	return collect(conn, timeout_ms);
}

PGresult *
store_prepare_bounded(PGconn *conn, int timeout_ms, const char *name, const char *sql)
{
	if (PQsendPrepare(conn, name, sql, 0, NULL) == 0)
		return send_failed(conn);
	return collect(conn, timeout_ms);
}

/*
 * The queries of one pipeline, in order: the transaction around the
 * caller's statement (exec.c, transaction pooling).
 */
enum { PIPE_BEGIN, PIPE_SETTINGS, PIPE_STMT, PIPE_COMMIT, PIPE_QUERIES };

/*
 * Collects the results of the PIPE_QUERIES queries and the sync: the first
 * error, else the statement's result; NULL when libpq had nothing.  After
 * an error the server skips the rest up to the sync, each skipped query
 * answering PGRES_PIPELINE_ABORTED.
 */
static PGresult *
collect_pipeline(PGconn *conn, int timeout_ms)
{
	int64_t deadline = clock_ms() + timeout_ms;
	PGresult *res, *keep = NULL, *err = NULL;
	bool cut = false;
	int q = 0;

	while (PQstatus(conn) != CONNECTION_BAD && q <= PIPE_QUERIES) {
		wait_result(conn, timeout_ms, deadline, &cut);
		if ((res = PQgetResult(conn)) == NULL) {
			q++;            /* the end of one query's results */
			continue;
		}
		if (PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
			PQclear(res);
			break;
		}
		if (PQresultStatus(res) == PGRES_FATAL_ERROR && err == NULL)
			err = res;
		else if (q == PIPE_STMT && keep == NULL && err == NULL)
			keep = res;
		else
			PQclear(res);
	}
	if (PQstatus(conn) != CONNECTION_BAD && PQexitPipelineMode(conn) == 0) {
		/* Results left unread: the connection's state is unknown, drop it. */
		shutdown(PQsocket(conn), SHUT_RDWR);
		PQconsumeInput(conn);
	}
	if (err != NULL) {
		PQclear(keep);
		return err;
	}
	return keep;
}

PGresult *
store_exec_in_tx_bounded(PGconn *conn, int timeout_ms, const char *settings, const char *sql,
    int nparams, const char *const *values)
{
	if (PQenterPipelineMode(conn) == 0)
		return send_failed(conn);
	if (PQsendQueryParams(conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0) == 0 ||
	    PQsendQueryParams(conn, settings, 0, NULL, NULL, NULL, NULL, 0) == 0 ||
	    PQsendQueryParams(conn, sql, nparams, NULL, values, NULL, NULL, 0) == 0 ||
	    PQsendQueryParams(conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0) == 0 ||
	    PQpipelineSync(conn) == 0) {
		/*
		 * Half a pipeline queued: nothing can tell what the server will
		 * have run.  The connection is dropped, as after a deadline.
		 */
		PGresult *res = send_failed(conn);

		shutdown(PQsocket(conn), SHUT_RDWR);
		PQconsumeInput(conn);
		return res;
	}
	return collect_pipeline(conn, timeout_ms);
}

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
		while (!cut && PQisBusy(conn)) {
			struct pollfd p = { .fd = PQsocket(conn), .events = POLLIN };
			/* -1 without a deadline: poll() then waits as long as it takes. */
			int64_t left = timeout_ms < 0 ? -1 : deadline - clock_ms();
			int r;

			if ((timeout_ms >= 0 && left <= 0) || (r = poll(&p, 1, (int)left)) == 0) {
				log_warnx("the database did not answer within %d ms; dropping the "
				    "connection", timeout_ms);
				shutdown(PQsocket(conn), SHUT_RDWR);
				cut = true;
				break;
			}
			if (r == -1 && errno != EINTR)
				break;
			if (PQconsumeInput(conn) == 0)
				break;
		}
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

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "store/conninfo.h"
#include "store/store_int.h"

/*
 * The LISTEN connection: the second and last PostgreSQL connection of a
 * worker.  It only waits: its socket joins the loop's poll, and each
 * notification on billing_worker (sent by the insert triggers) tells the
 * loop to claim now instead of at the next poll.
 */
#define LISTEN_TIMEOUT_MS 10000

struct store_listener {
	char *conninfo;
	char *password;             /* redacted from every message; may be NULL */
	PGconn *conn;
	char errmsg[512];
};

int
store_listener_new(const char *conninfo, store_listener **ret)
{
	store_listener *sl;

	if ((sl = calloc(1, sizeof(*sl))) == NULL)
		return -1;
	if ((sl->conninfo = strdup(conninfo)) == NULL) {
		free(sl);
		return -1;
	}
	/* The store already refuses a conninfo it cannot parse; no password then. */
	if (conninfo_password(conninfo, &sl->password) == -1)
		sl->password = NULL;
	*ret = sl;
	return 0;
}

static void
drop(store_listener *sl)
{
	if (sl->conn != NULL) {
		PQfinish(sl->conn);
		sl->conn = NULL;
	}
}

void
store_listener_free(store_listener *sl)
{
	if (sl == NULL)
		return;
	drop(sl);
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
set_err(store_listener *sl, const char *what)
{
	char raw[512];
	size_t n;

	snprintf(raw, sizeof(raw), "%s: %s", what,
	    sl->conn != NULL ? PQerrorMessage(sl->conn) : "out of memory");
	conninfo_redact(raw, sl->password, sl->errmsg, sizeof(sl->errmsg));
	n = strlen(sl->errmsg);
	while (n > 0 && (sl->errmsg[n - 1] == '\n' || sl->errmsg[n - 1] == ' '))
		sl->errmsg[--n] = '\0';
}

int
store_listener_connect(store_listener *sl)
{
	PGresult *res;

	drop(sl);
	sl->conn = store_open_conn(sl->conninfo, "billing-worker listen");
	if (sl->conn == NULL || PQstatus(sl->conn) != CONNECTION_OK) {
		set_err(sl, "could not open the LISTEN connection");
		drop(sl);
		return -1;
	}
	/* Bounded like every statement: a frozen server must not stall the loop. */
	res = store_exec_bounded(sl->conn, LISTEN_TIMEOUT_MS, "LISTEN billing_worker");
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		set_err(sl, "LISTEN failed");
		PQclear(res);
		drop(sl);
		return -1;
	}
	PQclear(res);
	/* From here on it is only read when poll says so: never block on it. */
	if (PQsetnonblocking(sl->conn, 1) == -1) {
		set_err(sl, "could not make the LISTEN connection non-blocking");
		drop(sl);
		return -1;
	}
	return 0;
}

void
store_listener_close(store_listener *sl)
{
	drop(sl);
}

int
store_listener_fd(const store_listener *sl)
{
	return sl->conn != NULL ? PQsocket(sl->conn) : -1;
}

int
store_listener_drain(store_listener *sl)
{
	PGnotify *n;
	int count = 0;

	if (sl->conn == NULL)
		return -1;
	if (PQconsumeInput(sl->conn) == 0 || PQstatus(sl->conn) != CONNECTION_OK) {
		set_err(sl, "LISTEN connection lost");
		drop(sl);
		return -1;
	}
	while ((n = PQnotifies(sl->conn)) != NULL) {
		count++;
		PQfreemem(n);
	}
	return count;
}

#ifndef BW_STORE_INT_H
#define BW_STORE_INT_H

/* Shared between the files of store/ only; nothing outside includes it. */

#include <libpq-fe.h>

#include "store/store.h"

/* The live connection, or NULL; owned by the store. */
PGconn *store_conn(store *st);

/* Sets store_errmsg() to "WHAT: <the server's or libpq's message>". */
void store_set_error(store *st, const char *what, const PGresult *res);

/*
 * Opens a connection with our defaults (connect timeout, TCP keepalives,
 * tcp_user_timeout) under CONNINFO's own settings, which win.  NULL only
 * when out of memory; check PQstatus.
 */
PGconn *store_open_conn(const char *conninfo, const char *application_name);

/*
 * PQexec, PQexecPrepared and PQprepare with a deadline on the client side
 * (store/deadline.c): after TIMEOUT_MS without the whole answer the
 * connection is dropped and the error result says it was lost.  Same
 * ownership as libpq's: the caller PQclear()s the result.
 */
PGresult *store_exec_bounded(PGconn *conn, int timeout_ms, const char *sql);
PGresult *store_exec_prepared_bounded(PGconn *conn, int timeout_ms, const char *name,
    int nparams, const char *const *values);
PGresult *store_prepare_bounded(PGconn *conn, int timeout_ms, const char *name,
    const char *sql);

PGresult *store_exec_params_bounded(PGconn *conn, int timeout_ms, const char *sql,
    int nparams, const char *const *values);

/* How long the client waits for an answer: the server's own timeout fires first. */
int store_client_deadline_ms(const store *st);

/* Sets store_errmsg() from a format. */
void store_errorf(store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif

#ifndef BW_STORE_INT_H
#define BW_STORE_INT_H

/*
 * Shared between the files of store/ only; nothing outside includes it.
 * The handle is opaque to the rest of the program (store.h) and open to
 * the store's own files here, as libpq-int.h opens struct pg_conn.
 *
 *   store.c    the handle, connecting, preparing, errors
 *   exec.c     running a statement, and redoing one that hit a deadlock
 *   deadline.c the bounded send and collect under exec.c
 *   sqlbuf.c   array literals and the id index the batch statements share
 *   claim.c    due, claim, renew        complete.c  completions
 *   reserve.c  holds on subsidies       park.c      poison rows
 *   the operator's commands: report.c, audit.c, history.c, requeue.c,
 *   pause.c, workers.c, migrate.c; the LISTEN connection: listen.c
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <libpq-fe.h>

#include "store/pq.h"
#include "store/store.h"

/* A growable text buffer for array literals, reused across calls. */
struct buf {
	char *data;
	size_t len, cap;
};

/*
 * Rows come back from RETURNING in no particular order.  To tell which of
 * n items they name without an n x rows scan, the items' ids are sorted
 * once with their positions and each returned id is looked up.
 */
struct id_pos {
	int64_t id;
	size_t pos;
};

/*
 * The pending test of a statement that names its rows by id (a claim by
 * ids, a renewal, a completion), on the table aliased ALIAS.  Written
 * "IS TRUE", the same test, so that no pending-only index's predicate
 * matches it and only the primary key serves the ids: written plainly,
 * statistics from before a bulk load (a few pending rows counted,
 * thousands there) made the planner read every pending row through
 * invoices_pending_age and hash them, in most statements
 * (tests/integration/test_due_plan.py).
 */
#define PENDING_BY_ID(alias) "(" alias ".status = 'pending') IS TRUE"

/* How many statements store_prepare_all() prepares, with room to spare. */
#define STORE_UNNAMED_MAX 16

/*
 * Where a kind's first attempts are looked for (schema version 10): at, the
 * lowest id that may still be one as far as this worker knows, and what
 * the sweeps for ids committed late need (claim.c).
 */
#define DUE_CURSOR_SAMPLES 16
struct due_cursor {
	int64_t at;                 /* 0: not known yet, looked up */
	/*
	 * Where the last poll's free first attempts began (0: unknown): the
	 * next poll but a sweep looks for candidates from there, past the
	 * rows in flight between the front and it.
	 */
	int64_t free_at;
	int64_t sweep_ms, deep_ms;  /* when the last sweep and lookup were sent */
	int64_t sample_ms[DUE_CURSOR_SAMPLES], sample_at[DUE_CURSOR_SAMPLES];
	int nsamples, next_sample;
};

struct store {
	char *conninfo;
	char *password;             /* the conninfo's, redacted from every message */
	bool conninfo_unparsable;   /* libpq's parse error may quote it: withheld */
	char *worker_id;
	PGconn *conn;
	/*
	 * The daemon's connection (store_connect_start, or store_connect after
	 * store_set_pipeline): libpq in pipeline and non-blocking mode, driven by
	 * the loop; conn is then NULL.  The commands' connections are conn.
	 */
	pq *engine;
	bool pipeline;
	bool prepared;
	int query_timeout_ms;   /* statement_timeout; the client waits 1 s more */
	char sqlstate[6];       /* of the last failed statement; "" for none */
	char errmsg[512];
	uint64_t retries;
	struct buf arr[13];
	char pause_note[ITEM_KIND_COUNT][600]; /* from the last due query; "" = not paused */
	struct due_cursor cursor[ITEM_KIND_COUNT];  /* where first attempts are looked for (claim.c) */
	bool history;               /* completions write the attempts history */
	/*
	 * database.pooling = "transaction" (store_set_pooling): no named
	 * statement and no session setting outlives a transaction, because the
	 * pooler may serve the next one from another server connection.  The
	 * statements store_prepare_all() would prepare are kept here by name
	 * and sent unnamed; tx_settings replaces the session's SETs inside
	 * every transaction (a SELECT of set_config(..., true) calls); in_tx
	 * says a transaction is open, the caller's or one store_run() wraps
	 * around a statement.
	 */
	bool txn_pooling;
	bool in_tx;
	char tx_settings[384];
	struct unnamed_stmt {
		char name[64];
		char *sql;
	} unnamed[STORE_UNNAMED_MAX];
	size_t n_unnamed;
	struct complete_batch *complete;    /* the loop's completion in flight (complete.c) */
	struct due_op *due;                 /* the loop's due query (claim.c) */
	struct claim_op *claim[ITEM_KIND_COUNT];    /* its claims, one per kind */
	struct renew_op *renew[ITEM_KIND_COUNT];    /* its lease renewals, one per kind */
	struct seen_op *seen;               /* the heartbeat in flight (workers.c) */
	struct reserve_op *reserve;         /* the loop's reservation (reserve.c) */
};

/* The live connection, or NULL; owned by the store. */
PGconn *store_conn(store *st);

/* Sets store_errmsg() to "WHAT: <the server's or libpq's message>". */
void store_set_error(store *st, const char *what, const PGresult *res);

/* Sets store_errmsg() from a format. */
void store_errorf(store *st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Opens a connection with our defaults (connect timeout, TCP keepalives,
 * tcp_user_timeout) under CONNINFO's own settings, which win.  NULL only
 * when out of memory; check PQstatus.
 */
PGconn *store_open_conn(const char *conninfo, const char *application_name);

/*
 * The same, without blocking: starts connecting C (store/pq.c) with our
 * defaults under CONNINFO's own settings; the loop drives the rest.  -1
 * when it could not even start (pq_errmsg() says why).
 */
int store_start_conn(pq *c, const char *conninfo, const char *application_name)
	__attribute__((warn_unused_result));

/*
 * The backlog query (store/report.c): run by store_backlog() on ST, and in
 * a daemon on the LISTEN connection (store/listen.c).  $1 is the cap.
 * store_backlog_read() takes its rows into DUE and OLDEST_PENDING_S.
 */
extern const char store_sql_backlog[];
void store_backlog_read(const PGresult *res, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT]);

/* How long the client waits for an answer: the server's own timeout fires first. */
int store_client_deadline_ms(const store *st);

/*
 * Whether ST's session plans every statement once, for any values: the
 * daemon's, on a direct connection (session_setup()).
 */
bool store_plans_once(const store *st);

/*
 * Prepares every statement of the daemon on ST's connection (claim.c,
 * complete.c, reserve.c); store_run() calls it before the first prepared
 * statement of a connection, so migrate and status work on any schema.
 */
int store_prepare_all(store *st) __attribute__((warn_unused_result));

/*
 * Each file's share of store_prepare_all(), for one kind where the
 * statement has one per kind: claim_skip, claim_ids and renew
 * (claim.c), complete (complete.c), reserve (reserve.c), due (claim.c).
 */
int store_prepare_claims(store *st, enum item_kind kind) __attribute__((warn_unused_result));
int store_prepare_complete(store *st, enum item_kind kind) __attribute__((warn_unused_result));
int store_prepare_reserve(store *st) __attribute__((warn_unused_result));
int store_prepare_due(store *st) __attribute__((warn_unused_result));

/*
 * Running statements (exec.c).  Every statement of a store handle goes
 * through store_run(), which sends it, waits for the answer against a
 * deadline on the client side, checks the result's status and records a
 * failure, so every caller fails the same way.
 */

/* How a statement is sent: libpq's three ways. */
enum store_send {
	STORE_SIMPLE,     /* PQsendQuery: no parameters; may hold several statements */
	STORE_PARAMS,     /* PQsendQueryParams: one statement with $n parameters */
	STORE_PREPARED,   /* PQsendQueryPrepared: TEXT names a prepared statement */
};

struct store_stmt {
	enum store_send send;
	const char *text;       /* the SQL, or the prepared statement's name */
	const char *what;       /* names a failure: store_errmsg() is "WHAT: reason" */
	ExecStatusType want;    /* the status of success: PGRES_COMMAND_OK or _TUPLES_OK */
	/*
	 * false: wait at most store_client_deadline_ms().  true: wait as long
	 * as the server takes, for `billing-worker migrate` only, which an
	 * operator runs by hand and whose DDL may rightly take long.
	 */
	bool no_deadline;
	/*
	 * true: planned for its parameters' values on the daemon's connection
	 * too, whose session plans every statement once, for any values
	 * (session_setup()).  For a statement whose best plan depends on them,
	 * such as the history's prune over a range of time: its job sets
	 * plan_cache_mode back to auto for its own transaction (send_collect()).
	 * Honored by store_run(), the statements waited for; the loop's
	 * asynchronous ones (store_op_send()) are all written to be planned once.
	 */
	bool custom_plan;
};

/*
 * Runs STMT with NPARAMS text parameters (NULL for SQL NULL).  On success
 * returns 0 and, when RET is not NULL, hands the result to the caller,
 * who PQclear()s it; without RET the result is cleared here.  On failure
 * returns -1 with store_errmsg() and the SQLSTATE set (store_set_error:
 * a read-only server drops the connection) and leaves *RET alone.  A
 * prepared statement first needs a connection ("not connected to the
 * database") and prepares the store's statements on first use.
 */
int store_run(store *st, const struct store_stmt *stmt, int nparams,
    const char *const *params, PGresult **ret) __attribute__((warn_unused_result));

/*
 * Runs SQL (one simple query) when connected and discards the answer,
 * leaving store_errmsg() and the SQLSTATE as they are: for a ROLLBACK or
 * an unlock after a failure, whose own error is the one to report.
 */
void store_run_cleanup(store *st, const char *sql, bool no_deadline);

/*
 * Redoes work that hit a deadlock or a serialization failure (SQLSTATE
 * 40P01, 40001: the server rolled it back, and the same work may well
 * succeed now), a bounded number of times.  BODY(ST, ARG) returns 0 or -1
 * with the error recorded by store_run().  With TX each attempt is one
 * transaction, BEGIN, BODY, COMMIT, and a failed one is rolled back.
 * Every retry is counted in store_retries() and logged as
 * "SUBJECT hit a deadlock or serialization failure, retrying", SUBJECT
 * formatted from FMT only then.  Returns BODY's last result.
 */
int store_retrying(store *st, bool tx, int (*body)(store *st, void *arg), void *arg,
    const char *fmt, ...) __attribute__((format(printf, 5, 6), warn_unused_result));

/* store_run() of one statement under store_retrying(), TX false. */
int store_run_retrying(store *st, const struct store_stmt *stmt, int nparams,
    const char *const *params, PGresult **ret, const char *fmt, ...)
	__attribute__((format(printf, 6, 7), warn_unused_result));

/*
 * The loop's asynchronous statements (store_set_pipeline only).  An op
 * owned by a file of the store carries one job of N of its statements,
 * each with NPARAMS[i] parameters PARAMS[i] (which must stay put until
 * the op is done: a retry sends them again): they run as one
 * transaction, and several ops may be in flight on the connection at
 * once, answered in order.
 *
 * store_op_send(): -1 when it could not be sent (not connected, already
 * in flight), with store_errmsg() set.  store_op_poll(): 0 while the
 * answer is not in; 1 when every statement succeeded, their results in
 * store_op_result() until store_op_clear(); -1 when one failed, with the
 * error recorded as store_run() records it.  A deadlock or serialization
 * failure is sent again, a bounded number of times, and reads as 0.
 */
struct store_op {
	struct pq_job job;
	bool active;                /* sent, its answer not yet taken */
	int first;                  /* the job's index of the first statement of ours */
	int retries;
	const char *what;
	char subject[64];           /* names it in the retry's log line; "" for WHAT */
};

int store_op_send(store *st, struct store_op *op, const struct store_stmt *const *stmts,
    int n, const int *nparams, const char *const *const *params)
	__attribute__((warn_unused_result));
bool store_op_active(const struct store_op *op);
int store_op_poll(store *st, struct store_op *op) __attribute__((warn_unused_result));
PGresult *store_op_result(const struct store_op *op, int i);
void store_op_clear(struct store_op *op);

/*
 * Prepares SQL as NAME with the client deadline; on failure store_errmsg()
 * is "could not prepare statements: reason".  Under transaction pooling
 * nothing is sent: SQL is kept under NAME, and store_run() sends it as an
 * unnamed statement wherever NAME is asked for.
 */
int store_prepare(store *st, const char *name, const char *sql)
	__attribute__((warn_unused_result));

/*
 * PQexec, PQexecParams, PQexecPrepared and PQprepare with a deadline on
 * the client side (store/deadline.c): after TIMEOUT_MS without the whole
 * answer the connection is dropped and the error result says it was lost.
 * A negative TIMEOUT_MS waits without a deadline.  Same ownership as
 * libpq's: the caller PQclear()s the result.  For connections that are
 * not a store handle's (listen.c); a handle's statements use store_run().
 */
PGresult *store_exec_bounded(PGconn *conn, int timeout_ms, const char *sql);
PGresult *store_exec_params_bounded(PGconn *conn, int timeout_ms, const char *sql,
    int nparams, const char *const *values);
PGresult *store_exec_prepared_bounded(PGconn *conn, int timeout_ms, const char *name,
    int nparams, const char *const *values);
PGresult *store_prepare_bounded(PGconn *conn, int timeout_ms, const char *name,
    const char *sql);

/*
 * BEGIN, SETTINGS (one statement without parameters), SQL with its
 * parameters and COMMIT in one round trip (libpq's pipeline mode), with the
 * same deadline.  Returns the first error, else SQL's result; the caller
 * PQclear()s it.  After an error the transaction may be left open and
 * aborted (PQtransactionStatus): the caller rolls it back.
 */
PGresult *store_exec_in_tx_bounded(PGconn *conn, int timeout_ms, const char *settings,
    const char *sql, int nparams, const char *const *values);

/*
 * Array literals and the id index (sqlbuf.c), for the statements that
 * take a whole batch as arrays.  Each returns 0, or -1 when out of memory.
 */

/* Starts B over as an empty array literal "{". */
int arr_open(struct buf *b) __attribute__((warn_unused_result));
/* Appends an element as it is: a number, "NULL", "t". */
int arr_add_raw(struct buf *b, const char *s) __attribute__((warn_unused_result));
int arr_add_int(struct buf *b, int64_t v) __attribute__((warn_unused_result));
/* Appends S quoted; NULL or "" is NULL.  Bytes that are not ASCII text become '?'. */
int arr_add_text(struct buf *b, const char *s) __attribute__((warn_unused_result));
/* Ends the literal "}": B->data is then the parameter. */
int arr_close(struct buf *b) __attribute__((warn_unused_result));

/* Orders struct id_pos by id, for qsort(). */
int id_pos_cmp(const void *a, const void *b);
/* Position of ID in the sorted index IX of N entries, or -1. */
ssize_t index_find(const struct id_pos *ix, size_t n, int64_t id);
/* Makes room for N entries in the index *IX of capacity *CAP; NULL when out of memory. */
struct id_pos *index_grow(struct id_pos **ix, size_t *cap, size_t n);

/* Frees the loop's completion batch (complete.c). */
void store_complete_free(store *st);
/* Frees the loop's due query and claims (claim.c). */
void store_claims_free(store *st);
/* Frees the loop's renewals (claim.c). */
void store_renewals_free(store *st);
/* Frees the heartbeat's (workers.c). */
void store_workers_free(store *st);
/* Frees the loop's reservation (reserve.c). */
void store_reserve_free(store *st);

#endif

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "store/store_int.h"

/*
 * The one way a store handle runs a statement, and the one way it redoes
 * work the server rolled back for a deadlock or a serialization failure.
 */

/* Deadlocks and serialization failures: how often a transaction is redone. */
#define TX_RETRIES 5

static const struct store_stmt stmt_begin = {
	.send = STORE_SIMPLE, .text = "BEGIN", .what = "BEGIN", .want = PGRES_COMMAND_OK,
};
static const struct store_stmt stmt_commit = {
	.send = STORE_SIMPLE, .text = "COMMIT", .what = "COMMIT", .want = PGRES_COMMAND_OK,
};

/* Sends STMT and collects its answer; the caller PQclear()s it. */
static PGresult *
send_collect(store *st, const struct store_stmt *stmt, int nparams, const char *const *params)
{
	int timeout_ms = stmt->no_deadline ? -1 : store_client_deadline_ms(st);

	switch (stmt->send) {
	case STORE_SIMPLE:
		return store_exec_bounded(st->conn, timeout_ms, stmt->text);
	case STORE_PARAMS:
		return store_exec_params_bounded(st->conn, timeout_ms, stmt->text, nparams, params);
	case STORE_PREPARED:
	default:
		return store_exec_prepared_bounded(st->conn, timeout_ms, stmt->text, nparams,
		    params);
	}
}

int
store_run(store *st, const struct store_stmt *stmt, int nparams, const char *const *params,
    PGresult **ret)
{
	PGresult *res;

	if (stmt->send == STORE_PREPARED) {
		if (!store_connected(st)) {
			store_errorf(st, "not connected to the database");
			return -1;
		}
		/* Prepared on first use, so migrate and status work on any schema. */
		if (!st->prepared && store_prepare_all(st) == -1)
			return -1;
	}
	res = send_collect(st, stmt, nparams, params);
	if (PQresultStatus(res) != stmt->want) {
		store_set_error(st, stmt->what, res);
		PQclear(res);
		return -1;
	}
	if (ret != NULL)
		*ret = res;
	else
		PQclear(res);
	return 0;
}

void
store_run_cleanup(store *st, const char *sql, bool no_deadline)
{
	const struct store_stmt stmt = {
		.send = STORE_SIMPLE, .text = sql, .no_deadline = no_deadline,
	};

	if (store_connected(st))
		PQclear(send_collect(st, &stmt, 0, NULL));
}

int
store_prepare(store *st, const char *name, const char *sql)
{
	PGresult *res = store_prepare_bounded(st->conn, store_client_deadline_ms(st), name, sql);
	int ret = 0;

	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		store_set_error(st, "could not prepare statements", res);
		ret = -1;
	}
	PQclear(res);
	return ret;
}

/* 40001 serialization_failure and 40P01 deadlock_detected are worth redoing. */
static bool
failed_retryable(const store *st)
{
	return strcmp(st->sqlstate, "40001") == 0 || strcmp(st->sqlstate, "40P01") == 0;
}

/* One attempt: BODY, inside BEGIN and COMMIT with TX, rolled back when it fails. */
static int
attempt(store *st, bool tx, int (*body)(store *, void *), void *arg)
{
	int ret;

	if (!tx)
		return body(st, arg);
	if (store_run(st, &stmt_begin, 0, NULL, NULL) == -1)
		return -1;
	if ((ret = body(st, arg)) == 0)
		ret = store_run(st, &stmt_commit, 0, NULL, NULL);
	if (ret == -1)
		store_run_cleanup(st, "ROLLBACK", false);
	return ret;
}

static int
retrying_v(store *st, bool tx, int (*body)(store *, void *), void *arg, const char *fmt,
    va_list ap)
{
	char subject[128] = "";

	for (int i = 0; i < TX_RETRIES; i++) {
		int r = attempt(st, tx, body, arg);

		if (r == 0)
			return 0;
		if (!failed_retryable(st))
			break;
		st->retries++;
		if (subject[0] == '\0')
			vsnprintf(subject, sizeof(subject), fmt, ap);
		log_info("%s hit a deadlock or serialization failure, retrying", subject);
	}
	return -1;
}

int
store_retrying(store *st, bool tx, int (*body)(store *, void *), void *arg,
    const char *fmt, ...)
{
	va_list ap;
	int ret;

	va_start(ap, fmt);
	ret = retrying_v(st, tx, body, arg, fmt, ap);
	va_end(ap);
	return ret;
}

/* One statement as the body of store_retrying(). */
struct one_stmt {
	const struct store_stmt *stmt;
	int nparams;
	const char *const *params;
	PGresult **ret;
};

static int
run_one(store *st, void *arg)
{
	struct one_stmt *one = arg;

	return store_run(st, one->stmt, one->nparams, one->params, one->ret);
}

int
store_run_retrying(store *st, const struct store_stmt *stmt, int nparams,
    const char *const *params, PGresult **ret, const char *fmt, ...)
{
	struct one_stmt one = { stmt, nparams, params, ret };
	va_list ap;
	int r;

	va_start(ap, fmt);
	r = retrying_v(st, false, run_one, &one, fmt, ap);
	va_end(ap);
	return r;
}

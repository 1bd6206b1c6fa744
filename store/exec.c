#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "common/clock.h"
#include "common/log.h"
#include "store/store_int.h"

/*
 * The one way a store handle runs a statement, and the one way it redoes
 * work the server rolled back for a deadlock or a serialization failure.
 */

/* Deadlocks and serialization failures: how often a transaction is redone. */
#define TX_RETRIES 5
/* A statement without a client deadline (migrate's DDL): a day. */
#define NO_DEADLINE_MS (24 * 3600 * 1000)

static const struct store_stmt stmt_begin = {
	.send = STORE_SIMPLE, .text = "BEGIN", .what = "BEGIN", .want = PGRES_COMMAND_OK,
};
static const struct store_stmt stmt_commit = {
	.send = STORE_SIMPLE, .text = "COMMIT", .what = "COMMIT", .want = PGRES_COMMAND_OK,
};

/*
 * The SQL kept under NAME by store_prepare() for transaction pooling, or
 * NULL when no statement has that name.
 */
static const char *
unnamed_sql(const store *st, const char *name)
{
	for (size_t i = 0; i < st->n_unnamed; i++)
		if (strcmp(st->unnamed[i].name, name) == 0)
			return st->unnamed[i].sql;
	return NULL;
}

/*
 * The daemon's connection (store/pq.c, in pipeline mode): NSTMTS
 * statements as one job, waited for within their deadline.  Returns the
 * first failed statement's result, else statement KEEP's; NULL when the
 * connection was lost (store_set_error() then reads why from the engine).
 */
static PGresult *
job_collect(store *st, const struct pq_stmt *stmts, int nstmts, int keep, int timeout_ms)
{
	struct pq_job job = { .nstmts = nstmts };
	PGresult *res = NULL;

	memcpy(job.stmts, stmts, (size_t)nstmts * sizeof(*stmts));
	if (pq_submit(st->engine, &job, timeout_ms < 0 ? NO_DEADLINE_MS : timeout_ms,
	    clock_ms()) == -1)
		return NULL;
	pq_wait(st->engine, &job);
	for (int i = 0; i < nstmts && res == NULL; i++)
		if (job.res[i] != NULL && PQresultStatus(job.res[i]) == PGRES_FATAL_ERROR)
			res = job.res[i], job.res[i] = NULL;
	if (res == NULL && job.ok)
		res = job.res[keep], job.res[keep] = NULL;
	pq_job_clear(&job);
	return res;
}

/* STMT as one statement of a job on the daemon's connection. */
static int
job_stmt(const store *st, const struct store_stmt *stmt, int nparams,
    const char *const *params, struct pq_stmt *out)
{
	*out = (struct pq_stmt){ .nparams = nparams, .params = params };
	if (stmt->send != STORE_PREPARED)
		out->sql = stmt->text;
	else if (st->txn_pooling)
		out->sql = unnamed_sql(st, stmt->text);
	else
		out->name = stmt->text;
	return out->sql != NULL || out->name != NULL ? 0 : -1;
}

/*
 * The daemon's session plans every statement once (session_setup()); a
 * statement marked custom_plan is planned for its values again, in its
 * own job's transaction only.
 */
static const char sql_custom_plan[] =
    "SELECT set_config('plan_cache_mode', 'auto', true)";

/* Sends STMT and collects its answer; the caller PQclear()s it. */
static PGresult *
send_collect(store *st, const struct store_stmt *stmt, int nparams, const char *const *params)
{
	int timeout_ms = stmt->no_deadline ? -1 : store_client_deadline_ms(st);
	const char *sql;

	if (st->conn == NULL) {
		/* The daemon's: a custom_plan statement after its plan mode. */
		struct pq_stmt two[2] = { { .sql = sql_custom_plan } };
		int from = stmt->custom_plan && store_plans_once(st) ? 0 : 1;

		if (st->engine == NULL || job_stmt(st, stmt, nparams, params, &two[1]) == -1)
			return NULL;
		return job_collect(st, two + from, 2 - from, 1 - from, timeout_ms);
	}
	switch (stmt->send) {
	case STORE_SIMPLE:
		return store_exec_bounded(st->conn, timeout_ms, stmt->text);
	case STORE_PARAMS:
		return store_exec_params_bounded(st->conn, timeout_ms, stmt->text, nparams, params);
	case STORE_PREPARED:
	default:
		/*
		 * Behind a transaction pooler a statement prepared on one server
		 * connection is unknown on the next ("prepared statement does not
		 * exist") and a second prepare on the first fails ("already
		 * exists"): the same SQL goes as the unnamed statement instead,
		 * parsed and planned again at every call.
		 */
		if (st->txn_pooling) {
			if ((sql = unnamed_sql(st, stmt->text)) == NULL)
				return NULL;
			return store_exec_params_bounded(st->conn, timeout_ms, sql, nparams,
			    params);
		}
		return store_exec_prepared_bounded(st->conn, timeout_ms, stmt->text, nparams,
		    params);
	}
}

/* Sends STMT, checks the status it returned and records a failure. */
static int
run_plain(store *st, const struct store_stmt *stmt, int nparams, const char *const *params,
    PGresult **ret)
{
	PGresult *res = send_collect(st, stmt, nparams, params);

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

/* What a statement of the store's own does to the transaction it runs in. */
enum tx_effect {
	TX_NONE,
	TX_OPENS,       /* BEGIN ... */
	TX_ENDS,        /* COMMIT, ROLLBACK */
};

static enum tx_effect
tx_effect_of(const char *sql)
{
	if (strncasecmp(sql, "BEGIN", 5) == 0)
		return TX_OPENS;
	if (strncasecmp(sql, "COMMIT", 6) == 0 || strncasecmp(sql, "ROLLBACK", 8) == 0)
		return TX_ENDS;
	return TX_NONE;
}

/*
 * Rolls back what a failed statement may have left open (an aborted
 * pipeline stops before its COMMIT), keeping the failure's own error.
 * Only when a transaction is open: a ROLLBACK without one draws a warning.
 */
static void
rollback_open(store *st, bool no_deadline)
{
	st->in_tx = false;
	if (store_connected(st) && PQtransactionStatus(store_conn(st)) != PQTRANS_IDLE)
		store_run_cleanup(st, "ROLLBACK", no_deadline);
}

/*
 * A statement of its own, outside any transaction of the caller's, under
 * transaction pooling: BEGIN, the settings, the statement and COMMIT, in
 * one round trip for a statement with parameters (a pipeline), in three
 * for a simple query, which may hold several statements and so cannot be
 * pipelined (the schema check at start; migrate never comes here).
 */
static int
run_in_tx(store *st, const struct store_stmt *stmt, int nparams, const char *const *params,
    PGresult **ret)
{
	int timeout_ms = stmt->no_deadline ? -1 : store_client_deadline_ms(st);
	const char *sql = stmt->send == STORE_PREPARED ? unnamed_sql(st, stmt->text) : stmt->text;
	char begin[512];
	struct store_stmt step = *stmt;
	PGresult *res = NULL;

	if (st->conn == NULL || stmt->send != STORE_SIMPLE) {
		/*
		 * The daemon's connection: every statement is one, even a simple
		 * query, and the job's own implicit transaction, up to its sync,
		 * holds the settings: no BEGIN, so a failure leaves nothing open
		 * behind it for the jobs queued after it to trip on.
		 */
		const struct pq_stmt tx[] = {
			{ .sql = st->tx_settings },
			{ .sql = sql, .nparams = nparams, .params = params },
		};

		if (sql == NULL)
			res = NULL;
		else if (st->conn == NULL)
			res = st->engine == NULL ? NULL : job_collect(st, tx, 2, 1, timeout_ms);
		else
			res = store_exec_in_tx_bounded(st->conn, timeout_ms, st->tx_settings, sql,
			    nparams, params);
		if (PQresultStatus(res) != stmt->want) {
			store_set_error(st, stmt->what, res);
			PQclear(res);
			rollback_open(st, stmt->no_deadline);
			return -1;
		}
		goto done;
	}
	snprintf(begin, sizeof(begin), "BEGIN; %s", st->tx_settings);
	step.text = begin;
	step.want = PGRES_TUPLES_OK;
	st->in_tx = true;
	if (run_plain(st, &step, 0, NULL, NULL) == -1 ||
	    run_plain(st, stmt, nparams, params, &res) == -1) {
		rollback_open(st, stmt->no_deadline);
		return -1;
	}
	step.text = "COMMIT";
	step.want = PGRES_COMMAND_OK;
	st->in_tx = false;
	if (run_plain(st, &step, 0, NULL, NULL) == -1) {
		PQclear(res);
		return -1;
	}
done:
	if (ret != NULL)
		*ret = res;
	else
		PQclear(res);
	return 0;
}

/*
 * Under transaction pooling the session settings live in each transaction
 * (store_connect()).  A caller's BEGIN carries them in the same round
 * trip; inside its transaction statements run as they are; a statement
 * outside one would be a transaction of its own without them, so it is
 * wrapped in one that has them (run_in_tx).  A failure rolls back,
 * keeping its own error.
 */
static int
run_pooled(store *st, const struct store_stmt *stmt, int nparams, const char *const *params,
    PGresult **ret)
{
	enum tx_effect fx = stmt->send == STORE_SIMPLE ? tx_effect_of(stmt->text) : TX_NONE;
	char begin[512];
	struct store_stmt step = *stmt;

	if (fx == TX_ENDS) {
		st->in_tx = false;
		return run_plain(st, stmt, nparams, params, ret);
	}
	if (fx == TX_NONE)
		return st->in_tx ? run_plain(st, stmt, nparams, params, ret) :
		    run_in_tx(st, stmt, nparams, params, ret);
	if (st->conn == NULL) {
		/* The daemon's connection: the BEGIN and the settings, two statements of one job. */
		const struct pq_stmt open[] = { { .sql = stmt->text }, { .sql = st->tx_settings } };
		PGresult *res = st->engine == NULL ? NULL : job_collect(st, open, 2, 1,
		    stmt->no_deadline ? -1 : store_client_deadline_ms(st));

		st->in_tx = true;
		if (PQresultStatus(res) != PGRES_TUPLES_OK) {
			store_set_error(st, stmt->what, res);
			PQclear(res);
			rollback_open(st, stmt->no_deadline);
			return -1;
		}
		PQclear(res);
		return 0;
	}
	if ((size_t)snprintf(begin, sizeof(begin), "%s; %s", stmt->text, st->tx_settings) >=
	    sizeof(begin)) {
		store_errorf(st, "%s: statement too long", stmt->what);
		return -1;
	}
	step.text = begin;
	step.want = PGRES_TUPLES_OK;
	st->in_tx = true;
	if (run_plain(st, &step, 0, NULL, NULL) == -1) {
		rollback_open(st, stmt->no_deadline);
		return -1;
	}
	return 0;
}

int
store_run(store *st, const struct store_stmt *stmt, int nparams, const char *const *params,
    PGresult **ret)
{
	if (stmt->send == STORE_PREPARED) {
		if (!store_connected(st)) {
			store_errorf(st, "not connected to the database");
			return -1;
		}
		/* Prepared on first use, so migrate and status work on any schema. */
		if (!st->prepared && store_prepare_all(st) == -1)
			return -1;
	}
	if (st->txn_pooling)
		return run_pooled(st, stmt, nparams, params, ret);
	return run_plain(st, stmt, nparams, params, ret);
}

void
store_run_cleanup(store *st, const char *sql, bool no_deadline)
{
	const struct store_stmt stmt = {
		.send = STORE_SIMPLE, .text = sql, .no_deadline = no_deadline,
	};

	if (tx_effect_of(sql) == TX_ENDS)
		st->in_tx = false;
	if (store_connected(st))
		PQclear(send_collect(st, &stmt, 0, NULL));
}

/* Keeps SQL under NAME for transaction pooling; once per name and handle. */
static int
keep_unnamed(store *st, const char *name, const char *sql)
{
	struct unnamed_stmt *u;

	if (unnamed_sql(st, name) != NULL)
		return 0;
	if (st->n_unnamed == STORE_UNNAMED_MAX || strlen(name) >= sizeof(u->name)) {
		store_errorf(st, "could not prepare statements: no room for \"%s\"", name);
		return -1;
	}
	u = &st->unnamed[st->n_unnamed];
	if ((u->sql = strdup(sql)) == NULL) {
		store_errorf(st, "could not prepare statements: out of memory");
		return -1;
	}
	snprintf(u->name, sizeof(u->name), "%s", name);
	st->n_unnamed++;
	return 0;
}

int
store_prepare(store *st, const char *name, const char *sql)
{
	PGresult *res;
	int ret = 0;

	if (st->txn_pooling)
		return keep_unnamed(st, name, sql);
	if (st->conn == NULL) {
		const struct pq_stmt prep = { .prepare = true, .name = name, .sql = sql };

		res = st->engine == NULL ? NULL :
		    job_collect(st, &prep, 1, 0, store_client_deadline_ms(st));
	} else {
		res = store_prepare_bounded(st->conn, store_client_deadline_ms(st), name, sql);
	}

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

/*
 * The loop's asynchronous statements.  An op is one job: the caller's
 * statements, one implicit transaction up to the job's sync (they commit
 * or fail together, and a pooler keeps the server connection until the
 * sync), after the settings under transaction pooling.  No explicit BEGIN:
 * a failed one would stay open, aborted, and fail the jobs queued behind.
 */
int
store_op_send(store *st, struct store_op *op, const struct store_stmt *const *stmts,
    int n, const int *nparams, const char *const *const *params)
{
	int j = 0;

	if (op->active) {
		store_errorf(st, "%s: already in flight", stmts[0]->what);
		return -1;
	}
	if (st->conn != NULL || st->engine == NULL || !store_connected(st)) {
		store_errorf(st, "%s: not connected to the database", stmts[0]->what);
		return -1;
	}
	if (n + 1 > PQ_JOB_STMTS_MAX) {
		store_errorf(st, "%s: too many statements for one job", stmts[0]->what);
		return -1;
	}
	if (!st->prepared && store_prepare_all(st) == -1)
		return -1;
	memset(&op->job, 0, sizeof(op->job));
	if (st->txn_pooling)
		op->job.stmts[j++] = (struct pq_stmt){ .sql = st->tx_settings };
	op->first = j;
	for (int i = 0; i < n; i++)
		if (job_stmt(st, stmts[i], nparams[i], params[i], &op->job.stmts[j++]) == -1) {
			store_errorf(st, "%s: statement not prepared", stmts[i]->what);
			return -1;
		}
	op->job.nstmts = j;
	op->what = stmts[0]->what;
	op->retries = 0;
	if (pq_submit(st->engine, &op->job, store_client_deadline_ms(st), clock_ms()) == -1) {
		store_set_error(st, op->what, NULL);
		return -1;
	}
	op->active = true;
	return 0;
}

bool
store_op_active(const struct store_op *op)
{
	return op->active;
}

int
store_op_poll(store *st, struct store_op *op)
{
	PGresult *err = NULL;

	if (!op->active)
		return -1;
	if (op->job.state == PQ_JOB_QUEUED)
		return 0;
	op->active = false;
	if (op->job.ok)
		return 1;
	for (int i = 0; i < op->job.nstmts && err == NULL; i++)
		if (op->job.res[i] != NULL && PQresultStatus(op->job.res[i]) == PGRES_FATAL_ERROR)
			err = op->job.res[i];
	st->sqlstate[0] = '\0';
	store_set_error(st, op->what, err);
	pq_job_clear(&op->job);
	/* As store_retrying(): every failure counted and logged, five attempts in all. */
	if (!failed_retryable(st))
		return -1;
	st->retries++;
	log_info("%s hit a deadlock or serialization failure, retrying",
	    op->subject[0] != '\0' ? op->subject : op->what);
	if (++op->retries < TX_RETRIES && store_connected(st) &&
	    pq_submit(st->engine, &op->job, store_client_deadline_ms(st), clock_ms()) == 0) {
		op->active = true;
		return 0;
	}
	return -1;
}

PGresult *
store_op_result(const struct store_op *op, int i)
{
	return op->job.res[op->first + i];
}

void
store_op_clear(struct store_op *op)
{
	pq_job_clear(&op->job);
	op->active = false;
}

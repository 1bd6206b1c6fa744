#include "store/store.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "common/log.h"
#include "store/conninfo.h"
#include "store/store_int.h"

/* Deadlocks and serialization failures: how often a transaction is redone. */
#define TX_RETRIES 5

static const char *const table_of[ITEM_KIND_COUNT] = { "invoices", "redemptions" };

/*
 * The SQL, one template per statement; %1$s is the table.  Table names are
 * constants of ours; every value is a parameter.
 */
/*
 * Due items of both kinds, oldest first, in one statement: an idle worker
 * costs one query per poll, and neither kind can starve the other.  Each
 * branch is served by its partial index.
 */
/*
 * The fleet's pauses (schema version 5) ride along: a paused kind's branch
 * returns nothing (its NOT EXISTS is one uncorrelated lookup per
 * statement), and each pause comes first as a row of kind 2 + its kind,
 * with its reason, so the worker knows at no extra round trip.
 */
static const char sql_due[] =
    "SELECT kind, id, note FROM ("
    " (SELECT 2 + (kind = 'redemption')::int AS kind, 0::bigint AS id,"
    "   '-infinity'::timestamptz AS next_attempt_at, format('%s (paused by %s since %s)',"
    "   reason, paused_by, to_char(since, 'YYYY-MM-DD HH24:MI:SSOF')) AS note"
    "   FROM fleet_pause)"
    " UNION ALL"
    " (SELECT 0, id, next_attempt_at, NULL FROM invoices"
    "   WHERE status = 'pending' AND next_attempt_at <= now()"
    "   AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = 'invoice')"
    "   ORDER BY next_attempt_at, id LIMIT $1::bigint)"
    " UNION ALL"
    " (SELECT 1, id, next_attempt_at, NULL FROM redemptions"
    "   WHERE status = 'pending' AND next_attempt_at <= now()"
    "   AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = 'redemption')"
    "   ORDER BY next_attempt_at, id LIMIT $1)) AS d "
    "ORDER BY next_attempt_at, kind, id LIMIT $1::bigint + 2";

/*
 * A claim's SET: bump the fence, take the lease, and hide the item until the
 * lease ends by moving next_attempt_at there.  lease_until still set means
 * the previous claim never completed: its API call may have happened.
 */
#define CLAIM_SET                                                              \
	"SET fence = t.fence + 1, locked_by = $1, "                            \
	"lease_until = now() + $2 * interval '1 millisecond', "                \
	"next_attempt_at = now() + $2 * interval '1 millisecond', "            \
	"ambiguous = t.ambiguous OR t.lease_until IS NOT NULL, updated_at = now(), " \
	"first_claimed_at = coalesce(t.first_claimed_at, now()) "

/*
 * After the kind's own columns: what the give-up rule and the key's age
 * need, and the generation the key is built from (schema version 6).
 */
#define CLAIM_RETURNING_COMMON                                                 \
	", t.blocked_calls, "                                                  \
	"(extract(epoch FROM now() - t.first_claimed_at) * 1000)::bigint, "    \
	"t.generation"

/*
 * A claim racing a pause takes nothing once the pause committed: the due
 * query that chose the ids may be older.  %3$s is the kind's name.
 */
#define CLAIM_NOT_PAUSED \
	"AND NOT EXISTS (SELECT 1 FROM fleet_pause WHERE kind = '%3$s') "

static const char *const claim_returning[ITEM_KIND_COUNT] = {
	"RETURNING t.id, t.fence, t.attempts, t.ambiguous, t.amount_cents, "
	"t.customer_id, t.currency, NULL::bigint, false" CLAIM_RETURNING_COMMON,
	"RETURNING t.id, t.fence, t.attempts, t.ambiguous, t.amount_cents, "
	"t.customer_id, NULL::text, t.subsidy_id, EXISTS (SELECT 1 FROM "
	"ledger_transactions h WHERE h.redemption_id = t.id "
	"AND h.generation = t.generation AND h.kind = 'hold')"
	CLAIM_RETURNING_COMMON,
};

/*
 * Both claims lock the rows in a subquery and update them by primary key
 * (t.id = ANY (ARRAY(...))).  A join instead let the generic plan of the
 * prepared statement hash the whole table, or walk the due index across the
 * whole backlog to find a handful of ids: 10 ms per claim of 50 rows on a
 * 20 000-row backlog, against 0.3 ms now (see BENCHMARKS.md).
 */
static const char sql_claim_skip[] =
    "UPDATE %1$s AS t " CLAIM_SET
    "WHERE t.id = ANY (ARRAY(SELECT id FROM %1$s WHERE status = 'pending' "
    "AND next_attempt_at <= now() ORDER BY next_attempt_at, id LIMIT $3 "
    "FOR UPDATE SKIP LOCKED)) " CLAIM_NOT_PAUSED "%2$s";

/*
 * The ids come from us, so only the primary key may serve this: the due
 * test is written "IS TRUE" so no stale estimate can make the planner scan
 * the due index for them instead.
 */
static const char sql_claim_ids[] =
    "UPDATE %1$s AS t " CLAIM_SET
    "WHERE t.id = ANY (ARRAY(SELECT i.id FROM unnest($3::bigint[]) AS x(id) "
    "JOIN %1$s i ON i.id = x.id WHERE i.status = 'pending' "
    "AND (i.next_attempt_at <= now()) IS TRUE FOR UPDATE OF i SKIP LOCKED)) "
    CLAIM_NOT_PAUSED "%2$s";

static const char sql_renew[] =
    "UPDATE %1$s AS t SET lease_until = now() + $3 * interval '1 millisecond', "
    "next_attempt_at = now() + $3 * interval '1 millisecond' "
    "FROM unnest($1::bigint[], $2::bigint[]) AS u(id, fence) "
    "WHERE t.id = u.id AND t.fence = u.fence AND t.status = 'pending' "
    "RETURNING t.id";

/*
 * Completions commit without waiting for the WAL flush (set_config(...,
 * true) applies to this transaction only, from inside the one statement).
 * That is safe here and only here: a completion lost in a database crash
 * leaves the item pending on a lease, and the next holder's call is a replay
 * that records the same result.  Claims and holds stay synchronous: they
 * must be durable before the API call they allow.
 */
#define COMPLETE_INPUT                                                         \
	"unnest($1::bigint[], $2::bigint[], $3::text[], $4::int[], $5::bool[], " \
	"$6::bigint[], $7::text[], $8::text[], $9::bool[], $10::text[], "      \
	"$11::bigint[], $12::int[], $13::text[]) "                             \
	"AS u(id, fence, state, calls, ambiguous, delay_ms, result_id, error, " \
	"blocked, operator_note, started_ms, http_status, class), "            \
	"(SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"

#define COMPLETE_SET(done_state, id_column)                                    \
	"SET status = CASE u.state WHEN 'done' THEN '" done_state "' "         \
	"WHEN 'failed' THEN 'failed' ELSE 'pending' END, "                     \
	id_column " = u.result_id, attempts = t.attempts + u.calls, "          \
	"blocked_calls = t.blocked_calls + u.blocked::int, "                   \
	"last_error = CASE WHEN u.error IS NULL AND u.operator_note IS NOT NULL " \
	"THEN t.last_error ELSE u.error END, "                                 \
	"needs_operator = u.operator_note, "                                   \
	"ambiguous = t.ambiguous OR u.ambiguous, "                             \
	"next_attempt_at = CASE WHEN u.state <> 'retry' THEN t.next_attempt_at " \
	"WHEN u.delay_ms < 0 THEN 'infinity' "                                 \
	"ELSE now() + u.delay_ms * interval '1 millisecond' END, "             \
	"locked_by = NULL, lease_until = NULL, updated_at = now(), "           \
	"finished_at = CASE WHEN u.state = 'retry' THEN NULL ELSE now() END "

#define COMPLETE_WHERE "WHERE t.id = u.id AND t.fence = u.fence AND t.status = 'pending' "

/*
 * What a completion hands to the history: the outcomes that applied (a
 * completion turned away by its fence leaves no trace, its holder's does).
 */
#define COMPLETE_RETURNING                                                     \
	"RETURNING t.id, t.status, t.attempts, u.started_ms, u.http_status, "  \
	"u.class, u.result_id, u.error, t.generation"

/*
 * The history of each outcome recorded, in the same statement, so it can
 * neither be lost nor written for an outcome that was not ($14: this
 * worker; $15: history.enabled).
 */
#define COMPLETE_HISTORY(kind)                                                 \
	"hist AS (INSERT INTO attempts (kind, item_id, generation, attempt, "  \
	"worker_id, started_at, finished_at, http_status, class, result_id, "  \
	"error) SELECT '" kind "', id, generation, attempts, $14, "           \
	"to_timestamp(started_ms / 1000.0), now(), nullif(http_status, 0), "   \
	"coalesce(class, 'not called'), result_id, error FROM upd WHERE $15::bool) "

static const char sql_complete_invoice[] =
    "WITH upd AS (UPDATE invoices AS t " COMPLETE_SET("paid", "charge_id")
    "FROM " COMPLETE_INPUT " " COMPLETE_WHERE COMPLETE_RETURNING "), "
    COMPLETE_HISTORY("invoice")
    "SELECT id FROM upd";

/*
 * A failed redemption gives its hold back in the same statement that marks
 * it failed, so no moment exists where it is failed with money still held.
 * Only the current generation's hold: an earlier one was given back when
 * that generation failed.
 */
static const char sql_complete_redemption[] =
    "WITH upd AS (UPDATE redemptions AS t " COMPLETE_SET("redeemed", "fulfillment_id")
    "FROM " COMPLETE_INPUT " " COMPLETE_WHERE COMPLETE_RETURNING "), "
    COMPLETE_HISTORY("redemption") ", "
    "rev AS (INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind, "
    "generation) SELECT h.subsidy_id, -h.amount_cents, h.redemption_id, 'reversal', h.generation "
    "FROM ledger_transactions h JOIN upd ON h.redemption_id = upd.id "
    "AND h.generation = upd.generation "
    "WHERE h.kind = 'hold' AND upd.status = 'failed' ON CONFLICT DO NOTHING) "
    "SELECT id FROM upd";

enum stmt {
	STMT_CLAIM_SKIP,
	STMT_CLAIM_IDS,
	STMT_RENEW,
	STMT_COMPLETE,
	STMT_COUNT,
};

static const char *const stmt_names[STMT_COUNT] = {
	"claim_skip", "claim_ids", "renew", "complete",
};

/* A growable text buffer for array literals, reused across calls. */
struct buf {
	char *data;
	size_t len, cap;
};

struct store {
	char *conninfo;
	char *password;             /* the conninfo's, redacted from every message */
	bool conninfo_unparsable;   /* libpq's parse error may quote it: withheld */
	char *worker_id;
	PGconn *conn;
	bool prepared;
	int query_timeout_ms;   /* statement_timeout; the client waits 1 s more */
	char sqlstate[6];       /* of the last failed statement; "" for none */
	char errmsg[512];
	uint64_t retries;
	struct buf arr[13];
	char pause_note[ITEM_KIND_COUNT][600]; /* from the last due query; "" = not paused */
	bool history;               /* completions write the attempts history */
	struct id_pos *index;       /* scratch for index_ids() */
	size_t index_cap;
};

static int
buf_reserve(struct buf *b, size_t more)
{
	size_t cap;
	char *p;

	if (b->len + more + 1 <= b->cap)
		return 0;
	cap = b->cap ? b->cap : 256;
	while (cap < b->len + more + 1)
		cap *= 2;
	if ((p = realloc(b->data, cap)) == NULL)
		return -1;
	b->data = p;
	b->cap = cap;
	return 0;
}

static int
buf_add(struct buf *b, const char *s, size_t n)
{
	if (buf_reserve(b, n) == -1)
		return -1;
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
	return 0;
}

/*
 * Rows come back from RETURNING in no particular order.  To tell which of
 * n items they name without an n x rows scan, the items' ids are sorted
 * once with their positions and each returned id is looked up.
 */
struct id_pos {
	int64_t id;
	size_t pos;
};

static int
id_pos_cmp(const void *a, const void *b)
{
	const struct id_pos *x = a, *y = b;

	return x->id < y->id ? -1 : x->id > y->id;
}

/* Position of ID in the sorted index IX of N entries, or -1. */
static ssize_t
index_find(const struct id_pos *ix, size_t n, int64_t id)
{
	struct id_pos key = { id, 0 };
	const struct id_pos *hit = bsearch(&key, ix, n, sizeof(*ix), id_pos_cmp);

	return hit != NULL ? (ssize_t)hit->pos : -1;
}

static void
buf_reset(struct buf *b)
{
	b->len = 0;
	if (b->data != NULL)
		b->data[0] = '\0';
}

/* Appends an element of an array literal: a number, "NULL", or a quoted string. */
static int
arr_add_raw(struct buf *b, const char *s)
{
	if (buf_add(b, b->len == 1 ? "" : ",", b->len == 1 ? 0 : 1) == -1)
		return -1;
	return buf_add(b, s, strlen(s));
}

static int
arr_add_int(struct buf *b, int64_t v)
{
	char num[32];

	snprintf(num, sizeof(num), "%" PRId64, v);
	return arr_add_raw(b, num);
}

/*
 * Quotes S for an array literal.  Text from the API may hold anything:
 * bytes that are not UTF-8 are replaced so one odd error message cannot
 * make PostgreSQL reject a whole batch of completions.
 */
static int
arr_add_text(struct buf *b, const char *s)
{
	const unsigned char *p;

	if (s == NULL || s[0] == '\0')
		return arr_add_raw(b, "NULL");
	if (buf_add(b, b->len == 1 ? "\"" : ",\"", b->len == 1 ? 1 : 2) == -1)
		return -1;
	for (p = (const unsigned char *)s; *p != '\0'; p++) {
		char c = (char)*p;

		if (*p == '"' || *p == '\\') {
			if (buf_add(b, "\\", 1) == -1)
				return -1;
		} else if (*p >= 0x80 || *p < 0x20) {
			c = '?';
		}
		if (buf_add(b, &c, 1) == -1)
			return -1;
	}
	return buf_add(b, "\"", 1);
}

static int
arr_open(struct buf *b)
{
	buf_reset(b);
	return buf_add(b, "{", 1);
}

static int
arr_close(struct buf *b)
{
	return buf_add(b, "}", 1);
}


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

/* Makes room for N index entries in ST's scratch; NULL when out of memory. */
static struct id_pos *
index_reserve(store *st, size_t n)
{
	struct id_pos *p;
	size_t cap = st->index_cap ? st->index_cap : 64;

	if (n <= st->index_cap)
		return st->index;
	while (cap < n)
		cap *= 2;
	if ((p = realloc(st->index, cap * sizeof(*p))) == NULL)
		return NULL;
	st->index = p;
	st->index_cap = cap;
	return p;
}

/* Sorted index over the ids of ITEMS. */
static struct id_pos *
index_items(store *st, struct item *const *items, size_t n)
{
	struct id_pos *ix = index_reserve(st, n);

	if (ix == NULL)
		return NULL;
	for (size_t i = 0; i < n; i++) {
		ix[i].id = items[i]->id;
		ix[i].pos = i;
	}
	qsort(ix, n, sizeof(*ix), id_pos_cmp);
	return ix;
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
	for (size_t i = 0; i < sizeof(st->arr) / sizeof(st->arr[0]); i++)
		free(st->arr[i].data);
	free(st->index);
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

int
store_client_deadline_ms(const store *st)
{
	return st->query_timeout_ms + 1000;
}

bool
store_connected(const store *st)
{
	return st->conn != NULL && PQstatus(st->conn) == CONNECTION_OK;
}

void
store_target(const store *st, char *buf, size_t len)
{
	if (!store_connected(st))
		snprintf(buf, len, "%s", "");
	else
		snprintf(buf, len, "host \"%s\", port \"%s\", database \"%s\"",
		    PQhost(st->conn), PQport(st->conn), PQdb(st->conn));
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
	return st->conn;
}

void
store_set_error(store *st, const char *what, const PGresult *res)
{
	const char *msg = res != NULL ? PQresultErrorMessage(res) : "";

	if (msg == NULL || msg[0] == '\0')
		msg = st->conn != NULL ? PQerrorMessage(st->conn) : "not connected";
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
	if (strcmp(st->sqlstate, "25006") == 0 && st->conn != NULL) {
		store_errorf(st, "%s: %s (the server is read-only: dropping the connection to "
		    "look for the writable one)", what, msg);
		snprintf(st->sqlstate, sizeof(st->sqlstate), "25006");
		PQfinish(st->conn);
		st->conn = NULL;
		st->prepared = false;
	}
}

bool
store_failed_on_data(const store *st)
{
	/* 22 data exception, 23 integrity constraint, P0 raised by a trigger. */
	return strncmp(st->sqlstate, "22", 2) == 0 || strncmp(st->sqlstate, "23", 2) == 0 ||
	    strncmp(st->sqlstate, "P0", 2) == 0;
}

static int
prepare_all(store *st)
{
	char sql[4096];
	PGresult *res;

	for (int k = 0; k < ITEM_KIND_COUNT; k++) {
		for (int s = 0; s < STMT_COUNT; s++) {
			char name[64];

			switch (s) {
			case STMT_CLAIM_SKIP:
				snprintf(sql, sizeof(sql), sql_claim_skip, table_of[k], claim_returning[k],
				    item_kind_name(k));
				break;
			case STMT_CLAIM_IDS:
				snprintf(sql, sizeof(sql), sql_claim_ids, table_of[k], claim_returning[k],
				    item_kind_name(k));
				break;
			case STMT_RENEW:
				snprintf(sql, sizeof(sql), sql_renew, table_of[k]);
				break;
			default:
				snprintf(sql, sizeof(sql), "%s", k == ITEM_INVOICE ?
				    sql_complete_invoice : sql_complete_redemption);
				break;
			}
			snprintf(name, sizeof(name), "%s_%s", stmt_names[s], item_kind_name(k));
			res = store_prepare_bounded(st->conn, store_client_deadline_ms(st), name, sql);
			if (PQresultStatus(res) != PGRES_COMMAND_OK) {
				store_set_error(st, "could not prepare statements", res);
				PQclear(res);
				return -1;
			}
			PQclear(res);
		}
	}
	for (int i = 0; i < 2; i++) {
		res = store_prepare_bounded(st->conn, store_client_deadline_ms(st),
		    i == 0 ? "reserve" : "due", i == 0 ?
		    "SELECT rid, result FROM bw_reserve($1::bigint[], $2::bigint[])" : sql_due);
		if (PQresultStatus(res) != PGRES_COMMAND_OK) {
			store_set_error(st, "could not prepare statements", res);
			PQclear(res);
			return -1;
		}
		PQclear(res);
	}
	st->prepared = true;
	return 0;
}

PGconn *
store_open_conn(const char *conninfo, const char *application_name)
{
	/*
	 * Our defaults come first so the operator's conninfo overrides them:
	 * bounded connect time and TCP keepalives so a dead peer is noticed
	 * instead of blocking the loop forever.
	 */
	const char *keys[] = { "connect_timeout", "keepalives", "keepalives_idle",
	    "keepalives_interval", "keepalives_count", "tcp_user_timeout",
	    "application_name", "dbname", NULL };
	const char *vals[] = { "5", "1", "10", "5", "3", "20000",
	    application_name, conninfo, NULL };

	return PQconnectdbParams(keys, vals, 1);
}

int
store_connect(store *st)
{
	PGresult *res;
	char settings[192];
	int ret = -1;

	if (st->conn != NULL) {
		PQfinish(st->conn);
		st->conn = NULL;
	}
	st->prepared = false;
	st->conn = store_open_conn(st->conninfo, "billing-worker");
	if (st->conn == NULL) {
		store_errorf(st, "could not connect to the database: out of memory");
		return -1;
	}
	if (st->conninfo_unparsable && conninfo_may_hold_secret(st->conninfo)) {
		store_errorf(st, "could not connect to the database: \"database.conninfo\" is not "
		    "a valid connection string (libpq's message is not shown: it may quote the "
		    "password)");
		goto out;
	}
	if (PQstatus(st->conn) != CONNECTION_OK) {
		store_errorf(st, "could not connect to the database: %s", PQerrorMessage(st->conn));
		goto out;
	}
	/*
	 * A statement that hangs (lock waits, a stuck server) must not stall the
	 * loop.  synchronous_commit is set, not inherited: a claim and a hold
	 * allow an API call, so they must be on disk before it is made, and a
	 * server or role may default to off.  Only the completions opt out, per
	 * transaction (COMPLETE_INPUT): a completion lost in a crash is replayed.
	 */
	snprintf(settings, sizeof(settings), "SET synchronous_commit = on; "
	    "SET statement_timeout = %d; SET lock_timeout = %d; "
	    "SET idle_in_transaction_session_timeout = '60s'", st->query_timeout_ms,
	    st->query_timeout_ms < 10000 ? st->query_timeout_ms : 10000);
	res = store_exec_bounded(st->conn, store_client_deadline_ms(st), settings);
	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		store_set_error(st, "could not configure the session", res);
		PQclear(res);
		goto out;
	}
	PQclear(res);
	log_info("connected to the database (host \"%s\", port \"%s\", database \"%s\")",
	    PQhost(st->conn), PQport(st->conn), PQdb(st->conn));
	ret = 0;
out:
	return ret;
}

/* 40001 serialization_failure and 40P01 deadlock_detected are worth redoing. */
static bool
res_is_retryable(const PGresult *res)
{
	const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);

	return state != NULL && (strcmp(state, "40001") == 0 || strcmp(state, "40P01") == 0);
}

/* Runs a prepared statement for KIND; returns the result or NULL with errmsg set. */
static PGresult *
exec_stmt(store *st, enum stmt s, enum item_kind kind, int nparams,
    const char *const *values, ExecStatusType want, bool *retryable)
{
	char name[64];
	PGresult *res;

	*retryable = false;
	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return NULL;
	}
	/* Prepared on first use, so migrate and status work on any schema. */
	if (!st->prepared && prepare_all(st) == -1)
		return NULL;
	snprintf(name, sizeof(name), "%s_%s", stmt_names[s], item_kind_name(kind));
	res = store_exec_prepared_bounded(st->conn, store_client_deadline_ms(st), name, nparams,
	    values);
	if (PQresultStatus(res) != want) {
		*retryable = res_is_retryable(res);
		store_set_error(st, stmt_names[s], res);
		PQclear(res);
		return NULL;
	}
	return res;
}

int
store_due(store *st, size_t limit, enum item_kind *kinds, int64_t *ids, size_t *ret_n)
{
	char lim[32];
	const char *params[1] = { lim };
	PGresult *res;
	size_t n;

	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	if (!st->prepared && prepare_all(st) == -1)
		return -1;
	snprintf(lim, sizeof(lim), "%zu", limit);
	res = store_exec_prepared_bounded(st->conn, store_client_deadline_ms(st), "due", 1, params);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		store_set_error(st, "due", res);
		PQclear(res);
		return -1;
	}
	for (int k = 0; k < ITEM_KIND_COUNT; k++)
		st->pause_note[k][0] = '\0';
	n = 0;
	for (int r = 0; r < PQntuples(res); r++) {
		int kind = atoi(PQgetvalue(res, r, 0));

		if (kind >= 2 && kind < 2 + ITEM_KIND_COUNT) {
			snprintf(st->pause_note[kind - 2], sizeof(st->pause_note[0]), "%s",
			    PQgetvalue(res, r, 2));
			continue;
		}
		if (n == limit)
			break;
		kinds[n] = kind == 1 ? ITEM_REDEMPTION : ITEM_INVOICE;
		ids[n++] = strtoll(PQgetvalue(res, r, 1), NULL, 10);
	}
	*ret_n = n;
	PQclear(res);
	return 0;
}

/*
 * attempts as read from a row, clamped to [0, INT_MAX - 1]: the worker adds
 * the call it is about to make, and a corrupted counter must not make that
 * addition overflow (the database then refuses the update, and the row is
 * parked; see store/park.c).
 */
static int
attempts_of(const char *text)
{
	long long v = strtoll(text, NULL, 10);

	if (v < 0)
		return 0;
	return v >= INT_MAX ? INT_MAX - 1 : (int)v;
}

/* A cell's text, or NULL for SQL NULL; owned by RES. */
static const char *
value_or_null(const PGresult *res, int row, int col)
{
	return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

int
store_claim(store *st, enum item_kind kind, const int64_t *ids, size_t nids,
    size_t limit, int lease_ms, struct item *items, size_t *ret_n)
{
	char lease[32], lim[32];
	const char *params[3];
	PGresult *res = NULL;
	struct buf *arr = &st->arr[0];
	bool retryable = false;
	int n, ret = -1;

	snprintf(lease, sizeof(lease), "%d", lease_ms);
	snprintf(lim, sizeof(lim), "%zu", limit);
	params[0] = st->worker_id;
	params[1] = lease;
	if (ids != NULL) {
		if (nids == 0) {
			*ret_n = 0;
			return 0;
		}
		if (arr_open(arr) == -1)
			goto oom;
		for (size_t i = 0; i < nids; i++)
			if (arr_add_int(arr, ids[i]) == -1)
				goto oom;
		if (arr_close(arr) == -1)
			goto oom;
		params[2] = arr->data;
	} else {
		params[2] = lim;
	}
	for (int attempt = 0; attempt < TX_RETRIES; attempt++) {
		res = exec_stmt(st, ids != NULL ? STMT_CLAIM_IDS : STMT_CLAIM_SKIP,
		    kind, 3, params, PGRES_TUPLES_OK, &retryable);
		if (res != NULL || !retryable)
			break;
		st->retries++;
		log_info("claim of %ss hit a deadlock or serialization failure, retrying",
		    item_kind_name(kind));
	}
	if (res == NULL)
		goto out;
	n = PQntuples(res);
	if ((size_t)n > limit)
		n = (int)limit;
	for (int i = 0; i < n; i++) {
		struct item *it = &items[i];
		bool copied;

		memset(it, 0, sizeof(*it));
		it->kind = kind;
		it->id = strtoll(PQgetvalue(res, i, 0), NULL, 10);
		it->fence = strtoll(PQgetvalue(res, i, 1), NULL, 10);
		it->attempts = attempts_of(PQgetvalue(res, i, 2));
		it->ambiguous = PQgetvalue(res, i, 3)[0] == 't';
		it->amount_cents = strtoll(PQgetvalue(res, i, 4), NULL, 10);
		copied = item_set_strings(it, value_or_null(res, i, 5), value_or_null(res, i, 6)) == 0;
		if (!PQgetisnull(res, i, 7))
			it->subsidy_id = strtoll(PQgetvalue(res, i, 7), NULL, 10);
		it->held = PQgetvalue(res, i, 8)[0] == 't';
		it->blocked_calls = attempts_of(PQgetvalue(res, i, 9));
		it->key_age_ms = strtoll(PQgetvalue(res, i, 10), NULL, 10);
		it->generation = atoi(PQgetvalue(res, i, 11));
		if (!copied) {
			/* Out of memory: give back what was filled; leases run out. */
			for (int j = 0; j <= i; j++)
				item_clear(&items[j]);
			goto oom;
		}
	}
	*ret_n = (size_t)n;
	ret = 0;
	goto out;
oom:
	store_errorf(st, "out of memory");
out:
	PQclear(res);
	return ret;
}

int
store_renew(store *st, enum item_kind kind, struct item *const *items, size_t n,
    int lease_ms)
{
	struct buf *ids = &st->arr[0], *fences = &st->arr[1];
	struct id_pos *ix;
	char lease[32];
	const char *params[3];
	PGresult *res;
	bool retryable;
	int rows;

	if (n == 0)
		return 0;
	if (arr_open(ids) == -1 || arr_open(fences) == -1)
		goto oom;
	for (size_t i = 0; i < n; i++)
		if (arr_add_int(ids, items[i]->id) == -1 ||
		    arr_add_int(fences, items[i]->fence) == -1)
			goto oom;
	if (arr_close(ids) == -1 || arr_close(fences) == -1)
		goto oom;
	snprintf(lease, sizeof(lease), "%d", lease_ms);
	params[0] = ids->data;
	params[1] = fences->data;
	params[2] = lease;
	res = exec_stmt(st, STMT_RENEW, kind, 3, params, PGRES_TUPLES_OK, &retryable);
	if (res == NULL)
		return -1;
	/* Renewed rows come back; everything else is no longer ours. */
	if ((ix = index_items(st, items, n)) == NULL) {
		PQclear(res);
		goto oom;
	}
	rows = PQntuples(res);
	for (size_t i = 0; i < n; i++)
		items[i]->lock_lost = true;
	for (int r = 0; r < rows; r++) {
		ssize_t pos = index_find(ix, n, strtoll(PQgetvalue(res, r, 0), NULL, 10));

		if (pos >= 0)
			items[pos]->lock_lost = false;
	}
	PQclear(res);
	return 0;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

static const char *const state_names[] = { "done", "failed", "retry" };

/* Records the completions of one kind; marks accepted[] for those applied. */
static int
complete_kind(store *st, enum item_kind kind, const struct completion *c,
    size_t n, bool *accepted, bool *retryable)
{
	struct buf *a = st->arr;
	struct id_pos *ix;
	const char *params[15];
	PGresult *res;
	size_t count = 0;

	for (int i = 0; i < 13; i++)
		if (arr_open(&a[i]) == -1)
			goto oom;
	if ((ix = index_reserve(st, n)) == NULL)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		if (c[i].kind != kind)
			continue;
		ix[count].id = c[i].id;
		ix[count].pos = i;
		count++;
		if (arr_add_int(&a[0], c[i].id) == -1 ||
		    arr_add_int(&a[1], c[i].fence) == -1 ||
		    arr_add_raw(&a[2], state_names[c[i].state]) == -1 ||
		    arr_add_int(&a[3], c[i].calls) == -1 ||
		    arr_add_raw(&a[4], c[i].ambiguous ? "t" : "f") == -1 ||
		    arr_add_int(&a[5], c[i].delay_ms) == -1 ||
		    arr_add_text(&a[6], c[i].state == COMPLETION_DONE ? c[i].result_id : NULL) == -1 ||
		    arr_add_text(&a[7], c[i].state == COMPLETION_DONE ? NULL : c[i].error) == -1 ||
		    arr_add_raw(&a[8], c[i].blocked ? "t" : "f") == -1 ||
		    arr_add_text(&a[9], c[i].state == COMPLETION_RETRY ? c[i].operator_note :
		    NULL) == -1 ||
		    arr_add_int(&a[10], c[i].started_unix_ms) == -1 ||
		    arr_add_int(&a[11], c[i].http_status) == -1 ||
		    arr_add_text(&a[12], c[i].history_class) == -1)
			goto oom;
	}
	if (count == 0)
		return 0;
	for (int i = 0; i < 13; i++) {
		if (arr_close(&a[i]) == -1)
			goto oom;
		params[i] = a[i].data;
	}
	params[13] = st->worker_id;
	params[14] = st->history ? "t" : "f";
	res = exec_stmt(st, STMT_COMPLETE, kind, 15, params, PGRES_TUPLES_OK, retryable);
	if (res == NULL)
		return -1;
	qsort(ix, count, sizeof(*ix), id_pos_cmp);
	for (int r = 0; r < PQntuples(res); r++) {
		ssize_t pos = index_find(ix, count, strtoll(PQgetvalue(res, r, 0), NULL, 10));

		if (pos >= 0)
			accepted[pos] = true;
	}
	PQclear(res);
	return 0;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

static int
exec_simple(store *st, const char *sql)
{
	PGresult *res = store_exec_bounded(st->conn, store_client_deadline_ms(st), sql);
	int ret = 0;

	if (PQresultStatus(res) != PGRES_COMMAND_OK) {
		store_set_error(st, sql, res);
		ret = -1;
	}
	PQclear(res);
	return ret;
}

int
store_complete(store *st, const struct completion *c, size_t n, bool *accepted)
{
	bool kinds[ITEM_KIND_COUNT] = { false, false };
	bool both, retryable = false;

	if (n == 0)
		return 0;
	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	for (size_t i = 0; i < n; i++)
		kinds[c[i].kind] = true;
	both = kinds[ITEM_INVOICE] && kinds[ITEM_REDEMPTION];
	for (int attempt = 0; attempt < TX_RETRIES; attempt++) {
		int failed = 0;

		memset(accepted, 0, n * sizeof(*accepted));
		if (both && exec_simple(st, "BEGIN") == -1)
			return -1;
		for (int k = 0; k < ITEM_KIND_COUNT && !failed; k++)
			if (kinds[k] && complete_kind(st, k, c, n, accepted, &retryable) == -1)
				failed = 1;
		if (!failed && (!both || exec_simple(st, "COMMIT") == 0))
			return 0;
		if (both && store_connected(st)) {
			PGresult *res = store_exec_bounded(st->conn, store_client_deadline_ms(st),
			    "ROLLBACK");

			PQclear(res);
		}
		if (!retryable)
			break;
		st->retries++;
		log_info("completion of %zu items hit a deadlock or serialization failure, retrying", n);
	}
	memset(accepted, 0, n * sizeof(*accepted));
	return -1;
}

int
store_reserve(store *st, struct item *const *items, size_t n,
    enum reserve_result *results)
{
	struct buf *ids = &st->arr[0], *fences = &st->arr[1];
	struct id_pos *ix;
	const char *params[2];
	PGresult *res = NULL;
	int ret = -1;

	if (n == 0)
		return 0;
	if (!store_connected(st)) {
		store_errorf(st, "not connected to the database");
		return -1;
	}
	if (!st->prepared && prepare_all(st) == -1)
		return -1;
	if (arr_open(ids) == -1 || arr_open(fences) == -1)
		goto oom;
	for (size_t i = 0; i < n; i++) {
		results[i] = RESERVE_LOST;
		if (arr_add_int(ids, items[i]->id) == -1 ||
		    arr_add_int(fences, items[i]->fence) == -1)
			goto oom;
	}
	if (arr_close(ids) == -1 || arr_close(fences) == -1)
		goto oom;
	params[0] = ids->data;
	params[1] = fences->data;
	for (int attempt = 0; attempt < TX_RETRIES; attempt++) {
		res = store_exec_prepared_bounded(st->conn, store_client_deadline_ms(st), "reserve", 2,
		    params);
		if (PQresultStatus(res) == PGRES_TUPLES_OK)
			break;
		store_set_error(st, "reserve", res);
		if (!res_is_retryable(res)) {
			PQclear(res);
			return -1;
		}
		PQclear(res);
		res = NULL;
		st->retries++;
		log_info("reservation of %zu redemptions hit a deadlock or serialization "
		    "failure, retrying", n);
	}
	if (res == NULL)
		return -1;
	if ((ix = index_items(st, items, n)) == NULL) {
		PQclear(res);
		goto oom;
	}
	for (int r = 0; r < PQntuples(res); r++) {
		ssize_t pos = index_find(ix, n, strtoll(PQgetvalue(res, r, 0), NULL, 10));
		const char *what = PQgetvalue(res, r, 1);

		if (pos >= 0)
			results[pos] = strcmp(what, "held") == 0 ? RESERVE_HELD :
			    strcmp(what, "insufficient") == 0 ? RESERVE_INSUFFICIENT :
			    strcmp(what, "busy") == 0 ? RESERVE_BUSY : RESERVE_LOST;
	}
	ret = 0;
	PQclear(res);
	return ret;
oom:
	store_errorf(st, "out of memory");
	return -1;
}

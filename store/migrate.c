#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "store/migrate.h"
#include "store/store_int.h"

/*
 * One advisory lock key for every billing-worker that migrates this
 * database: hosts deploying at once run the migrations one after another,
 * and the second finds nothing left to do.
 */
#define MIGRATE_LOCK_KEY "7240162913502611"

/*
 * The migration's statements wait for the server as long as it takes:
 * `billing-worker migrate` is run by hand, and DDL on a large table may
 * rightly outlast the daemon's client deadline.
 */
static int
run(store *st, const char *sql, ExecStatusType want, PGresult **keep)
{
	const struct store_stmt stmt = {
		.send = STORE_SIMPLE, .text = sql, .what = "migration", .want = want,
		.no_deadline = true,
	};

	return store_run(st, &stmt, 0, NULL, keep);
}

/* The highest version recorded, 0 for none, -1 on error. */
static int
current_version(store *st)
{
	PGresult *res = NULL;
	int v;

	if (run(st, "SELECT coalesce(max(version), 0) FROM schema_version",
	    PGRES_TUPLES_OK, &res) == -1)
		return -1;
	v = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	return v;
}

static int
apply(store *st, const struct bw_migration *m)
{
	static const struct store_stmt record = {
		.send = STORE_PARAMS, .text = "INSERT INTO schema_version (version, name) "
		"VALUES ($1, $2)", .what = "migration", .want = PGRES_COMMAND_OK,
		.no_deadline = true,
	};
	char version[16];
	const char *params[2] = { version, m->name };

	if (run(st, "BEGIN", PGRES_COMMAND_OK, NULL) == -1)
		return -1;
	if (run(st, m->sql, PGRES_COMMAND_OK, NULL) == -1)
		goto rollback;
	snprintf(version, sizeof(version), "%d", m->version);
	if (store_run(st, &record, 2, params, NULL) == -1)
		goto rollback;
	if (run(st, "COMMIT", PGRES_COMMAND_OK, NULL) == -1)
		return -1;
	log_info("applied migration %d (\"%s\")", m->version, m->name);
	return 0;
rollback:
	store_run_cleanup(st, "ROLLBACK", true);
	return -1;
}

int
store_migrate(store *st)
{
	int have, ret = -1;
	int newest = bw_migrations[bw_migrations_count - 1].version;

	if (!store_connected(st))
		return -1;
	/* The lock below is a session's: a transaction pooler would not keep it. */
	if (st->txn_pooling) {
		store_errorf(st, "migrations need a session of their own (a session-level "
		    "advisory lock), which a transaction pooler does not keep: connect directly");
		return -1;
	}
	if (run(st, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")", PGRES_TUPLES_OK, NULL) == -1)
		return -1;
	if (run(st, "SET client_min_messages = warning; "
	    "CREATE TABLE IF NOT EXISTS schema_version ("
	    "version integer PRIMARY KEY, name text NOT NULL, "
	    "applied_at timestamptz NOT NULL DEFAULT now())", PGRES_COMMAND_OK, NULL) == -1)
		goto unlock;
	if ((have = current_version(st)) == -1)
		goto unlock;
	if (have > newest) {
		store_errorf(st, "database schema version %d is newer than this binary "
		    "knows (%d): upgrade billing-worker", have, newest);
		goto unlock;
	}
	for (int i = 0; i < bw_migrations_count; i++)
		if (bw_migrations[i].version > have && apply(st, &bw_migrations[i]) == -1)
			goto unlock;
	if (have == newest)
		log_info("schema is up to date (version %d)", newest);
	ret = 0;
unlock:
	store_run_cleanup(st, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")", true);
	return ret;
}

int
store_check_schema(store *st)
{
	int newest = bw_migrations[bw_migrations_count - 1].version;
	/* Run by the daemon at start: bounded like its other statements. */
	const struct store_stmt stmt = {
		.send = STORE_SIMPLE, .text = "SELECT coalesce(max(version), 0) FROM schema_version",
		.what = "could not read the schema version", .want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL;
	int have;

	if (store_run(st, &stmt, 0, NULL, &res) == -1) {
		/*
		 * Advice to migrate only when the server answered, not when it was
		 * lost: inserted before the reason, and the SQLSTATE kept.
		 */
		if (store_connected(st)) {
			char state[sizeof(st->sqlstate)];

			memcpy(state, st->sqlstate, sizeof(state));
			store_errorf(st, "%s (run \"billing-worker migrate\" first)%s", stmt.what,
			    store_errmsg(st) + strlen(stmt.what));
			memcpy(st->sqlstate, state, sizeof(state));
		}
		return -1;
	}
	have = atoi(PQgetvalue(res, 0, 0));
	PQclear(res);
	if (have < newest) {
		store_errorf(st, "database schema version %d is older than this binary "
		    "needs (%d): run \"billing-worker migrate\"", have, newest);
		return -1;
	}
	return 0;
}

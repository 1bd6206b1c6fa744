#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * billing-worker audit: the invariants of CONTRACT section 1 that the
 * database alone can show, one query each.  Every query returns the rows
 * that break its invariant and a sentence describing each, so adding a
 * check is adding a row to the table below.  Read-only, and run in one
 * REPEATABLE READ transaction so all checks see the same moment; the run
 * is recorded after it (audit_runs, schema version 9).
 *
 * The full audit reads every row, seconds at ten million finished items.
 * The incremental one (--since-last-clean) reads the items finished since
 * the newest clean run, through the finished_at indexes, and the pending
 * ones: an item's row is final once finished (only requeue changes it
 * again, and that finishes it anew), so an item checked clean stays so,
 * unless someone edits finished rows by hand, which the full audit, kept on
 * its daily timer, catches.
 */

struct check {
	const char *name;
	const char *sql;        /* one text column: the description; $1 = stuck seconds */
	/*
	 * The same check over the items finished at or after $1 (and the
	 * pending ones, few and indexed), for --since-last-clean; NULL: the
	 * check spans whole subsidies, so only the full audit makes it.
	 */
	const char *since;
	bool pending_only;      /* reads pending items only: the same in both modes */
};

/*
 * The "redemption net" check's message and conditions, shared by the full
 * audit and the incremental one, which differ only in the rows they read.
 */
#define NET_SELECT                                                             \
	"SELECT format('redemption %s is %s but its ledger rows%s net to %s "  \
	"(amount %s; expected %s)', r.id, r.status, CASE WHEN r.generation > 1 " \
	"THEN format(' in generation %s', r.generation) ELSE '' END, coalesce(n.net, 0), " \
	"r.amount_cents, CASE r.status WHEN 'redeemed' THEN (-r.amount_cents)::text " \
	"WHEN 'failed' THEN '0' ELSE format('0 or %s', -r.amount_cents) END) "
#define NET_WHERE_AND_OLD_GENERATIONS                                          \
	"WHERE (r.status = 'redeemed' AND coalesce(n.net, 0) <> -r.amount_cents) " \
	"OR (r.status = 'failed' AND coalesce(n.net, 0) <> 0) "                \
	"OR (r.status = 'pending' AND coalesce(n.net, 0) NOT IN (0, -r.amount_cents)) " \
	"UNION ALL "                                                           \
	"SELECT format('redemption %s is in generation %s but its ledger rows in generation %s " \
	"net to %s (expected 0: only the current generation may hold funds)', r.id, " \
	"r.generation, l.generation, sum(l.amount_cents)) "

static const struct check checks[] = {
	{ "negative balance",
	  "SELECT format('subsidy %s (\"%s\"): balance is %s cents, below zero', "
	  "s.id, s.name, sum(l.amount_cents)) "
	  "FROM subsidies s JOIN ledger_transactions l ON l.subsidy_id = s.id "
	  "GROUP BY s.id HAVING sum(l.amount_cents) < 0",
	  /* The cache alone (CHECK-guarded): summing a subsidy's ledger is O(ledger). */
	  "SELECT format('subsidy %s (\"%s\"): cached balance is %s cents, below zero', "
	  "s.id, s.name, s.balance_cents) FROM subsidies s WHERE s.balance_cents < 0", false },
	{ "balance cache",
	  "SELECT format('subsidy %s (\"%s\"): cached balance %s differs from its ledger sum %s', "
	  "s.id, s.name, s.balance_cents, coalesce(t.total, 0)) "
	  "FROM subsidies s LEFT JOIN (SELECT subsidy_id, sum(amount_cents) AS total "
	  "FROM ledger_transactions GROUP BY subsidy_id) t ON t.subsidy_id = s.id "
	  "WHERE s.balance_cents <> coalesce(t.total, 0)", NULL, false },
	/*
	 * Per generation (schema version 6): the current one nets as the
	 * contract says for the redemption's status; every other one was
	 * failed and given back, or never reserved, so it nets to zero.
	 */
	{ "redemption net",
	  NET_SELECT
	  "FROM redemptions r LEFT JOIN (SELECT redemption_id, generation, sum(amount_cents) AS net "
	  "FROM ledger_transactions WHERE redemption_id IS NOT NULL "
	  "GROUP BY redemption_id, generation) n "
	  "ON n.redemption_id = r.id AND n.generation = r.generation "
	  NET_WHERE_AND_OLD_GENERATIONS
	  "FROM redemptions r JOIN ledger_transactions l ON l.redemption_id = r.id "
	  "WHERE l.generation <> r.generation "
	  "GROUP BY r.id, r.generation, l.generation HAVING sum(l.amount_cents) <> 0",
	  NET_SELECT
	  "FROM (SELECT * FROM redemptions WHERE finished_at >= $1 "
	  "      UNION ALL SELECT * FROM redemptions WHERE status = 'pending') r "
	  "LEFT JOIN LATERAL (SELECT sum(amount_cents) AS net FROM ledger_transactions l "
	  "  WHERE l.redemption_id = r.id AND l.generation = r.generation) n ON true "
	  NET_WHERE_AND_OLD_GENERATIONS
	  "FROM (SELECT id, generation FROM redemptions WHERE finished_at >= $1 "
	  "      UNION ALL SELECT id, generation FROM redemptions WHERE status = 'pending') r "
	  "JOIN ledger_transactions l ON l.redemption_id = r.id "
	  "WHERE l.generation <> r.generation "
	  "GROUP BY r.id, r.generation, l.generation HAVING sum(l.amount_cents) <> 0", false },
	{ "ledger subsidy",
	  "SELECT format('ledger row %s of redemption %s is on subsidy %s, the redemption on %s', "
	  "l.id, r.id, l.subsidy_id, r.subsidy_id) "
	  "FROM ledger_transactions l JOIN redemptions r ON r.id = l.redemption_id "
	  "WHERE l.subsidy_id <> r.subsidy_id",
	  "SELECT format('ledger row %s of redemption %s is on subsidy %s, the redemption on %s', "
	  "l.id, r.id, l.subsidy_id, r.subsidy_id) "
	  "FROM (SELECT id, subsidy_id FROM redemptions WHERE finished_at >= $1 "
	  "      UNION ALL SELECT id, subsidy_id FROM redemptions WHERE status = 'pending') r "
	  "JOIN ledger_transactions l ON l.redemption_id = r.id "
	  "WHERE l.subsidy_id <> r.subsidy_id", false },
	{ "result id",
	  "SELECT format('invoice %s is %s %s a charge_id', id, status, "
	  "CASE WHEN charge_id IS NULL THEN 'without' ELSE 'with' END) FROM invoices "
	  "WHERE (status = 'paid') <> (charge_id IS NOT NULL) "
	  "UNION ALL "
	  "SELECT format('redemption %s is %s %s a fulfillment_id', id, status, "
	  "CASE WHEN fulfillment_id IS NULL THEN 'without' ELSE 'with' END) FROM redemptions "
	  "WHERE (status = 'redeemed') <> (fulfillment_id IS NOT NULL)",
	  "SELECT format('invoice %s is %s %s a charge_id', id, status, "
	  "CASE WHEN charge_id IS NULL THEN 'without' ELSE 'with' END) "
	  "FROM (SELECT * FROM invoices WHERE finished_at >= $1 "
	  "      UNION ALL SELECT * FROM invoices WHERE status = 'pending') i "
	  "WHERE (status = 'paid') <> (charge_id IS NOT NULL) "
	  "UNION ALL "
	  "SELECT format('redemption %s is %s %s a fulfillment_id', id, status, "
	  "CASE WHEN fulfillment_id IS NULL THEN 'without' ELSE 'with' END) "
	  "FROM (SELECT * FROM redemptions WHERE finished_at >= $1 "
	  "      UNION ALL SELECT * FROM redemptions WHERE status = 'pending') r "
	  "WHERE (status = 'redeemed') <> (fulfillment_id IS NOT NULL)", false },
	{ "needs an operator",
	  "SELECT format('%s %s needs an operator (first claimed %s s ago, %s attempts): %s; "
	  "last answer: %s', kind, id, coalesce(extract(epoch FROM now() - first_claimed_at)"
	  "::numeric(12,0), 0), attempts, needs_operator, coalesce(last_error, 'none')) "
	  "FROM (SELECT 'invoice' AS kind, id, first_claimed_at, attempts, needs_operator, "
	  "      last_error FROM invoices WHERE status = 'pending' AND needs_operator IS NOT NULL "
	  "      UNION ALL "
	  "      SELECT 'redemption', id, first_claimed_at, attempts, needs_operator, last_error "
	  "      FROM redemptions WHERE status = 'pending' AND needs_operator IS NOT NULL) AS o "
	  "ORDER BY kind, id", NULL, true },
	{ "stuck in flight",
	  "SELECT format('%s %s has been in flight with an expired lease since %s "
	  "(holder \"%s\"): no worker is taking it', kind, id, lease_until, locked_by) "
	  "FROM (SELECT 'invoice' AS kind, id, lease_until, locked_by FROM invoices "
	  "      WHERE status = 'pending' AND lease_until < now() - $1 * interval '1 second' "
	  "      UNION ALL "
	  "      SELECT 'redemption', id, lease_until, locked_by FROM redemptions "
	  "      WHERE status = 'pending' AND lease_until < now() - $1 * interval '1 second') AS f "
	  "ORDER BY kind, id", NULL, true },
};

/*
 * The first statement of the audit's transaction, so it also takes the
 * snapshot: its moment, how far this run will cover (that moment, moved
 * back to the start of the oldest client transaction then open in this
 * database, and by $1 ms for sessions of other roles, whose xact_start we
 * may not see; autovacuum, which can run for minutes on a large table and
 * never finishes an item, does not count), and where the newest clean run
 * stopped.
 */
static const char sql_begin_run[] =
    "SELECT now(), least(now() - $1::int * interval '1 millisecond', "
    " (SELECT min(xact_start) FROM pg_stat_activity WHERE datname = current_database() "
    "  AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
    "  AND xact_start IS NOT NULL)), "
    " (SELECT covers_to FROM audit_runs WHERE violations = 0 ORDER BY id DESC LIMIT 1)";

static const char sql_record_run[] =
    "INSERT INTO audit_runs (mode, started_at, checked_from, covers_to, violations) "
    "VALUES ($1, $2, $3, $4, $5)";

/* Appends the run's record, after the read-only transaction. */
static int
record_run(store *st, bool incremental, const char *started, const char *from,
    const char *covers_to, int violations)
{
	const struct store_stmt stmt = {
		.send = STORE_PARAMS, .text = sql_record_run, .what = "could not record the audit run",
		.want = PGRES_COMMAND_OK,
	};
	char n[16];
	const char *params[5] = { incremental ? "incremental" : "full", started, from,
	    covers_to, n };

	snprintf(n, sizeof(n), "%d", violations);
	return store_run(st, &stmt, 5, params, NULL);
}

int
store_audit(store *st, FILE *out, const struct store_audit_opts *opts, int *violations)
{
	static const struct store_stmt begin = {
		.send = STORE_SIMPLE, .text = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
		.what = "audit", .want = PGRES_COMMAND_OK,
	};
	const struct store_stmt begin_run = {
		.send = STORE_PARAMS, .text = sql_begin_run, .what = "audit",
		.want = PGRES_TUPLES_OK,
	};
	PGresult *res = NULL, *run = NULL;
	char stuck[16], margin[16];
	const char *params[1] = { stuck }, *since = NULL;
	const char *margin_params[1] = { margin };
	bool incremental = false, open = false;
	int found = 0, ret = -1;

	snprintf(stuck, sizeof(stuck), "%d", opts->stuck_after_s);
	snprintf(margin, sizeof(margin), "%d", opts->unseen_margin_ms);
	/* Every statement bounded: a frozen server ends the audit with an error. */
	if (store_run(st, &begin, 0, NULL, NULL) == -1)
		return -1;
	open = true;
	if (store_run(st, &begin_run, 1, margin_params, &run) == -1)
		goto out;
	if (opts->since_last_clean) {
		if (PQgetisnull(run, 0, 2)) {
			fprintf(out, "audit: no clean run recorded yet: checking every item\n");
		} else {
			incremental = true;
			since = PQgetvalue(run, 0, 2);
			fprintf(out, "audit: items finished since %s (the last clean run) and "
			    "pending items; subsidy-wide ledger sums are left to the full audit\n",
			    since);
		}
	}
	for (size_t c = 0; c < sizeof(checks) / sizeof(checks[0]); c++) {
		const char *sql = checks[c].sql;
		const char *const *p = params;
		int nparams;

		if (incremental && !checks[c].pending_only) {
			if (checks[c].since == NULL)
				continue;
			sql = checks[c].since;
			p = &since;
		}
		const struct store_stmt check = {
			.send = STORE_PARAMS, .text = sql, .what = checks[c].name,
			.want = PGRES_TUPLES_OK,
		};
		nparams = strstr(sql, "$1") != NULL ? 1 : 0;
		res = NULL;
		if (store_run(st, &check, nparams, p, &res) == -1)
			goto out;
		for (int r = 0; r < PQntuples(res); r++) {
			fprintf(out, "violation (%s): %s\n", checks[c].name, PQgetvalue(res, r, 0));
			found++;
		}
		PQclear(res);
	}
	store_run_cleanup(st, "ROLLBACK", false);
	open = false;
	/*
	 * Recorded after the read-only transaction, clean or not: the
	 * incremental audit starts from the newest clean run only.
	 */
	if (record_run(st, incremental, PQgetvalue(run, 0, 0), since,
	    PQgetvalue(run, 0, 1), found) == -1)
		goto out;
	*violations = found;
	ret = 0;
out:
	/* A failure may have dropped the connection (store_set_error); the cleanup asks. */
	if (open)
		store_run_cleanup(st, "ROLLBACK", false);
	PQclear(run);
	return ret;
}

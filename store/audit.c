#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "store/store_int.h"

/*
 * billing-worker audit: the invariants of CONTRACT section 1 that the
 * database alone can show, one query each.  Every query returns the rows
 * that break its invariant and a sentence describing each, so adding a
 * check is adding a row to the table below.  Read-only, and run in one
 * REPEATABLE READ transaction so all checks see the same moment.
 */

struct check {
	const char *name;
	const char *sql;        /* one text column: the description; $1 = stuck seconds */
};

static const struct check checks[] = {
	{ "negative balance",
	  "SELECT format('subsidy %s (\"%s\"): balance is %s cents, below zero', "
	  "s.id, s.name, sum(l.amount_cents)) "
	  "FROM subsidies s JOIN ledger_transactions l ON l.subsidy_id = s.id "
	  "GROUP BY s.id HAVING sum(l.amount_cents) < 0" },
	{ "balance cache",
	  "SELECT format('subsidy %s (\"%s\"): cached balance %s differs from its ledger sum %s', "
	  "s.id, s.name, s.balance_cents, coalesce(t.total, 0)) "
	  "FROM subsidies s LEFT JOIN (SELECT subsidy_id, sum(amount_cents) AS total "
	  "FROM ledger_transactions GROUP BY subsidy_id) t ON t.subsidy_id = s.id "
	  "WHERE s.balance_cents <> coalesce(t.total, 0)" },
	/*
	 * Per generation (schema version 6): the current one nets as the
	 * contract says for the redemption's status; every other one was
	 * failed and given back, or never reserved, so it nets to zero.
	 */
	{ "redemption net",
	  "SELECT format('redemption %s is %s but its ledger rows%s net to %s "
	  "(amount %s; expected %s)', r.id, r.status, CASE WHEN r.generation > 1 "
	  "THEN format(' in generation %s', r.generation) ELSE '' END, coalesce(n.net, 0), "
	  "r.amount_cents, CASE r.status WHEN 'redeemed' THEN (-r.amount_cents)::text "
	  "WHEN 'failed' THEN '0' ELSE format('0 or %s', -r.amount_cents) END) "
	  "FROM redemptions r LEFT JOIN (SELECT redemption_id, generation, sum(amount_cents) AS net "
	  "FROM ledger_transactions WHERE redemption_id IS NOT NULL "
	  "GROUP BY redemption_id, generation) n "
	  "ON n.redemption_id = r.id AND n.generation = r.generation "
	  "WHERE (r.status = 'redeemed' AND coalesce(n.net, 0) <> -r.amount_cents) "
	  "OR (r.status = 'failed' AND coalesce(n.net, 0) <> 0) "
	  "OR (r.status = 'pending' AND coalesce(n.net, 0) NOT IN (0, -r.amount_cents)) "
	  "UNION ALL "
	  "SELECT format('redemption %s is in generation %s but its ledger rows in generation %s "
	  "net to %s (expected 0: only the current generation may hold funds)', r.id, "
	  "r.generation, l.generation, sum(l.amount_cents)) "
	  "FROM redemptions r JOIN ledger_transactions l ON l.redemption_id = r.id "
	  "WHERE l.generation <> r.generation "
	  "GROUP BY r.id, r.generation, l.generation HAVING sum(l.amount_cents) <> 0" },
	{ "ledger subsidy",
	  "SELECT format('ledger row %s of redemption %s is on subsidy %s, the redemption on %s', "
	  "l.id, r.id, l.subsidy_id, r.subsidy_id) "
	  "FROM ledger_transactions l JOIN redemptions r ON r.id = l.redemption_id "
	  "WHERE l.subsidy_id <> r.subsidy_id" },
	{ "result id",
	  "SELECT format('invoice %s is %s %s a charge_id', id, status, "
	  "CASE WHEN charge_id IS NULL THEN 'without' ELSE 'with' END) FROM invoices "
	  "WHERE (status = 'paid') <> (charge_id IS NOT NULL) "
	  "UNION ALL "
	  "SELECT format('redemption %s is %s %s a fulfillment_id', id, status, "
	  "CASE WHEN fulfillment_id IS NULL THEN 'without' ELSE 'with' END) FROM redemptions "
	  "WHERE (status = 'redeemed') <> (fulfillment_id IS NOT NULL)" },
	{ "needs an operator",
	  "SELECT format('%s %s needs an operator (first claimed %s s ago, %s attempts): %s; "
	  "last answer: %s', kind, id, coalesce(extract(epoch FROM now() - first_claimed_at)"
	  "::numeric(12,0), 0), attempts, needs_operator, coalesce(last_error, 'none')) "
	  "FROM (SELECT 'invoice' AS kind, id, first_claimed_at, attempts, needs_operator, "
	  "      last_error FROM invoices WHERE status = 'pending' AND needs_operator IS NOT NULL "
	  "      UNION ALL "
	  "      SELECT 'redemption', id, first_claimed_at, attempts, needs_operator, last_error "
	  "      FROM redemptions WHERE status = 'pending' AND needs_operator IS NOT NULL) AS o "
	  "ORDER BY kind, id" },
	{ "stuck in flight",
	  "SELECT format('%s %s has been in flight with an expired lease since %s "
	  "(holder \"%s\"): no worker is taking it', kind, id, lease_until, locked_by) "
	  "FROM (SELECT 'invoice' AS kind, id, lease_until, locked_by FROM invoices "
	  "      WHERE status = 'pending' AND lease_until < now() - $1 * interval '1 second' "
	  "      UNION ALL "
	  "      SELECT 'redemption', id, lease_until, locked_by FROM redemptions "
	  "      WHERE status = 'pending' AND lease_until < now() - $1 * interval '1 second') AS f "
	  "ORDER BY kind, id" },
};

int
store_audit(store *st, FILE *out, int stuck_after_s, int *violations)
{
	static const struct store_stmt begin = {
		.send = STORE_SIMPLE, .text = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
		.what = "audit", .want = PGRES_COMMAND_OK,
	};
	PGresult *res;
	char stuck[16];
	const char *params[1] = { stuck };
	int found = 0, ret = -1;

	snprintf(stuck, sizeof(stuck), "%d", stuck_after_s);
	/* Every statement bounded: a frozen server ends the audit with an error. */
	if (store_run(st, &begin, 0, NULL, NULL) == -1)
		return -1;
	for (size_t c = 0; c < sizeof(checks) / sizeof(checks[0]); c++) {
		const struct store_stmt check = {
			.send = STORE_PARAMS, .text = checks[c].sql, .what = checks[c].name,
			.want = PGRES_TUPLES_OK,
		};
		int nparams = strstr(checks[c].sql, "$1") != NULL ? 1 : 0;

		res = NULL;
		if (store_run(st, &check, nparams, params, &res) == -1)
			goto out;
		for (int r = 0; r < PQntuples(res); r++) {
			fprintf(out, "violation (%s): %s\n", checks[c].name, PQgetvalue(res, r, 0));
			found++;
		}
		PQclear(res);
	}
	*violations = found;
	ret = 0;
out:
	/* A failure may have dropped the connection (store_set_error); the cleanup asks. */
	store_run_cleanup(st, "ROLLBACK", false);
	return ret;
}

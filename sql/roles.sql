-- billing_worker: the least-privileged role `billing-worker run|once|status|audit`
-- connects as.  Not a migration (it is not compiled into the binary): run it
-- as the owner of the schema, after `billing-worker migrate`, on every deploy:
--
--     psql -v ON_ERROR_STOP=1 -d billing -f sql/roles.sql
--
-- (installed as /usr/share/billing-worker/sql/roles.sql by the package and
-- by make install, under PREFIX).
--
-- It is idempotent, and starts by taking back whatever it grants, so a
-- privilege removed here is removed from the database too.  `migrate` itself
-- runs as the owner, never as this role.  The role has no password here:
-- give it one (ALTER ROLE billing_worker PASSWORD ...) or use peer or
-- certificate authentication, as the site prefers.
--
-- What the worker does, and so all it may do:
--   * read the items it takes and write its own columns of them, never the
--     producers' (customer_id, amount_cents, currency, subsidy_id);
--   * append hold and reversal rows to the ledger (the ledger refuses UPDATE
--     and DELETE from anyone, by trigger; this role is not granted them either);
--   * call bw_reserve(), which runs with the caller's rights (SECURITY
--     INVOKER), as do the triggers its ledger rows fire: bw_ledger_apply
--     updates subsidies.balance_cents, so the role needs UPDATE on that one
--     column, and SELECT ... FOR UPDATE on the subsidy's row needs it too;
--   * put a failed item back (`requeue`): its own columns again, the
--     generation among them, and one row appended to requeues saying who and
--     why (requeues refuses UPDATE and DELETE by trigger, and the role is not
--     granted them either);
--   * read everything `status` and `audit` report on, and append the record
--     of each audit run (audit_runs), which `audit --since-last-clean` reads.
-- It cannot create, alter or drop anything, insert items, delete rows, or
-- touch any other column.

\set ON_ERROR_STOP 1

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'billing_worker') THEN
        CREATE ROLE billing_worker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT;
    END IF;
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO billing_worker', current_database());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO billing_worker', current_schema());
END $$;

REVOKE ALL ON invoices, redemptions, subsidies, ledger_transactions, schema_version,
    workers, fleet_pause, attempts, requeues, audit_runs FROM billing_worker;

-- run and once refuse to start on an older schema: they read its version.
GRANT SELECT ON schema_version TO billing_worker;

GRANT SELECT ON invoices TO billing_worker;
GRANT UPDATE (status, charge_id, attempts, last_error, next_attempt_at, ambiguous,
              fence, locked_by, lease_until, updated_at, finished_at, blocked_calls,
              first_claimed_at, needs_operator, generation)
    ON invoices TO billing_worker;

GRANT SELECT ON redemptions TO billing_worker;
GRANT UPDATE (status, fulfillment_id, attempts, last_error, next_attempt_at, ambiguous,
              fence, locked_by, lease_until, updated_at, finished_at, blocked_calls,
              first_claimed_at, needs_operator, generation)
    ON redemptions TO billing_worker;

GRANT SELECT ON ledger_transactions TO billing_worker;
GRANT INSERT (subsidy_id, amount_cents, redemption_id, kind, generation)
    ON ledger_transactions TO billing_worker;

GRANT SELECT (id, name, balance_cents) ON subsidies TO billing_worker;

-- The registry: each worker writes and deletes its own row.
GRANT SELECT, INSERT, UPDATE, DELETE ON workers TO billing_worker;

-- Every poll reads the pauses; pause and resume run with the worker's
-- configuration, so the role writes them too.
GRANT SELECT, INSERT, UPDATE, DELETE ON fleet_pause TO billing_worker;

-- The history: appended with each completion, pruned by retention only.
GRANT SELECT, INSERT, DELETE ON attempts TO billing_worker;
GRANT UPDATE (balance_cents) ON subsidies TO billing_worker;

-- requeue runs with the worker's configuration: it appends the record of
-- who put an item back and why, and status reads it.
GRANT SELECT, INSERT ON requeues TO billing_worker;

-- audit records each run; the incremental audit starts where the newest
-- clean one stopped.
GRANT SELECT, INSERT ON audit_runs TO billing_worker;

-- Functions are executable by PUBLIC unless told otherwise; only the worker
-- reserves funds.
REVOKE EXECUTE ON FUNCTION bw_reserve(bigint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bw_reserve(bigint[], bigint[]) TO billing_worker;

-- Schema version 9: the record of audit runs, and what makes an incremental
-- audit cheap ("billing-worker audit --since-last-clean").
--
-- Every audit run appends one row.  covers_to is the moment up to which its
-- checks saw every finished item: the start of its snapshot, moved back to
-- the start of the oldest transaction still open then (a completion sets
-- finished_at to its transaction's now(), and one that committed after the
-- snapshot was not seen).  The next incremental audit checks the items
-- finished at or after the covers_to of the newest clean run.

CREATE TABLE audit_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    mode        text NOT NULL CHECK (mode IN ('full', 'incremental')),
    started_at  timestamptz NOT NULL,   -- the audit's snapshot
    checked_from timestamptz,           -- incremental: items finished at or after this
    covers_to   timestamptz NOT NULL,
    violations  integer NOT NULL,
    run_by      text NOT NULL DEFAULT current_user,
    finished_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX audit_runs_clean ON audit_runs (id) WHERE violations = 0;

-- IF NOT EXISTS: on a large database an operator may build the four
-- indexes below first, CONCURRENTLY, under these names (README, Upgrading),
-- so the migration does not hold off writes while it builds them.

-- Finished items by when they finished.  Only the completion's row version
-- has an entry (claims and retries leave finished_at NULL), so it costs one
-- index entry per finished item; completions already update the row
-- without HOT (status is in the partial indexes' predicates).
CREATE INDEX IF NOT EXISTS invoices_finished ON invoices (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS redemptions_finished ON redemptions (finished_at) WHERE finished_at IS NOT NULL;

-- The oldest pending item (the backlog gauge billing_worker_oldest_pending_age_seconds,
-- status): min(created_at) over pending rows.  Without this index it is a
-- scan of the whole table once the pending rows are too many for the
-- planner to fetch them through the due index: 1.5 s at a million pending
-- among ten million finished, where it is the alert that matters.  Pending
-- row versions only, so it costs one small-index entry per claim.
CREATE INDEX IF NOT EXISTS invoices_pending_age ON invoices (created_at) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS redemptions_pending_age ON redemptions (created_at) WHERE status = 'pending';

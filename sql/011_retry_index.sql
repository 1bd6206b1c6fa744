-- Schema version 11: the retry index, matched by the retry queries alone.
--
-- The retry index of version 10 had the predicate status = 'pending' AND
-- (...), and the retry queries wrote it so.  But every query that implies
-- status = 'pending' also matches the two pending-only indexes (the due
-- index of version 1 and the created_at index of version 9), and with
-- statistics from before a bulk load (42 pending rows counted, 40 000
-- there) the planner took invoices_pending_age for the retries and read
-- every pending row to find none: 690 buffers and 8.2 ms a claim in
-- skip-locked mode, against 1 buffer through the retry index
-- (tests/integration/test_due_plan.py).  No query text can choose between
-- indexes whose predicates it implies alike.
--
-- So the status test is written "IS TRUE" here and in the retry queries
-- (store/claim.c): the same test, which matches this predicate and no
-- pending-only one.  Built under a new name before the old index is
-- dropped; IF NOT EXISTS: on a large database an operator may build them
-- first, CONCURRENTLY (README, Upgrading).

CREATE INDEX IF NOT EXISTS invoices_retry_due ON invoices (next_attempt_at, id)
    WHERE (status = 'pending') IS TRUE AND (attempts <> 0 OR fence > 1 OR generation > 1
        OR last_error IS NOT NULL OR (lease_until IS NULL AND next_attempt_at > created_at));

CREATE INDEX IF NOT EXISTS redemptions_retry_due ON redemptions (next_attempt_at, id)
    WHERE (status = 'pending') IS TRUE AND (attempts <> 0 OR fence > 1 OR generation > 1
        OR last_error IS NOT NULL OR (lease_until IS NULL AND next_attempt_at > created_at));

DROP INDEX IF EXISTS invoices_retry;
DROP INDEX IF EXISTS redemptions_retry;

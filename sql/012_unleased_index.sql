-- Schema version 12: the backlog gauge's index leaves out leased rows.
--
-- Since version 10 no poll and no claim reads the due index of version 1:
-- first attempts are found by id from a cursor on the primary key, the rest
-- through the *_retry_due index.  It served only the backlog gauge, the
-- count of due items no worker holds (store/report.c).  But it held every
-- pending row version, leased ones too, and a claim moves next_attempt_at
-- (so is never a HOT update): every claim wrote an entry into it, one of
-- the three B-tree insertions a claim makes, and the bottom-up deletions
-- that follow.
--
-- The index below holds the pending rows without a lease: a producer's
-- INSERT writes an entry, as before, and so does an outcome that defers a
-- retry; a claim sets a lease, and its row version is left out.  On the
-- fast API that is 2-4 % more items a second (BENCHMARKS.md).  What the
-- gauge no longer counts: a row whose lease ran out (its holder died),
-- until a worker claims it again, which the next poll of any worker does;
-- `audit` lists a row whose lease ran out long ago and that nobody took.
--
-- A binary older than version 10 polls through the old index, and one
-- older than 11 finds its retries through it: restart every worker on the
-- new version soon after migrating (README, Upgrading).
--
-- The build holds off writes to its table while it reads the table, as the
-- indexes of version 9 did; IF NOT EXISTS: on a large database an operator
-- builds it first, CONCURRENTLY.  Both statements wait at most 10 s for
-- their lock, so that behind a long transaction on the table they fail
-- (migrate names the lock timeout, to be run again) rather than queue
-- every claim and completion behind them.

SET LOCAL lock_timeout = '10s';

CREATE INDEX IF NOT EXISTS invoices_unleased ON invoices (next_attempt_at)
    WHERE status = 'pending' AND lease_until IS NULL;
CREATE INDEX IF NOT EXISTS redemptions_unleased ON redemptions (next_attempt_at)
    WHERE status = 'pending' AND lease_until IS NULL;

DROP INDEX IF EXISTS invoices_due;
DROP INDEX IF EXISTS redemptions_due;

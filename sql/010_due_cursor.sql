-- Schema version 10: finding due work at a cost that dead row versions and
-- the finished history do not change.
--
-- The due index of version 1 orders pending rows by next_attempt_at.  Every
-- claim moves a row's next_attempt_at to its lease end and every completion
-- takes it out of 'pending', and each leaves a dead entry behind, in front
-- of the live ones, at the oldest times.  Vacuum removes them, unless a long
-- transaction anywhere pins the xmin horizon: then every poll walks all of
-- them, and its cost grows with every item finished since the pin.
--
-- Pending rows are now split in two disjoint sets:
--
--   first attempts  never tried, never deferred, of the first generation (1),
--                   claimed at most once (fence <= 1): the producer's
--                   INSERT as it was, or in flight, or with a lease its
--                   holder let run out.  Found by id, from a cursor each
--                   worker keeps past the rows already finished (store/claim.c),
--                   on the primary key: dead entries below the cursor are
--                   never walked.
--   the rest        retries, deferrals, parked, requeued and reclaimed rows:
--                   found through the small partial index below, ordered by
--                   time as before.  A first claim of a fresh row sets a
--                   lease on a row with fence 1 and attempts 0: the new
--                   version does not satisfy the predicate, so the busy
--                   flow of new work never adds an entry to it.
--
-- A row moves from the first set to the second (a retry, a deferral, a
-- park), never back: every claim bumps the fence and fences only grow, so
-- a row of the second set claimed again has fence 2 or more; the one row
-- that leaves the first set unclaimed (a park of a row whose claim the
-- database refused, store/park.c) carries its last_error.  So a cursor
-- that never passes a row of the first set loses nothing.
-- The two predicates are each other's negation over status = 'pending';
-- store/claim.c writes them exactly as here so the planner matches them.

CREATE INDEX invoices_retry ON invoices (next_attempt_at, id)
    WHERE status = 'pending' AND (attempts <> 0 OR fence > 1 OR generation > 1
        OR last_error IS NOT NULL OR (lease_until IS NULL AND next_attempt_at > created_at));

CREATE INDEX redemptions_retry ON redemptions (next_attempt_at, id)
    WHERE status = 'pending' AND (attempts <> 0 OR fence > 1 OR generation > 1
        OR last_error IS NOT NULL OR (lease_until IS NULL AND next_attempt_at > created_at));

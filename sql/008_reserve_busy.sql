-- Schema version 8: a reservation never waits on a row another transaction
-- holds.
--
-- The worker runs one event loop: while its bw_reserve() waited on a
-- subsidy row that a producer held FOR UPDATE (a long report, a deposit in
-- a transaction left open), every other item of that process waited too,
-- up to lock_timeout and again on the next claim.  Now a redemption whose
-- subsidy row, or whose own row, another transaction holds is answered
-- 'busy' and nothing is written for it; the worker puts it back, pending,
-- to be tried again shortly, without a call and without counting an
-- attempt.  Everything else is as in version 6: the fence check, the
-- existing hold, the balance check, rows locked in (subsidy_id, id) order.
--
-- Why SKIP LOCKED and not NOWAIT: NOWAIT raises an error, which only an
-- EXCEPTION block can catch per row, and each such block is a
-- subtransaction; one that locks a row takes a subtransaction id of its
-- own, so a batch of more than 64 would overflow the backend's subxid cache
-- and slow every snapshot on the server.  SKIP LOCKED is the same one
-- statement per row, no subtransaction.  What it cannot do is tell a row
-- that is locked from a row that is not there, so a skipped row is looked
-- up again without a lock (a plain read never waits) to tell 'busy' from
-- 'lost'.  A row our own transaction already locked (a second redemption of
-- the same subsidy in the batch) is not skipped: SKIP LOCKED skips only
-- locks of other transactions.
--
-- Why it still cannot overdraw: a hold is written only under the subsidy's
-- row lock, as before; a skipped subsidy gets no hold at all.  The CHECK
-- (balance_cents >= 0) on subsidies stays the backstop.
--
-- The catch: another worker's reservation on the same subsidy holds its row
-- for the few milliseconds of its statement, and a reservation arriving
-- then is 'busy' too, where it used to wait those milliseconds.  It is
-- tried again a few hundred milliseconds later: a short delay for that
-- redemption, instead of a stall of the whole process behind any lock.

CREATE OR REPLACE FUNCTION bw_reserve(p_ids bigint[], p_fences bigint[])
RETURNS TABLE (rid bigint, result text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    available bigint;
    gen integer;
BEGIN
    FOR r IN
        SELECT x.id, x.fence, d.subsidy_id, d.amount_cents
          FROM unnest(p_ids, p_fences) AS x(id, fence)
          JOIN redemptions d ON d.id = x.id
         ORDER BY d.subsidy_id, x.id
    LOOP
        rid := r.id;
        -- The generation is read under the row lock: a requeue bumps the
        -- fence with it, so a matching fence means a current generation.
        SELECT d.generation INTO gen FROM redemptions d
          WHERE d.id = r.id AND d.fence = r.fence AND d.status = 'pending'
          FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- Still ours as last committed: someone holds the row.  If
            -- that someone was moving the fence, the deferral's fenced
            -- completion is turned away, as any stale outcome is.
            IF EXISTS (SELECT 1 FROM redemptions d
                        WHERE d.id = r.id AND d.fence = r.fence
                          AND d.status = 'pending') THEN
                result := 'busy';
            ELSE
                result := 'lost';
            END IF;
        ELSIF EXISTS (SELECT 1 FROM ledger_transactions l
                       WHERE l.redemption_id = r.id AND l.generation = gen
                         AND l.kind = 'hold') THEN
            result := 'held';
        ELSE
            -- FOR NO KEY UPDATE, not FOR UPDATE: a producer inserting a
            -- redemption holds FOR KEY SHARE on its subsidy (the foreign
            -- key's check) until it commits, which FOR UPDATE conflicts
            -- with, so every open producer transaction made the subsidy
            -- 'busy' (and, before SKIP LOCKED, could deadlock with a
            -- reservation).  NO KEY UPDATE still excludes every other
            -- reservation and the ledger trigger's balance update, which is
            -- what keeps the balance from being spent twice.
            SELECT s.balance_cents INTO available
              FROM subsidies s WHERE s.id = r.subsidy_id FOR NO KEY UPDATE SKIP LOCKED;
            IF NOT FOUND THEN
                -- The foreign key keeps the row there, so it is locked;
                -- were it ever missing, the answer stays what it was.
                IF EXISTS (SELECT 1 FROM subsidies s WHERE s.id = r.subsidy_id) THEN
                    result := 'busy';
                ELSE
                    result := 'insufficient';
                END IF;
            ELSIF available >= r.amount_cents THEN
                INSERT INTO ledger_transactions
                    (subsidy_id, amount_cents, redemption_id, kind, generation)
                VALUES (r.subsidy_id, -r.amount_cents, r.id, 'hold', gen);
                result := 'held';
            ELSE
                result := 'insufficient';
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

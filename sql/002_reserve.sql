-- Schema version 2: reserving funds for redemptions (the escrow step).
--
-- bw_reserve() writes the hold of each claimed redemption that has none
-- yet, if its subsidy's balance covers it.  One call reserves a whole batch
-- in one transaction, so a batch costs one round trip.
--
-- Why it cannot overdraw: each reservation first locks its subsidy's row
-- (SELECT ... FOR UPDATE), so reservations on one subsidy run one after the
-- other and each sees the balance the previous one left; deposits go
-- through the same row (the ledger trigger updates it).  Should anything
-- else ever try, the CHECK (balance_cents >= 0) on subsidies refuses it.
--
-- Why it cannot hold twice: the unique index on (redemption_id, kind) and
-- the check for an existing hold under the redemption's row lock.
--
-- Why a stale worker cannot reserve: the redemption must still carry the
-- caller's fence; otherwise the answer is 'lost' and nothing is written.
--
-- Redemptions are taken in (subsidy_id, id) order so concurrent batches
-- lock subsidies in the same order, which keeps deadlocks rare; the worker
-- retries the few that remain.

CREATE FUNCTION bw_reserve(p_ids bigint[], p_fences bigint[])
RETURNS TABLE (rid bigint, result text)
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    available bigint;
BEGIN
    FOR r IN
        SELECT x.id, x.fence, d.subsidy_id, d.amount_cents
          FROM unnest(p_ids, p_fences) AS x(id, fence)
          JOIN redemptions d ON d.id = x.id
         ORDER BY d.subsidy_id, x.id
    LOOP
        rid := r.id;
        PERFORM 1 FROM redemptions d
          WHERE d.id = r.id AND d.fence = r.fence AND d.status = 'pending'
          FOR UPDATE;
        IF NOT FOUND THEN
            result := 'lost';
        ELSIF EXISTS (SELECT 1 FROM ledger_transactions l
                       WHERE l.redemption_id = r.id AND l.kind = 'hold') THEN
            result := 'held';
        ELSE
            SELECT s.balance_cents INTO available
              FROM subsidies s WHERE s.id = r.subsidy_id FOR UPDATE;
            IF available >= r.amount_cents THEN
                INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind)
                VALUES (r.subsidy_id, -r.amount_cents, r.id, 'hold');
                result := 'held';
            ELSE
                result := 'insufficient';
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- Schema version 7: the history of every attempt ("what happened to invoice 17?").
--
-- One row per recorded outcome of a claim: the API call it made (or why
-- none was made), who made it, when, what came back, how the worker read
-- it.  Written by the completion statement itself, in the same
-- transaction, batched like the completions, so a history row exists if
-- and only if its outcome was recorded.  Append-only for the worker;
-- billing-worker prunes the history of finished items older than
-- history.retention_days, in small batches.

CREATE TABLE attempts (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    kind        text NOT NULL CHECK (kind IN ('invoice', 'redemption')),
    item_id     bigint NOT NULL,
    generation  integer NOT NULL DEFAULT 1, -- the item's key generation (requeue)
    attempt     integer NOT NULL,       -- the item's attempts after this outcome
    worker_id   text NOT NULL,
    started_at  timestamptz NOT NULL,   -- the call started (or the claim was handled)
    finished_at timestamptz NOT NULL,   -- the outcome was recorded
    http_status integer,                -- NULL when no HTTP answer came
    class       text NOT NULL,          -- paid, redeemed, declined, refused, key reused,
                                        -- worker-level, in progress, transient, ambiguous,
                                        -- not called, abandoned
    result_id   text,
    error       text,                   -- the answer's reason or the transport's error
    -- One B-tree, which show reads: every index is one more write in each
    -- completion, so the key is the way the rows are looked up.
    PRIMARY KEY (kind, item_id, id)
);

-- Retention finds the old rows through a BRIN index: rows arrive in
-- finished_at order, so a few bytes per block range do, and an insert costs
-- next to nothing.
CREATE INDEX attempts_by_age ON attempts USING brin (finished_at);

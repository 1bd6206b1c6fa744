-- Schema version 4: answers that are about the worker, items that wait for
-- an operator, and the age of an idempotency key.
--
-- blocked_calls: the API calls of an item answered 401, 403, 404 or 405.
-- Those answers are about the worker's token or base URL, not the item
-- (CONTRACT section 2): they stay counted in attempts, but never count
-- toward max_attempts, so a mistyped token cannot fail a backlog.
--
-- first_claimed_at: set by the first claim and never again.  The key's age
-- at the API is at most this old (no call under it can be older), so a
-- provider that keeps keys for a bounded time is never asked to replay a
-- key it may have forgotten (billing_api.idempotency_key_ttl_s).
--
-- needs_operator: why the item waits for a human, or NULL.  Set when an
-- item that may already have taken effect got an answer that is not final
-- (a 400 or 422 after an ambiguous attempt), or when its key may have
-- expired; last_error keeps the answer that stopped it.  Such an item stays
-- pending: it is never failed by the worker.
--
-- workers: the fleet's registry.  Each worker writes its row at start and
-- every few seconds (id, host, version, lock mode, last seen), and whether
-- the billing API refuses it (a worker-level answer), so `status`, run
-- anywhere, lists the live workers and names the refused ones.  A worker
-- deletes its row when it exits; a row not seen for a while is a worker
-- that died.

ALTER TABLE invoices
    ADD COLUMN blocked_calls integer NOT NULL DEFAULT 0,
    ADD COLUMN first_claimed_at timestamptz,
    ADD COLUMN needs_operator text;

ALTER TABLE redemptions
    ADD COLUMN blocked_calls integer NOT NULL DEFAULT 0,
    ADD COLUMN first_claimed_at timestamptz,
    ADD COLUMN needs_operator text;

CREATE TABLE workers (
    worker_id           text PRIMARY KEY,
    host                text NOT NULL,
    version             text NOT NULL,
    lock_mode           text NOT NULL,
    started_at          timestamptz NOT NULL DEFAULT now(),
    seen_at             timestamptz NOT NULL DEFAULT now(),
    api_blocked_since   timestamptz,        -- NULL unless the billing API refuses it
    api_blocked_reason  text
);

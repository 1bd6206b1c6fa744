-- Schema version 3: wake the workers when producers insert items.
--
-- One notification per INSERT statement, not per row: a producer inserting
-- 10 000 invoices in one statement wakes each worker once.  PostgreSQL also
-- folds identical notifications of one transaction into one.  Workers
-- LISTEN on billing_worker and still poll every poll_interval_ms, so a lost
-- notification (a LISTEN connection down at the time) only costs latency.

CREATE FUNCTION bw_notify_new_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billing_worker', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER invoices_notify AFTER INSERT ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION bw_notify_new_items();
CREATE TRIGGER redemptions_notify AFTER INSERT ON redemptions
    FOR EACH STATEMENT EXECUTE FUNCTION bw_notify_new_items();

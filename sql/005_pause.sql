-- Schema version 5: pausing the fleet (billing-worker pause / resume).
--
-- One row per paused kind.  Every worker's due query reads this table in
-- the same statement (no extra round trip per poll) and takes nothing of a
-- paused kind; the claims check it too, so a claim racing a pause cannot
-- start a call after the pause committed.  Calls already in flight finish
-- and are recorded.  Deleting a row (resume) notifies the workers, so they
-- poll at once instead of at their next poll_interval_ms.

CREATE TABLE fleet_pause (
    kind        text PRIMARY KEY CHECK (kind IN ('invoice', 'redemption')),
    reason      text NOT NULL CHECK (reason <> ''),
    paused_by   text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION bw_notify_resume() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('billing_worker', 'resume');
    RETURN NULL;
END $$;

CREATE TRIGGER fleet_pause_resume AFTER DELETE ON fleet_pause
    FOR EACH STATEMENT EXECUTE FUNCTION bw_notify_resume();

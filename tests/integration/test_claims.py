"""Claims: a row the database refuses to claim, one kind's failing claim, and
how fast a backlog's tail is taken.

A claim bumps the row's fence in the database.  A row that cannot take the
bump (its fence at INT64_MAX, a producer's trigger) must be found, parked
with the reason and retried slowly, and must hold back neither the other
rows of its kind nor the other kind; every Redis lock taken for a claim
that did not happen is given back at once.
"""

import time

import pytest

from harness import (Worker, create_subsidy, insert_invoices, insert_redemptions, make_config,
                     migrate, run_cli, wait_for)

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role

INT64_MAX = 2**63 - 1
MODES = ["skip-locked", "redis"]


def count(db, table, status):
    return db.scalar(f"SELECT count(*) FROM {table} WHERE status = %s", (status,))


def pg_errors(db, text):
    """Lines of the cluster's log from this test's database that carry TEXT."""
    tag = f"@{db.name} "
    return sum(1 for line in db.cluster.log().splitlines() if tag in line and text in line)


@pytest.mark.parametrize("mode", MODES)
def test_a_row_whose_fence_cannot_be_bumped_is_parked_and_blocks_nothing(
        tmp_path, db, redis, fake_api, binary, mode):
    """Covers claim_take's claim of one kind failing on the data (claim_skip_locked /
    claim_redis in worker/claim.c): the candidates of that kind are claimed one by
    one, the refusing row is parked by store_park_unclaimed (store/park.c), every
    other row of both kinds is claimed and paid, and in redis mode every lock
    taken for a claim that did not happen is released."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": mode, "billing_api.backoff_max_ms": 60000,
        # Long enough that a leaked Redis lock would still be there at the end.
        "locks.ttl_ms": 30000, "locks.renew_interval_ms": 10000})
    migrate(cfg)
    ids = insert_invoices(db, 6)
    poison = ids[2]
    db.execute("UPDATE invoices SET fence = %s WHERE id = %s", (INT64_MAX, poison))
    sid = create_subsidy(db, "s", 10000)
    rids = insert_redemptions(db, sid, 2, 100)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "invoices", "paid") == 5 and
             count(db, "redemptions", "redeemed") == len(rids), 15, message=w.log)

    status, fence, attempts, locked_by, err, later = db.query(
        "SELECT status, fence, attempts, locked_by, last_error, "
        "next_attempt_at > now() + interval '30 seconds' FROM invoices WHERE id = %s",
        (poison,))[0]
    assert (status, fence, attempts, locked_by) == ("pending", INT64_MAX, 0, None)
    assert "could not be claimed" in err and "bigint out of range" in err, err
    assert later, "the parked row must not be due again soon"
    assert f"invoice-{poison}" not in fake_api.state()["requests"]
    named = [line for line in w.log().splitlines() if f"invoice {poison}:" in line]
    assert len(named) == 1 and "could not be claimed" in named[0], named

    # Parked: no further claim touches it, so no statement fails again.
    errors = pg_errors(db, "bigint out of range")
    assert errors >= 1
    lines = len(w.log().splitlines())
    time.sleep(3)
    assert pg_errors(db, "bigint out of range") == errors
    assert len(w.log().splitlines()) - lines < 5, w.log_tail()
    if mode == "redis":
        wait_for(lambda: redis.keys("*lock*") == [], 2,
                 message=lambda: f"lock keys left: {redis.keys('*lock*')}")
    assert w.alive()
    assert w.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_redemptions_are_claimed_in_the_same_poll_when_the_invoice_claim_fails(
        tmp_path, db, redis, fake_api, binary, mode):
    """Covers claim_skip_locked and claim_redis (worker/claim.c) when the claim of the
    first kind (invoices) fails, not on the data: the second kind is still claimed
    in the same poll, the invoices are left as they were (not parked), and in
    redis mode the locks of both kinds are given back."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": mode, "worker.poll_interval_ms": 60000,
        "locks.ttl_ms": 30000, "locks.renew_interval_ms": 10000})
    migrate(cfg)
    db.execute("CREATE FUNCTION refuse_invoice_claims() RETURNS trigger LANGUAGE plpgsql AS $$ "
               "BEGIN RAISE EXCEPTION 'claims of invoices are switched off' "
               "USING ERRCODE = '55000'; END $$")
    db.execute("CREATE TRIGGER refuse_claims BEFORE UPDATE ON invoices FOR EACH ROW "
               "WHEN (NEW.fence IS DISTINCT FROM OLD.fence) "
               "EXECUTE FUNCTION refuse_invoice_claims()")
    iids = insert_invoices(db, 3)
    sid = create_subsidy(db, "s", 10000)
    rids = insert_redemptions(db, sid, 3, 100)
    w = Worker(cfg, "w").start()
    # Polling once a minute: only the first poll can have claimed them.
    wait_for(lambda: count(db, "redemptions", "redeemed") == len(rids), 10, message=w.log)
    refused = [line for line in w.log().splitlines() if "could not claim invoices" in line]
    assert len(refused) == 1 and "switched off" in refused[0], w.log()
    assert db.query("SELECT status, attempts, last_error FROM invoices ORDER BY id") == \
        [("pending", 0, None)] * len(iids)
    assert not any(k.startswith("invoice-") for k in fake_api.state()["requests"])
    if mode == "redis":
        wait_for(lambda: redis.keys("*lock*") == [], 2,
                 message=lambda: f"lock keys left: {redis.keys('*lock*')}")
    assert w.stop() == 0


def test_once_takes_a_backlogs_tail_without_waiting_for_polls(tmp_path, db, redis, fake_api,
                                                              binary):
    """Covers claim_take's *more in redis mode (worker/claim.c): with fewer items due
    than the 4 x limit candidate window but more than a claim may take, the next
    claim follows as soon as there is room instead of a poll_interval_ms later."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": "redis", "worker.concurrency": 16, "worker.batch_size": 16,
        "worker.poll_interval_ms": 2000})
    migrate(cfg)
    insert_invoices(db, 154)
    started = db.scalar("SELECT clock_timestamp()")
    t0 = time.monotonic()
    r = run_cli(cfg, "once", timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout + r.stderr
    assert count(db, "invoices", "paid") == 154
    # One batch per poll would take about 4 x 2 s for the last 64 items.
    work = (db.scalar("SELECT max(finished_at) FROM invoices") - started).total_seconds()
    assert work < 1.5, f"the last invoice was paid {work:.1f} s after the start"
    # The run then ends at its next poll, which finds nothing due.
    assert elapsed < 3.0 + 0.5, f"once took {elapsed:.1f} s"

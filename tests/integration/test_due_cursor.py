"""Due work found from a cursor (schema version 10): no item missed.

First attempts are found by id from a cursor each worker keeps past the
rows already finished; everything else (retries, reclaims) through the
*_retry partial index (store/claim.c, sql/010_due_cursor.sql).  A cursor
that moves too far loses items forever, so each way one could be lost is
tested, in both lock modes and for both kinds:

  - an id committed after higher ids were seen and finished (identity
    values are not committed in id order): found by the sweeps;
  - a first attempt whose worker died holding its lease: the cursor never
    passes a row in flight, so it is claimed again when the lease ends;
  - a retry: found through the retry index, not the cursor.
"""

import signal
import time

import pytest

from harness import (Worker, create_subsidy, insert_invoices, insert_redemptions, make_config,
                     migrate, wait_for)

pytestmark = pytest.mark.worker_role

MODES = ["skip-locked", "redis"]


def done(db, table, ids):
    want = "paid" if table == "invoices" else "redeemed"
    return db.scalar(f"SELECT count(*) FROM {table} WHERE id = ANY(%s) AND status = %s",
                     (list(ids), want)) == len(ids)


@pytest.mark.parametrize("mode", MODES)
def test_an_id_committed_after_higher_ids_is_found(tmp_path, db, redis, fake_api, binary, mode):
    """A producer's transaction takes an id of each kind and commits only after
    higher ids of both kinds were inserted, claimed and paid, so every cursor
    is past it: the sweep over the last seconds' ids finds it."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": mode})
    migrate(cfg)
    sid = create_subsidy(db, "s", 100000)
    # Its own subsidy: the open transaction's KEY SHARE lock on it would
    # make the reservations of the others busy.
    sid_late = create_subsidy(db, "late", 100000)
    w = Worker(cfg, "w").start()
    first = insert_invoices(db, 3)
    rfirst = insert_redemptions(db, sid, 3, 100)
    wait_for(lambda: done(db, "invoices", first) and done(db, "redemptions", rfirst), 15,
             message=w.log)

    late = db.connect(autocommit=False)
    with late.cursor() as cur:
        cur.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
                    "VALUES ('cus_late', 1000, 'usd') RETURNING id")
        late_id = cur.fetchone()[0]
        cur.execute("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                    "VALUES (%s, 'learner-late', 100) RETURNING id", (sid_late,))
        late_rid = cur.fetchone()[0]
    after = insert_invoices(db, 5)
    rafter = insert_redemptions(db, sid, 5, 100)
    assert min(after) > late_id and min(rafter) > late_rid
    wait_for(lambda: done(db, "invoices", after) and done(db, "redemptions", rafter), 15,
             message=w.log)
    # Past both, and a while later: as long as a producer's slow transaction.
    time.sleep(3)
    late.commit()
    late.close()
    wait_for(lambda: done(db, "invoices", [late_id]) and done(db, "redemptions", [late_rid]),
             15, message=w.log)
    assert w.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_first_attempt_whose_worker_died_is_claimed_when_its_lease_ends(
        tmp_path, db, redis, fake_api, binary, mode):
    """A worker dies (SIGKILL) with a first attempt of each kind in flight.
    Another worker, running all along, pays everything inserted after them
    meanwhile, and its cursor must stay at the dead one's rows: they are
    claimed again once their lease has run out."""
    # The retried call meets the first one's key still in progress (409):
    # retried again soon, it gets the answer once the first call ends.
    over = {"locks.mode": mode, "locks.ttl_ms": 2000, "locks.renew_interval_ms": 500,
            "billing_api.backoff_initial_ms": 500, "billing_api.backoff_max_ms": 1000}
    cfg1 = make_config(tmp_path, db, redis, fake_api, **over)
    cfg2 = make_config(tmp_path, db, redis, fake_api, **over)
    migrate(cfg1)
    sid = create_subsidy(db, "s", 100000)
    # The first two calls hang 8 s: still in flight when their worker dies.
    fake_api.faults([{"match": {}, "action": "delay", "delay_ms": 8000, "times": 2}])
    w1 = Worker(cfg1, "w1").start()
    iid = insert_invoices(db, 1)[0]
    rid = insert_redemptions(db, sid, 1, 100)[0]
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE id = %s AND fence = 1 AND "
                               "lease_until IS NOT NULL", (iid,)) == 1 and
             db.scalar("SELECT count(*) FROM redemptions WHERE id = %s AND fence = 1 AND "
                       "lease_until IS NOT NULL", (rid,)) == 1, 15, message=w1.log)
    wait_for(lambda: len(fake_api.state()["requests"]) >= 2, 10, message=w1.log)
    w1.signal(signal.SIGKILL)
    w1.wait(10)
    fake_api.faults([])
    w2 = Worker(cfg2, "w2").start()
    after = insert_invoices(db, 5)
    rafter = insert_redemptions(db, sid, 5, 100)
    wait_for(lambda: done(db, "invoices", after) and done(db, "redemptions", rafter), 15,
             message=w2.log)
    wait_for(lambda: done(db, "invoices", [iid]) and done(db, "redemptions", [rid]), 30,
             message=w2.log)
    assert w2.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_retries_are_found_past_the_cursor(tmp_path, db, redis, fake_api, binary, mode):
    """The first call of each item fails (503): the retries, due a moment
    later, are found through the retry index while the cursor has moved
    past them to the new work inserted meanwhile."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": mode, "billing_api.backoff_initial_ms": 500,
        "billing_api.backoff_max_ms": 1000})
    migrate(cfg)
    sid = create_subsidy(db, "s", 100000)
    fake_api.faults([{"match": {}, "action": "status", "status": 503, "times": 4}])
    w = Worker(cfg, "w").start()
    ids = insert_invoices(db, 2)
    rids = insert_redemptions(db, sid, 2, 100)
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE attempts > 0") == 2 and
             db.scalar("SELECT count(*) FROM redemptions WHERE attempts > 0") == 2, 15,
             message=w.log)
    after = insert_invoices(db, 3)
    rafter = insert_redemptions(db, sid, 3, 100)
    wait_for(lambda: done(db, "invoices", ids + after) and done(db, "redemptions", rids + rafter),
             20, message=w.log)
    assert db.scalar("SELECT min(attempts) FROM invoices WHERE id = ANY(%s)", (ids,)) == 2
    assert db.scalar("SELECT min(attempts) FROM redemptions WHERE id = ANY(%s)", (rids,)) == 2
    assert w.stop() == 0

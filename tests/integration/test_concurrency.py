"""Several workers on the same rows: races, crashes and pauses.

Every test ends by checking the books against the fake API's own record:
each invoice is paid exactly when the API applied a charge under its key,
with that charge's id.
"""

import pytest

from harness import migrate, Worker, insert_invoices, make_config, run_cli, wait_for

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def assert_books_agree(db, fake_api, expect_paid=None):
    """Every paid invoice holds the API's id for its key; nothing else was charged."""
    state = fake_api.state()
    applied = state["applied"]
    rows = db.query("SELECT id, status, charge_id FROM invoices ORDER BY id")
    paid = 0
    for iid, status, charge_id in rows:
        key = f"invoice-{iid}"
        if status == "paid":
            paid += 1
            assert key in applied, f"{key} paid but the API never charged it"
            assert applied[key]["id"] == charge_id, f"{key}: recorded {charge_id}, API has {applied[key]['id']}"
        else:
            assert key not in applied, f"{key} is {status} but the API charged it"
    if expect_paid is not None:
        assert paid == expect_paid
    return state


def start_workers(tmp_path, db, redis, fake_api, modes, **overrides):
    workers = []
    for i, mode in enumerate(modes):
        cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": mode, **overrides})
        if i == 0:
            migrate(cfg)
        workers.append(Worker(cfg, f"w{i}-{mode}"))
    return workers


@pytest.mark.parametrize("modes", [
    ["redis"] * 4,
    ["skip-locked"] * 4,
    ["redis", "redis", "skip-locked", "skip-locked", "auto"],
], ids=["redis", "skip-locked", "mixed"])
def test_racing_workers_charge_each_invoice_once(tmp_path, db, redis, fake_api, binary, modes):
    workers = start_workers(tmp_path, db, redis, fake_api, modes)
    insert_invoices(db, 1000)
    for w in workers:
        w.start()
    wait_for(lambda: pending(db) == 0, 120, interval=0.2,
             message=lambda: f"{pending(db)} pending; {workers[0].log_tail()}")
    for w in workers:
        assert w.stop() == 0
    state = assert_books_agree(db, fake_api, expect_paid=1000)
    # No faults: one call per invoice, however the workers raced.
    assert len(state["requests"]) == 1000
    assert max(state["requests"].values()) == 1
    assert db.scalar("SELECT count(*) FROM invoices WHERE attempts <> 1") == 0
    # The work was really shared.
    busy = [w for w in workers if ", id \"ch_" in w.log()]
    assert len(busy) >= 2
    assert redis.keys("billing-worker:lock:*") == []


def test_killed_worker_mid_call_is_finished_by_another(tmp_path, db, redis, fake_api, binary):
    a, b = start_workers(tmp_path, db, redis, fake_api, ["redis", "redis"])
    [iid] = insert_invoices(db, 1)
    key = f"invoice-{iid}"
    # The first request sits in the API for 3 s: A dies while it is in flight.
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 3000, "times": 1}])
    a.start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 1, 10)
    a.kill()
    b.start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: b.log())
    assert b.stop() == 0
    assert_books_agree(db, fake_api, expect_paid=1)
    status, ambiguous, fence, locked_by = db.query(
        "SELECT status, ambiguous, fence, locked_by FROM invoices")[0]
    # B's claim found A's lease run out without a completion: A may have charged.
    assert ambiguous is True
    assert fence >= 2 and locked_by is None
    assert f"invoice {iid}: paid" in b.log()


def test_paused_worker_records_nothing_over_the_new_owner(tmp_path, db, redis, fake_api, binary):
    overrides = {"locks.ttl_ms": 1000, "locks.renew_interval_ms": 300,
                 "billing_api.timeout_ms": 5000}
    a, b = start_workers(tmp_path, db, redis, fake_api, ["redis", "redis"], **overrides)
    [iid] = insert_invoices(db, 1)
    key = f"invoice-{iid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 1500, "times": 1}])
    a.start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 1, 10)
    a.pause()                                   # frozen past its 1 s lease
    b.start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: b.log())
    fence_after_b, charge_b = db.query("SELECT fence, charge_id FROM invoices")[0]
    a.resume()                                  # wakes with a stale claim
    wait_for(lambda: "was lost to another worker" in a.log() or "lease lost" in a.log(), 15,
             message=lambda: a.log())
    assert a.stop() == 0 and b.stop() == 0
    status, charge_id, fence = db.query("SELECT status, charge_id, fence FROM invoices")[0]
    assert (status, charge_id, fence) == ("paid", charge_b, fence_after_b)
    assert_books_agree(db, fake_api, expect_paid=1)
    assert f"invoice {iid}: paid" not in a.log()


def test_skip_locked_worker_killed_mid_call_is_recovered(tmp_path, db, redis, fake_api, binary):
    a, b = start_workers(tmp_path, db, redis, fake_api, ["skip-locked", "skip-locked"])
    ids = insert_invoices(db, 20)
    fake_api.faults([{"match": {}, "action": "delay", "delay_ms": 2000, "times": 20}])
    a.start()
    wait_for(lambda: fake_api.state()["total_requests"] >= 5, 10)
    a.kill()
    b.start()
    wait_for(lambda: pending(db) == 0, 40, message=lambda: b.log())
    assert b.stop() == 0
    assert_books_agree(db, fake_api, expect_paid=len(ids))

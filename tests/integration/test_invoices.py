"""Invoices end to end: real PostgreSQL, redis-server and the fake billing API."""

import os
import re
from pathlib import Path

import pytest

from harness import (Worker, insert_invoices, make_config, migrate, owner_config, run_cli,
                     wait_for)

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role


SQL_VERSIONS = sorted((int(p.name.split("_")[0]),) for p in
                      (Path(__file__).resolve().parents[2] / "sql").glob("[0-9]*_*.sql"))


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def test_migrate_is_idempotent_and_versioned(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    migrate(cfg)
    assert db.query("SELECT version FROM schema_version ORDER BY version") == SQL_VERSIONS
    assert db.scalar("SELECT count(*) FROM information_schema.tables "
                     "WHERE table_name IN ('invoices','subsidies','ledger_transactions','redemptions')") == 4


def test_migrate_from_several_hosts_at_once(tmp_path, db, redis, fake_api, binary):
    import subprocess
    cfg = make_config(tmp_path, db, redis, fake_api)
    # Straight to the binary, so the owner's config by hand (see harness.owner_config).
    procs = [subprocess.Popen([str(binary), "-c", str(owner_config(cfg)), "migrate"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    assert db.query("SELECT version FROM schema_version ORDER BY version") == SQL_VERSIONS


def test_once_charges_every_invoice_once(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    ids = insert_invoices(db, 50)
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = db.query("SELECT id, status, charge_id, attempts, last_error FROM invoices ORDER BY id")
    assert [row[1] for row in rows] == ["paid"] * 50
    state = fake_api.state()
    for (iid, _, charge_id, attempts, last_error) in rows:
        key = f"invoice-{iid}"
        assert state["applied"][key]["id"] == charge_id
        assert state["requests"][key] == 1
        assert attempts == 1 and last_error is None
    # Every request carried the contract's headers, with the right key.
    hdrs = {k.lower(): v for k, v in state["last_headers"][f"invoice-{ids[0]}"].items()}
    assert hdrs["idempotency-key"] == f"invoice-{ids[0]}"
    assert hdrs["authorization"] == "Bearer <redacted>"
    assert hdrs["content-type"].startswith("application/json")
    body = state["applied"][f"invoice-{ids[0]}"]["body"]
    assert body == {"invoice_id": ids[0], "customer": "cus_0", "amount": 1000, "currency": "usd"}
    # No Redis lock is left behind.
    assert redis.keys("billing-worker:lock:*") == []


def test_declined_and_bad_rows_fail_with_reason(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) VALUES "
               "('declined_1', 500, 'usd'), ('', 500, 'usd'), ('cus_x', 500, 'dollars'), "
               "('cus_ok', 700, 'eur')")
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {c: (s, a, e) for c, s, a, e in
            db.query("SELECT customer_id, status, attempts, last_error FROM invoices")}
    assert rows["declined_1"][0] == "failed"
    assert rows["declined_1"][1] == 1
    assert "card_declined" in rows["declined_1"][2]
    assert rows[""] == ("failed", 0, "customer_id is empty")
    assert rows["cus_x"][0] == "failed" and rows["cus_x"][1] == 0
    assert "currency" in rows["cus_x"][2]
    assert rows["cus_ok"][0] == "paid"
    state = fake_api.state()
    # Refused rows never reached the API.
    assert sum(state["requests"].values()) == 2


def test_transient_errors_are_retried_with_the_same_key(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    fake_api.faults([{"match": {"key": f"invoice-{iid}"}, "action": "status", "status": 503, "times": 2},
                     {"match": {"key": f"invoice-{iid}"}, "action": "status", "status": 429,
                      "retry_after": 1, "times": 1}])
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: w.log())
    w.stop()
    status, attempts, charge_id = db.query("SELECT status, attempts, charge_id FROM invoices")[0]
    assert status == "paid" and attempts == 4
    state = fake_api.state()
    assert state["requests"][f"invoice-{iid}"] == 4
    assert state["applied"][f"invoice-{iid}"]["id"] == charge_id


def test_gives_up_after_max_attempts_when_nothing_happened(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.max_attempts": 3})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    fake_api.faults([{"match": {}, "action": "status", "status": 500}])
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: w.log())
    w.stop()
    status, attempts, err = db.query("SELECT status, attempts, last_error FROM invoices")[0]
    assert status == "failed" and attempts == 3
    assert err.startswith("gave up after 3 attempts")
    assert f"invoice-{iid}" not in fake_api.state()["applied"]


def test_timeout_after_effect_ends_paid_once_via_replay(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.timeout_ms": 500,
                                                        "billing_api.max_attempts": 2})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    # Every attempt times out after the charge is applied: never given up, though
    # max_attempts is passed, because each attempt may have charged.
    fake_api.faults([{"match": {"key": f"invoice-{iid}"}, "action": "timeout_after_effect",
                      "delay_ms": 1500, "times": 3}])
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: pending(db) == 0, 40, message=lambda: w.log())
    w.stop()
    status, attempts, charge_id = db.query("SELECT status, attempts, charge_id FROM invoices")[0]
    state = fake_api.state()
    assert status == "paid"
    assert attempts == 4
    assert state["applied"][f"invoice-{iid}"]["id"] == charge_id
    assert "may have taken effect" in w.log()


def test_garbage_2xx_is_ambiguous_and_resolved_by_replay(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    fake_api.faults([{"match": {}, "action": "garbage_after_effect", "times": 1}])
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0
    wait_for(lambda: run_cli(cfg, "once").returncode == 0 and pending(db) == 0, 20)
    status, charge_id = db.query("SELECT status, charge_id FROM invoices")[0]
    assert status == "paid"
    assert fake_api.state()["applied"][f"invoice-{iid}"]["id"] == charge_id


def test_status_lists_counts(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 3)
    r = run_cli(cfg, "status")
    assert r.returncode == 0, r.stderr
    assert re.search(r"invoices\s+3\s+0\s+0\s+0\s+0", r.stdout), r.stdout


def test_run_refuses_unmigrated_database(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(cfg, "once", timeout=30)
    assert r.returncode == 1
    assert "migrate" in r.stderr


def test_token_never_logged(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"log.level": "debug"})
    migrate(cfg)
    insert_invoices(db, 5)
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0
    assert fake_api.token not in r.stderr + r.stdout


def test_row_changed_after_an_ambiguous_attempt_is_not_failed(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    # An attempt may have charged; then a producer blanked the customer.
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency, ambiguous, attempts) "
               "VALUES ('', 500, 'usd', true, 1)")
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    status, ambiguous, err = db.query("SELECT status, ambiguous, last_error FROM invoices")[0]
    assert (status, ambiguous, err) == ("pending", True, "customer_id is empty")
    assert "left pending for an operator" in r.stderr
    assert fake_api.state()["total_requests"] == 0

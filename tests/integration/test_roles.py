"""sql/roles.sql: billing_worker can do what the worker needs, and nothing else."""

import shutil

import psycopg2
import pytest

from harness import (WORKER_ROLE, Worker, apply_roles, create_subsidy, insert_invoices,
                     insert_redemptions, make_config, run_cli, wait_for)

pytestmark = pytest.mark.worker_role


def as_worker(db):
    conn = psycopg2.connect(host=db.host, port=db.port, dbname=db.name, user=WORKER_ROLE,
                            connect_timeout=10)
    conn.autocommit = True
    return conn


def test_worker_runs_as_billing_worker(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    assert run_cli(cfg, "migrate").returncode == 0
    apply_roles(db)  # twice: idempotent
    insert_invoices(db, 5)
    sid = create_subsidy(db, "s", 1000)
    insert_redemptions(db, sid, 3, 100, customer="declined-{i}")
    w = Worker(cfg, "w1")
    w.start()
    users = wait_for(lambda: db.query(
        "SELECT DISTINCT usename FROM pg_stat_activity WHERE application_name = 'billing-worker'"),
        10)
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") +
             db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'") == 0, 30,
             message=lambda: w.log())
    assert w.stop() == 0
    assert users == [(WORKER_ROLE,)]
    # Declined redemptions wrote a hold and its reversal as billing_worker.
    assert db.scalar("SELECT count(*) FROM ledger_transactions WHERE kind = 'reversal'") == 3
    for cmd in ("status", "audit"):
        r = run_cli(cfg, cmd)
        assert r.returncode == 0, r.stdout + r.stderr


FORBIDDEN = [
    "INSERT INTO invoices (customer_id, amount_cents, currency) VALUES ('x', 1, 'usd')",
    "UPDATE invoices SET amount_cents = 1",
    "UPDATE invoices SET customer_id = 'someone-else'",
    "UPDATE invoices SET currency = 'eur'",
    "UPDATE redemptions SET amount_cents = 1",
    "UPDATE redemptions SET subsidy_id = 1",
    "DELETE FROM invoices",
    "DELETE FROM ledger_transactions",
    "UPDATE requeues SET reason = 'nobody asked'",
    "DELETE FROM requeues",
    "UPDATE subsidies SET name = 'x'",
    "INSERT INTO subsidies (name) VALUES ('x')",
    "TRUNCATE ledger_transactions",
    "CREATE TABLE evil (x int)",
    "DROP TABLE invoices",
    "INSERT INTO schema_version (version, name) VALUES (99, 'x')",
]


@pytest.mark.parametrize("sql", FORBIDDEN, ids=[s.split(" (")[0][:40] for s in FORBIDDEN])
def test_billing_worker_cannot(tmp_path, db, redis, fake_api, binary, sql):
    cfg = make_config(tmp_path, db, redis, fake_api)
    assert run_cli(cfg, "migrate").returncode == 0
    insert_invoices(db, 1)
    create_subsidy(db, "s", 100)
    conn = as_worker(db)
    try:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege), conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def test_migrate_as_billing_worker_fails_cleanly(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(cfg, "migrate")        # as the owner (the twin), then roles.sql
    assert r.returncode == 0, r.stderr
    # The worker's own config under another name, so run_cli has no owner twin for it.
    plain = tmp_path / "billing-worker-role.conf"
    shutil.copy(cfg, plain)
    r = run_cli(plain, "migrate")
    assert r.returncode == 1
    assert "permission denied" in r.stderr

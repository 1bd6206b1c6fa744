"""status on large tables: finished counts above 100 000 rows are estimates
(the planner's row count less the exact pending and failed), said so in
both formats; below it they are exact."""

import json

from harness import insert_invoices, make_config, migrate, run_cli


def add_paid(db, n):
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency, status, charge_id, "
               "attempts, finished_at) SELECT 'cus_' || i, 100, 'usd', 'paid', 'ch_' || i, 1, "
               "now() - interval '1 day' FROM generate_series(1, %s) i", (n,))
    db.execute("ANALYZE invoices")


def kinds(cfg):
    r = run_cli(cfg, "status", "--json")
    assert r.returncode == 0, r.stderr
    return {k["kind"]: k for k in json.loads(r.stdout)["kinds"]}


def test_small_tables_are_counted_exactly(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    add_paid(db, 500)
    insert_invoices(db, 3)
    inv = kinds(cfg)["invoices"]
    assert (inv["done"], inv["pending"], inv["done_estimated"]) == (500, 3, False)
    text = run_cli(cfg, "status").stdout
    assert "estimated" not in text and "~" not in text


def test_large_tables_estimate_the_finished_count(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    add_paid(db, 150_000)
    insert_invoices(db, 7)
    inv = kinds(cfg)
    assert inv["invoices"]["done_estimated"] is True
    assert inv["invoices"]["pending"] == 7            # still exact
    assert abs(inv["invoices"]["done"] - 150_000) < 150_000 * 0.02
    assert inv["redemptions"]["done_estimated"] is False
    text = run_cli(cfg, "status").stdout
    assert "~" in text and "estimated from the table's statistics" in text

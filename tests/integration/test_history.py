"""The attempts history and `billing-worker show`: "what happened to invoice 17?"

Every recorded outcome leaves one row in `attempts`, written by the
completion statement itself: who, when, the HTTP status or the transport's
error, how the answer was read, the result id.  An outcome turned away by
its fence leaves none.  `show` prints the item, its ledger rows and its
history, as text or JSON; history.retention_days prunes finished items'
history in small batches and never touches a pending item's.
"""

import json

from harness import (Worker, create_subsidy, insert_invoices, insert_redemptions, make_config,
                     migrate, run_cli, wait_for)


def history(db, kind, iid):
    return db.query("SELECT attempt, class, http_status, result_id, error, worker_id, "
                    "finished_at >= started_at FROM attempts WHERE kind = %s AND item_id = %s "
                    "ORDER BY id", (kind, iid))


def test_every_attempt_is_in_the_history_and_show_prints_it(tmp_path, db, redis, fake_api,
                                                            binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.id": "w-hist"})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 400)
    [poor] = insert_redemptions(db, sid, 1, 5000)
    fake_api.faults([{"match": {"key": f"invoice-{iid}"}, "action": "status", "status": 503,
                      "times": 1},
                     {"match": {"key": f"invoice-{iid}"}, "action": "timeout_after_effect",
                      "delay_ms": 3000, "times": 1}])
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") +
             db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'") == 0, 30,
             message=w.log)
    assert w.stop() == 0
    charge = db.scalar("SELECT charge_id FROM invoices WHERE id = %s", (iid,))
    rows = history(db, "invoice", iid)
    assert [r[:3] for r in rows] == [(1, "transient", 503), (2, "ambiguous", None),
                                      (3, "paid", 200)], rows
    assert "injected 503" in rows[0][4]
    assert "no answer from the billing API" in rows[1][4]
    assert rows[2][3] == charge and rows[2][4] is None
    assert all(r[5] == "w-hist" and r[6] for r in rows)
    assert [r[:3] for r in history(db, "invoice", bad)] == [(1, "declined", 402)]
    assert [r[:4] for r in history(db, "redemption", rid)] == \
        [(1, "redeemed", 200, db.scalar("SELECT fulfillment_id FROM redemptions WHERE id = %s",
                                         (rid,)))]
    # Refused before any call: one row, no HTTP status, attempts unchanged.
    assert [r[:3] for r in history(db, "redemption", poor)] == [(0, "not called", None)]
    assert history(db, "redemption", poor)[0][4] == "insufficient funds"

    r = run_cli(cfg, "show", "invoice", str(iid))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"invoice {iid}\n") and f"charge_id        {charge}" in out
    assert "history: 3 attempts" in out
    assert "transient, http 503" in out and "ambiguous" in out and f"paid, http 200" in out
    r = run_cli(cfg, "show", "redemption", str(rid), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kind"] == "redemption" and doc["item"]["status"] == "redeemed"
    assert [l["kind"] for l in doc["ledger"]] == ["hold"]
    assert doc["history"][0]["class"] == "redeemed" and doc["history"][0]["http_status"] == "200"
    r = run_cli(cfg, "show", "invoice", "999999")
    assert r.returncode == 1 and "no invoice 999999" in r.stderr
    r = run_cli(cfg, "show", "refund", "1")
    assert r.returncode == 2


def test_history_can_be_turned_off_and_is_pruned_for_finished_items(tmp_path, db, redis,
                                                                   fake_api, binary):
    off = make_config(tmp_path, db, redis, fake_api, **{"history.enabled": False})
    migrate(off)
    insert_invoices(db, 3)
    assert run_cli(off, "once").returncode == 0
    assert db.scalar("SELECT count(*) FROM attempts") == 0

    cfg = make_config(tmp_path, db, redis, fake_api, **{"history.retention_days": 30})
    ids = insert_invoices(db, 3)
    assert run_cli(cfg, "once").returncode == 0
    # Age the history of two paid invoices and of one still pending.
    pending = insert_invoices(db, 1)[0]
    db.execute("INSERT INTO attempts (kind, item_id, attempt, worker_id, started_at, "
               "finished_at, class) VALUES ('invoice', %s, 1, 'x', now() - interval '40 days', "
               "now() - interval '40 days', 'transient')", (pending,))
    db.execute("UPDATE attempts SET started_at = now() - interval '40 days', "
               "finished_at = now() - interval '40 days' WHERE item_id = ANY(%s)", (ids[:2],))
    db.execute("UPDATE invoices SET next_attempt_at = now() + interval '1 hour' WHERE id = %s",
               (pending,))
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM attempts WHERE item_id = ANY(%s)",
                               (ids[:2],)) == 0, 10, message=w.log)
    assert db.scalar("SELECT count(*) FROM attempts WHERE item_id = %s", (ids[2],)) == 1
    assert db.scalar("SELECT count(*) FROM attempts WHERE item_id = %s", (pending,)) == 1
    assert w.stop() == 0


def test_status_lists_the_live_workers_from_the_registry(tmp_path, db, redis, fake_api, binary):
    """The registry (workers): each worker writes its row at start and every
    10 s, and deletes it when it exits; status lists id, host, version,
    lock mode and when it was last seen."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.id": "w-reg-1"})
    skip = make_config(tmp_path, db, redis, fake_api, **{"worker.id": "w-reg-2",
                                                        "locks.mode": "skip-locked"})
    migrate(cfg)
    w1, w2 = Worker(cfg, "w1").start(), Worker(skip, "w2").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM workers") == 2, 10, message=w1.log)
    st = run_cli(cfg, "status")
    assert st.returncode == 0, st.stderr
    assert "workers: 2" in st.stdout
    assert '"w-reg-1"  host ' in st.stdout and "  mode redis  seen " in st.stdout
    assert '"w-reg-2"  host ' in st.stdout and "  mode skip-locked  seen " in st.stdout
    doc = json.loads(run_cli(cfg, "status", "--json").stdout)
    assert sorted(w["worker_id"] for w in doc["workers"] if w["live"]) == ["w-reg-1", "w-reg-2"]
    assert all(w["api_refused_since"] is None for w in doc["workers"])
    assert w1.stop() == 0
    assert db.query("SELECT worker_id FROM workers") == [("w-reg-2",)]
    w2.kill()
    db.execute("UPDATE workers SET seen_at = now() - interval '5 minutes'")
    assert '"w-reg-2"' in (out := run_cli(cfg, "status").stdout) and "(stale: it may have died)" in out

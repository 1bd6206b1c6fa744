"""billing-worker pause / resume: stop billing fleet-wide, now, and take it up again.

The pause lives in the database (fleet_pause), so every worker on every
host sees it at its next poll, through its due query: no extra statement
per poll, Redis optional.  Calls in flight finish and are recorded; status,
the metrics and the systemd status line say paused, since when and why.
"""

import re
import time
import urllib.request

from harness import (LOCALHOST, Worker, create_subsidy, free_port, insert_invoices,
                     insert_redemptions, make_config, migrate, run_cli, wait_for)
from test_ops import NotifyListener


def count(db, table, status):
    return db.scalar(f"SELECT count(*) FROM {table} WHERE status = %s", (status,))


def scrape(port):
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_pause_stops_new_calls_fleet_wide_and_resume_takes_them_up(tmp_path, db, redis,
                                                                    fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "metrics.listen": f"{LOCALHOST}:{port}", "worker.poll_interval_ms": 200})
    skip = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": "skip-locked"})
    migrate(cfg)
    fake_api.faults([], latency_ms=800)
    insert_invoices(db, 4)
    notify = NotifyListener()
    w1 = Worker(cfg, "w1", env={"NOTIFY_SOCKET": notify.address}).start()
    w2 = Worker(skip, "w2").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE locked_by IS NOT NULL") == 4,
             10, message=w1.log)
    r = run_cli(cfg, "pause", "--kind", "invoice", "--reason", "card processor incident 42")
    assert r.returncode == 0, r.stderr
    assert "paused invoices (1 changed)" in r.stdout
    # The four in flight finish and are recorded; nothing new is called.
    wait_for(lambda: count(db, "invoices", "paid") == 4, 10, message=w1.log)
    calls = fake_api.state()["total_requests"]
    insert_invoices(db, 10)
    sid = create_subsidy(db, "s", 1000)
    insert_redemptions(db, sid, 3, 100)
    wait_for(lambda: count(db, "redemptions", "redeemed") == 3, 10, message=w1.log)
    time.sleep(1)
    assert count(db, "invoices", "pending") == 10
    assert fake_api.state()["total_requests"] == calls + 3     # the redemptions only
    for w in (w1, w2):
        assert "billing of invoices is paused fleet-wide: card processor incident 42 " \
            "(paused by " in w.log()
    assert 'billing_worker_paused{kind="invoice"} 1' in scrape(port)
    assert 'billing_worker_paused{kind="redemption"} 0' in scrape(port)
    wait_for(lambda: notify.seen("STATUS=paused: invoices: card processor incident 42"), 10,
             message=lambda: notify.messages)
    notify.close()
    st = run_cli(cfg, "status")
    assert re.search(r"^PAUSED: invoices since \S+ \S+ by \S+@\S+: card processor incident 42$",
                     st.stdout, re.M), st.stdout
    js = run_cli(cfg, "status", "--json")
    assert '"reason": "card processor incident 42"' in js.stdout

    t0 = time.monotonic()
    r = run_cli(cfg, "resume")
    assert r.returncode == 0 and "resumed invoices and redemptions (1 changed)" in r.stdout
    wait_for(lambda: count(db, "invoices", "paid") == 14, 15, message=w1.log)
    # The resume notifies: no worker waits for its poll (here 0.2 s, and the calls 0.8 s).
    assert time.monotonic() - t0 < 5
    assert "billing of invoices resumed" in w1.log()
    assert 'billing_worker_paused{kind="invoice"} 0' in scrape(port)
    assert "PAUSED" not in run_cli(cfg, "status").stdout
    assert w1.stop() == 0 and w2.stop() == 0


def test_pause_needs_a_reason_and_a_known_kind(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    r = run_cli(cfg, "pause")
    assert r.returncode == 2 and "pause needs --reason TEXT" in r.stderr
    r = run_cli(cfg, "pause", "--kind", "refund", "--reason", "x")
    assert r.returncode == 2 and '--kind must be "invoice" or "redemption", not "refund"' in r.stderr
    r = run_cli(cfg, "pause", "--reason", "maintenance")
    assert r.returncode == 0 and "paused invoices and redemptions (2 changed)" in r.stdout
    # once has nothing to do while paused, and says so.
    insert_invoices(db, 2)
    r = run_cli(cfg, "once")
    assert r.returncode == 0 and "billing of invoices is paused fleet-wide" in r.stderr
    assert count(db, "invoices", "pending") == 2
    r = run_cli(cfg, "resume", "--kind", "redemption")
    assert r.returncode == 0 and "resumed redemptions (1 changed)" in r.stdout
    r = run_cli(cfg, "resume", "--kind", "redemption")
    assert r.returncode == 0 and "(0 changed)" in r.stdout

"""The fast paths: LISTEN/NOTIFY wake-ups and batched claims and completions."""

import time

from harness import (migrate, Worker, create_subsidy, insert_invoices, make_config, run_cli,
                     wait_for)


def paid(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'")


def test_notify_wakes_a_worker_long_before_its_poll(tmp_path, db, redis, fake_api, binary):
    # Polling once a minute: only the notification can explain a quick pick-up.
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.poll_interval_ms": 60000})
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 10, message=w.log)
    time.sleep(0.3)     # let the first (empty) poll pass
    for round_ in range(3):
        t0 = time.monotonic()
        insert_invoices(db, 5)
        wait_for(lambda: paid(db) == 5 * (round_ + 1), 5, interval=0.01, message=w.log)
        assert time.monotonic() - t0 < 2.0
    assert w.stop() == 0


def test_lost_listen_connection_is_reopened(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.poll_interval_ms": 60000})
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: w.log().count("listening for new items") == 1, 10, message=w.log)
    killed = db.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                       "WHERE application_name = 'billing-worker listen' AND datname = %s",
                       (db.name,))
    assert killed == 1
    wait_for(lambda: "LISTEN connection lost" in w.log(), 10, message=w.log)
    wait_for(lambda: w.log().count("listening for new items") == 2, 10, message=w.log)
    insert_invoices(db, 3)
    wait_for(lambda: paid(db) == 3, 5, message=w.log)
    assert w.stop() == 0


def test_batched_paths_under_contention_record_each_item_once(tmp_path, db, redis, fake_api, binary):
    modes = ["redis", "redis", "skip-locked", "skip-locked", "auto"]
    cfgs = [make_config(tmp_path, db, redis, fake_api,
                        **{"locks.mode": m, "worker.concurrency": 128, "worker.batch_size": 500})
            for m in modes]
    migrate(cfgs[0])
    sid = create_subsidy(db, "big", 10 ** 9)
    workers = [Worker(c, f"w{i}") for i, c in enumerate(cfgs)]
    for w in workers:
        w.start()
    # Items keep arriving while the workers run, in both kinds.
    for _ in range(10):
        insert_invoices(db, 200)
        db.execute("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                   "SELECT %s, 'l' || g, 100 FROM generate_series(1, 100) g", (sid,))
        time.sleep(0.05)
    wait_for(lambda: db.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending') + "
                               "(SELECT count(*) FROM redemptions WHERE status = 'pending')") == 0,
             120, interval=0.2)
    for w in workers:
        assert w.stop() == 0
    state = fake_api.state()
    assert len(state["requests"]) == 3000
    # A key may reach the API more than once only as a repeat of an attempt
    # the workers recorded as unfinished (a call that timed out under load is
    # ambiguous and is sent again under its key).  Every request must be one
    # a worker claimed and recorded: one that was not is a call made by a
    # worker that did not hold the item, which is what this test is about.
    calls = {}
    for kind, item, cls, started, finished in db.query(
            "SELECT kind, item_id, class, extract(epoch FROM started_at)::float8, "
            "extract(epoch FROM finished_at)::float8 FROM attempts "
            "WHERE class <> 'not called' ORDER BY kind, item_id, attempt"):
        calls.setdefault(f"{kind}-{item}", []).append((cls, started, finished))
    for key, n in state["requests"].items():
        recorded = calls.get(key, [])
        assert n <= len(recorded), (key, n, recorded)
        for (cls, _, finished), (_, next_started, _) in zip(recorded, recorded[1:]):
            assert cls in ("ambiguous", "transient", "abandoned"), (key, recorded)
            # One attempt at a time: the next call began after the previous
            # outcome was recorded (10 ms of slack for the two clocks' rounding).
            assert next_started >= finished - 0.01, (key, recorded)
    for iid, charge_id in db.query("SELECT id, charge_id FROM invoices"):
        assert state["applied"][f"invoice-{iid}"]["id"] == charge_id
    for rid, fid in db.query("SELECT id, fulfillment_id FROM redemptions"):
        assert state["applied"][f"redemption-{rid}"]["id"] == fid
    assert db.scalar("SELECT balance_cents FROM subsidies") == 10 ** 9 - 1000 * 100
    r = run_cli(cfgs[0], "audit")
    assert r.returncode == 0, r.stdout

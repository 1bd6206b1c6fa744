"""Signals, reloads, outages of PostgreSQL and Redis, and the command line."""

import re

from harness import migrate, Worker, insert_invoices, make_config, run_cli, wait_for


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def paid(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'")


def in_flight(fake_api):
    s = fake_api.state()
    return s["total_requests"]


def test_sigterm_lets_calls_in_flight_finish(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 5)
    fake_api.faults([], latency_ms=1500)
    w = Worker(cfg, "w").start()
    wait_for(lambda: in_flight(fake_api) == 5, 10)
    assert w.stop(timeout=10) == 0
    assert paid(db) == 5            # finished and recorded before exiting
    assert "stopping" in w.log()
    assert redis.keys("billing-worker:lock:*") == []


def test_shutdown_deadline_abandons_calls_as_ambiguous(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.shutdown_timeout_ms": 300,
                                                        "billing_api.timeout_ms": 10000})
    migrate(cfg)
    insert_invoices(db, 3)
    fake_api.faults([{"match": {}, "action": "delay", "delay_ms": 4000}])
    w = Worker(cfg, "w").start()
    wait_for(lambda: in_flight(fake_api) == 3, 10)
    assert w.stop(timeout=5) == 0
    rows = db.query("SELECT status, ambiguous, attempts, locked_by FROM invoices")
    # Not lost, not failed: pending again, due at once, and never to be given up on.
    assert rows == [("pending", True, 1, None)] * 3
    assert redis.keys("billing-worker:lock:*") == []
    # A second run finishes them through the replay of the same keys.
    fake_api.faults([])
    wait_for(lambda: run_cli(cfg, "once").returncode == 0 and pending(db) == 0, 30)
    assert paid(db) == 3


def test_sighup_reloads_and_keeps_old_config_when_bad(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "starting" in w.log(), 10)
    good = cfg.read_text()

    cfg.write_text(good.replace("concurrency = 16", "concurrency = 3"))
    w.reload()
    wait_for(lambda: "configuration reloaded (concurrency 3" in w.log(), 10, message=w.log)

    cfg.write_text(good.replace("concurrency = 16", "concurrency = 0"))
    w.reload()
    wait_for(lambda: "keeping the running configuration" in w.log(), 10, message=w.log)
    assert re.search(r"worker-\d+\.conf:\d+: \"worker.concurrency\" must be between", w.log())

    cfg.write_text(good.replace("dbname=", "application_name=x dbname="))
    w.reload()
    wait_for(lambda: "need a restart" in w.log(), 10, message=w.log)
    assert "database.conninfo" in w.log()

    # Still working after all that.
    insert_invoices(db, 10)
    wait_for(lambda: paid(db) == 10, 20, message=w.log)
    assert w.stop() == 0


def test_postgres_restart_mid_run_loses_nothing(tmp_path, pg, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 300)
    fake_api.faults([], latency_ms=20)
    w = Worker(cfg, "w").start()
    wait_for(lambda: paid(db) >= 20, 20)
    pg.restart()
    wait_for(lambda: pending(db) == 0, 60, interval=0.2, message=w.log, ignore=(Exception,))
    assert w.stop() == 0
    assert "reachable again" in w.log()
    state = fake_api.state()
    for iid, charge_id in db.query("SELECT id, charge_id FROM invoices"):
        assert state["applied"][f"invoice-{iid}"]["id"] == charge_id


def test_auto_mode_falls_back_to_skip_locked_while_redis_is_down(
        tmp_path, db, redis_server, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": "auto"})
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "connected to redis" in w.log(), 10, message=w.log)
    redis_server.stop()
    try:
        insert_invoices(db, 20)
        wait_for(lambda: paid(db) == 20, 30, message=w.log)
        assert "SKIP LOCKED until it returns" in w.log()
    finally:
        redis_server.start()
    insert_invoices(db, 5)
    wait_for(lambda: "back to redis locks" in w.log(), 30, message=w.log)
    wait_for(lambda: paid(db) == 25, 20, message=w.log)
    assert w.stop() == 0


def test_redis_mode_waits_for_redis(tmp_path, db, redis_server, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": "redis"})
    migrate(cfg)
    redis_server.stop()
    try:
        w = Worker(cfg, "w").start()
        insert_invoices(db, 10)
        wait_for(lambda: "redis unreachable" in w.log(), 10, message=w.log)
        assert paid(db) == 0 and w.alive()
    finally:
        redis_server.start()
    wait_for(lambda: paid(db) == 10, 30, message=w.log)
    assert w.stop() == 0


def test_database_unreachable_at_start_is_retried(tmp_path, pg, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 5)
    pg.stop()
    try:
        w = Worker(cfg, "w").start()
        wait_for(lambda: "retrying in" in w.log(), 15, message=w.log)
        assert w.alive()
    finally:
        pg.start()
    wait_for(lambda: paid(db) == 5, 30, message=w.log, ignore=(Exception,))
    assert w.stop() == 0


def test_check_config_reports_file_and_line(tmp_path, binary):
    bad = tmp_path / "bad.conf"
    bad.write_text('worker = {\n  concurrency = 0;\n  colour = "blue";\n};\n'
                   'locks = { ttl_ms = 1000; renew_interval_ms = 2000; };\n')
    r = run_cli(bad, "check-config")
    assert r.returncode == 2
    assert f"{bad}:2: \"worker.concurrency\" must be between" in r.stderr
    assert f"{bad}:3: unknown setting \"worker.colour\"" in r.stderr
    assert "renew_interval_ms" in r.stderr
    assert "missing required setting \"database.conninfo\"" in r.stderr

    syntax = tmp_path / "syntax.conf"
    syntax.write_text("worker = {\n  concurrency = ;\n};\n")
    r = run_cli(syntax, "check-config")
    assert r.returncode == 2 and f"{syntax}:2:" in r.stderr


def test_check_config_accepts_valid_file(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    assert "configuration is valid" in r.stdout


def test_usage_errors_exit_2(tmp_path, binary):
    assert run_cli(None, "frobnicate").returncode == 2
    assert run_cli(None, "-x").returncode == 2
    r = run_cli(tmp_path / "missing.conf", "check-config")
    assert r.returncode == 2 and "missing.conf:0:" in r.stderr


def test_missing_token_file_is_a_clear_error(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"billing_api.token_file": str(tmp_path / "nope")})
    for cmd in ("check-config", "once"):
        r = run_cli(cfg, cmd)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "billing_api.token_file" in r.stderr and "nope" in r.stderr

"""Checks the test harness itself, not the worker."""

import os
import re
import stat
import subprocess

import pytest

import harness
from harness import (
    create_subsidy, insert_invoices, insert_redemptions, ledger_balance, load_schema,
    make_config, wait_for,
)


def test_postgres_reachable(pg, db):
    assert db.scalar("SELECT 1") == 1
    assert db.scalar("SELECT current_user") == "postgres"
    assert db.scalar("SHOW fsync") == "off"
    assert db.scalar("SHOW max_connections") == "200"
    assert db.scalar("SELECT current_database()") == db.name
    assert f"port={pg.port}" in db.dsn and "host=127.0.0.1" in db.dsn


def test_db_is_fresh(db):
    # Nothing but the system schemas; a table made here is gone for the next test.
    assert db.scalar(
        "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')") == 0
    db.execute("CREATE TABLE leftover (x int)")


def test_db_is_fresh_again(db):
    assert db.scalar("SELECT to_regclass('leftover')") is None


def test_sample_data_helpers(db):
    load_schema(db)
    ids = insert_invoices(db, 5, customer="declined_{i}", amount=lambda i: 100 + i)
    assert len(ids) == 5 and ids == sorted(ids)
    assert db.query("SELECT customer_id, amount_cents, currency, status FROM invoices ORDER BY id")[0] == \
        ("declined_0", 100, "usd", "pending")
    sid = create_subsidy(db, "acme", 10_000)
    assert ledger_balance(db, sid) == 10_000
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 10_000
    rids = insert_redemptions(db, sid, 3, 2500)
    assert db.scalar("SELECT count(*) FROM redemptions WHERE subsidy_id = %s AND status = 'pending'", (sid,)) == 3
    assert len(rids) == 3


def test_db_survives_pg_restart(pg, db):
    pid_before = db.scalar("SELECT pg_backend_pid()")
    pg.restart()
    # The helper connection broke; the next call reconnects.
    assert db.scalar("SELECT 1") == 1
    assert db.scalar("SELECT pg_backend_pid()") != pid_before


def test_redis_ping_and_flush(redis):
    assert redis.ping()
    redis.command("SET", "bw:lock:invoice:1", "w1", "PX", 10_000)
    assert redis.keys("bw:*") == ["bw:lock:invoice:1"]
    assert 0 < redis.pttl("bw:lock:invoice:1") <= 10_000


def test_redis_is_flushed_per_test(redis):
    assert redis.keys() == []


def test_redis_stop_start_same_port(redis):
    port = redis.port
    redis.stop()
    with pytest.raises(OSError):
        harness.redis_command(redis.host, port, "PING", timeout=0.5)
    redis.start()
    assert redis.server.port == port and redis.ping()


def test_wait_for():
    calls = []
    assert wait_for(lambda: calls.append(1) or len(calls) >= 3, timeout=5, interval=0.01) is True
    with pytest.raises(AssertionError, match="timed out after 0.1s: never"):
        wait_for(lambda: False, timeout=0.1, message="never")
    with pytest.raises(AssertionError, match="state 7"):
        wait_for(lambda: False, timeout=0.05, message=lambda: "state 7")


def test_make_config(tmp_path, db, redis):
    cfg = make_config(tmp_path, db, redis, None,
                      **{"locks.mode": "skip-locked", "worker.concurrency": 4,
                         "log.level": None, "redis.password_file": "", "worker.flag": True})
    text = cfg.read_text()
    assert 'mode = "skip-locked";' in text
    assert "concurrency = 4;" in text
    assert "level" not in text
    assert "flag = true;" in text
    assert f'conninfo = "{db.dsn}";' in text
    assert f"port = {redis.port};" in text
    for group in ("worker", "database", "redis", "locks", "billing_api"):
        assert re.search(rf"^{group} = {{$", text, re.M)
    other = make_config(tmp_path, db, redis, None)
    ids = [re.search(r'id = "([^"]+)"', p.read_text()).group(1) for p in (cfg, other)]
    assert ids[0] != ids[1] and cfg != other
    with pytest.raises(ValueError):
        make_config(tmp_path, db, redis, None, nodot=1)


def test_libconfig_syntax_accepted(tmp_path, db, redis):
    # The C library itself must accept what make_config writes.
    if subprocess.run(["sh", "-c", "command -v gcc && pkg-config --exists libconfig"],
                      capture_output=True).returncode != 0:
        pytest.skip("gcc or libconfig-dev missing")
    src = tmp_path / "parse.c"
    src.write_text(
        '#include <libconfig.h>\n#include <stdio.h>\n'
        'int main(int c, char **v) { config_t cf; config_init(&cf); (void)c;\n'
        '  if (!config_read_file(&cf, v[1])) { fprintf(stderr, "%d: %s\\n", config_error_line(&cf),'
        ' config_error_text(&cf)); return 1; }\n'
        '  int n = 0; const char *s = 0; config_lookup_int(&cf, "worker.concurrency", &n);\n'
        '  config_lookup_string(&cf, "database.conninfo", &s); printf("%d %s\\n", n, s); return 0; }\n')
    exe = tmp_path / "parse"
    subprocess.run(f"gcc -o {exe} {src} $(pkg-config --cflags --libs libconfig)", shell=True, check=True)
    cfg = make_config(tmp_path, db, redis, None, **{"database.conninfo": 'a "quoted" \\ value'})
    out = subprocess.run([str(exe), str(cfg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout == '16 a "quoted" \\ value\n'


def test_missing_binary_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "BINARY", tmp_path / "no-such-binary")
    with pytest.raises(pytest.fail.Exception, match="build it first with `make`"):
        harness.Worker(tmp_path / "x.conf", "w").start()
    with pytest.raises(pytest.fail.Exception, match="build it first with `make`"):
        harness.run_cli(tmp_path / "x.conf", "status")


def test_worker_process_control(monkeypatch, tmp_path):
    # A stand-in binary: the Worker plumbing, not the worker.
    fake = tmp_path / "fake-worker"
    fake.write_text('#!/bin/sh\ntrap \'echo bye; exit 0\' TERM\necho "started $*"\n'
                    'while :; do sleep 0.05; done\n')
    fake.chmod(0o755)
    monkeypatch.setattr(harness, "BINARY", fake)
    cfg = tmp_path / "w.conf"
    cfg.write_text("")
    w = harness.Worker(cfg, "w1").start()
    wait_for(lambda: "started -c" in w.log(), timeout=5, message="no output")
    assert w.alive() and f"-c {cfg} run" in w.log()
    w.pause()
    w.resume()
    assert w.stop(timeout=5) == 0
    assert "bye" in w.log() and not w.alive()
    w2 = harness.Worker(cfg, "w2").start()
    assert w2.kill() == -9
    w3 = harness.Worker(cfg, "w3").start()
    wait_for(lambda: "started" in w3.log(), timeout=5, message="no output")
    w3.pause()
    assert w3.stop(timeout=5) == 0  # a paused worker is resumed before SIGTERM
    harness.Worker(cfg, "left-running").start()  # reaped by the autouse fixture
    with pytest.raises(AssertionError, match="did not finish within 0.5s"):
        harness.run_cli(cfg, "status", timeout=0.5)


def test_fake_api(request):
    if not harness.FAKE_API_SCRIPT.exists():
        pytest.skip("tests/fake_api.py does not exist yet")
    api = request.getfixturevalue("fake_api")
    assert api.port and api.url == f"http://127.0.0.1:{api.port}"
    assert stat.S_IMODE(os.stat(api.token_file).st_mode) == 0o600
    assert api.token_file.read_text().strip() == api.token
    state = api.state()
    assert state["total_requests"] == 0 and state["applied"] == {}
    api.faults([{"match": {"key_prefix": "invoice-"}, "action": "status", "status": 503, "times": 1}])
    body = {"invoice_id": 1, "customer": "cus_1", "amount": 100, "currency": "usd"}
    headers = {"Authorization": f"Bearer {api.token}", "Idempotency-Key": "invoice-1"}
    assert api.request("POST", "/v1/charges", body, headers)[0] == 503
    status, _, charge = api.request("POST", "/v1/charges", body, headers)
    assert status == 200 and charge["id"].startswith("ch_")
    state = api.state()
    assert state["applied"]["invoice-1"]["id"] == charge["id"]
    assert state["requests"]["invoice-1"] == 2
    api.reset()
    assert api.state()["total_requests"] == 0


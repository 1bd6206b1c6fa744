"""Operations: metrics, systemd notifications, status --json, JSON logs,
credentials, and reloads under load, against the real servers."""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from harness import (migrate, parse_metrics, LOCALHOST, Worker, free_port, insert_invoices, make_config, run_cli,
                     wait_for)


def count(db, status):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = %s", (status,))


def scrape(port):
    """GET /metrics; returns {series: value}, series as written ('name{labels}')."""
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(resp.read().decode())


def finished(m, outcome):
    return m[f'billing_worker_items_finished_total{{kind="invoice",outcome="{outcome}"}}']


def calls(m, cls):
    return m[f'billing_worker_api_calls_total{{class="{cls}"}}']


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def test_metrics_match_what_the_run_did(tmp_path, db, redis, fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    insert_invoices(db, 45)
    insert_invoices(db, 5, customer="declined_{i}")
    # The first 10 calls get a 503; slow enough that a scrape sees calls in flight.
    fake_api.faults([{"match": {"key_prefix": "invoice-"}, "action": "status",
                      "status": 503, "times": 10}], latency_ms=150)
    w = Worker(cfg, "w").start()

    # Mid-run: calls in flight, and the backlog is what is left to claim.
    during = wait_for(lambda: (lambda m: m if m["billing_worker_in_flight"] > 0 else None)(
        scrape(port)), 20, ignore=(OSError,), message=w.log)
    assert during["billing_worker_in_flight"] <= during["billing_worker_concurrency"] == 16
    assert during["billing_worker_database_up"] == 1

    wait_for(lambda: count(db, "pending") == 0, 60, message=w.log)
    m = wait_for(lambda: (lambda m: m if m["billing_worker_in_flight"] == 0 else None)(
        scrape(port)), 10)
    state = fake_api.state()
    assert state["fired"] == {"0": 10}

    assert finished(m, "paid") == 45 == count(db, "paid")
    assert finished(m, "failed") == 5 == count(db, "failed")
    assert calls(m, "5xx") == 10
    assert calls(m, "2xx") == 45
    assert calls(m, "4xx") == 5
    assert calls(m, "none") == 0
    assert m['billing_worker_retries_scheduled_total{kind="invoice"}'] == 10
    assert m['billing_worker_completions_rejected_total{kind="invoice"}'] == 0
    total_calls = state["total_requests"]
    assert total_calls == 60
    assert m['billing_worker_api_call_duration_seconds_count'] == total_calls
    assert m['billing_worker_api_call_duration_seconds_bucket{le="+Inf"}'] == total_calls
    # Every call took the injected 150 ms at least (the 503s are answered before it).
    assert m['billing_worker_api_call_duration_seconds_bucket{le="0.1"}'] <= 10
    assert m['billing_worker_api_call_duration_seconds_sum'] >= 50 * 0.15
    # One claim per call: the 10 retried items were claimed twice.
    assert m["billing_worker_lock_acquisitions_total"] == total_calls
    assert m['billing_worker_lock_losses_total{lock="lease"}'] == 0
    assert m['billing_worker_reconnects_total{peer="database"}'] == 0
    assert m["billing_worker_redis_up"] == 1
    assert m['billing_worker_lock_mode{mode="redis"}'] == 1
    assert time.time() - 10 < m["billing_worker_last_poll_timestamp_seconds"] <= time.time() + 1
    # The backlog gauges come from the database, at most 5 s old: nothing left.
    m = wait_for(lambda: (lambda m: m if m['billing_worker_backlog{kind="invoice"}'] == 0
                          else None)(scrape(port)), 15)
    assert m['billing_worker_oldest_pending_age_seconds{kind="invoice"}'] == 0

    # Anything but /metrics is a 404.
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{LOCALHOST}:{port}/", timeout=5)
    assert e.value.code == 404
    assert w.stop() == 0
    assert f"serving metrics on http://{LOCALHOST}:{port}/metrics" in w.log()


def stalls_over_50ms(m):
    return (m["billing_worker_loop_stall_seconds_count"] -
            m['billing_worker_loop_stall_seconds_bucket{le="0.05"}'])


def test_a_slow_backlog_query_stalls_nothing(tmp_path, db, redis, fake_api, binary):
    """The backlog gauges cost a query, and with the xmin horizon pinned (a
    long transaction anywhere) its index walks meet every row version since
    the pin: 38 ms after 200 000 items and growing with each one.  Run on
    the worker's own connection, as a statement the loop waited for, each
    refresh (a scrape, every 5 s at most) stalled the loop that long and
    held up the claims and completions queued behind it.  It now runs on
    the LISTEN connection.  Here a million items went through under a pin
    (in SQL: inserted, leased, paid), then invoices flow to a 50 ms API
    while /metrics is scraped: no turn of the loop may take 50 ms."""
    hold = db.connect(autocommit=False)
    hold.cursor().execute("SELECT txid_current()")
    try:
        port = free_port()
        cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
        migrate(cfg)
        db.execute("ALTER TABLE invoices SET (autovacuum_enabled = false)")
        db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
                   "SELECT 'cus_old' || g, 1000, 'usd' FROM generate_series(1, 1000000) g")
        db.execute("UPDATE invoices SET fence = 1, locked_by = 'gone', "
                   "lease_until = now() + interval '1 hour', next_attempt_at = now() + interval '1 hour'")
        db.execute("UPDATE invoices SET status = 'paid', charge_id = 'ch_old', finished_at = now(), "
                   "attempts = 1, lease_until = NULL, locked_by = NULL")
        t0 = time.monotonic()
        db.query("SELECT min(created_at) FROM invoices WHERE status = 'pending'")
        slow_ms = (time.monotonic() - t0) * 1000
        print(f"the oldest pending row, looked up under the pin: {slow_ms:.0f} ms")
        # What makes this test able to fail: the gauge's query is slow here.
        assert slow_ms > 60, slow_ms
        fake_api.faults([], latency_ms=50)
        w = Worker(cfg, "w").start()
        wait_for(lambda: "listening for new items" in w.log(), 20, message=w.log)
        insert_invoices(db, 20000)
        wait_for(lambda: count(db, "paid") >= 1000100, 30, message=w.log)
        m0 = scrape(port)
        for _ in range(24):
            time.sleep(0.5)
            m = scrape(port)
        assert w.stop() == 0
    finally:
        hold.rollback()
        hold.close()
    backlog = 'billing_worker_backlog{kind="invoice"}'
    print(f"stalls over 50 ms: {stalls_over_50ms(m0)} before, {stalls_over_50ms(m)} after; "
          f"longest {m['billing_worker_loop_stall_max_seconds'] * 1000:.0f} ms; "
          f"backlog {m.get(backlog)}")
    # The gauges were refreshed meanwhile (at most 5 s apart), by answers
    # that came in on the other connection, while invoices were paid.
    assert backlog in m
    assert finished(m, "paid") > finished(m0, "paid")
    assert stalls_over_50ms(m) == stalls_over_50ms(m0), (m0, m)


def test_metrics_backlog_and_reconnects(tmp_path, pg, db, redis, fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}",
                                                        "worker.concurrency": 2,
                                                        "worker.batch_size": 2})
    migrate(cfg)
    fake_api.faults([], latency_ms=300)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "serving metrics" in w.log(), 10, message=w.log)
    insert_invoices(db, 40)
    db.execute("UPDATE invoices SET created_at = now() - interval '1 hour'")
    m = wait_for(lambda: (lambda m: m if m.get('billing_worker_backlog{kind="invoice"}', 0) > 0
                          else None)(scrape(port)), 20, message=w.log)
    # Two in flight at a time, so most of them wait, and the oldest is an hour old.
    assert 30 <= m['billing_worker_backlog{kind="invoice"}'] <= 40
    assert m['billing_worker_oldest_pending_age_seconds{kind="invoice"}'] >= 3600
    assert m['billing_worker_backlog{kind="redemption"}'] == 0

    pg.restart()
    wait_for(lambda: scrape(port)['billing_worker_reconnects_total{peer="database"}'] >= 1, 30,
             message=w.log)
    wait_for(lambda: count(db, "pending") == 0, 60, message=w.log, ignore=(Exception,))
    assert scrape(port)["billing_worker_database_up"] == 1
    assert w.stop() == 0


def test_a_frozen_backend_does_not_stall_the_loop(tmp_path, db, redis, fake_api, binary):
    """billing_worker_loop_stall_seconds counts each turn's time outside the
    loop's wait: idle turns are short however long the loop sleeps, and a
    PostgreSQL backend that stops answering makes no turn long either,
    since every statement of the loop is sent and answered on its poll.
    (Before, the poll that met the frozen backend was one turn as long as
    the freeze.)"""
    port = free_port()
    app = f"bw-stall-{os.getpid()}"
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "metrics.listen": f"{LOCALHOST}:{port}",
        "database.conninfo": f"{db.dsn} application_name={app}",
        "worker.poll_interval_ms": 200})
    migrate(cfg)
    insert_invoices(db, 5)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == 5, 20, message=w.log)
    pid = wait_for(lambda: db.scalar("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                     (app,)), 10)
    # Idle for 3 s, polling every 200 ms: many turns, none of them long.
    time.sleep(3)
    idle = wait_for(lambda: scrape(port), 10, ignore=(OSError,))
    assert idle["billing_worker_loop_stall_seconds_count"] >= 10
    assert idle["billing_worker_loop_stall_max_seconds"] < 0.5
    assert idle['billing_worker_loop_stall_seconds_bucket{le="0.5"}'] == \
        idle["billing_worker_loop_stall_seconds_count"]

    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2)
        # Frozen: the loop still turns (the metrics answer from it) and briefly.
        frozen = scrape(port)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert frozen["billing_worker_loop_stall_max_seconds"] < 0.1, frozen
    # Thawed, the statements in flight are answered and the work goes on.
    insert_invoices(db, 5)
    wait_for(lambda: count(db, "paid") == 10, 20, message=w.log)
    m = scrape(port)
    assert m["billing_worker_loop_stall_max_seconds"] < 0.1, m
    assert m['billing_worker_loop_stall_seconds_bucket{le="0.5"}'] == \
        m["billing_worker_loop_stall_seconds_count"]
    assert "did not answer" not in w.log()
    assert w.stop() == 0


def test_metrics_exposition_passes_promtool(tmp_path, db, redis, fake_api, binary):
    """promtool (Prometheus' own linter) accepts the whole exposition."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package)")
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    insert_invoices(db, 3)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == 3, 20, message=w.log)
    text = wait_for(lambda: urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics",
                                                   timeout=5).read(), 10, ignore=(OSError,))
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
    assert w.stop() == 0


def test_metrics_redis_up_and_last_poll(tmp_path, db, redis, fake_api, binary):
    """redis_up follows the connection; the last poll stops while claims fail."""
    port, port_sl = free_port(), free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    cfg_sl = make_config(tmp_path, db, redis, fake_api,
                         **{"metrics.listen": f"{LOCALHOST}:{port_sl}",
                            "locks.mode": "skip-locked"})
    w = Worker(cfg, "w").start()
    start = time.time()
    m = wait_for(lambda: (lambda m: m if m["billing_worker_redis_up"] == 1 and
                          m["billing_worker_last_poll_timestamp_seconds"] >= int(start)
                          else None)(scrape(port)), 20, ignore=(OSError,), message=w.log)
    assert m['billing_worker_lock_mode{mode="redis"}'] == 1

    redis.stop()
    try:
        # Items due and no Redis: in redis mode no round succeeds.
        insert_invoices(db, 3)
        wait_for(lambda: scrape(port)["billing_worker_redis_up"] == 0, 20, message=w.log)
        frozen = scrape(port)["billing_worker_last_poll_timestamp_seconds"]
        time.sleep(2.5)     # an absence: 25 poll intervals with no round recorded
        assert scrape(port)["billing_worker_last_poll_timestamp_seconds"] == frozen
        assert count(db, "pending") == 3
    finally:
        redis.start()
    m = wait_for(lambda: (lambda m: m if m["billing_worker_redis_up"] == 1 and
                          m["billing_worker_last_poll_timestamp_seconds"] > frozen
                          else None)(scrape(port)), 30, message=w.log)
    assert m['billing_worker_reconnects_total{peer="redis"}'] >= 1
    wait_for(lambda: count(db, "paid") == 3, 30, message=w.log)
    assert w.stop() == 0

    # skip-locked never connects to Redis: 0, and the mode says why.
    w = Worker(cfg_sl, "sl").start()
    m = wait_for(lambda: (lambda m: m if m["billing_worker_last_poll_timestamp_seconds"] > 0
                          else None)(scrape(port_sl)), 20, ignore=(OSError,), message=w.log)
    assert m["billing_worker_redis_up"] == 0
    assert m['billing_worker_lock_mode{mode="skip-locked"}'] == 1
    assert 'billing_worker_lock_mode{mode="redis"}' not in m
    assert w.stop() == 0


def test_waiting_for_the_database_at_start(tmp_path, pg, db, redis, fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    insert_invoices(db, 3)
    n = NotifyListener()
    pg.stop()
    try:
        w = Worker(cfg, "w", env={"NOTIFY_SOCKET": n.address}).start()
        # Not ready, says why, and scrapes are answered meanwhile.
        wait_for(lambda: n.seen("STATUS=waiting for the database: "), 15, message=w.log)
        m = wait_for(lambda: scrape(port), 10, ignore=(OSError,), message=w.log)
        assert m["billing_worker_database_up"] == 0
        assert n.seen("READY=1") == []
    finally:
        pg.start()
    try:
        wait_for(lambda: n.seen("READY=1"), 30, message=w.log)
        wait_for(lambda: count(db, "paid") == 3, 30, message=w.log, ignore=(Exception,))
        assert scrape(port)["billing_worker_database_up"] == 1
        assert w.stop() == 0
    finally:
        n.close()


def test_metrics_listen_in_use_fails_the_start(tmp_path, db, redis, fake_api, binary):
    with socket.socket() as taken:
        taken.bind((LOCALHOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = make_config(tmp_path, db, redis, fake_api,
                          **{"metrics.listen": f"{LOCALHOST}:{port}"})
        migrate(cfg)
        w = Worker(cfg, "w").start()
        assert w.wait(15) == 1
    assert re.search(r"metrics endpoint: could not listen on \"127\.0\.0\.1:\d+\"", w.log())


# --------------------------------------------------------------------------
# systemd notifications
# --------------------------------------------------------------------------

class NotifyListener:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self):
        self.name = f"bw-notify-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)       # abstract namespace: no path to clean up
        self.sock.settimeout(0.2)
        self.messages = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def address(self):
        return "@" + self.name

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().splitlines())

    def seen(self, prefix):
        return [m for m in list(self.messages) if m.startswith(prefix)]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_notify_ready_status_watchdog_reload_stopping(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 20)
    fake_api.faults([], latency_ms=500)
    n = NotifyListener()
    try:
        w = Worker(cfg, "w", env={"NOTIFY_SOCKET": n.address, "WATCHDOG_USEC": "400000"}).start()
        wait_for(lambda: n.seen("READY=1"), 15, message=lambda: f"{n.messages}\n{w.log()}")
        # READY comes once the database is reachable and the schema checked.
        assert "connected to the database" in w.log()
        wait_for(lambda: [s for s in n.seen("STATUS=in flight ") if " of 16" in s], 10,
                 message=lambda: n.messages)
        wait_for(lambda: [s for s in n.seen("STATUS=") if "due: " in s], 10,
                 message=lambda: n.messages)
        # Half the watchdog interval is 200 ms: several pings in a second or two.
        wait_for(lambda: len(n.seen("WATCHDOG=1")) >= 4, 10, message=lambda: n.messages)

        before = len(n.messages)
        w.reload()
        wait_for(lambda: "READY=1" in n.messages[before:], 10, message=lambda: n.messages)
        assert "RELOADING=1" in n.messages[before:]
        assert n.messages[before:].index("RELOADING=1") < n.messages[before:].index("READY=1")

        w.signal(signal.SIGTERM)
        assert w.wait(15) == 0
        wait_for(lambda: n.seen("STOPPING=1"), 5, message=lambda: n.messages)
        assert n.seen("STATUS=stopping: ")
        assert count(db, "paid") + count(db, "pending") == 20
    finally:
        n.close()


def test_no_watchdog_pings_without_watchdog_usec(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    n = NotifyListener()
    try:
        w = Worker(cfg, "w", env={"NOTIFY_SOCKET": n.address}).start()
        wait_for(lambda: n.seen("READY=1"), 15, message=w.log)
        time.sleep(1.0)  # a fixed wait on purpose: asserting that nothing arrives
        assert n.seen("WATCHDOG=1") == []
        assert w.stop() == 0
    finally:
        n.close()


# --------------------------------------------------------------------------
# status --json, JSON logs
# --------------------------------------------------------------------------

def test_status_json_matches_the_text_report(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 6)
    insert_invoices(db, 2, customer="declined_{i}")
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    insert_invoices(db, 3)
    db.execute("UPDATE invoices SET locked_by = 'web9:1', lease_until = now() + interval '1 hour',"
               " fence = fence + 1 WHERE id = (SELECT max(id) FROM invoices)")

    r = run_cli(cfg, "status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    kinds = {k["kind"]: k for k in doc["kinds"]}
    assert kinds["invoices"]["pending"] == 3
    assert kinds["invoices"]["in_flight"] == 1
    assert kinds["invoices"]["done"] == 6
    assert kinds["invoices"]["failed"] == 2
    assert kinds["invoices"]["oldest_pending_s"] >= 0
    assert kinds["redemptions"]["pending"] == 0
    assert [(f["kind"], f["holder"]) for f in doc["in_flight"]] == [("invoice", "web9:1")]
    assert 3500 < doc["in_flight"][0]["lease_left_s"] <= 3600
    assert doc["in_flight_truncated"] is False
    assert doc["overdue"] == []

    text = run_cli(cfg, "status")
    assert text.returncode == 0
    row = next(line.split() for line in text.stdout.splitlines() if line.startswith("invoices"))
    assert row[1:6] == ["3", "1", "0", "6", "2"]
    assert f'holder "web9:1"' in text.stdout

    # --json belongs to status alone.
    assert run_cli(cfg, "audit", "--json").returncode == 2
    assert run_cli(cfg, "--json", "status").returncode == 2


def test_json_logs_one_object_per_line(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"log.format": "json"})
    migrate(cfg)
    ids = insert_invoices(db, 3)
    insert_invoices(db, 1, customer="declined_x")
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stderr.splitlines()]
    assert lines and all({"ts", "level", "worker", "msg"} <= set(x) for x in lines)
    paid = [x for x in lines if x.get("kind") == "invoice" and ": paid, id " in x["msg"]]
    assert sorted(x["item"] for x in paid) == ids
    declined = [x for x in lines if "card_declined" in x["msg"]]
    assert len(declined) == 1 and declined[0]["level"] == "warning"
    assert all(x["worker"].startswith("test-worker-") for x in lines)


def test_log_format_switches_on_reload(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "starting" in w.log(), 10, message=w.log)
    cfg.write_text(cfg.read_text().replace('level = "info";', 'level = "info";\n  format = "json";'))
    w.reload()
    wait_for(lambda: '"msg":"configuration reloaded' in w.log(), 10, message=w.log)
    ids = insert_invoices(db, 2)
    wait_for(lambda: count(db, "paid") == 2, 20, message=w.log)
    assert w.stop() == 0
    after = w.log().split('"msg":"configuration reloaded', 1)[1].splitlines()[1:]
    objs = [json.loads(line) for line in after if line.startswith("{")]
    assert sorted(o["item"] for o in objs if ": paid, id " in o["msg"]) == ids


# --------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------

def test_token_from_credentials_directory(tmp_path, db, redis, fake_api, binary):
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    token = creds / "api-token"
    token.write_text(fake_api.token_file.read_text())
    token.chmod(0o400)
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"billing_api.token_file": str(tmp_path / "not-there")})
    migrate(cfg)
    insert_invoices(db, 3)
    r = run_cli(cfg, "once", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    assert 'from the systemd credential "api-token"' in r.stderr
    assert count(db, "paid") == 3
    assert fake_api.token not in r.stderr

    # Without the credential the token file is used, and it is missing.
    token.unlink()
    r = run_cli(cfg, "once", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 2 and "not-there" in r.stderr


# --------------------------------------------------------------------------
# Reload under load
# --------------------------------------------------------------------------

def test_reloads_with_calls_in_flight_drop_nothing(tmp_path, db, redis, fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    good = cfg.read_text()
    ids = insert_invoices(db, 300)
    fake_api.faults([], latency_ms=120)
    w = Worker(cfg, "w").start()
    wait_for(lambda: fake_api.state()["total_requests"] >= 16, 15, message=w.log)

    # Down, up, timeouts and backoff changed, a bad file: every time with calls in flight.
    steps = [("concurrency = 16", "concurrency = 3"),
             ("concurrency = 16", "concurrency = 40"),
             ("timeout_ms = 2000", "timeout_ms = 3000"),
             ("batch_size = 16", "batch_size = 7"),
             ("concurrency = 16", "concurrency = 0")]
    for i, (old, new) in enumerate(steps):
        cfg.write_text(good.replace(old, new))
        wait_for(lambda: scrape(port)["billing_worker_in_flight"] > 0, 10, message=w.log)
        w.reload()
        marker = "keeping the running configuration" if new.endswith("= 0") else \
            "configuration reloaded"
        wait_for(lambda: w.log().count(marker) >= (1 if marker.startswith("keeping") else i + 1),
                 10, message=w.log)
        if new == "concurrency = 3":
            wait_for(lambda: scrape(port)["billing_worker_in_flight"] <= 3, 10, message=w.log)
            assert scrape(port)["billing_worker_concurrency"] == 3
        if new == "concurrency = 40":
            wait_for(lambda: scrape(port)["billing_worker_in_flight"] > 16, 10, message=w.log)

    wait_for(lambda: count(db, "paid") == 300, 90, message=w.log)
    assert w.stop() == 0
    state = fake_api.state()
    # Exactly once: one call per key, and the recorded id is the API's.
    assert all(state["requests"][f"invoice-{i}"] == 1 for i in ids)
    for iid, charge_id, attempts in db.query("SELECT id, charge_id, attempts FROM invoices"):
        assert state["applied"][f"invoice-{iid}"]["id"] == charge_id and attempts == 1
    assert "outcome not recorded" not in w.log()
    assert "abandoned" not in w.log()


def busy_worker_on_a_freezable_server(tmp_path, db, redis, fake_api, latency_ms, items, **over):
    """A worker with 8 calls in flight to an API answering in LATENCY_MS,
    connect_timeout 3 s, metrics on; returns it and its metrics port once
    it listens and bills."""
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "metrics.listen": f"{LOCALHOST}:{port}",
        "database.conninfo": f"{db.dsn} connect_timeout=3",
        "worker.concurrency": 8, "worker.batch_size": 8, "worker.poll_interval_ms": 200,
        **over})
    migrate(cfg)
    fake_api.faults([], latency_ms=latency_ms)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 15, message=w.log)
    insert_invoices(db, items)
    wait_for(lambda: count(db, "paid") >= 16, 30, message=w.log)
    return w, port


@contextlib.contextmanager
def postmaster_frozen_after_ending(pg, db, application_name):
    """Freezes the postmaster (SIGSTOP: new sessions are accepted by the
    kernel and never answered), ends this database's sessions of
    APPLICATION_NAME, and yields a cursor on a session opened before, which
    keeps working; the postmaster runs again on the way out."""
    admin = db.connect()
    postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGSTOP)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = %s AND datname = current_database()",
                        (application_name,))
            yield cur
    finally:
        os.kill(postmaster, signal.SIGCONT)
        admin.close()


def test_a_listen_reconnect_to_a_frozen_server_does_not_stall_the_loop(tmp_path, pg, db, redis,
                                                                       fake_api, binary):
    """The LISTEN connection reconnects without blocking the loop.  With the
    postmaster frozen (the kernel still accepts the TCP connection, but no
    new session is ever answered) its reconnect waits out its connect
    timeout on its own, and the calls in flight are read and recorded
    meanwhile.  A blocking connect stalled the whole loop for
    connect_timeout, every call in flight waiting with it."""
    w, port = busy_worker_on_a_freezable_server(tmp_path, db, redis, fake_api, 50, 1500)
    with postmaster_frozen_after_ending(pg, db, "billing-worker listen") as cur:
        cur.execute("SELECT count(*) FROM invoices WHERE status = 'paid'")
        paid0 = cur.fetchone()[0]
        time.sleep(4.5)
        cur.execute("SELECT count(*) FROM invoices WHERE status = 'paid'")
        paid1 = cur.fetchone()[0]
    m = wait_for(lambda: scrape(port), 10, ignore=(OSError,))
    print(f"paid during the 4.5 s freeze: {paid1 - paid0}; longest loop stall "
          f"{m['billing_worker_loop_stall_max_seconds'] * 1000:.0f} ms")
    assert m["billing_worker_loop_stall_max_seconds"] < 1.0, w.log()
    assert paid1 - paid0 >= 100, w.log()
    wait_for(lambda: count(db, "pending") == 0, 60, message=w.log, ignore=(Exception,))
    wait_for(lambda: w.log().count("listening for new items") >= 2, 20, message=w.log)
    assert w.stop() == 0


def test_a_reconnect_to_a_frozen_server_does_not_stall_the_loop(tmp_path, pg, db, redis,
                                                                fake_api, binary):
    """The main connection reconnects without blocking the loop either.
    With its backend gone and the postmaster frozen, the reconnect waits
    out its connect timeout on its own; the calls in flight are answered,
    read and kept meanwhile, and recorded once the database is back, none
    of them timed out into an ambiguous attempt.  A blocking reconnect
    stalled the loop for connect_timeout (3 s here, measured 3 003 ms),
    during which no answer was read and no slot refilled."""
    w, port = busy_worker_on_a_freezable_server(tmp_path, db, redis, fake_api, 300, 400, **{
        "billing_api.timeout_ms": 2000})
    with postmaster_frozen_after_ending(pg, db, "billing-worker"):
        time.sleep(4.5)
    m = wait_for(lambda: scrape(port), 10, ignore=(OSError,))
    wait_for(lambda: count(db, "pending") == 0, 60, message=w.log, ignore=(Exception,))
    ambiguous = db.scalar("SELECT count(*) FROM attempts WHERE class = 'ambiguous'")
    print(f"longest loop stall {m['billing_worker_loop_stall_max_seconds'] * 1000:.0f} ms; "
          f"ambiguous attempts {ambiguous}")
    assert m["billing_worker_loop_stall_max_seconds"] < 1.0, w.log()
    assert ambiguous == 0, w.log()
    assert "database reachable again" in w.log()
    assert w.stop() == 0

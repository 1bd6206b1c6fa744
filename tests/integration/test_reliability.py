"""Dead peers, lost locks, slow consumers and poison rows.

A server that is SIGSTOPped rather than killed is the nasty case: its
kernel still accepts connections and acknowledges every byte, so neither a
refused connection nor TCP keepalive nor tcp_user_timeout ever tells the
worker anything, and PostgreSQL's statement_timeout cannot fire in a
stopped server.  Only a deadline on the client side ends the wait.
"""

import json
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

from harness import migrate, Worker, free_port, insert_invoices, make_config, run_cli, wait_for


def count(db, status):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = %s", (status,))


def backend_of(db, app):
    return db.scalar("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,))


def worker_with_backend(tmp_path, db, redis, fake_api, query_timeout_ms, n):
    """A worker that paid N invoices, and the pid of its server process."""
    app = f"bw-{os.getpid()}-{query_timeout_ms}"
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "database.conninfo": f"{db.dsn} application_name={app}",
        "database.query_timeout_ms": query_timeout_ms})
    migrate(cfg)
    insert_invoices(db, n)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == n, 20, message=w.log)
    return w, wait_for(lambda: backend_of(db, app), 10)


def test_stopped_postgres_backend_does_not_hang_the_worker(tmp_path, db, redis, fake_api, binary):
    w, pid = worker_with_backend(tmp_path, db, redis, fake_api, 2000, 5)
    # Its server process frozen: the next statement waits on a socket whose
    # peer's kernel acknowledges everything and never answers.
    os.kill(pid, signal.SIGSTOP)
    try:
        insert_invoices(db, 5)
        wait_for(lambda: "did not answer within" in w.log(), 15, message=w.log)
        # A new connection (a new server process) takes the work up again.
        wait_for(lambda: count(db, "paid") == 10, 30, message=w.log)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert w.stop() == 0
    assert "reachable again" in w.log()


def postmaster_pid(pg):
    return int((pg.datadir / "postmaster.pid").read_text().split()[0])


def test_frozen_postgres_server_never_blocks_a_stop(tmp_path, pg, db, redis, fake_api, binary):
    w, backend = worker_with_backend(tmp_path, db, redis, fake_api, 1000, 3)
    frozen = [backend, postmaster_pid(pg)]
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        # Dropped after the deadline, then every reconnect times out too.
        wait_for(lambda: "did not answer within" in w.log(), 10, message=w.log)
        wait_for(lambda: "retrying in" in w.log(), 20, message=w.log)
        t = time.monotonic()
        assert w.stop(timeout=15) == 0
        assert time.monotonic() - t < 15
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


class FreezingProxy:
    """A TCP proxy to PostgreSQL that freezes a connection at a given statement.

    Every byte goes through both ways until the client's bytes on a
    connection contain TRIGGER (a statement's text, as the Parse or Query
    message carries it).  From then on nothing more is forwarded on that
    connection, in either direction, and nothing is closed: to the worker it
    is a server that stopped answering while its kernel still acknowledges
    every byte.  Only the first `times` connections that send the trigger
    are frozen; later ones pass, so a worker that reconnects can go on.
    """

    def __init__(self, target_host, target_port, trigger, times=1):
        self.target = (target_host, target_port)
        self.trigger = trigger
        self.times_left = times
        self.frozen = 0
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.socks = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                continue
            frozen = threading.Event()
            with self.lock:
                self.socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, frozen, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, frozen, False),
                             daemon=True).start()

    def _pump(self, src, dst, frozen, from_client):
        tail = b""
        try:
            while not frozen.is_set():
                data = src.recv(65536)
                if not data or frozen.is_set():
                    break
                if from_client and self.trigger in tail + data:
                    with self.lock:
                        hit = self.times_left > 0
                        if hit:
                            self.times_left -= 1
                            self.frozen += 1
                    if hit:
                        frozen.set()
                        break
                tail = data[-len(self.trigger):]
                dst.sendall(data)
        except OSError:
            return
        if frozen.is_set():
            self.closed.wait()      # open, silent, until the test ends
        else:
            for s in (src, dst):    # a normal end: pass the close on
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def conninfo(self, db, **extra):
        params = {"host": "127.0.0.1", "port": self.port, "dbname": db.name, "user": db.user,
                  **extra}
        return " ".join(f"{k}={v}" for k, v in params.items())

    def close(self):
        self.closed.set()
        self.listener.close()
        with self.lock:
            for s in self.socks:
                s.close()


# The statements' texts, as store/report.c and store/migrate.c send them.
BACKLOG_SQL = b"SELECT 0, (SELECT count(*) FROM (SELECT 1 FROM invoices WHERE status = 'pending'"
SCHEMA_CHECK_SQL = b"SELECT coalesce(max(version), 0) FROM schema_version"


def scrape(port, timeout):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def test_frozen_server_during_the_backlog_query_does_not_stall_the_worker(
        tmp_path, db, redis, fake_api, binary):
    """The backlog query (store/report.c, asked for by a scrape of /metrics
    and by the systemd status line) runs on the LISTEN connection, which
    the proxy also carries, with the main connection's client deadline:
    with the server frozen in the middle of it, the scrape is answered at
    once (with the gauges' last answer), the worker drops that connection
    after database.query_timeout_ms + 1 s, connects it again, and goes on
    paying throughout.  Before the deadline, it was the one statement of
    the loop sent with a plain PQexecParams: the scrape got no answer and
    the worker never paid anything again.  Before it moved, it ran on the
    main connection: the scrape waited out the deadline, and the claims
    with it.
    """
    migrate(make_config(tmp_path, db, redis, fake_api))
    proxy = FreezingProxy(db.host, db.port, BACKLOG_SQL)
    try:
        port = free_port()
        cfg = make_config(tmp_path, db, redis, fake_api, **{
            "database.conninfo": proxy.conninfo(db),
            "database.query_timeout_ms": 1000,
            "metrics.listen": f"127.0.0.1:{port}"})
        w = Worker(cfg, "w").start()
        insert_invoices(db, 3)
        wait_for(lambda: count(db, "paid") == 3, 20, message=w.log)

        wait_for(lambda: "listening for new items" in w.log(), 20, message=w.log)
        t = time.monotonic()
        try:
            scrape(port, timeout=15)
        except (socket.timeout, urllib.error.URLError) as e:
            raise AssertionError(f"the scrape got no answer in 15 s ({e!r}): the worker is "
                                 f"stuck in the backlog query; log:\n{w.log_tail()}") from None
        assert time.monotonic() - t < 1, w.log_tail()
        wait_for(lambda: proxy.frozen == 1, 10, message=w.log)
        # Paying goes on while the backlog query hangs.
        insert_invoices(db, 3)
        wait_for(lambda: count(db, "paid") == 6, 20, message=w.log)
        # Dropped at the deadline (2 s), not at some TCP timeout, and listening again.
        wait_for(lambda: "the database did not answer within 2000 ms" in w.log(), 10,
                 message=w.log)
        wait_for(lambda: w.log().count("listening for new items") >= 2, 20, message=w.log)
        assert w.log().count("connected to the database") == 1   # the main one never dropped
        assert w.stop() == 0
    finally:
        proxy.close()


def test_frozen_server_during_the_schema_check_ends_a_once_run(
        tmp_path, db, redis, fake_api, binary):
    """store_check_schema (store/migrate.c), the first statement of `run`
    and `once`, has the client-side deadline: a server frozen in the middle
    of it ends the run with a clear error after query_timeout_ms + 1 s.
    Before, it was a plain PQexec and `once` hung forever.
    """
    migrate(make_config(tmp_path, db, redis, fake_api))
    insert_invoices(db, 1)
    proxy = FreezingProxy(db.host, db.port, SCHEMA_CHECK_SQL)
    try:
        cfg = make_config(tmp_path, db, redis, fake_api, **{
            "database.conninfo": proxy.conninfo(db),
            "database.query_timeout_ms": 1000})
        t = time.monotonic()
        r = run_cli(cfg, "once", timeout=30)
        took = time.monotonic() - t
        assert proxy.frozen == 1
        assert r.returncode == 1, r.stderr
        assert "the database did not answer within 2000 ms" in r.stderr
        assert "could not read the schema version: " in r.stderr
        # The connection was lost, not the schema: no advice to migrate.
        assert "migrate" not in r.stderr, r.stderr
        assert took < 15, (took, r.stderr)
        assert fake_api.state()["total_requests"] == 0
        assert count(db, "pending") == 1
    finally:
        proxy.close()


def test_frozen_redis_auto_mode_keeps_working(tmp_path, db, redis_server, redis, fake_api, binary):
    cfg_auto = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": "auto", "redis.command_timeout_ms": 500})
    cfg_redis = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": "redis", "redis.command_timeout_ms": 500})
    migrate(cfg_auto)
    a = Worker(cfg_auto, "auto").start()
    r = Worker(cfg_redis, "redis").start()
    wait_for(lambda: "connected to redis" in a.log() and "connected to redis" in r.log(), 10)
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        insert_invoices(db, 20)
        # The auto worker times its Redis command out and claims with SKIP LOCKED.
        wait_for(lambda: count(db, "paid") == 20, 30, message=lambda: a.log() + r.log())
        assert "SKIP LOCKED until it returns" in a.log()
        wait_for(lambda: "redis unreachable" in r.log(), 15, message=r.log)
        t = time.monotonic()
        assert r.stop(timeout=10) == 0          # never stuck on the frozen server
        assert time.monotonic() - t < 10
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    insert_invoices(db, 5)
    wait_for(lambda: "back to redis locks" in a.log(), 30, message=a.log)
    wait_for(lambda: count(db, "paid") == 25, 20, message=a.log)
    assert a.stop() == 0


def test_lost_lease_stops_renewal_and_records_nothing(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.ttl_ms": 2000, "locks.renew_interval_ms": 200, "billing_api.timeout_ms": 5000})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    key = f"invoice-{iid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 2500, "times": 1}])
    w = Worker(cfg, "w").start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) == 1, 10)
    # Another claim takes the item while the call is in flight (what a
    # worker on the far side of a partition would do once the lease ran out).
    db.execute("UPDATE invoices SET fence = fence + 1, locked_by = 'thief', "
               "lease_until = now() + interval '1 hour', next_attempt_at = now() + interval '1 hour'")
    wait_for(lambda: f"invoice {iid}: lease lost to another worker" in w.log(), 5, message=w.log)
    wait_for(lambda: f"invoice {iid}: outcome not recorded" in w.log(), 10, message=w.log)
    # Logged once: a lost lease is not renewed again.
    assert w.log().count(f"invoice {iid}: lease lost") == 1
    # The thief's claim stands untouched; nothing the loser learned was written.
    assert db.query("SELECT status, charge_id, locked_by, attempts FROM invoices") == \
        [("pending", None, "thief", 0)]
    assert redis.keys("billing-worker:lock:*") == []
    assert w.stop() == 0


def test_lost_redis_lock_is_logged_and_the_lease_still_fences(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.ttl_ms": 2000, "locks.renew_interval_ms": 200})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    key = f"invoice-{iid}"
    lock = f"billing-worker:lock:invoice:{iid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 1500, "times": 1}])
    w = Worker(cfg, "w").start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) == 1, 10)
    assert redis.keys(lock) == [lock]
    redis.command("DEL", lock)
    wait_for(lambda: f"invoice {iid}: redis lock lost" in w.log(), 5, message=w.log)
    time.sleep(0.6)                          # three renew intervals: it must not come back
    assert redis.keys(lock) == []
    # The database lease is intact, so the fenced completion is accepted.
    wait_for(lambda: count(db, "paid") == 1, 10, message=w.log)
    assert w.log().count("redis lock lost") == 1
    assert w.stop() == 0


def test_an_item_that_always_times_out_blocks_nothing(tmp_path, db, redis, fake_api, binary):
    # One slot only: the slow item must still let the others through.
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "worker.concurrency": 1, "worker.batch_size": 1, "billing_api.timeout_ms": 800,
        "billing_api.connect_timeout_ms": 300, "billing_api.backoff_max_ms": 1000,
        "locks.ttl_ms": 2000, "locks.renew_interval_ms": 300})
    migrate(cfg)
    [slow] = insert_invoices(db, 1, customer="slow_{i}")
    others = insert_invoices(db, 20)
    fake_api.faults([{"match": {"customer_prefix": "slow"}, "action": "hang", "delay_ms": 5000}],
                    latency_ms=10)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == len(others), 60, interval=0.2, message=w.log)
    # Timed out again and again: pending, marked ambiguous (a timeout after
    # sending may have charged), never failed, and between attempts neither
    # its lease nor its Redis lock is held.
    wait_for(lambda: fake_api.state()["requests"].get(f"invoice-{slow}", 0) >= 3, 30)
    assert db.query("SELECT status, ambiguous FROM invoices WHERE id = %s", (slow,)) == \
        [("pending", True)]
    wait_for(lambda: db.scalar("SELECT locked_by IS NULL FROM invoices WHERE id = %s", (slow,))
             and redis.keys("billing-worker:lock:invoice:*") == [], 10, interval=0.01)
    fake_api.faults([])
    wait_for(lambda: count(db, "paid") == 21, 30, message=w.log)
    assert w.stop() == 0
    assert fake_api.state()["applied"][f"invoice-{slow}"]["id"] == \
        db.scalar("SELECT charge_id FROM invoices WHERE id = %s", (slow,))


POISON = [
    ("", "usd", "customer_id is empty"),
    ("tab\there", "usd", "customer_id is not valid UTF-8 or holds control characters"),
    ("x" * 300, "usd", "customer_id is longer than 255 bytes"),
    ("cus_ok", "dollars", "currency is not a three-letter ISO 4217 code"),
    ("cus_ok", "u$d", "currency is not a three-letter ISO 4217 code"),
]


def test_poison_rows_fail_with_a_reason_and_never_crash_the_worker(tmp_path, db, redis, fake_api,
                                                                    binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.batch_size": 4})
    migrate(cfg)
    good = insert_invoices(db, 6)
    bad = [db.scalar("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "VALUES (%s, 100, %s) RETURNING id", (c, cur)) for c, cur, _ in POISON]
    sid = db.scalar("INSERT INTO subsidies (name) VALUES ('s') RETURNING id")
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, 1000)", (sid,))
    bad_red = db.scalar("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                        "VALUES (%s, 'bell' || chr(7), 100) RETURNING id", (sid,))
    good += insert_invoices(db, 6)
    w = Worker(cfg, "w").start()
    pid = w.pid
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") == 0
             and db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'") == 0,
             30, message=w.log)
    for iid, (_, _, reason) in zip(bad, POISON):
        assert db.query("SELECT status, last_error, attempts FROM invoices WHERE id = %s",
                        (iid,)) == [("failed", reason, 0)]
    assert db.query("SELECT status, last_error, attempts FROM redemptions") == \
        [("failed", "customer_id is not valid UTF-8 or holds control characters", 0)]
    assert count(db, "paid") == len(good)
    state = fake_api.state()
    assert all(f"invoice-{iid}" not in state["requests"] for iid in bad)
    assert f"redemption-{bad_red}" not in state["requests"]
    # Refused funds never held: the subsidy is untouched.
    assert db.scalar("SELECT balance_cents FROM subsidies") == 1000
    # One process, started once, still running, no crash loop.
    assert w.alive() and w.pid == pid and w.log().count("starting (run") == 1
    assert w.stop() == 0
    r = run_cli(cfg, "audit")
    assert r.returncode == 0, r.stdout


def test_a_row_the_database_refuses_to_complete_holds_nothing_back(tmp_path, db, redis, fake_api,
                                                                    binary):
    # A corrupted counter: recording attempts + 1 overflows, so the batch's
    # completion fails on this row every time.  It used to hold back every
    # other outcome of its batch (charged, never recorded) and spin the loop.
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.batch_size": 8})
    migrate(cfg)
    ids = insert_invoices(db, 8)
    poison = ids[3]
    db.execute("UPDATE invoices SET attempts = 2147483647 WHERE id = %s", (poison,))
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == 7, 10, message=w.log)
    key = f"invoice-{poison}"
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 3, 10, message=w.log)
    status, ambiguous, locked_by, err = db.query(
        "SELECT status, ambiguous, locked_by, last_error FROM invoices WHERE id = %s", (poison,))[0]
    # Charged, so never failed: parked pending, ambiguous, with the reason and the charge's id.
    charge = fake_api.state()["applied"][key]["id"]
    assert (status, ambiguous) == ("pending", True)
    assert "integer out of range" in err and charge in err
    assert f"invoice {poison}: could not record the outcome" in w.log()
    # Retried after backoff_max_ms (500 ms here), not in a tight loop.
    lines = len(w.log().splitlines())
    time.sleep(2)
    assert len(w.log().splitlines()) - lines < 15
    assert w.alive()
    assert w.stop() == 0


def test_timeout_on_a_reused_connection_is_ambiguous_not_unsent(tmp_path, db, redis, fake_api,
                                                                 binary):
    # Found by `make chaos` (seed 20261122): an invoice whose call timed out
    # after the API had applied it, on a keep-alive connection reused from an
    # earlier call, was classified "could not reach the billing API" (never
    # sent), so after max_attempts it was marked failed - while charged.
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "worker.concurrency": 1, "worker.batch_size": 1, "billing_api.timeout_ms": 800,
        "billing_api.connect_timeout_ms": 300, "billing_api.max_attempts": 1})
    migrate(cfg)
    [first] = insert_invoices(db, 1)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == 1, 10, message=w.log)      # the connection is open now
    # The fault first: the insert's notification may have the item called at once.
    fake_api.faults([{"match": {"customer_prefix": "slow"}, "action": "timeout_after_effect",
                      "delay_ms": 3000, "times": 1}])
    [second] = insert_invoices(db, 1, customer="slow_{i}")
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (second,)) != "pending",
             20, message=w.log)
    assert w.stop() == 0
    charge = fake_api.state()["applied"][f"invoice-{second}"]["id"]
    assert db.query("SELECT status, charge_id, ambiguous FROM invoices WHERE id = %s",
                    (second,)) == [("paid", charge, True)], w.log()
    assert "may have taken effect" in w.log()


class OneShotApi(threading.Thread):
    """A billing API that answers the first request, reads the second on the
    same keep-alive connection, then dies: closes that connection unanswered
    and stops listening, so libcurl's retry on a new connection is refused.
    Whether the second request was applied is unknown to the client."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests = []

    def _read_request(self, f):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = f.readline()
            if not line:
                return None
            head += line
        n = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
        return head + f.read(n)

    def run(self):
        conn, _ = self.sock.accept()
        f = conn.makefile("rb")
        self.requests.append(self._read_request(f))
        body = json.dumps({"id": "ch_first", "object": "charge"}).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        self.requests.append(self._read_request(f))
        self.sock.close()           # the retry's connect is refused
        conn.close()


def test_request_lost_with_a_reused_connection_then_refused_is_ambiguous(tmp_path, db, redis,
                                                                         binary):
    api = OneShotApi()
    api.start()
    cfg = make_config(tmp_path, db, redis, None, **{
        "billing_api.base_url": f"http://127.0.0.1:{api.port}",
        "worker.concurrency": 1, "worker.batch_size": 1, "billing_api.max_attempts": 1,
        "billing_api.backoff_max_ms": 60000, "billing_api.backoff_initial_ms": 60000})
    migrate(cfg)
    [first] = insert_invoices(db, 1)
    w = Worker(cfg, "w").start()
    wait_for(lambda: count(db, "paid") == 1, 10, message=w.log)
    [second] = insert_invoices(db, 1)
    wait_for(lambda: "invoice %d: " % second in w.log(), 15, message=w.log)
    assert w.stop() == 0
    assert api.requests[1] is not None and b"invoice-%d" % second in api.requests[1]
    # The API read it and may have charged: never failed, retried under the same key.
    assert db.query("SELECT status, ambiguous FROM invoices WHERE id = %s", (second,)) == \
        [("pending", True)], w.log()

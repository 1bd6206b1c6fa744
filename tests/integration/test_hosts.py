"""Workers on separate hosts, one of them cut off mid-run.

Each worker runs in a network namespace of its own, joined by a veth pair
to a "server" namespace that holds PostgreSQL, Redis and the fake API, as
if each were a separate machine.  Addresses exist only on the veth links
this test creates, inside its own namespaces (10.200.<n>.0/30); nothing is
added to the root namespace.  The test process reaches the servers through
PostgreSQL's Unix socket and, for HTTP to the fake API, from a thread that
has joined the server namespace.

Needs root and `ip netns add`; skipped with the reason otherwise.
"""

import ctypes
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import urllib.request

import pytest

import harness
from harness import PgCluster, Worker, make_config, wait_for

CLONE_NEWNET = 0x40000000
TAG = f"{os.getpid() % 100000}"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_or_skip():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to make network namespaces (ip netns add)")
    probe = f"bwprobe{TAG}"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        pytest.skip(f"ip netns add is not permitted here: {r.stderr.strip()}")
    ip("netns", "del", probe, check=False)


def in_netns(ns, fn):
    """Runs fn() in a thread that has joined network namespace NS; returns its result."""
    out = {}

    def body():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join(60)
    if "error" in out:
        raise out["error"]
    return out.get("value")


class NsPg(PgCluster):
    """A private PostgreSQL cluster running inside network namespace NS."""

    host = "*"      # listen_addresses: every address of the server namespace

    def __init__(self, ns):
        super().__init__()
        self.ns = ns

    def _run(self, tool, *args, timeout=120, check=True):
        cmd = [str(self.bindir / tool), *map(str, args)]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        if tool == "pg_ctl":
            cmd = ["ip", "netns", "exec", self.ns, *cmd]
        proc = subprocess.run(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}\n"
                               f"{harness._tail(self.logfile)}")
        return proc

    def _initdb(self):
        super()._initdb()
        with open(self.datadir / "pg_hba.conf", "a") as f:
            f.write("host all all 10.200.0.0/16 trust\n")

    def connect(self, dbname="postgres", autocommit=True, **kwargs):
        import psycopg2
        conn = psycopg2.connect(host=str(self.sockdir), port=self.port, dbname=dbname,
                                user=self.superuser, connect_timeout=10, **kwargs)
        conn.autocommit = autocommit
        return conn


class NsWorker(Worker):
    """A worker process inside network namespace NS (the same pid: ip netns exec execs)."""

    def __init__(self, ns, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ns = ns

    def start(self):
        binary = harness.require_binary()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, str(binary), "-c", str(self.config_path), "run"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=harness.REPO_ROOT, start_new_session=True)
        self._paused = False
        harness._live_workers.append(self)
        harness._test_workers.append(self)
        return self


class Net:
    """A server namespace and N worker namespaces, worker i on link 10.200.i.0/30."""

    def __init__(self, n):
        self.srv = f"bwsrv{TAG}"
        self.hosts = [f"bwh{i}x{TAG}" for i in range(1, n + 1)]
        self.made = []

    def up(self):
        ip("netns", "add", self.srv)
        self.made.append(self.srv)
        ip("-n", self.srv, "link", "set", "lo", "up")
        for i, ns in enumerate(self.hosts, 1):
            ip("netns", "add", ns)
            self.made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", self.srv_if(i), "netns", self.srv, "type", "veth",
               "peer", "name", self.host_if(i), "netns", ns)
            ip("-n", self.srv, "addr", "add", f"10.200.{i}.1/30", "dev", self.srv_if(i))
            ip("-n", ns, "addr", "add", f"10.200.{i}.2/30", "dev", self.host_if(i))
            ip("-n", self.srv, "link", "set", self.srv_if(i), "up")
            ip("-n", ns, "link", "set", self.host_if(i), "up")

    @staticmethod
    def srv_if(i):
        return f"bw{TAG}s{i}"[-15:]

    @staticmethod
    def host_if(i):
        return f"bw{TAG}h{i}"[-15:]

    def cut(self, i):
        ip("-n", self.hosts[i - 1], "link", "set", self.host_if(i), "down")

    def restore(self, i):
        ip("-n", self.hosts[i - 1], "link", "set", self.host_if(i), "up")

    def down(self):
        for ns in reversed(self.made):
            ip("netns", "del", ns, check=False)


def start_in_ns(ns, cmd, workdir, name):
    log = open(workdir / f"{name}.log", "ab")
    try:
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def api_call(net, port, method, path, body=None):
    def go():
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://10.200.1.1:{port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    return in_netns(net.srv, go)


@pytest.fixture
def hosts(tmp_path):
    netns_or_skip()
    net = Net(3)
    procs = []
    pg = None
    try:
        net.up()
        pg = NsPg(net.srv)
        pg.start()
        redis_port, api_port = 6379, 8080
        procs.append(start_in_ns(net.srv, [
            shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(redis_port),
            "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)], tmp_path, "redis"))
        token = secrets.token_hex(16)
        token_file = tmp_path / "api-token"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        ready = tmp_path / "api-ready"
        procs.append(start_in_ns(net.srv, [
            harness.PYTHON, str(harness.FAKE_API_SCRIPT), "--host", "0.0.0.0", "--port",
            str(api_port), "--token-file", str(token_file), "--ready-file", str(ready)],
            tmp_path, "fake-api"))
        wait_for(ready.exists, 15, message="the fake API did not start in its namespace")
        admin = pg.connect()
        db = harness.create_database(pg, admin)
        yield net, pg, db, (redis_port, api_port, token_file)
        harness.reap_workers()
        db.close()
        admin.close()
    finally:
        harness.reap_workers()
        for p in procs:
            p.kill()
            p.wait()
        if pg is not None:
            pg.cleanup()
        net.down()


class _Endpoint:
    """What make_config needs of a redis or fake_api fixture, for one worker's link."""

    def __init__(self, host, port, token_file=None):
        self.host, self.port, self.token_file = host, port, token_file
        self.url = f"http://{host}:{port}"


def test_cut_off_host_loses_its_items_to_the_others_and_recovers(tmp_path, hosts, binary):
    net, pg, db, (redis_port, api_port, token_file) = hosts
    modes = ["redis", "skip-locked", "auto"]
    workers, ids = [], []
    for i, mode in enumerate(modes, 1):
        srv = f"10.200.{i}.1"
        dbx = harness.Database(pg, db.name)
        dbx.dsn = f"host={srv} port={pg.port} dbname={db.name} user=postgres"
        wid = f"host{i}-{mode}"
        cfg = make_config(tmp_path, dbx, _Endpoint(srv, redis_port),
                          _Endpoint(srv, api_port, token_file), **{
                              "worker.id": wid, "locks.mode": mode, "locks.ttl_ms": 3000,
                              "locks.renew_interval_ms": 500, "billing_api.timeout_ms": 2000,
                              "database.query_timeout_ms": 2000, "redis.command_timeout_ms": 500,
                                  # The API sits on a private test link, not loopback.
                                  "billing_api.allow_insecure_http": True})
        if i == 1:
            r = subprocess.run(["ip", "netns", "exec", net.hosts[0], str(binary), "-c", str(cfg),
                                "migrate"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        workers.append(NsWorker(net.hosts[i - 1], cfg, wid))
        ids.append(wid)
    api_call(net, api_port, "POST", "/_control/faults", {"latency_ms": 300, "rules": []})
    harness.insert_invoices(db, 400)
    cut_w = workers[0]
    cut_w.start()
    # Host 1 alone until it holds items with calls in flight, then the others.
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE locked_by = %s", (ids[0],)) >= 10,
             20, message=cut_w.log)
    for w in workers[1:]:
        w.start()
    net.cut(1)
    # Cut off: what it holds now, it can no longer record.
    held = db.query("SELECT id, fence FROM invoices WHERE locked_by = %s AND status = 'pending'",
                    (ids[0],))
    assert held
    # The others take host 1's items once their leases (3 s) run out.
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") == 0,
             60, interval=0.2, message=lambda: workers[1].log_tail() + workers[2].log_tail())
    for iid, fence in held:
        status, new_fence, locked_by = db.query(
            "SELECT status, fence, locked_by FROM invoices WHERE id = %s", (iid,))[0]
        assert status == "paid" and new_fence > fence and locked_by is None, iid
    for w in workers[1:]:
        assert w.stop() == 0
    # Host 1 comes back by itself: its stale outcomes are turned away by the
    # fence, and it takes new work again without a restart.
    net.restore(1)
    wait_for(lambda: "outcome not recorded" in cut_w.log(), 40, message=cut_w.log)
    new = harness.insert_invoices(db, 20)
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") == 0,
             60, interval=0.2, message=cut_w.log)
    assert cut_w.alive()
    assert cut_w.stop() == 0
    # Nothing recorded twice: each invoice is "paid" in exactly one worker's log,
    # and the database holds the API's own charge for each.
    paid_lines = {}
    for w in workers:
        for iid in re.findall(r"invoice (\d+): paid", w.log()):
            paid_lines[int(iid)] = paid_lines.get(int(iid), 0) + 1
    assert all(n == 1 for n in paid_lines.values()), {k: n for k, n in paid_lines.items() if n > 1}
    assert len(paid_lines) == 420
    assert all(f"invoice {iid}: paid" in cut_w.log() for iid in new)
    applied = api_call(net, api_port, "GET", "/_control/state")["applied"]
    for iid, charge in db.query("SELECT id, charge_id FROM invoices"):
        assert applied[f"invoice-{iid}"]["id"] == charge
    assert len(applied) == 420

#!/usr/bin/env python3
"""make bench: billing-worker's throughput, latency and cost, all measured in one run.

Everything runs here, on loopback: a private PostgreSQL with the durable
defaults of a production server (fsync and synchronous_commit on, as in the
anchors of the peer's figures), redis-server, nginx answering a fixed JSON
(the fast billing API), build/delay_api from tests/bench/delay_api.c (the
100 ms API), and tests/bench/timed_api.py (the freeze and row-lock rows' slow
APIs, and the arrival clock for the latency figure). The worker runs with its default
configuration except where a row says otherwise.

Rows:
  e2e P proc       20 000 invoices, P worker processes, fast API: items/s
  no history       the largest e2e run again with history.enabled = false: what
                   the attempts history costs, side by side (target: ≤ 10 %)
  limit P conn     pgbench running the worker's own completion statement on
                   P connections, with the batch size the worker actually used
                   in the e2e run (from pg_stat_statements) and with 1
  slow API         100 ms API, 1 process at concurrency 256: items/s vs 2 560/s,
                   timed from the INSERT's commit, the median of 3 runs
  latency          INSERT of one invoice to its API call, idle system: p50, p99
  cpu              worker CPU seconds per 1 000 items (the 4-process run)
  rss              peak RSS of one process at concurrency 1 024
  idle             queries/s to PostgreSQL and commands/s to Redis per idle process
  pg freeze        1 process, 64 calls in flight to a 50 ms API, its PostgreSQL
                   backend SIGSTOPped for 5 s: the loop's longest stall (scraped
                   from billing_worker_loop_stall_max_seconds), calls that ended
                   with no answer (ambiguous), API calls/s and items recorded/s
                   before, during and after
  redis freeze     the same with redis-server SIGSTOPped for 3 s (redis lock mode)
  row lock         3 processes, 100 ms API, invoices and redemptions over 10
                   subsidies; a producer holds one subsidy row FOR UPDATE for
                   20 s: items not on that subsidy completed/s before and during

The freeze and row-lock rows measure what a statement or Redis command
the loop would wait for costs.  With --baseline BINARY (a build of an
earlier main) the e2e runs alternate with it, and the 100 ms API and the
freeze rows run it too, so every ratio is measured side by side.  It runs
in a database of its own (bench_baseline), on the schema its own migrate
makes: on ours it would pay for the indexes of later schema versions.

With --peer graphile-worker (make bench PEER=graphile-worker) the peer queue
runs beside us in the same run, after the other rows, on the same PostgreSQL
and nginx for the same invoices, alternating with our e2e runs at 1 and 4
processes: scripts/bench_peer.py (it installs the peer with npm outside the
project, in BW_PEER_DIR, default /var/tmp/billing-worker-bench-peer).

Usage: make bench [BENCH_ARGS="--items 20000 --quick --only pg-freeze redis-freeze"]
"""

import argparse
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

import harness  # noqa: E402
import bench_peer  # noqa: E402
from harness import (PgCluster, RedisServer, render_config, wait_for)  # noqa: E402

BINARY = ROOT / "build" / "billing-worker"
SCENARIOS = ("e2e", "slow", "latency", "rss", "idle", "pg-freeze", "redis-freeze", "row-lock",
             "baseline", "size")


class BenchCluster(PgCluster):
    """The harness's cluster with a production server's durability settings."""

    def _initdb(self):
        super()._initdb()
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# bench: durable like production, measured with pg_stat_statements\n"
                    "fsync = on\nsynchronous_commit = on\nfull_page_writes = on\n"
                    "shared_buffers = '256MB'\nmax_connections = 300\n"
                    "shared_preload_libraries = 'pg_stat_statements'\n"
                    "pg_stat_statements.track = all\n")


def start_nginx(workdir):
    port = harness.free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""\
        worker_processes 2;
        pid {workdir}/nginx.pid;
        error_log {workdir}/nginx-error.log warn;
        events {{ worker_connections 4096; }}
        http {{
            access_log off;
            keepalive_requests 10000000;
            keepalive_timeout 300s;
            server {{
                listen 127.0.0.1:{port} backlog=4096;
                location / {{
                    default_type application/json;
                    return 200 '{{"id":"ch_bench","object":"charge"}}';
                }}
            }}
        }}
        """))
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "nginx.out", "w"))
    wait_for(lambda: harness.port_open(port) if hasattr(harness, "port_open") else _port_open(port),
             10, message="nginx did not start")
    return proc, f"http://127.0.0.1:{port}"


def _port_open(port):
    import socket
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_timed_api(workdir, delay_ms=0, arrivals=None):
    args = [harness.PYTHON, str(ROOT / "tests" / "bench" / "timed_api.py"), "--delay-ms", str(delay_ms)]
    if arrivals:
        args += ["--arrivals", str(arrivals)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        raise RuntimeError(f"timed_api did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def start_delay_api(delay_ms):
    """build/delay_api (tests/bench/delay_api.c): the 100 ms API row's API,
    answering each call delay_ms after it arrived, with no queue of its own
    in front of the worker's (see the file)."""
    proc = subprocess.Popen([str(ROOT / "build" / "delay_api"), "--delay-ms", str(delay_ms)],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("READY "):
        raise RuntimeError(f"delay_api did not start: {line!r} (make build/delay_api)")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def stop(proc):
    if proc and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(tempfile.mkdtemp(prefix="bw-bench-"))
        self.pg = BenchCluster()
        self.redis = RedisServer()
        self.token = self.work / "token"
        fd = os.open(self.token, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"bench-token\n")
        os.close(fd)
        self.rows = []
        self.n_config = 0

    # -- plumbing --------------------------------------------------------

    def start(self):
        self.pg.start()
        self.redis.start()
        self.databases = {}
        self._create_database("bench", BINARY)
        # The baseline runs on the schema its own migrate makes, in a
        # database of its own: on ours it paid for indexes it never had
        # (three more index entries an item, from schema versions 9-11),
        # 5-7 % of its speed at 1 process, and the ratio read that much
        # in our favour.
        if getattr(self.args, "baseline", None) is not None:
            self._create_database("bench_baseline", self.args.baseline)
        self.conn, self.dsn, self.dbname = self.databases[BINARY]
        for conn, _, name in self.databases.values():
            with conn.cursor() as cur:
                cur.execute("SELECT max(version) FROM schema_version")
                print(f"  database {name}: schema version {cur.fetchone()[0]}", flush=True)
        # The fast API only for the rows that call it: the others run without nginx.
        if {"e2e", "idle", "baseline"} & set(self.args.only) or self.args.peer:
            self.nginx, self.fast_url = start_nginx(self.work)

    def _create_database(self, name, binary):
        admin = self.pg.connect("postgres")
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        admin.close()
        self.conn = self.pg.connect(name)
        self.dsn = f"host=127.0.0.1 port={self.pg.port} dbname={name} user={self.pg.superuser}"
        self.databases[binary] = (self.conn, self.dsn, name)
        cfg = self.config("http://127.0.0.1:1")
        r = subprocess.run([str(binary), "-c", str(cfg), "migrate"], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{binary} migrate: {r.stderr}")
        self.sql("CREATE EXTENSION pg_stat_statements")

    @contextlib.contextmanager
    def schema_of(self, binary):
        """The rows inside run on BINARY's own database and schema."""
        before = (self.conn, self.dsn, self.dbname)
        self.conn, self.dsn, self.dbname = self.databases[binary or BINARY]
        try:
            yield
        finally:
            self.conn, self.dsn, self.dbname = before

    def close(self):
        stop(getattr(self, "nginx", None))
        self.redis.cleanup()
        self.pg.cleanup()
        if self.args.keep:
            print(f"worker logs and configs kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    def sql(self, q, params=None):
        with self.conn.cursor() as cur:
            cur.execute(q, params)
            return cur.fetchall() if cur.description else None

    def scalar(self, q, params=None):
        return self.sql(q, params)[0][0]

    def config(self, url, **over):
        self.n_config += 1
        groups = {
            "worker": {"id": f"bench-{self.n_config}"},
            "database": {"conninfo": self.dsn},
            "redis": {"host": "127.0.0.1", "port": self.redis.port},
            "locks": {"mode": "redis"},
            "billing_api": {"base_url": url, "token_file": str(self.token)},
            "log": {"level": "warn"},
        }
        for dotted, v in over.items():
            g, _, k = dotted.partition(".")
            groups.setdefault(g, {})[k] = v
        path = self.work / f"w{self.n_config}.conf"
        path.write_text(render_config(groups))
        return path

    def workers(self, n, url, binary=None, **over):
        procs = []
        for _ in range(n):
            cfg = self.config(url, **over)
            log = open(self.work / f"{cfg.stem}.log", "w")
            procs.append(subprocess.Popen([str(binary or BINARY), "-c", str(cfg), "run"],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        # Ready when every worker LISTENs (one 'billing-worker listen' session each).
        wait_for(lambda: self.scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name"
                                     " = 'billing-worker listen' AND datname = %s",
                                     (self.dbname,)) >= n,
                 30, message="workers did not start")
        return procs

    @staticmethod
    def cpu_seconds(procs):
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        return total

    @staticmethod
    def peak_rss_mib(proc):
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop_workers(self, procs):
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            if p.wait(60) != 0:
                raise RuntimeError(f"worker exited {p.returncode}: see {self.work}")

    def reset(self, stats=None):
        """Empty tables for a run.  STATS: None keeps the planner's
        statistics of invoices as the rows before left them (TRUNCATE
        does not clear them); "none" clears them, as on a new install;
        "backlog" makes them those of a table analyzed while it held a
        backlog of pending invoices, as a production table's are.  The
        baseline rows run in both named states, so no row before them
        decides the state they compare the builds in."""
        tables = "invoices, attempts, redemptions, ledger_transactions, subsidies"
        self.sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        if stats == "backlog":
            self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g",
                     (self.args.items,))
            self.sql("ANALYZE invoices")
            self.sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        elif stats == "none":
            self.sql("DELETE FROM pg_statistic WHERE starelid = 'invoices'::regclass")
            self.sql("UPDATE pg_class SET reltuples = -1, relpages = 0 "
                     "WHERE oid = 'invoices'::regclass")
        self.sql("SELECT pg_stat_statements_reset()")
        self.sql("CHECKPOINT")
        self.redis.command("FLUSHALL")

    def wait_drained(self, total, timeout, since=None):
        """Waits until every invoice is paid; returns the run's length by the
        database's own clock (first INSERT to last completion, or from SINCE,
        a timestamp of that clock, to the last completion), so how often
        this polls does not matter (and it polls gently, not to compete)."""
        t0 = time.monotonic()
        while self.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") > 0 or \
                self.scalar("SELECT count(*) FROM invoices") < total:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"not drained after {timeout}s: see {self.work}")
            time.sleep(0.1)
        if since is not None:
            return float(self.scalar("SELECT extract(epoch FROM max(finished_at) - %s) "
                                     "FROM invoices", (since,)))
        return float(self.scalar("SELECT extract(epoch FROM max(finished_at) - min(created_at)) "
                                 "FROM invoices"))

    def cpu_by_component(self):
        """CPU seconds so far of every process of the run, by what it is."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {"postgres": 0.0, "nginx": 0.0, "redis": 0.0}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat.rsplit(")", 1)[1].split()
            secs = (int(fields[11]) + int(fields[12])) / tick
            # A parent keeps the CPU of the children it reaped (cutime,
            # cstime): PostgreSQL backends that exit mid-run still count.
            if comm.startswith(("postgres", "nginx")):
                secs += (int(fields[13]) + int(fields[14])) / tick
            for name in out:
                if comm.startswith(name):
                    out[name] += secs
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out["bench driver"] = ru.ru_utime + ru.ru_stime
        return out

    def completion_batch(self):
        """Mean rows per completion statement of the last run (pg_stat_statements)."""
        calls, rows = self.sql("SELECT coalesce(sum(calls), 0), coalesce(sum(rows), 0) "
                               "FROM pg_stat_statements WHERE query LIKE "
                               "'WITH upd AS (UPDATE invoices AS t SET status%'")[0]
        return (float(rows) / float(calls)) if calls else 0.0

    # -- the measurements ------------------------------------------------

    def e2e(self, nproc, binary=None, stats=None, **overrides):
        with self.schema_of(binary):
            return self._e2e(nproc, binary, stats, **overrides)

    def _e2e(self, nproc, binary, stats, **overrides):
        n = self.args.items
        self.reset(stats)
        procs = self.workers(nproc, self.fast_url, binary=binary, **overrides)
        cpu0 = self.cpu_seconds(procs)
        other0 = self.cpu_by_component()
        self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                 "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g", (n,))
        elapsed = self.wait_drained(n, 600)
        cpu = self.cpu_seconds(procs) - cpu0
        other1 = self.cpu_by_component()
        self.stop_workers(procs)
        batch = self.completion_batch()
        split = {"workers": cpu, **{k: other1[k] - other0[k] for k in other1}}
        return n / elapsed, cpu, batch, split, elapsed

    def pgbench_limit(self, clients, batch):
        """items/s of the worker's completion statement, BATCH rows a statement."""
        b = max(1, int(round(batch)))
        rows = self.args.pgbench_rows if b > 1 else self.args.pgbench_rows // 10
        per_client = max(1, rows // (clients * b))
        self.reset()
        self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                 "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g",
                 (per_client * clients * b,))
        self.sql("VACUUM ANALYZE invoices")
        script = self.work / "complete.sql"
        # The worker's statement (store/complete.c, complete_invoice), fed a
        # fresh range of pending ids per transaction instead of parameters.
        script.write_text(textwrap.dedent("""\
            \\set n :n + 1
            \\set lo ((:client_id * :t) + :n - 1) * :b + 1
            \\set hi :lo + :b - 1
            WITH upd AS (UPDATE invoices AS t SET status = CASE u.state WHEN 'done' THEN 'paid' WHEN 'failed' THEN 'failed' ELSE 'pending' END, charge_id = u.result_id, attempts = t.attempts + u.calls, last_error = u.error, ambiguous = t.ambiguous OR u.ambiguous, next_attempt_at = CASE WHEN u.state = 'retry' THEN now() + u.delay_ms * interval '1 millisecond' ELSE t.next_attempt_at END, locked_by = NULL, lease_until = NULL, updated_at = now(), finished_at = CASE WHEN u.state = 'retry' THEN NULL ELSE now() END FROM unnest(ARRAY(SELECT generate_series(:lo::bigint, :hi::bigint)), array_fill(0::bigint, ARRAY[:b]), array_fill('done'::text, ARRAY[:b]), array_fill(1, ARRAY[:b]), array_fill(false, ARRAY[:b]), array_fill(0::bigint, ARRAY[:b]), array_fill('ch_bench'::text, ARRAY[:b]), array_fill(NULL::text, ARRAY[:b])) AS u(id, fence, state, calls, ambiguous, delay_ms, result_id, error) WHERE t.id = u.id AND t.fence = u.fence AND t.status = 'pending' RETURNING t.id, t.attempts), hist AS (INSERT INTO attempts (kind, item_id, attempt, worker_id, started_at, finished_at, http_status, class, result_id) SELECT 'invoice', id, attempts, 'bench', now(), now(), 200, 'paid', 'ch_bench' FROM upd) SELECT id FROM upd;
            """))
        cmd = [str(self.pg.bindir / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(self.pg.port),
               "-U", self.pg.superuser, "-c", str(clients), "-j", str(clients), "-t", str(per_client),
               "-D", "n=0", "-D", f"t={per_client}", "-D", f"b={b}", "-f", str(script), "bench"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"pgbench failed:\n{r.stdout}\n{r.stderr}")
        tps = next(float(line.split("=")[1].split()[0]) for line in r.stdout.splitlines()
                   if line.startswith("tps ="))
        done = self.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'")
        expected = per_client * clients * b
        if done != expected:
            raise RuntimeError(f"pgbench completed {done} of {expected} rows")
        return tps * b

    def slow_api(self, binary=None):
        with self.schema_of(binary):
            return self._slow_api(binary)

    def _slow_api(self, binary):
        """1 process, concurrency 256, the 100 ms API: items/s timed from the
        INSERT's commit (its rows are invisible before it; the clock is read
        just after, so the figure errs low by that round trip), and from the
        INSERT's start, which adds the producer's own 40-100 ms."""
        n = self.args.slow_items
        self.reset()
        api, url = start_delay_api(100)
        try:
            procs = self.workers(1, url, binary=binary, **{"worker.concurrency": 256})
            self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g", (n,))
            committed = self.scalar("SELECT clock_timestamp()")
            from_commit = n / self.wait_drained(n, 300, since=committed)
            from_start = n / self.wait_drained(n, 10)
            self.stop_workers(procs)
        finally:
            stop(api)
        return from_commit, from_start

    def latency(self):
        self.reset()
        arrivals = self.work / "arrivals.txt"
        api, url = start_timed_api(self.work, arrivals=arrivals)
        inserted = {}
        try:
            procs = self.workers(1, url)
            time.sleep(1.5)                     # past the first poll: idle
            for i in range(self.args.latency_samples):
                t = time.time()
                iid = self.scalar("INSERT INTO invoices (customer_id, amount_cents, currency) "
                                  "VALUES ('cus_lat', 1000, 'usd') RETURNING id")
                inserted[iid] = t
                time.sleep(0.03)
            self.wait_drained(len(inserted), 60)
            self.stop_workers(procs)
        finally:
            stop(api)
        lat = []
        for line in arrivals.read_text().splitlines():
            iid, at = line.split()
            if int(iid) in inserted:
                lat.append((float(at) - inserted[int(iid)]) * 1000)
        lat.sort()
        return statistics.median(lat), lat[int(len(lat) * 0.99) - 1], len(lat)

    def rss(self):
        self.reset()
        api, url = start_timed_api(self.work, delay_ms=1000)
        try:
            procs = self.workers(1, url, **{"worker.concurrency": 1024, "worker.batch_size": 1024})
            n = 3072
            self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g", (n,))
            self.wait_drained(n, 120)
            rss = self.peak_rss_mib(procs[0])
            self.stop_workers(procs)
        finally:
            stop(api)
        return rss

    def idle(self, nproc=4, seconds=10):
        self.reset()
        procs = self.workers(nproc, self.fast_url)
        time.sleep(2)
        q0 = self.scalar("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                         "WHERE query NOT LIKE '%%pg_stat_statements%%'")
        c0 = self.redis_commands()
        time.sleep(seconds)
        q1 = self.scalar("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                         "WHERE query NOT LIKE '%%pg_stat_statements%%'")
        c1 = self.redis_commands()
        self.stop_workers(procs)
        # The INFO of the first reading is counted in the second: take it out.
        return (float(q1 - q0) / nproc / seconds, (c1 - c0 - 1) / nproc / seconds)

    def redis_commands(self):
        info = self.redis.command("INFO", "stats")
        if isinstance(info, bytes):
            info = info.decode()
        for line in info.splitlines():
            if line.startswith("total_commands_processed:"):
                return int(line.split(":")[1])
        raise RuntimeError("no total_commands_processed in INFO")

    @staticmethod
    def scrape(port):
        """The worker's /metrics as {series: value}. A loop stalled on a
        frozen peer answers late: the timeout is generous on purpose."""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            return harness.parse_metrics(r.read().decode())

    def recorded_between(self, t0, t1, held=None):
        """Items whose outcome was recorded in [t0, t1) (unix seconds), by the
        database's finished_at; with HELD, redemptions of that subsidy are
        left out. finished_at is the completion's transaction time, so a
        completion that met a frozen backend counts where it began."""
        n = self.scalar("SELECT count(*) FROM invoices WHERE finished_at >= to_timestamp(%s) "
                        "AND finished_at < to_timestamp(%s)", (t0, t1))
        n += self.scalar("SELECT count(*) FROM redemptions WHERE finished_at >= to_timestamp(%s) "
                         "AND finished_at < to_timestamp(%s) AND subsidy_id IS DISTINCT FROM %s",
                         (t0, t1, held))
        return n

    @staticmethod
    def arrived_between(arrivals, t0, t1):
        """API requests the timed API received in [t0, t1)."""
        n = 0
        for line in arrivals.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and t0 <= float(parts[1]) < t1:
                n += 1
        return n

    def freeze(self, what, seconds, calm=3.0, binary=None):
        with self.schema_of(binary):
            return self._freeze(what, seconds, calm, binary)

    def _freeze(self, what, seconds, calm, binary):
        """One process, 64 calls in flight to a 50 ms API; then WHAT
        ("postgres": the worker's own backend, not its LISTEN one; "redis":
        redis-server) is SIGSTOPped for SECONDS. Returns the figures of the
        CALM seconds before, the freeze, and the CALM seconds after."""
        n = self.args.freeze_items
        self.reset()
        arrivals = self.work / f"arrivals-{what}.txt"
        arrivals.write_text("")
        api, url = start_timed_api(self.work, delay_ms=50, arrivals=arrivals)
        port = harness.free_port()
        procs = []
        try:
            procs = self.workers(1, url, binary=binary,
                                 **{"worker.concurrency": 64, "worker.batch_size": 64,
                                            "locks.mode": "redis",
                                            "billing_api.timeout_ms": self.args.freeze_api_timeout_ms,
                                            "metrics.listen": f"127.0.0.1:{port}"})
            self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g", (n,))
            wait_for(lambda: self.scrape(port)["billing_worker_in_flight"] >= 60, 30,
                     ignore=(OSError,), message="the worker never had 60 calls in flight")
            time.sleep(1)
            if what == "postgres":
                pid = self.scalar("SELECT pid FROM pg_stat_activity WHERE datname = %s "
                                  "AND application_name = 'billing-worker'", (self.dbname,))
            else:
                pid = self.redis.proc.pid
            m0 = self.scrape(port)
            t0 = time.time()
            time.sleep(calm)
            t_stop = time.time()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(seconds)
            finally:
                t_cont = time.time()
                os.kill(pid, signal.SIGCONT)
            time.sleep(calm)
            t1 = time.time()
            m1 = self.scrape(port)
            left = self.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")
            if left == 0:
                raise RuntimeError(f"{what} freeze: the backlog ran out; raise --freeze-items")
            self.stop_workers(procs)
            procs = []
        finally:
            for p in procs:
                p.kill()
                p.wait()
            stop(api)
        windows = {"before": (t0, t_stop), "during": (t_stop, t_cont), "after": (t_cont, t1)}
        items = {k: self.recorded_between(a, b) / (b - a) for k, (a, b) in windows.items()}
        calls = {k: self.arrived_between(arrivals, a, b) / (b - a) for k, (a, b) in windows.items()}
        none = m1['billing_worker_api_calls_total{class="none"}'] - \
            m0['billing_worker_api_calls_total{class="none"}']
        ambiguous = self.scalar("SELECT count(*) FROM attempts WHERE class = 'ambiguous'")
        long_turns = (m1["billing_worker_loop_stall_seconds_count"] -
                      m1['billing_worker_loop_stall_seconds_bucket{le="1"}']) - \
            (m0["billing_worker_loop_stall_seconds_count"] -
             m0['billing_worker_loop_stall_seconds_bucket{le="1"}'])
        return {"max0": m0["billing_worker_loop_stall_max_seconds"],
                "max1": m1["billing_worker_loop_stall_max_seconds"],
                "long_turns": long_turns, "none": none, "ambiguous": ambiguous,
                "items": items, "calls": calls, "seconds": seconds}

    def row_lock(self, hold_s=20.0, before_s=5.0, nsub=10):
        """Three processes, 100 ms API, a backlog of invoices and redemptions
        over NSUB subsidies; a producer's transaction holds subsidy 1's row
        FOR UPDATE for HOLD_S seconds. Items not on subsidy 1 recorded per
        second in the BEFORE_S seconds before the hold and during it."""
        n = self.args.rowlock_items
        held = 1
        self.reset()
        for i in range(nsub):
            sid = self.scalar("INSERT INTO subsidies (name) VALUES (%s) RETURNING id", (f"bench-{i}",))
            self.sql("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, %s)",
                     (sid, 10 ** 12))
        api, url = start_timed_api(self.work, delay_ms=100)
        ports = [harness.free_port() for _ in range(3)]
        procs = []
        try:
            for port in ports:
                procs += self.workers(1, url, **{"metrics.listen": f"127.0.0.1:{port}"})
            # Chunks of both kinds, each its own statement (its own now()):
            # the due query takes them oldest first, so the kinds interleave
            # and redemptions of subsidy 1 turn up in every stretch.
            chunk = 500
            for lo in range(0, n // 2, chunk):
                self.sql("INSERT INTO invoices (customer_id, amount_cents, currency) "
                         "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(%s, %s) g",
                         (lo + 1, lo + chunk))
                self.sql("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                         "SELECT 1 + g %% %s, 'learner-' || g, 100 FROM generate_series(%s, %s) g",
                         (nsub, lo + 1, lo + chunk))
            time.sleep(2)
            t0 = time.time()
            time.sleep(before_s)
            hold = self.pg.connect("bench", autocommit=False)
            try:
                with hold.cursor() as cur:
                    cur.execute("SELECT id FROM subsidies WHERE id = %s FOR UPDATE", (held,))
                t_h0 = time.time()
                time.sleep(hold_s)
                t_h1 = time.time()
                left = self.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending') "
                                   "+ (SELECT count(*) FROM redemptions WHERE status = 'pending' "
                                   "AND subsidy_id <> %s)", (held,))
                hold.commit()
            finally:
                hold.close()
            if left == 0:
                raise RuntimeError("row lock: the backlog ran out during the hold; raise --rowlock-items")
            ms = [self.scrape(p) for p in ports]
            stall = max(m["billing_worker_loop_stall_max_seconds"] for m in ms)
            long_turns = sum(m["billing_worker_loop_stall_seconds_count"] -
                             m['billing_worker_loop_stall_seconds_bucket{le="5"}'] for m in ms)
            held_done = self.scalar("SELECT count(*) FROM redemptions WHERE subsidy_id = %s AND "
                                    "finished_at >= to_timestamp(%s) AND finished_at < to_timestamp(%s)",
                                    (held, t_h0, t_h1))
            self.stop_workers(procs)
            procs = []
        finally:
            for p in procs:
                p.kill()
                p.wait()
            stop(api)
        before = self.recorded_between(t0, t_h0, held) / (t_h0 - t0)
        during = self.recorded_between(t_h0, t_h1, held) / (t_h1 - t_h0)
        return before, during, stall, long_turns, held_done, hold_s

    # -- the report ------------------------------------------------------

    def run(self):
        a = self.args
        only = set(a.only)
        print(f"billing-worker bench: {a.items} invoices per e2e run; machine: "
              f"{os.cpu_count()} cores, {platform.platform()}; scenarios: "
              + ", ".join(x for x in SCENARIOS if x in only), flush=True)
        lines = [
            "",
            "| measurement | figure | ratio | target |",
            "|---|---|---|---|",
        ]
        tail = []
        if "e2e" in only:
            self.run_e2e(lines, tail)
        if "slow" in only:
            # Three runs (alternating with the baseline's), the median: one
            # run is 30 rounds of 100 ms and moves by a point or two.
            ours, theirs = [], []
            for _ in range(3):
                ours.append(self.slow_api())
                if a.baseline is not None:
                    theirs.append(self.slow_api(binary=a.baseline))
            slow, slow_start = statistics.median(r[0] for r in ours), \
                statistics.median(r[1] for r in ours)
            runs = ", ".join(f"{r[0] / 2560:.1%}" for r in ours)
            print(f"  slow API: {slow:,.0f} items/s from the commit ({runs}), "
                  f"{slow_start:,.0f} from the INSERT's start", flush=True)
            lines.append(f"| 100 ms API, 1 process, concurrency 256 (median of 3: {runs}) | "
                         f"{slow:,.0f} items/s from the INSERT's commit ({slow_start:,.0f} from "
                         f"its start) | {slow / 2560:.1%} ({slow_start / 2560:.1%}) of 2 560/s "
                         f"| ≥ 95 % |")
            if theirs:
                slow_b = statistics.median(r[0] for r in theirs)
                print(f"  slow API, baseline: {slow_b:,.0f} items/s", flush=True)
                lines.append(f"| 100 ms API, 1 process, concurrency 256: this build / baseline | "
                             f"{slow:,.0f} / {slow_b:,.0f} items/s | {slow / 2560:.1%} / "
                             f"{slow_b / 2560:.1%} of 2 560/s | |")
        if "latency" in only:
            p50, p99, nlat = self.latency()
            print(f"  latency: p50 {p50:.1f} ms, p99 {p99:.1f} ms ({nlat} samples)", flush=True)
            lines.append(f"| INSERT → API call latency, idle, {nlat} samples | p50 {p50:.1f} ms, "
                         f"p99 {p99:.1f} ms | | p50 < 20 ms |")
        if "e2e" in only:
            lines.append(tail.pop(0))
        if "rss" in only:
            rss = self.rss()
            print(f"  rss: {rss:.1f} MiB", flush=True)
            lines.append(f"| peak RSS, 1 process, concurrency 1 024 | {rss:.1f} MiB | | < 64 MiB |")
        if "idle" in only:
            q_idle, r_idle = self.idle()
            print(f"  idle: {q_idle:.2f} queries/s, {r_idle:.2f} redis commands/s per process",
                  flush=True)
            lines.append(f"| idle cost per process | {q_idle:.2f} queries/s, {r_idle:.2f} Redis "
                         f"commands/s | | ≤ 1 query/s |")
        for name, what, secs in (("pg-freeze", "postgres", 5.0), ("redis-freeze", "redis", 3.0)):
            if name not in only:
                continue
            f = self.freeze(what, secs)
            it, ca = f["items"], f["calls"]
            label = (f"{'PostgreSQL backend' if what == 'postgres' else 'redis-server'} "
                     f"frozen {secs:.0f} s (1 process, 64 in flight, 50 ms API, API timeout "
                     f"{a.freeze_api_timeout_ms / 1000:g} s)")
            print(f"  {name}: longest stall {f['max1']:.2f} s (before: {f['max0'] * 1000:.1f} ms), "
                  f"{f['long_turns']:.0f} turns over 1 s, {f['none']:.0f} calls without an answer, "
                  f"{f['ambiguous']} ambiguous attempts; items/s before {it['before']:,.0f}, during "
                  f"{it['during']:,.0f}, after {it['after']:,.0f}; API calls/s {ca['before']:,.0f} / "
                  f"{ca['during']:,.0f} / {ca['after']:,.0f}", flush=True)
            lines.append(f"| {label}: longest loop stall | {f['max1']:.2f} s "
                         f"({f['long_turns']:.0f} turns over 1 s) | {f['max1'] / secs:.0%} of the "
                         f"freeze (before it: {f['max0'] * 1000:.1f} ms) | |")
            lines.append(f"| {label}: calls ended without an answer | {f['none']:.0f} "
                         f"({f['ambiguous']} attempts recorded ambiguous) | | 0 |")
            lines.append(f"| {label}: items recorded/s before / during / after | "
                         f"{it['before']:,.0f} / {it['during']:,.0f} / {it['after']:,.0f} | during = "
                         f"{it['during'] / it['before']:.0%} of before | |")
            lines.append(f"| {label}: API calls/s before / during / after | "
                         f"{ca['before']:,.0f} / {ca['during']:,.0f} / {ca['after']:,.0f} | during = "
                         f"{ca['during'] / ca['before']:.0%} of before | |")
            if a.baseline is not None:
                fb = self.freeze(what, secs, binary=a.baseline)
                print(f"  {name}, baseline: longest stall {fb['max1']:.2f} s, {fb['none']:.0f} "
                      f"calls without an answer, {fb['ambiguous']} ambiguous attempts", flush=True)
                lines.append(f"| {label}: longest loop stall, calls without an answer, this "
                             f"build / baseline | {f['max1'] * 1000:.0f} ms, {f['none']:.0f} / "
                             f"{fb['max1'] * 1000:.0f} ms, {fb['none']:.0f} | | < 50 ms, 0 |")
        if "row-lock" in only:
            before, during, stall, long_turns, held_done, hold_s = self.row_lock()
            print(f"  row lock: items not on the held subsidy {before:,.0f}/s before, "
                  f"{during:,.0f}/s during the {hold_s:.0f} s hold ({during / before:.0%}); "
                  f"longest stall {stall:.2f} s, {long_turns:.0f} turns over 5 s in the 3 "
                  f"processes; {held_done} of the held subsidy's redemptions recorded during it",
                  flush=True)
            lines.append(f"| one subsidy row held FOR UPDATE {hold_s:.0f} s, 3 processes, 100 ms API: "
                         f"items not on it recorded/s before / during | {before:,.0f} / {during:,.0f} "
                         f"(longest loop stall {stall:.2f} s, {long_turns:.0f} turns over 5 s) | "
                         f"during = {during / before:.0%} of before | ≥ 80 % |")
        if "baseline" in only:
            self.run_baseline(lines)
        if "size" in only:  # cost against table size: scripts/bench_size.py
            import bench_size
            bench_size.run(self, lines)
        if a.peer:
            bench_peer.run(self, a.peer, lines)
        print("\n".join(lines + tail))

    def run_baseline(self, lines):
        """This build against --baseline BINARY (a build of an earlier main),
        side by side in this run: the fast-API e2e at 1 and 4 processes,
        alternating ours, theirs, ours, theirs, so a drift of the machine
        weighs on both alike."""
        base = self.args.baseline
        if base is None:
            lines.append("| baseline comparison | not run: give --baseline BINARY | | |")
            return
        # Both builds in each of two states of the planner's statistics:
        # none (a new install), and those of a table analyzed with a
        # backlog (production).  Until 2026-12-04 these rows ran in
        # whatever state the pgbench rows before them left: there 2886861
        # claimed 34 rows a claim instead of 64, at half its speed, and
        # the rows said 3.11 x.
        for stats in ("none", "backlog"):
            self._baseline_rows(lines, base, stats)

    def _baseline_rows(self, lines, base, stats):
        state = {"none": "no statistics", "backlog": "statistics of a backlog"}[stats]
        for p in (1, 4):
            # Three alternating runs each, the medians: within one run of
            # make bench the same build has moved by 1.4 x between two
            # e2e runs, and a mean of two followed the outlier.
            ours, theirs = [], []
            for _ in range(3):
                ours.append(self.e2e(p, stats=stats))
                theirs.append(self.e2e(p, binary=base, stats=stats))
            rate_o = statistics.median(r[0] for r in ours)
            rate_t = statistics.median(r[0] for r in theirs)
            cpu_o = statistics.median(r[1] for r in ours) / (self.args.items / 1000)
            cpu_t = statistics.median(r[1] for r in theirs) / (self.args.items / 1000)
            runs_o = ", ".join(f"{r[0]:,.0f}" for r in ours)
            runs_t = ", ".join(f"{r[0]:,.0f}" for r in theirs)
            print(f"  baseline, {p} proc, {state}: ours {rate_o:,.0f} items/s ({runs_o}; "
                  f"{cpu_o:.3f} CPU s per 1 000), baseline {rate_t:,.0f} items/s ({runs_t}; "
                  f"{cpu_t:.3f})", flush=True)
            lines.append(f"| e2e, {p} process{'es' if p > 1 else ''}, fast API, {state}: this "
                         f"build / baseline (medians of 3 alternating runs: {runs_o} / {runs_t}) | "
                         f"{rate_o:,.0f} / {rate_t:,.0f} items/s | {rate_o / rate_t:.2f} × | "
                         f"{'≥ 1.5 ×' if p == 1 else '≥ 1 ×'} |")
            lines.append(f"| worker CPU per 1 000 items, {p} process{'es' if p > 1 else ''}, "
                         f"{state}: this build / baseline | {cpu_o:.3f} / {cpu_t:.3f} s | "
                         f"{cpu_o / cpu_t:.2f} × | {'≤ 1 ×' if p == 4 else ''} |")

    def run_e2e(self, lines, tail):
        """The e2e runs, the history comparison and the pgbench limits: rows
        into LINES, then the CPU row and the CPU table into TAIL."""
        a = self.args
        e2e = {}
        for p in a.procs:
            rate, cpu, batch, split, elapsed = self.e2e(p)
            e2e[p] = (rate, cpu, batch, split, elapsed)
            busy = sum(split.values())
            print(f"  e2e {p} proc: {rate:,.0f} items/s in {elapsed:.2f} s (mean completion batch "
                  f"{batch:.1f}); CPU s: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()) +
                  f"; {busy / elapsed:.2f} of {os.cpu_count()} cores busy", flush=True)
        top = max(a.procs)
        # Without history between two runs with it, so a drift of the machine
        # during the three runs weighs on both sides alike.
        nohist = self.e2e(top, **{"history.enabled": False})
        again = self.e2e(top)
        hist_rate = (e2e[top][0] + again[0]) / 2
        print(f"  e2e {top} proc without history: {nohist[0]:,.0f} items/s; with history "
              f"{e2e[top][0]:,.0f} and {again[0]:,.0f}, mean {hist_rate / nohist[0]:.0%} of that",
              flush=True)
        limits = {}
        for p in a.procs:
            lim_b = self.pgbench_limit(p, e2e[p][2])
            lim_1 = self.pgbench_limit(p, 1)
            limits[p] = (lim_b, lim_1)
            print(f"  pgbench {p} conn: {lim_b:,.0f} items/s at batch {e2e[p][2]:.0f}, "
                  f"{lim_1:,.0f} at batch 1", flush=True)
        for p in a.procs:
            rate = e2e[p][0]
            lim_b, lim_1 = limits[p]
            # The peer is measured in this run or not at all (PEER=graphile-worker):
            # a figure from another day on another machine would say nothing.
            lines.append(f"| e2e, {p} process{'es' if p > 1 else ''}, fast API (nginx) | "
                         f"{rate:,.0f} items/s | "
                         f"{'the peer: see its rows' if a.peer else 'peer not run (PEER=graphile-worker)'}"
                         f" | |")
            lines.append(f"| pgbench limit, {p} conn, worker's completion SQL, batch "
                         f"{e2e[p][2]:.0f} (the worker's mean) | {lim_b:,.0f} items/s | "
                         f"worker / limit = {rate / lim_b:.0%} | {'≥ 70 %' if p == top else ''} |")
            lines.append(f"| pgbench limit, {p} conn, same SQL, batch 1 (per-item tx) | "
                         f"{lim_1:,.0f} items/s | worker / limit = {rate / lim_1:.0%} | |")
        lines.append(f"| e2e, {top} processes, history.enabled = false | {nohist[0]:,.0f} items/s | "
                     f"with history (mean of the runs before and after) = {hist_rate / nohist[0]:.0%} "
                     f"of it | ≥ 90 % |")
        cpu_per_k = e2e[top][1] / (a.items / 1000)
        tail.append(f"| worker CPU per 1 000 items ({top} processes) | {cpu_per_k:.3f} s | | |")
        tail += [
            "",
            "CPU seconds during each e2e run, by component (cores busy = total / elapsed):",
            "",
            "| processes | elapsed | " + " | ".join(e2e[top][3]) + " | cores busy |",
            "|---|---|" + "---|" * len(e2e[top][3]) + "---|",
        ]
        for p in a.procs:
            split, elapsed = e2e[p][3], e2e[p][4]
            tail.append(f"| {p} | {elapsed:.2f} s | " + " | ".join(f"{v:.2f}" for v in split.values()) +
                        f" | {sum(split.values()) / elapsed:.2f} of {os.cpu_count()} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=20000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--slow-items", type=int, default=7680)
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--pgbench-rows", type=int, default=200000)
    ap.add_argument("--freeze-items", type=int, default=20000,
                    help="backlog of the freeze rows: enough to keep 64 calls in flight throughout")
    ap.add_argument("--freeze-api-timeout-ms", type=int, default=2000,
                    help="billing_api.timeout_ms of the freeze rows; below the freeze, so a loop "
                         "that does not read answers while it waits times them out")
    ap.add_argument("--rowlock-items", type=int, default=48000,
                    help="backlog of the row-lock row, half invoices, half redemptions")
    ap.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS),
                    metavar="NAME", help="run only these scenarios: " + ", ".join(SCENARIOS))
    ap.add_argument("--keep", action="store_true", help="keep the worker logs and configs")
    ap.add_argument("--baseline", type=Path, metavar="BINARY",
                    help="a build of an earlier main, for the 'baseline' rows: e.g. git worktree "
                         "add /tmp/base REF && make -C /tmp/base, then "
                         "--baseline /tmp/base/build/billing-worker")
    ap.add_argument("--peer", choices=bench_peer.PEERS, help="run this peer queue beside us, "
                    "alternating, and print the ratio measured in this run (scripts/bench_peer.py)")
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the bench itself")
    import bench_size
    bench_size.add_args(ap)
    a = ap.parse_args()
    if a.quick:
        a.items, a.slow_items, a.latency_samples, a.pgbench_rows = 2000, 1024, 30, 20000
        bench_size.quick(a)
    if not BINARY.exists():
        sys.exit("build/billing-worker is missing: run make")
    try:
        if a.peer:
            print(f"peer: {a.peer} {bench_peer.install(a.peer)} in {bench_peer.PEER_DIR}", flush=True)
    except bench_peer.PeerError as e:
        sys.exit(f"--peer {a.peer}: {e}")
    b = Bench(a)
    try:
        b.start()
        b.run()
    finally:
        b.close()


if __name__ == "__main__":
    main()

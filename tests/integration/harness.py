"""Integration-test harness for billing-worker.

Private servers for the whole session (started by conftest.py):

    PgCluster    a throw-away PostgreSQL cluster on a free 127.0.0.1 port
    PgStandby    a hot standby of a PgCluster (pg_basebackup -R), for failover tests
    PgBouncer    a private pgbouncer in front of a PgCluster, session or transaction pooling
    RedisServer  a throw-away redis-server on a free 127.0.0.1 port
    SentinelSet  a master, a replica and three sentinels (quorum 2), for
                 Redis failover tests

Per-test objects (conftest.py fixtures `db`, `redis`, `fake_api`):

    Database     a fresh database in the cluster, with query/execute/scalar
    RedisClient  the session server, flushed, with a tiny RESP client
    FakeApi      tests/fake_api.py on a free port, with faults/state/reset

Helpers for tests:

    make_config(tmp_path, db, redis, fake_api, **{"group.key": value}) -> Path
    Worker(config_path, name)  start/stop/kill/pause/resume/wait/log/alive
    run_cli(config_path, *args, timeout=60) -> subprocess.CompletedProcess
    wait_for(predicate, timeout, interval=0.05, message="...")
    insert_invoices(db, n, ...), create_subsidy(db, name, deposit),
    insert_redemptions(db, subsidy_id, n, amount, ...), load_schema(db)

Nothing here builds the worker: tests that need build/billing-worker fail
with a message saying to run `make` when it is missing.  PostgreSQL refuses
to run as root, so as root the cluster belongs to the `postgres` user and
its tools run through `runuser -u postgres --`.  The cluster's superuser is
`postgres` either way (initdb -U postgres), trust authentication.
"""

import atexit
import glob
import itertools
import json
import os
import pwd
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg2
import psycopg2.extras

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
BINARY = Path(os.environ.get("BW_BINARY", REPO_ROOT / "build" / "billing-worker"))
FAKE_API_SCRIPT = REPO_ROOT / "tests" / "fake_api.py"
SQL_DIR = REPO_ROOT / "sql"
LOCALHOST = "127.0.0.1"


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------

def parse_metrics(text):
    """A Prometheus text exposition as {series: value}, series as written
    ('name{labels}')."""
    series = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def free_port(host=LOCALHOST):
    """A TCP port nothing listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, interval=0.05, message="condition not met", ignore=()):
    """Polls predicate() until it returns something true, and returns that.

    Raises AssertionError("timed out after Ns: <message>") when timeout
    seconds pass first.  message may be a callable, evaluated only then
    (e.g. to show the current state).  Exceptions whose type is in `ignore`
    count as "not yet" (e.g. psycopg2.OperationalError while PostgreSQL
    restarts); the last one is named in the error.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = predicate()
        except ignore as exc:  # noqa: PERF203 - a poll loop
            value, last_exc = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            if last_exc is not None:
                text = f"{text} (last error: {last_exc!r})"
            raise AssertionError(f"timed out after {timeout}s: {text}")
        time.sleep(interval)


def _tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def require_binary():
    """The worker binary's path; fails the test clearly when it is missing."""
    if not BINARY.is_file() or not os.access(BINARY, os.X_OK):
        import pytest

        pytest.fail(
            f"{BINARY} does not exist: build it first with `make` "
            "(the integration tests never build it themselves)",
            pytrace=False,
        )
    return BINARY


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

def find_pg_bindir():
    """The newest /usr/lib/postgresql/*/bin with initdb, else pg_config's, else PATH's."""
    override = os.environ.get("PG_BINDIR")
    if override:
        return Path(override)

    def version(path):
        m = re.search(r"/postgresql/(\d+)(?:\.(\d+))?/bin$", path)
        return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)

    dirs = [d for d in glob.glob("/usr/lib/postgresql/*/bin") if os.path.exists(os.path.join(d, "initdb"))]
    if dirs:
        return Path(max(dirs, key=version))
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        bindir = Path(out.stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    except (OSError, subprocess.CalledProcessError):
        pass
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("no PostgreSQL server binaries found (apt-get install postgresql)")


class PgCluster:
    """A private PostgreSQL cluster in a temp dir, on a free 127.0.0.1 port.

    start() runs initdb the first time.  stop(mode), start(), restart() and
    running() are there for chaos tests; cleanup() stops it (immediate) and
    removes the temp dir.

    settings overrides or adds postgresql.conf lines (values written as
    given, so strings need their quotes).  The defaults trade durability
    for speed (fsync and synchronous_commit off); a crash test that must
    see which commits survive passes e.g. {"fsync": "on"}.
    """

    superuser = "postgres"
    host = LOCALHOST

    def __init__(self, settings=None):
        self.bindir = find_pg_bindir()
        self.overrides = dict(settings or {})
        self.as_postgres = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix="bw-pg-"))
        self.datadir = self.dir / "data"
        self.sockdir = self.dir / "sock"
        self.logfile = self.dir / "postgres.log"
        self.port = None
        self._initialized = False
        self.sockdir.mkdir()
        if self.as_postgres:
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root needs runuser (util-linux) to start PostgreSQL")
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs a `postgres` user (apt-get install postgresql)") from None
            for p in (self.dir, self.sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)

    # -- plumbing --

    def _run(self, tool, *args, timeout=120, check=True):
        cmd = [str(self.bindir / tool), *map(str, args)]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(
            cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(cmd)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}\n"
                f"server log ({self.logfile}), last lines:\n{_tail(self.logfile)}"
            )
        return proc

    def _initdb(self):
        self._run("initdb", "-D", self.datadir, "-U", self.superuser, "--auth=trust",
                  "-E", "UTF8", "--no-locale", "--no-sync")
        settings = {
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.sockdir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
            "include_if_exists": "'port.conf'",
        }
        settings.update(self.overrides)
        conf = "".join(f"{k} = {v}\n" for k, v in settings.items())
        # Append as the cluster's owner: the file belongs to postgres when root.
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# billing-worker integration tests\n" + conf)
        self._initialized = True

    def _write_port(self):
        path = self.datadir / "port.conf"
        path.write_text(f"port = {self.port}\n")
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- public --

    def start(self):
        """Starts the server (initdb first if needed); keeps its port once it has one."""
        if not self._initialized:
            self._initdb()
        if self.running():
            return
        fixed = self.port is not None
        for attempt in range(5):
            if not fixed:
                self.port = free_port()
            self._write_port()
            proc = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", self.datadir,
                             "-l", self.logfile, check=False)
            if proc.returncode == 0:
                return
            # A port taken between free_port() and bind: try another one.
            if fixed or attempt == 4:
                raise RuntimeError(
                    f"pg_ctl start exited {proc.returncode}\n{proc.stdout}{proc.stderr}\n"
                    f"server log, last lines:\n{_tail(self.logfile)}"
                )

    def stop(self, mode="fast"):
        """pg_ctl stop -m MODE (smart | fast | immediate); no-op when not running."""
        if self.running():
            self._run("pg_ctl", "stop", "-w", "-t", "60", "-D", self.datadir, "-m", mode)

    def restart(self, mode="fast"):
        """pg_ctl restart -m MODE, on the same port."""
        self._run("pg_ctl", "restart", "-w", "-t", "60", "-D", self.datadir, "-m", mode,
                  "-l", self.logfile)

    def running(self):
        if not self._initialized:
            return False
        return self._run("pg_ctl", "status", "-D", self.datadir, check=False).returncode == 0

    def conninfo(self, dbname="postgres"):
        return f"host={self.host} port={self.port} dbname={dbname} user={self.superuser}"

    def connect(self, dbname="postgres", autocommit=True, **kwargs):
        conn = psycopg2.connect(host=self.host, port=self.port, dbname=dbname,
                                user=self.superuser, connect_timeout=10, **kwargs)
        conn.autocommit = autocommit
        return conn

    def log(self):
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self):
        try:
            if self._initialized:
                self._run("pg_ctl", "stop", "-w", "-t", "30", "-D", self.datadir,
                          "-m", "immediate", check=False)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PgStandby(PgCluster):
    """A hot standby of PRIMARY (a running PgCluster), for failover tests.

    start() the first time runs `pg_basebackup -R` from the primary instead
    of initdb, so it has the primary's roles, databases and settings; it
    then streams from it as application_name NAME, on its own port and
    socket directory.  It is not a synchronous standby of anything itself
    (synchronous_standby_names = '' here): promoted with no standby of its
    own, it commits alone instead of waiting forever.

    The primary must allow replication: PRIMARY_SETTINGS below, and
    initdb's default pg_hba.conf (replication from 127.0.0.1, trust).
    """

    def __init__(self, primary, name, settings=None):
        super().__init__(settings)
        self.primary = primary
        self.application_name = name

    def _initdb(self):
        p = self.primary
        self._run("pg_basebackup", "-D", self.datadir, "-h", p.host, "-p", p.port,
                  "-U", p.superuser, "-R", "-X", "stream", "-c", "fast", "--no-sync")
        settings = {
            "primary_conninfo": (f"'host={p.host} port={p.port} user={p.superuser} "
                                 f"application_name={self.application_name}'"),
            "unix_socket_directories": f"'{self.sockdir}'",
            "synchronous_standby_names": "''",
        }
        settings.update(self.overrides)
        # postgresql.auto.conf is read last: these win over the copied files.
        with open(self.datadir / "postgresql.auto.conf", "a") as f:
            f.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
        self._initialized = True

    def promote(self):
        """pg_ctl promote -w: returns once it accepts writes."""
        self._run("pg_ctl", "promote", "-w", "-t", "60", "-D", self.datadir)


# A primary a PgStandby can follow synchronously: every commit that asks for
# it (synchronous_commit = on) waits until a standby has flushed it.
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "wal_keep_size": "'64MB'",
    "synchronous_standby_names": "'*'",
    "synchronous_commit": "on",
}


def multi_host_conninfo(clusters, dbname, user=PgCluster.superuser, **extra):
    """One libpq conninfo listing CLUSTERS in order, read-write target by default."""
    params = {
        "host": ",".join(c.host for c in clusters),
        "port": ",".join(str(c.port) for c in clusters),
        "dbname": dbname,
        "user": user,
        "target_session_attrs": "read-write",
        **extra,
    }
    return " ".join(f"{k}={v}" for k, v in params.items())


class PgBouncer:
    """A private pgbouncer (/usr/sbin/pgbouncer) in front of CLUSTER, on a free 127.0.0.1 port.

    pool_mode is "session" or "transaction"; every database of the cluster
    is served (`* = host port`), with default_pool_size server connections
    per database and user, so a handful of workers really share them.
    auth_type trust with an auth_file naming the cluster's superuser and
    the worker role.  As root it runs as `postgres` (it refuses root, as
    PostgreSQL does).  conninfo(dbname) is what a worker config points at;
    connect(dbname) a psycopg2 connection through it.  stop() ends it
    (SIGINT, its safe shutdown) and cleanup() removes its directory.
    """

    host = LOCALHOST
    binary = "/usr/sbin/pgbouncer"

    def __init__(self, cluster, pool_mode, default_pool_size=5):
        if not os.path.exists(self.binary):
            raise RuntimeError(f"{self.binary} is missing (apt-get install pgbouncer)")
        self.cluster = cluster
        self.pool_mode = pool_mode
        self.default_pool_size = default_pool_size
        self.as_postgres = os.geteuid() == 0
        self.dir = Path(tempfile.mkdtemp(prefix=f"bw-pgbouncer-{pool_mode}-"))
        self.logfile = self.dir / "pgbouncer.log"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.port = None
        self.proc = None
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _write(self, name, text):
        path = self.dir / name
        path.write_text(text)
        if self.as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def start(self):
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.port = free_port()
        self._write("userlist.txt", f'"{PgCluster.superuser}" ""\n"billing_worker" ""\n')
        ini = self._write("pgbouncer.ini", "\n".join([
            "[databases]",
            f"* = host={self.cluster.host} port={self.cluster.port}",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'userlist.txt'}",
            f"pool_mode = {self.pool_mode}",
            f"default_pool_size = {self.default_pool_size}",
            "max_client_conn = 200",
            f"admin_users = {PgCluster.superuser}",
            f"logfile = {self.logfile}",
            f"pidfile = {self.pidfile}",
            "ignore_startup_parameters = extra_float_digits",
            "",
        ]))
        cmd = [self.binary, str(ini)]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # In the foreground, in a session of its own: stop() signals it by pid.
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"pgbouncer exited {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                return False
        wait_for(listening, 15, message=self.log)
        return self

    def conninfo(self, dbname, user=None):
        return (f"host={self.host} port={self.port} dbname={dbname} "
                f"user={user or PgCluster.superuser}")

    def connect(self, dbname, autocommit=True):
        conn = psycopg2.connect(host=self.host, port=self.port, dbname=dbname,
                                user=PgCluster.superuser, connect_timeout=10)
        conn.autocommit = autocommit
        return conn

    def log(self):
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self):
        """Ends pgbouncer and waits for it; its pid is the pidfile's (runuser forks)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def cleanup(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class Database:
    """One database in the cluster, for one test.

    dsn is a libpq conninfo string for the worker's config.  query/execute/
    scalar use one autocommit psycopg2 connection, reopened when it broke
    (e.g. after pg.restart()); connect() gives the test a connection of its own.
    """

    def __init__(self, cluster, name):
        self.cluster = cluster
        self.name = name
        self.host = cluster.host
        self.port = cluster.port
        self.user = cluster.superuser
        self.dsn = cluster.conninfo(name)
        self.worker_dsn = None   # set by use_worker_role(): the worker's own conninfo
        self._conn = None
        self._others = []

    def connect(self, autocommit=True, **kwargs):
        conn = self.cluster.connect(self.name, autocommit=autocommit, **kwargs)
        self._others.append(conn)
        return conn

    def _run(self, fn):
        for attempt in (0, 1):
            if self._conn is None or self._conn.closed:
                self._conn = self.cluster.connect(self.name)
            try:
                with self._conn.cursor() as cur:
                    return fn(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                # A connection the server dropped (restart, terminate): retry
                # once on a new one.  Anything else is the test's error.
                if attempt == 1 or not self._conn.closed:
                    raise
        raise AssertionError("unreachable")

    def query(self, sql, params=None):
        """All rows, as a list of tuples."""
        def fn(cur):
            cur.execute(sql, params)
            return cur.fetchall() if cur.description is not None else []
        return self._run(fn)

    def execute(self, sql, params=None):
        """Runs a statement; returns its rowcount."""
        def fn(cur):
            cur.execute(sql, params)
            return cur.rowcount
        return self._run(fn)

    def scalar(self, sql, params=None):
        """The first column of the first row, or None when there is no row."""
        rows = self.query(sql, params)
        return rows[0][0] if rows else None

    def execute_values(self, sql, rows, template=None, fetch=False):
        """psycopg2.extras.execute_values on the helper connection."""
        def fn(cur):
            return psycopg2.extras.execute_values(cur, sql, rows, template=template,
                                                  page_size=1000, fetch=fetch)
        return self._run(fn)

    def close(self):
        for conn in [self._conn, *self._others]:
            if conn is not None and not conn.closed:
                try:
                    conn.close()
                except psycopg2.Error:
                    pass
        self._conn, self._others = None, []


_db_counter = itertools.count(1)


def create_database(cluster, admin):
    name = f"t_{os.getpid()}_{next(_db_counter)}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    return Database(cluster, name)


def drop_database(admin, db):
    db.close()
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


def load_schema(db):
    """Runs sql/NNN_*.sql directly, bypassing `billing-worker migrate`.

    For tests of the harness or of SQL alone; do not mix with `migrate` on the
    same database (the worker would not know the schema is there).
    """
    for path in sorted(SQL_DIR.glob("[0-9]*.sql")):
        db.execute(path.read_text())


# --------------------------------------------------------------------------
# Sample data
# --------------------------------------------------------------------------

def _per_row(value, i):
    return value(i) if callable(value) else value


def insert_invoices(db, n, customer="cus_{i}", amount=1000, currency="usd"):
    """Inserts n pending invoices; returns their ids in insertion order.

    customer is a format string with {i} (0 .. n-1); amount and currency may
    also be callables of i.  E.g. customer="declined_{i}" for refused ones.
    """
    if n <= 0:
        return []
    rows = [(customer.format(i=i), _per_row(amount, i), _per_row(currency, i)) for i in range(n)]
    got = db.execute_values(
        "INSERT INTO invoices (customer_id, amount_cents, currency) VALUES %s RETURNING id",
        rows, fetch=True)
    return [r[0] for r in got]


def create_subsidy(db, name, deposit):
    """Creates a subsidy funded by deposit (cents; an int, a list of ints, or 0/None); returns its id."""
    sid = db.scalar("INSERT INTO subsidies (name) VALUES (%s) RETURNING id", (name,))
    deposits = deposit if isinstance(deposit, (list, tuple)) else ([deposit] if deposit else [])
    for amount in deposits:
        db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, %s)",
                   (sid, amount))
    return sid


def insert_redemptions(db, subsidy_id, n, amount, customer="learner-{i}"):
    """Inserts n pending redemptions of a subsidy; returns their ids in insertion order.

    customer is a format string with {i}; amount may be a callable of i.
    """
    if n <= 0:
        return []
    rows = [(subsidy_id, customer.format(i=i), _per_row(amount, i)) for i in range(n)]
    got = db.execute_values(
        "INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) VALUES %s RETURNING id",
        rows, fetch=True)
    return [r[0] for r in got]


def ledger_balance(db, subsidy_id):
    """SUM of a subsidy's ledger rows (the contract's balance)."""
    return db.scalar("SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_transactions WHERE subsidy_id = %s",
                     (subsidy_id,))


# --------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------

class RedisError(Exception):
    """An error reply (-ERR ...) from redis."""


def _resp_encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def _resp_read(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode(errors="surrogateescape")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_resp_read(f) for _ in range(n)]
    raise ConnectionError(f"unexpected redis reply {line!r}")


def redis_command(host, port, *args, timeout=2.0):
    """Sends one command over a new connection; returns the decoded reply."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(_resp_encode(args))
        with s.makefile("rb") as f:
            return _resp_read(f)


class RedisServer:
    """A private redis-server (no persistence) on a free 127.0.0.1 port.

    stop() kills it (SIGKILL, or SIGTERM with graceful=True); start() brings
    it back on the same port.
    """

    host = LOCALHOST

    def __init__(self):
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.dir = Path(tempfile.mkdtemp(prefix="bw-redis-"))
        self.logfile = self.dir / "redis.log"
        self.port = None
        self.proc = None

    def start(self):
        if self.running():
            return
        fixed = self.port is not None
        for attempt in range(5):
            if not fixed:
                self.port = free_port()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", self.host,
                 "--save", "", "--appendonly", "no", "--dir", str(self.dir),
                 "--logfile", str(self.logfile), "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                cwd=self.dir,
            )
            try:
                wait_for(lambda: self.proc.poll() is not None or self._ping(), 10,
                         message="redis-server did not answer PING")
            except AssertionError:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
            if fixed or attempt == 4:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}; log:\n{_tail(self.logfile)}")

    def _ping(self):
        try:
            return redis_command(self.host, self.port, "PING", timeout=0.5) == "PONG"
        except (OSError, ConnectionError, RedisError):
            return False

    def stop(self, graceful=False):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def command(self, *args):
        return redis_command(self.host, self.port, *args)

    def cleanup(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSet:
    """A Redis master, one replica (replicaof) and three sentinels watching
    it with quorum 2, all on free 127.0.0.1 ports, each redis-server and
    redis-sentinel started with its own config file in one temp dir (a
    sentinel rewrites its file as it learns).  Short timings
    (down-after-milliseconds DOWN_AFTER_MS) make a failover take seconds.

    kill(port) SIGKILLs the server on PORT; master() asks a sentinel where
    the master is now; node(port).command(...) talks to one server.
    """

    host = LOCALHOST
    name = "bw-master"

    def __init__(self, down_after_ms=1000, failover_timeout_ms=3000):
        self.server_binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.sentinel_binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        self.dir = Path(tempfile.mkdtemp(prefix="bw-sentinel-"))
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.procs = {}        # port -> Popen
        self.master_port = self.replica_port = None
        self.sentinel_ports = []

    def _spawn(self, binary, port, lines):
        conf = self.dir / f"{port}.conf"
        conf.write_text("\n".join([f"port {port}", f"bind {self.host}", "daemonize no",
                                   f'dir "{self.dir}"', f'logfile "{self.dir}/{port}.log"']
                                  + lines) + "\n")
        self.procs[port] = subprocess.Popen(
            [binary, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, cwd=self.dir)
        wait_for(lambda: self.procs[port].poll() is not None or self._ping(port), 10,
                 message=f"{binary} on port {port} did not answer PING")
        if self.procs[port].poll() is not None:
            raise RuntimeError(f"{binary} exited {self.procs[port].returncode}; log:\n"
                               f"{_tail(self.dir / f'{port}.log')}")

    def _ping(self, port):
        try:
            return redis_command(self.host, port, "PING", timeout=0.5) == "PONG"
        except (OSError, ConnectionError, RedisError):
            return False

    def start(self):
        data = ['save ""', "appendonly no"]
        self.master_port = free_port()
        self._spawn(self.server_binary, self.master_port, data)
        self.replica_port = free_port()
        self._spawn(self.server_binary, self.replica_port,
                    data + [f"replicaof {self.host} {self.master_port}"])
        for _ in range(3):
            port = free_port()
            self._spawn(self.sentinel_binary, port, [
                f"sentinel monitor {self.name} {self.host} {self.master_port} 2",
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.name} 1"])
            self.sentinel_ports.append(port)
        wait_for(lambda: "master_link_status:up" in self.node(self.replica_port).command(
            "INFO", "replication"), 20, message="the replica never synced")
        # A failover needs every sentinel to know the replica and the others.
        wait_for(self._sentinels_ready, 30, interval=0.2,
                 message="the sentinels never found each other and the replica")
        return self

    def _sentinels_ready(self):
        for port in self.sentinel_ports:
            info = redis_command(self.host, port, "SENTINEL", "MASTER", self.name)
            info = dict(zip(info[::2], info[1::2]))
            if info.get("num-other-sentinels") != "2" or info.get("num-slaves") != "1":
                return False
        return True

    @property
    def sentinels(self):
        """The sentinels as redis.sentinels lists them."""
        return [f"{self.host}:{p}" for p in self.sentinel_ports]

    def master(self):
        """The master's port as the first sentinel that answers names it, or None."""
        for port in self.sentinel_ports:
            try:
                got = redis_command(self.host, port, "SENTINEL", "get-master-addr-by-name",
                                    self.name, timeout=0.5)
                return int(got[1]) if got else None
            except (OSError, ConnectionError, RedisError):
                continue
        return None

    def node(self, port):
        """A client of the server on PORT (the same RESP client as RedisClient)."""
        return _PortClient(self.host, port)

    def kill(self, port):
        proc = self.procs.get(port)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def log(self, port):
        return _tail(self.dir / f"{port}.log", 60)

    def cleanup(self):
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)


class _PortClient:
    def __init__(self, host, port):
        self.host, self.port = host, port

    def command(self, *args, timeout=2.0):
        return redis_command(self.host, self.port, *args, timeout=timeout)


class RedisClient:
    """What the `redis` fixture gives a test: the session server, flushed."""

    def __init__(self, server):
        self.server = server
        self.host = server.host
        self.port = server.port

    def command(self, *args):
        return redis_command(self.host, self.port, *args)

    def ping(self):
        return self.command("PING") == "PONG"

    def flushall(self):
        return self.command("FLUSHALL")

    def keys(self, pattern="*"):
        """Sorted key names matching pattern."""
        return sorted(self.command("KEYS", pattern))

    def get(self, key):
        return self.command("GET", key)

    def pttl(self, key):
        return self.command("PTTL", key)

    # chaos helpers: the session server itself
    def stop(self, graceful=False):
        self.server.stop(graceful=graceful)

    def start(self):
        self.server.start()


# --------------------------------------------------------------------------
# Fake billing API
# --------------------------------------------------------------------------

class FakeApi:
    """tests/fake_api.py, started on a free port with a random token (file mode 0600)."""

    host = LOCALHOST

    def __init__(self, workdir, tls=None, url_host=None, alpn=None):
        """tls: (cert, key, ca) PEM paths to serve HTTPS (see make_test_ca);
        url_host: the host name the worker is given (default 127.0.0.1);
        alpn: protocols the TLS server offers, e.g. ("h2", "http/1.1")."""
        self.workdir = Path(workdir)
        self.tls = tls
        self.alpn = tuple(alpn or ())
        self.url_host = url_host or self.host
        self.token = secrets.token_hex(24)
        self.token_file = self.workdir / "api-token"
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        os.chmod(self.token_file, 0o600)
        self.logfile = self.workdir / "fake-api.log"
        self.port = None
        self.proc = None
        self._drain = None

    @property
    def url(self):
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.url_host}:{self.port}"

    @property
    def _control_url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self, port=None, timeout=15):
        """Starts it (port: None = the previous one if any, else a free one) and waits for READY."""
        if not FAKE_API_SCRIPT.exists():
            raise RuntimeError(f"{FAKE_API_SCRIPT} does not exist yet")
        if port is None:
            port = self.port or 0
        log = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(
                [PYTHON, str(FAKE_API_SCRIPT), "--host", self.host, "--port", str(port),
                 "--token-file", str(self.token_file),
                 *(["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
                   if self.tls else []),
                 *(["--tls-alpn", ",".join(self.alpn)] if self.tls and self.alpn else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd=REPO_ROOT,
            )
        finally:
            log.close()
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"fake API did not print READY within {timeout}s "
                    f"(exit {self.proc.returncode}); stdout {buf!r}; log:\n{_tail(self.logfile)}")
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    continue  # EOF: poll() says why on the next round
                buf += chunk
        line, _, rest = buf.partition(b"\n")
        m = re.fullmatch(rb"READY (\d+)", line.strip())
        if not m:
            self.stop()
            raise RuntimeError(f"fake API printed {line!r}, expected READY <port>")
        self.port = int(m.group(1))
        # Keep reading stdout so that anything else it prints never blocks it.
        self._drain = threading.Thread(target=self._drain_stdout, args=(rest,), daemon=True)
        self._drain.start()
        return self

    def _drain_stdout(self, first):
        with open(self.logfile, "ab") as log:
            if first:
                log.write(first)
            for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
                log.write(chunk)
                log.flush()

    def stop(self, timeout=5):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drain is not None:
            self._drain.join(2)
            self._drain = None
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def request(self, method, path, body=None, headers=None, timeout=10):
        """One HTTP request; returns (status, headers dict, parsed JSON or text)."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self._control_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        context = None
        if self.tls:
            import ssl
            # The test's own control channel: the worker is what verifies.
            context = ssl.create_default_context(cafile=str(self.tls[2]))
            context.check_hostname = False
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
                status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, dict(e.headers), e.read()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode(errors="replace")
        return status, hdrs, payload

    def _control(self, method, path, body=None):
        status, _, payload = self.request(method, path, body)
        if status != 200:
            raise AssertionError(f"fake API {method} {path} answered {status}: {payload!r}")
        return payload

    def faults(self, rules, latency_ms=0):
        """Replaces the fault rules (see docs/internal/fake-api-spec.md)."""
        return self._control("POST", "/_control/faults", {"latency_ms": latency_ms, "rules": list(rules)})

    def state(self):
        return self._control("GET", "/_control/state")

    def arrivals(self):
        """time.time() of each request so far (the first 100 000), in order."""
        return self._control("GET", "/_control/arrivals")

    def reset(self):
        return self._control("POST", "/_control/reset", {})

    def log(self):
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""


def make_test_ca(workdir, name, hostnames=("localhost",)):
    """A throwaway CA and a server certificate it signed, made with openssl.

    Returns (cert, key, ca) PEM paths in workdir/name/; the certificate's
    subjectAltName lists hostnames (DNS names, or IP: entries as "IP:1.2.3.4").
    """
    d = Path(workdir) / name
    d.mkdir(parents=True, exist_ok=True)
    san = ",".join(h if h.startswith("IP:") else f"DNS:{h}" for h in hostnames)
    (d / "ext.cnf").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                               "extendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=60)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", f"/CN=billing-worker test CA {name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
            "-subj", f"/CN={hostnames[0]}")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "server.pem", d / "server.key", d / "ca.pem"


# --------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------

_config_counter = itertools.count(1)

GROUPS = ("worker", "database", "redis", "locks", "billing_api", "log")


def _libconfig_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}L" if not -2**31 <= v < 2**31 else str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (str, Path)):
        s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{s}"'
    if isinstance(v, (list, tuple)):
        return "[ " + ", ".join(_libconfig_value(x) for x in v) + " ]"
    raise TypeError(f"no libconfig syntax for {v!r}")


def render_config(groups):
    out = []
    for group, settings in groups.items():
        out.append(f"{group} = {{")
        for key, value in settings.items():
            out.append(f"  {key} = {_libconfig_value(value)};")
        out.append("};")
    return "\n".join(out) + "\n"


def make_config(tmp_path, db, redis, fake_api, **overrides):
    """Writes a worker config in tmp_path and returns its path.

    db, redis, fake_api are the fixtures' objects.  redis=None points at a
    port nothing listens on; fake_api=None at a closed port with a dummy
    token file.  Overrides are dotted keys, e.g.
        make_config(tmp_path, db, redis, fake_api,
                    **{"locks.mode": "skip-locked", "worker.concurrency": 4})
    A value of None removes the key; unknown keys and groups are added.
    """
    n = next(_config_counter)
    tmp_path = Path(tmp_path)
    if fake_api is not None:
        base_url, token_file = fake_api.url, fake_api.token_file
    else:
        base_url = f"http://{LOCALHOST}:{free_port()}"
        token_file = tmp_path / f"dummy-token-{n}"
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")
    redis_host, redis_port = (redis.host, redis.port) if redis is not None else (LOCALHOST, free_port())

    groups = {
        "worker": {
            "id": f"test-worker-{os.getpid()}-{n}",
            "concurrency": 16,
            "batch_size": 16,
            "poll_interval_ms": 100,
            "shutdown_timeout_ms": 5000,
        },
        "database": {"conninfo": db.worker_dsn or db.dsn},
        "redis": {"host": redis_host, "port": redis_port, "connect_timeout_ms": 500},
        "locks": {"mode": "redis", "ttl_ms": 2000, "renew_interval_ms": 500},
        "billing_api": {
            "base_url": base_url,
            "token_file": str(token_file),
            "timeout_ms": 2000,
            "connect_timeout_ms": 500,
            "max_attempts": 5,
            "backoff_initial_ms": 50,
            "backoff_max_ms": 500,
        },
        "log": {"level": "info"},
    }
    for dotted, value in overrides.items():
        group, sep, key = dotted.partition(".")
        if not sep or not key:
            raise ValueError(f"override {dotted!r} is not GROUP.KEY")
        settings = groups.setdefault(group, {})
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value

    path = tmp_path / f"worker-{n}.conf"
    path.write_text(render_config(groups))
    if db.worker_dsn and groups["database"].get("conninfo") == db.worker_dsn:
        # The twin that `migrate` runs with, as a deploy would: the owner's.
        groups["database"]["conninfo"] = db.dsn
        twin = tmp_path / f"worker-{n}-owner.conf"
        twin.write_text(render_config(groups))
        _owner_configs[str(path)] = (twin, db)
    return path


# --------------------------------------------------------------------------
# The worker process
# --------------------------------------------------------------------------

_live_workers = []     # every Worker started and not yet reaped
_test_workers = []     # the Workers started by the current test (for failure reports)


class Worker:
    """build/billing-worker -c CONFIG run, its output in <config's dir>/<name>.log."""

    def __init__(self, config_path, name="worker", args=("run",), env=None, log_dir=None):
        self.config_path = Path(config_path)
        self.name = name
        self.args = tuple(args)
        self.env = None if env is None else {**os.environ, **env}
        log_dir = Path(log_dir) if log_dir is not None else self.config_path.parent
        self.log_path = log_dir / f"{name}.log"
        self.proc = None
        self._paused = False

    def __repr__(self):
        state = "not started" if self.proc is None else (
            f"pid {self.proc.pid}" if self.alive() else f"exited {self.proc.returncode}")
        return f"<Worker {self.name} {state}>"

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def returncode(self):
        return self.proc.poll() if self.proc else None

    def start(self):
        binary = require_binary()
        if self.alive():
            raise AssertionError(f"{self} is already running")
        with open(self.log_path, "ab") as log:
            log.write(f"==== {time.strftime('%H:%M:%S')} start {' '.join(self.args)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, cwd=REPO_ROOT, start_new_session=True,
            )
        self._paused = False
        _live_workers.append(self)
        _test_workers.append(self)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def pause(self):
        """SIGSTOP: frozen mid-flight, leases and locks keep ticking."""
        self.signal(signal.SIGSTOP)
        self._paused = True

    def resume(self):
        self.signal(signal.SIGCONT)
        self._paused = False

    def reload(self):
        self.signal(signal.SIGHUP)

    def wait(self, timeout):
        """Waits for it to exit by itself; returns the exit code (negative: killed by that signal)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout}s; log tail:\n{self.log_tail()}") from None

    def stop(self, timeout=10):
        """SIGTERM (graceful stop), then waits; returns the exit code.

        Fails the test (after a SIGKILL) when it has not exited in time.
        """
        if self.proc is None:
            raise AssertionError(f"{self.name} was never started")
        if not self.alive():
            return self.proc.returncode
        if self._paused:
            self.resume()
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s of SIGTERM (killed); log tail:\n"
                f"{self.log_tail()}") from None

    def kill(self):
        """SIGKILL, as a crash; returns the exit code (-9)."""
        if self.proc is None:
            return None
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines=40):
        return _tail(self.log_path, lines)


def reap_workers():
    """SIGKILLs every worker still running; returns those that were."""
    left = [w for w in _live_workers if w.alive()]
    for w in left:
        try:
            os.kill(w.proc.pid, signal.SIGCONT)
            os.kill(w.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        w.proc.wait()
    _live_workers.clear()
    return left


def migrate(config_path):
    """billing-worker migrate, which must succeed."""
    r = run_cli(config_path, "migrate")
    assert r.returncode == 0, r.stderr
    return r


def run_cli(config_path, *args, timeout=60, env=None):
    """Runs `billing-worker [-c CONFIG] ARGS...` to completion; returns the CompletedProcess (text).

    config_path None leaves out -c.  Fails the test if it runs past timeout.
    For a database in worker-role mode, `migrate` runs with the owner's twin
    of the config and then applies sql/roles.sql, as a deploy does.
    """
    binary = require_binary()
    cmd = [str(binary)]
    owner = _owner_configs.get(str(config_path)) if args and args[0] == "migrate" else None
    if config_path is not None:
        cmd += ["-c", str(owner[0] if owner else config_path)]
    cmd += [str(a) for a in args]
    if owner:
        proc = _run_cli(cmd, timeout, env)
        if proc.returncode == 0:
            apply_roles(owner[1])
        return proc
    return _run_cli(cmd, timeout, env)


def _run_cli(cmd, timeout, env):
    try:
        return subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
            env=None if env is None else {**os.environ, **env}, cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{' '.join(cmd)} did not finish within {timeout}s; output:\n"
                             f"{e.stdout or ''}{e.stderr or ''}") from None


# --------------------------------------------------------------------------
# Least privilege: the worker as `billing_worker` (sql/roles.sql)
# --------------------------------------------------------------------------

WORKER_ROLE = "billing_worker"
ROLES_SQL = SQL_DIR / "roles.sql"
_owner_configs = {}    # config path -> (the owner's twin config, Database)


def owner_config(config_path):
    """The config `migrate` should run with: the owner's twin in worker-role mode."""
    owner = _owner_configs.get(str(config_path))
    return owner[0] if owner else config_path


def apply_roles(db):
    """Runs sql/roles.sql with psql as the cluster's superuser (the schema's owner)."""
    proc = db.cluster._run("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", db.host,
                           "-p", db.port, "-U", db.cluster.superuser, "-d", db.name,
                           "-f", ROLES_SQL, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"sql/roles.sql failed:\n{proc.stdout}{proc.stderr}")


def use_worker_role(db):
    """Puts db in worker-role mode: configs made for it connect as billing_worker."""
    db.worker_dsn = f"host={db.host} port={db.port} dbname={db.name} user={WORKER_ROLE}"
    # The role is the cluster's; roles.sql creates it too, but a test may run
    # the worker before any migrate (to see it refuse an empty database).
    db.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{WORKER_ROLE}') "
               f"THEN CREATE ROLE {WORKER_ROLE} LOGIN; END IF; END $$")


# --------------------------------------------------------------------------
# Last-resort cleanup if pytest dies without running fixture finalizers
# --------------------------------------------------------------------------

def _atexit_cleanup():
    reap_workers()


atexit.register(_atexit_cleanup)

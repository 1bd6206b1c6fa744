"""Fixtures for the integration tests; the machinery lives in harness.py.

Session-scoped (one each per pytest run):
    pg            harness.PgCluster: private PostgreSQL (restart(), stop(), start())
    redis_server  harness.RedisServer: private redis-server (stop(), start())

Function-scoped:
    db            harness.Database: a fresh database t_<pid>_<n>, dropped after the test;
                  under @pytest.mark.worker_role (or a module's pytestmark) the configs
                  made for it connect as billing_worker, and migrate runs as the owner
                  then applies sql/roles.sql
    redis         harness.RedisClient: the session redis-server after FLUSHALL
    fake_api      harness.FakeApi: tests/fake_api.py on a free port, stopped after
    binary        path of build/billing-worker (fails the test if it is missing)

Every Worker still running when a test ends is SIGKILLed; when a test fails,
the tail of each of its workers' logs is added to the report.

Run from the repo root:  /usr/bin/python3 -m pytest -q tests/integration
"""

import atexit
import sys
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def _serve(server):
    """Starts SERVER for the session; cleaned up at the end, or at exit if pytest dies."""
    atexit.register(server.cleanup)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
        atexit.unregister(server.cleanup)


@pytest.fixture(scope="session")
def pg():
    yield from _serve(harness.PgCluster())


@pytest.fixture(scope="session")
def _pg_admin(pg):
    """A superuser connection to the `postgres` database, reopened when it broke."""
    state = {"conn": None}

    def get():
        conn = state["conn"]
        if conn is not None and not conn.closed:
            try:  # a restart (pg.restart()) breaks it without telling
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                conn.close()
        if conn is None or conn.closed:
            state["conn"] = conn = pg.connect("postgres")
        return conn

    yield get
    if state["conn"] is not None and not state["conn"].closed:
        state["conn"].close()


@pytest.fixture(scope="session")
def redis_server():
    yield from _serve(harness.RedisServer())


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "worker_role: the worker connects as billing_worker (sql/roles.sql); "
        "migrate runs as the owner")


@pytest.fixture
def db(pg, _pg_admin, request):
    pg.start()  # a no-op unless an earlier test left it stopped
    database = harness.create_database(pg, _pg_admin())
    if request.node.get_closest_marker("worker_role") is not None:
        harness.use_worker_role(database)
    try:
        yield database
    finally:
        harness.reap_workers()  # nothing may hold connections to it now
        pg.start()
        harness.drop_database(_pg_admin(), database)


@pytest.fixture
def redis(redis_server):
    redis_server.start()  # a no-op unless an earlier test left it stopped
    client = harness.RedisClient(redis_server)
    client.flushall()
    yield client


@pytest.fixture
def fake_api(tmp_path):
    if not harness.FAKE_API_SCRIPT.exists():
        pytest.fail(f"{harness.FAKE_API_SCRIPT} does not exist", pytrace=False)
    api = harness.FakeApi(tmp_path)
    api.start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def binary():
    return harness.require_binary()


@pytest.fixture(autouse=True)
def _reap_workers():
    harness._test_workers.clear()
    yield
    harness.reap_workers()  # tests may end with workers running: not an error
    harness._test_workers.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for w in harness._test_workers:
            report.sections.append((f"worker {w.name} ({w.log_path})", w.log_tail(60)))

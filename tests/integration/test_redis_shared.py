"""One redis-server shared by several fleets: redis.key_prefix, redis.db, redis.username.

Two fleets (staging and production, say) each have their own database and
billing API but one Redis.  With different prefixes their locks, rate
buckets, 429 pauses and worker registries never meet; with redis.db they
live in another database of the server; with an ACL user the worker
authenticates as that user, and a wrong password is reported naming redis
and the user, never the password.
"""

import os
import socket

import pytest

import harness
from harness import (migrate, Worker, insert_invoices, make_config, wait_for, _resp_encode,
                     _resp_read)

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role


@pytest.fixture
def db2(pg, _pg_admin):
    """A second fresh database, for a second fleet."""
    pg.start()
    database = harness.create_database(pg, _pg_admin())
    harness.use_worker_role(database)
    try:
        yield database
    finally:
        harness.reap_workers()
        pg.start()
        harness.drop_database(_pg_admin(), database)


@pytest.fixture
def fake_api2(tmp_path):
    """A second fake billing API: each fleet's idempotency keys (invoice-1 ...) are its own."""
    workdir = tmp_path / "api2"
    workdir.mkdir()
    api = harness.FakeApi(workdir)
    api.start()
    try:
        yield api
    finally:
        api.stop()


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def assert_each_paid_once(db, fake_api, n):
    """Every invoice paid with the API's id for its key, each key called once."""
    state = fake_api.state()
    rows = db.query("SELECT id, status, charge_id FROM invoices ORDER BY id")
    assert len(rows) == n
    for iid, status, charge_id in rows:
        key = f"invoice-{iid}"
        assert status == "paid", (key, status)
        assert state["applied"][key]["id"] == charge_id
    assert len(state["requests"]) == n
    assert max(state["requests"].values()) == 1


def redis_in_db(redis, dbnum, *args):
    """ARGS run in database DBNUM of the session server (SELECT lasts one connection)."""
    with socket.create_connection((redis.host, redis.port), timeout=2) as s:
        s.sendall(_resp_encode(("SELECT", dbnum)) + _resp_encode(args))
        with s.makefile("rb") as f:
            assert _resp_read(f) == "OK"
            return _resp_read(f)


def test_two_fleets_with_their_own_prefix_share_one_redis(tmp_path, db, db2, redis, fake_api,
                                                          fake_api2, binary):
    fleets = []
    for name, database, api in (("staging", db, fake_api), ("production", db2, fake_api2)):
        prefix = f"bw-{name}:"
        cfgs = [make_config(tmp_path, database, redis, api, **{
            "redis.key_prefix": prefix,
            # Every worker spends the fleet's budget: the bucket key exists.
            "billing_api.max_requests_per_second": 2000,
        }) for _ in range(2)]
        migrate(cfgs[0])
        insert_invoices(database, 300)
        # Calls that take a while keep locks held long enough to be seen.
        api.faults([], latency_ms=30)
        fleets.append((name, prefix, database, api, [Worker(c, f"{name}-{i}") for i, c in enumerate(cfgs)]))

    seen = set()
    members = {prefix: set() for _, prefix, _, _, _ in fleets}
    for _, _, _, _, workers in fleets:
        for w in workers:
            w.start()

    def drained():
        seen.update(redis.keys())
        for prefix in members:
            members[prefix].update(redis.command("ZRANGE", f"{prefix}workers", 0, -1))
        return all(pending(database) == 0 for _, _, database, _, _ in fleets)

    wait_for(drained, 120, interval=0.02,
             message=lambda: f"still pending: {[(n, pending(d)) for n, _, d, _, _ in fleets]}")
    # Locks showed up while the fleets ran, each under its own prefix.
    for name, prefix, _, _, _ in fleets:
        assert any(k.startswith(f"{prefix}lock:invoice:") for k in seen), (name, sorted(seen)[:10])
    for _, _, database, api, workers in fleets:
        for w in workers:
            assert w.stop() == 0
        assert_each_paid_once(database, api, 300)

    left = redis.keys()
    seen.update(left)
    assert sorted(k for k in seen if not k.startswith(("bw-staging:", "bw-production:"))) == []
    for name, prefix, _, _, workers in fleets:
        assert f"{prefix}workers" in seen
        assert f"{prefix}rate:bucket" in left
        # Each fleet's registry held its own workers, and only those, while
        # they ran; each left it at its stop.
        assert len(members[prefix]) == 2, (name, members[prefix])
        assert all(m.startswith("test-worker-") for m in members[prefix])
        assert f"{prefix}workers" not in left
        assert redis.keys(f"{prefix}lock:*") == []
    assert not members["bw-staging:"] & members["bw-production:"]


def test_a_429_pauses_only_its_own_fleet(tmp_path, db, db2, redis, fake_api, fake_api2, binary):
    cfg_a = make_config(tmp_path, db, redis, fake_api, **{"redis.key_prefix": "bw-a:"})
    cfg_b = make_config(tmp_path, db2, redis, fake_api2, **{"redis.key_prefix": "bw-b:"})
    migrate(cfg_a)
    migrate(cfg_b)
    [first] = insert_invoices(db, 1)
    # Fleet A's one call gets a 429 with a long Retry-After: a fleet-wide pause.
    fake_api.faults([{"match": {"key": f"invoice-{first}"}, "action": "status", "status": 429,
                      "retry_after": 30, "times": 1}])
    a = Worker(cfg_a, "a").start()
    wait_for(lambda: redis.keys("bw-a:rate:pause") != [], 20,
             message=lambda: f"no pause key: {redis.keys()}; {a.log_tail()}")
    b = Worker(cfg_b, "b").start()
    insert_invoices(db2, 20)
    wait_for(lambda: pending(db2) == 0, 30, message=lambda: b.log_tail())
    assert pending(db) == 1      # still paused
    assert redis.keys("bw-b:rate:pause") == []
    assert redis.keys("billing-worker:*") == []
    assert a.stop() == 0 and b.stop() == 0


def test_redis_db_keeps_every_key_in_that_database(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "redis.db": 3, "billing_api.max_requests_per_second": 1000})
    migrate(cfg)
    insert_invoices(db, 200)
    fake_api.faults([], latency_ms=30)
    w = Worker(cfg, "db3").start()
    seen = set()

    def drained():
        seen.update(redis_in_db(redis, 3, "KEYS", "*"))
        assert redis.keys() == [], redis.keys()
        return pending(db) == 0

    wait_for(drained, 60, interval=0.02, message=lambda: w.log_tail())
    assert w.stop() == 0
    assert_each_paid_once(db, fake_api, 200)
    assert any(k.startswith("billing-worker:lock:invoice:") for k in seen)
    left = redis_in_db(redis, 3, "KEYS", "*")
    assert "billing-worker:workers" in seen and "billing-worker:rate:bucket" in left
    for other in range(16):
        if other != 3:
            assert redis_in_db(redis, other, "DBSIZE") == 0, other
    assert 'connected to redis at' in w.log() and "(database 3, " in w.log()


def test_redis_db_survives_a_reconnect(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.db": 5})
    migrate(cfg)
    insert_invoices(db, 10)
    w = Worker(cfg, "db5").start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: w.log_tail())
    # Redis restarts empty: the new connection starts in db 0 and must SELECT again.
    redis.stop()
    insert_invoices(db, 10)
    wait_for(lambda: "redis unreachable" in w.log(), 30, message=lambda: w.log_tail())
    redis.start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: w.log_tail())
    assert "redis reachable again" in w.log()
    assert "billing-worker:workers" in redis_in_db(redis, 5, "KEYS", "*")
    assert w.stop() == 0
    assert redis.keys() == []
    assert_each_paid_once(db, fake_api, 20)


@pytest.fixture
def acl_user(redis):
    """An ACL user that may touch only keys under "bw-acl:"; removed afterwards."""
    password = "s3cret-" + os.urandom(8).hex()
    redis.command("ACL", "SETUSER", "billing-staging", "reset", "on", f">{password}",
                  "~bw-acl:*", "+@all")
    try:
        yield "billing-staging", password
    finally:
        redis.command("ACL", "DELUSER", "billing-staging")


def write_secret(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def test_acl_user_with_a_password_file(tmp_path, db, redis, fake_api, binary, acl_user):
    user, password = acl_user
    pwfile = write_secret(tmp_path / "redis-password", password)
    # The user may touch no key outside its prefix: any key left out of
    # redis.key_prefix would fail the lock script with NOPERM.
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "redis.username": user, "redis.password_file": str(pwfile),
        "redis.key_prefix": "bw-acl:", "billing_api.max_requests_per_second": 1000})
    migrate(cfg)
    insert_invoices(db, 50)
    w = Worker(cfg, "acl").start()
    wait_for(lambda: pending(db) == 0, 30, message=lambda: w.log_tail())
    registry = "bw-acl:workers" in redis.keys()
    assert w.stop() == 0
    assert_each_paid_once(db, fake_api, 50)
    log = w.log()
    assert "redis unreachable" not in log and "NOPERM" not in log, log
    assert registry
    assert password not in log


def test_acl_user_with_a_wrong_password(tmp_path, db, redis, fake_api, binary, acl_user):
    user, password = acl_user
    wrong = "not-the-" + os.urandom(8).hex()
    pwfile = write_secret(tmp_path / "redis-password", wrong)
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "redis.username": user, "redis.password_file": str(pwfile),
        "redis.key_prefix": "bw-acl:"})
    migrate(cfg)
    insert_invoices(db, 1)
    w = Worker(cfg, "acl-wrong").start()
    wait_for(lambda: "redis unreachable" in w.log(), 20, message=lambda: w.log_tail())
    assert w.stop() == 0
    log = w.log()
    assert f'redis unreachable: authentication as user "{user}" failed: WRONGPASS' in log, log
    assert wrong not in log and password not in log
    assert pending(db) == 1
    assert fake_api.state()["total_requests"] == 0


def test_username_without_password_file_is_a_config_error(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.username": "billing-staging"})
    r = harness.run_cli(cfg, "check-config")
    assert r.returncode != 0
    assert ('"redis.username" is set but "redis.password_file" is not: Redis authenticates '
            "a user only with a password") in r.stderr


def test_check_config_connect_authenticates_as_the_acl_user(tmp_path, db, redis, fake_api,
                                                            binary, acl_user):
    """lock_redis_options: check-config --connect built its own Redis options
    and left out redis.username and redis.db, so it sent AUTH for the
    default user and reported an ACL deployment that works as unreachable."""
    user, password = acl_user
    pwfile = write_secret(tmp_path / "redis-password", password)
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "redis.username": user, "redis.password_file": str(pwfile),
        "redis.key_prefix": "bw-acl:"})
    migrate(cfg)
    r = harness.run_cli(cfg, "check-config", "--connect")
    assert "answered PONG (after AUTH)" in r.stdout, r.stdout + r.stderr
    assert password not in r.stdout + r.stderr

"""Redis behind Sentinel: the workers find the master by its name and follow a failover.

Each test runs its own harness.SentinelSet: a master, one replica
(replicaof) and three sentinels watching it with quorum 2 and
down-after-milliseconds 1000, every server with its own config file in a
temp dir.  The workers are given redis.sentinels and redis.master_name
instead of redis.host/port: they ask the sentinels where the master is,
check it says so (ROLE), and after a failover find the new one at their
next connect.

While a producer inserts invoices and redemptions and the fake API answers
slowly (so calls are in flight), the master is SIGKILLed.  What must hold:
the sentinels promote the replica, the locks are then taken there (its
EVALSHA count grows, its lock keys appear), auto-mode workers bill on with
SKIP LOCKED in the gap, the redis-mode worker resumes on the new master,
every item ends final, the database and the API's own record agree item
by item, the audit is clean and no balance was ever seen below zero.
"""

import atexit
import threading
import time

import pytest

from harness import (SentinelSet, Worker, free_port, make_config, migrate, reap_workers,
                     run_cli, wait_for)
from test_failover import Producer, books_violations, done_count, pending_count

API_LATENCY_MS = 100
SUBSIDY_FUNDS = 15000
# down-after-milliseconds (1 s), the election, then the workers' reconnect
# backoff (100 ms doubling to 5 s): a few seconds, bounded generously.
FAILOVER_BOUND_S = 20.0
LOCK_PREFIX = "billing-worker:lock:"


@pytest.fixture
def sentinels():
    s = SentinelSet(down_after_ms=1000, failover_timeout_ms=3000)
    atexit.register(s.cleanup)
    try:
        s.start()
        yield s
    finally:
        reap_workers()
        s.cleanup()
        atexit.unregister(s.cleanup)


def sentinel_config(tmp_path, db, fake_api, s, **overrides):
    """A worker config that knows Redis only through the sentinels."""
    return make_config(tmp_path, db, None, fake_api, **{
        "redis.host": None, "redis.port": None, "redis.sentinels": s.sentinels,
        "redis.master_name": s.name, **overrides})


def evalsha_calls(node):
    """How many EVALSHA the server on NODE has run (INFO commandstats)."""
    try:
        info = node.command("INFO", "commandstats", timeout=0.5)
    except (OSError, ConnectionError):
        return None
    for line in info.splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


class LockWatch(threading.Thread):
    """Samples the replica's EVALSHA count every 20 ms and notes when it first
    grows: a replica only applies a script's effects, so the first EVALSHA it
    runs itself is the first lock (or renewal) taken on it as the master."""

    def __init__(self, node):
        super().__init__(daemon=True, name="lock-watch")
        self.node = node
        self.base = evalsha_calls(node) or 0
        self.first = None
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set() and self.first is None:
            n = evalsha_calls(self.node)
            if n is not None and n > self.base:
                self.first = time.time()
            self.stop_flag.wait(0.02)

    def stop(self):
        self.stop_flag.set()
        if self.is_alive():
            self.join(5)


def found_master(worker, s, port):
    return (f'redis master "{s.name}" is {s.host}:{port} (from sentinel '
            in worker.log())


def finished_by(db, worker_id, since):
    return db.scalar("SELECT count(*) FROM attempts WHERE worker_id = %s "
                     "AND finished_at >= to_timestamp(%s)", (worker_id, since))


def test_master_killed_workers_follow_the_sentinels(tmp_path, db, fake_api, sentinels, binary):
    """SIGKILL of the master mid-run: the locks move to the promoted replica,
    and the books stay right."""
    s = sentinels
    old, new = s.master_port, s.replica_port
    common = {"worker.concurrency": 4, "worker.batch_size": 4,
              "worker.poll_interval_ms": 200, "billing_api.backoff_max_ms": 500}
    cfgs = [sentinel_config(tmp_path, db, fake_api, s, **common, **{
        "worker.id": name, "locks.mode": mode})
        for name, mode in (("sn-w1", "auto"), ("sn-w2", "auto"), ("sn-w3", "redis"))]
    migrate(cfgs[0])
    sid = db.scalar("INSERT INTO subsidies (name) VALUES ('sentinel') RETURNING id")
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, %s)",
               (sid, SUBSIDY_FUNDS))
    fake_api.faults([], latency_ms=API_LATENCY_MS)
    workers = [Worker(cfg, f"w{i + 1}").start() for i, cfg in enumerate(cfgs)]
    logs = lambda: "\n".join(f"--- {w.name}\n{w.log_tail(20)}" for w in workers)  # noqa: E731
    producer = Producer(db.dsn, sid)
    watch = LockWatch(s.node(new))
    producer.start()
    try:
        wait_for(lambda: done_count(db) >= 100, 30, message=logs)
        assert all(found_master(w, s, old) for w in workers), logs()
        assert evalsha_calls(s.node(old)) > 0
        watch.base = evalsha_calls(s.node(new))
        watch.start()

        s.kill(old)
        t_kill = time.time()
        wait_for(lambda: s.master() == new, FAILOVER_BOUND_S, interval=0.05,
                 message=lambda: f"no failover; sentinel log:\n{s.log(s.sentinel_ports[0])}")
        t_switch = time.time()
        wait_for(lambda: watch.first is not None, FAILOVER_BOUND_S, interval=0.05,
                 message=logs)
        first_lock = watch.first - t_kill
        wait_for(lambda: all(found_master(w, s, new) for w in workers), FAILOVER_BOUND_S,
                 message=logs)
        # The lock script runs there, and its keys are written there.
        wait_for(lambda: s.node(new).command("KEYS", LOCK_PREFIX + "*"), 10, interval=0.02,
                 message=logs)
        # Every worker, the redis-mode one included, bills on after the switch.
        wait_for(lambda: all(finished_by(db, f"sn-w{i}", t_switch) > 0 for i in (1, 2, 3)),
                 FAILOVER_BOUND_S, message=logs)
        print(f"\nsentinel failover: the sentinels named the replica {t_switch - t_kill:.2f} s "
              f"after the kill; first lock on the new master {first_lock:.2f} s after the "
              f"kill; EVALSHA there so far {evalsha_calls(s.node(new))}")
        assert first_lock < FAILOVER_BOUND_S
    finally:
        producer.stop()
        watch.stop()

    wait_for(lambda: pending_count(db) == 0, 60, interval=0.2, message=logs)
    for w in workers:
        assert w.stop(timeout=20) == 0, w.log_tail()
    state = fake_api.state()
    assert books_violations(db, state) == []
    assert producer.negatives == []
    assert db.scalar("SELECT min(balance_cents) FROM subsidies") >= 0
    r = run_cli(cfgs[0], "audit", timeout=60)
    assert r.returncode == 0 and "audit: clean" in r.stdout, r.stdout + r.stderr
    # The auto-mode workers said they fell back, and came back.
    for w in workers[:2]:
        assert "claiming with FOR UPDATE SKIP LOCKED until it returns" in w.log(), w.log_tail()
        assert "redis reachable again: back to redis locks" in w.log(), w.log_tail()
    replays = sum(n - 1 for n in state["requests"].values() if n > 1)
    print(f"sentinel failover: {done_count(db)} items final, {producer.inserted} inserted, "
          f"{replays} replayed calls, per worker after the switch "
          f"{[finished_by(db, f'sn-w{i}', t_switch) for i in (1, 2, 3)]}")


def worker_paid(db, worker_id):
    return db.scalar("SELECT count(*) FROM attempts WHERE worker_id = %s", (worker_id,))


def insert_some(db, n=20):
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
               "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g", (n,))


def test_demoted_master_is_dropped_and_a_replica_never_used(tmp_path, db, fake_api, sentinels,
                                                            binary):
    """The master the workers hold a connection to becomes a replica
    without that connection breaking (REPLICAOF by hand: a sentinel's own
    reconfiguration also kills the clients, a partition healing does not),
    while the sentinels still name it.  The first lock script it refuses
    (READONLY) must drop the connection, and no connect may keep it while
    it says it is a replica (ROLE): a redis-mode worker takes nothing, an
    auto-mode one bills on with SKIP LOCKED, neither cycles through
    connect and refusal.  Once it is the master again both come back."""
    s = sentinels
    m, r = s.master_port, s.replica_port
    cfgs = [sentinel_config(tmp_path, db, fake_api, s, **{
        "worker.id": name, "locks.mode": mode, "worker.poll_interval_ms": 100})
        for name, mode in (("dm-w1", "redis"), ("dm-w2", "auto"))]
    migrate(cfgs[0])
    fake_api.faults([], latency_ms=20)
    w1, w2 = workers = [Worker(cfg, f"w{i + 1}").start() for i, cfg in enumerate(cfgs)]
    logs = lambda: "\n".join(f"--- {w.name}\n{w.log_tail(20)}" for w in workers)  # noqa: E731
    wait_for(lambda: all(found_master(w, s, m) for w in workers), 10, message=logs)
    insert_some(db)
    wait_for(lambda: pending_count(db) == 0, 20, message=logs)

    s.node(r).command("REPLICAOF", "NO", "ONE")
    s.node(m).command("REPLICAOF", s.host, str(r))
    assert s.master() == m, "the sentinels already moved"
    # A worker meets the replica only when it claims: the auto-mode one,
    # once on SKIP LOCKED, can take a whole insert before the redis-mode one
    # polls (seen in make test: 20 of 20, and nothing for the other to try).
    # So more come while either has yet to try.
    def both_refused():
        if all("READONLY" in w.log() for w in workers):
            return True
        if pending_count(db) == 0:
            insert_some(db)
        return False
    insert_some(db)
    wait_for(both_refused, 10, message=logs)
    wait_for(lambda: pending_count(db) == 0, 20, message=logs)
    before = worker_paid(db, "dm-w1")
    insert_some(db)
    wait_for(lambda: pending_count(db) == 0, 20, message=logs)
    time.sleep(1.0)   # reconnects keep being tried: none may keep the replica
    r_cli = run_cli(cfgs[0], "check-config", "--connect")
    for w in workers:
        after = w.log().split("READONLY", 1)[1]
        assert "reachable again" not in after, w.log_tail()
        assert w.log().count("READONLY") == 1, w.log_tail()
    assert worker_paid(db, "dm-w1") == before, "the redis-mode worker claimed on a replica"
    assert (f'no master found for "{s.name}": master at {s.host}:{m} (from sentinel '
            f'{s.sentinels[0]}): it says it is a slave, not the master') in r_cli.stdout, \
        r_cli.stdout

    # It is the master again, as the sentinels always said.
    s.node(m).command("REPLICAOF", "NO", "ONE")
    s.node(r).command("REPLICAOF", s.host, str(m))
    wait_for(lambda: all(w.log().count(f'redis master "{s.name}" is {s.host}:{m} ') >= 2
                         for w in workers), 15, message=logs)
    insert_some(db, 40)
    wait_for(lambda: pending_count(db) == 0, 20, message=logs)
    assert worker_paid(db, "dm-w1") > before, logs()
    for w in workers:
        assert w.stop(timeout=20) == 0, w.log_tail()
    assert books_violations(db, fake_api.state()) == []


def test_sentinel_config_errors_and_probe(tmp_path, db, fake_api, sentinels, binary):
    """A bad entry names the key, its line and the entry; check-config
    --connect names the master the sentinels gave, and which one did; a
    name no sentinel knows, or sentinels that do not answer, say so."""
    s = sentinels
    bad = sentinel_config(tmp_path, db, fake_api, s,
                          **{"redis.sentinels": [s.sentinels[0], "localhost", "10.0.0.1:0"]})
    r = run_cli(bad, "check-config")
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert f'{bad}:' in out and '"redis.sentinels" entry 2 ("localhost") must be HOST:PORT' in out
    assert '"redis.sentinels" entry 3 ("10.0.0.1:0") must be HOST:PORT' in out

    nameless = sentinel_config(tmp_path, db, fake_api, s, **{"redis.master_name": None})
    r = run_cli(nameless, "check-config")
    assert r.returncode == 2
    assert '"redis.sentinels" is set but "redis.master_name" is not' in r.stdout + r.stderr

    # host/port beside sentinels are valid but unused: a warning, not a refusal.
    both = sentinel_config(tmp_path, db, fake_api, s, **{"redis.port": 6390})
    r = run_cli(both, "check-config")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"redis.port" is not used: with "redis.sentinels"' in r.stdout + r.stderr

    good = sentinel_config(tmp_path, db, fake_api, s)
    migrate(good)
    r = run_cli(good, "check-config", "--connect")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (f'redis: master "{s.name}" at "{s.host}:{s.master_port}" (from sentinel '
            f'{s.sentinels[0]}) answered PONG') in r.stdout, r.stdout

    unknown = sentinel_config(tmp_path, db, fake_api, s, **{"redis.master_name": "nobody"})
    r = run_cli(unknown, "check-config", "--connect")
    assert r.returncode != 0
    assert 'no sentinel knows master "nobody"' in r.stdout, r.stdout

    dead = [f"{s.host}:{free_port()}", f"{s.host}:{free_port()}"]
    silent = sentinel_config(tmp_path, db, fake_api, s, **{"redis.sentinels": dead})
    r = run_cli(silent, "check-config", "--connect")
    assert r.returncode != 0
    assert (f'no sentinel answered for master "{s.name}": sentinel {dead[0]}: '
            f'Connection refused') in r.stdout, r.stdout

    # A dead first sentinel is passed over; the master comes from the next.
    partly = sentinel_config(tmp_path, db, fake_api, s,
                             **{"redis.sentinels": dead[:1] + s.sentinels[1:]})
    r = run_cli(partly, "check-config", "--connect")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'(from sentinel {s.sentinels[1]}) answered PONG' in r.stdout, r.stdout

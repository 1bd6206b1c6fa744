"""PostgreSQL failover and switchover, tested the way they happen.

Each test runs a pair of private clusters of its own: a primary that
replicates synchronously (harness.PRIMARY_SETTINGS: a claim or a hold is
acknowledged only once the standby has flushed it) and a hot standby made
from it with pg_basebackup -R (harness.PgStandby).  The workers are given
one multi-host conninfo, `host=A,B port=PA,PB target_session_attrs=read-write`,
as they would be under Patroni or pg_auto_failover without a virtual IP:
libpq tries the hosts in order and keeps the first that accepts writes.

While a producer inserts invoices and redemptions and the fake API answers
them slowly (so calls are in flight), the primary is lost and the standby
promoted.  What must hold afterwards: billing resumes on the new primary
within seconds of the promotion, every item ends final, the database and
the API's own record agree item by item (nothing charged that is not
recorded, no recorded charge the API does not hold, no item charged under
two keys), the audit is clean on the new primary, and no subsidy's balance
was ever seen below zero.

poll_interval_ms is 5000 throughout, so an item finished much sooner than
that after its INSERT was claimed on a notification: the LISTEN connection
followed the primary too.
"""

import atexit
import re
import threading
import time

import psycopg2
import pytest

from harness import (PRIMARY_SETTINGS, Database, PgCluster, PgStandby, Worker, make_config,
                     migrate, multi_host_conninfo, reap_workers, run_cli, wait_for)

POLL_MS = 5000
API_LATENCY_MS = 100
# A claim woken by a notification waits for 0-4 ms of jitter, then one API
# call (API_LATENCY_MS) and one completion: far below POLL_MS.
NOTIFY_BOUND_S = 1.5
RESUME_BOUND_S = 15.0
# A worker that meets a read-only server drops the connection after the
# first statement that fails there; a few lines (claim, renewal, flush,
# reconnects while no host accepts writes) are expected, not hundreds.
READ_ONLY_LINES_MAX = 20
SUBSIDY_FUNDS = 15000
REDEMPTION_CENTS = 100


# --------------------------------------------------------------------------
# The pair of clusters, the producer and the books
# --------------------------------------------------------------------------

def _cleanup(cluster):
    cluster.cleanup()
    atexit.unregister(cluster.cleanup)


@pytest.fixture
def pair():
    """(primary, standby), the standby streaming synchronously."""
    primary = PgCluster(settings=PRIMARY_SETTINGS)
    atexit.register(primary.cleanup)
    standby = None
    try:
        primary.start()
        standby = PgStandby(primary, "bw_standby")
        atexit.register(standby.cleanup)
        standby.start()
        wait_for(lambda: primary_admin(primary, "SELECT sync_state FROM pg_stat_replication "
                                       "WHERE application_name = 'bw_standby'") == [("sync",)],
                 30, message="the standby never became synchronous")
        yield primary, standby
    finally:
        reap_workers()
        if standby is not None:
            _cleanup(standby)
        _cleanup(primary)


def primary_admin(cluster, sql):
    """Runs SQL (autocommit) on CLUSTER's postgres database; returns its rows, if any."""
    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description is not None else []
    finally:
        conn.close()


def new_database(primary):
    name = f"failover_{int(time.time() * 1000) % 10**9}"
    primary_admin(primary, f'CREATE DATABASE "{name}"')
    return Database(primary, name)


def connect_writable(dsn):
    conn = psycopg2.connect(dsn, connect_timeout=2)
    conn.autocommit = True
    return conn


class Producer(threading.Thread):
    """Inserts invoices and redemptions every 50 ms through the multi-host
    conninfo, as an application would, and samples every balance.

    An insert that fails (no writable host yet) is simply tried again on a
    new connection; the test counts what was inserted, not what was meant.
    Every tenth invoice is declined by the API, so failures flow too.
    """

    def __init__(self, dsn, subsidy_id):
        super().__init__(daemon=True, name="producer")
        self.dsn, self.subsidy_id = dsn, subsidy_id
        self.stop_flag = threading.Event()
        self.inserted = 0
        self.errors = 0
        self.negatives = []
        self.n = 0

    def run(self):
        conn = None
        while not self.stop_flag.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect_writable(self.dsn)
                with conn.cursor() as cur:
                    rows = []
                    for _ in range(3):
                        self.n += 1
                        rows.append(("declined_%d" % self.n if self.n % 10 == 0
                                     else "cus_%d" % self.n, 1000 + self.n))
                    cur.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
                                "SELECT c, a, 'usd' FROM unnest(%s::text[], %s::bigint[]) "
                                "AS u(c, a)", ([r[0] for r in rows], [r[1] for r in rows]))
                    cur.execute("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                                "VALUES (%s, %s, %s)",
                                (self.subsidy_id, "learner-%d" % self.n, REDEMPTION_CENTS))
                    self.inserted += 4
                    cur.execute("SELECT s.id, s.balance_cents, coalesce(sum(l.amount_cents), 0) "
                                "FROM subsidies s LEFT JOIN ledger_transactions l "
                                "ON l.subsidy_id = s.id GROUP BY s.id")
                    self.negatives += [r for r in cur.fetchall() if r[1] < 0 or r[2] < 0]
            except psycopg2.Error:
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.stop_flag.wait(0.1)
                continue
            self.stop_flag.wait(0.05)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join(10)


def done_count(db, since=None):
    where = "status <> 'pending'" + ("" if since is None else " AND finished_at >= to_timestamp(%s)")
    params = None if since is None else (since, since)
    return db.scalar(f"SELECT (SELECT count(*) FROM invoices WHERE {where}) + "
                     f"(SELECT count(*) FROM redemptions WHERE {where})", params)


def pending_count(db):
    return db.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending') + "
                     "(SELECT count(*) FROM redemptions WHERE status = 'pending')")


def first_finished_after(db, since):
    """[seconds from SINCE (epoch) to the first item finished at or after it], or None."""
    got = db.scalar("SELECT (extract(epoch FROM min(f)) - %s)::float8 FROM ("
                    "SELECT finished_at AS f FROM invoices UNION ALL "
                    "SELECT finished_at FROM redemptions) t WHERE f >= to_timestamp(%s)",
                    (since, since))
    return None if got is None else [got]


def first_finished_by_worker(db, since):
    """{worker id: seconds from SINCE to the first outcome it recorded after it}."""
    return dict(db.query(
        "SELECT worker_id, (extract(epoch FROM min(finished_at)) - %s)::float8 FROM attempts "
        "WHERE finished_at >= to_timestamp(%s) GROUP BY worker_id", (since, since)))


def every_worker_resumed(db, since, n):
    got = first_finished_by_worker(db, since)
    return got if len(got) >= n else None


def books_violations(db, state):
    """Where the database and the API's record disagree (CONTRACT section 1)."""
    v = []
    applied = state["applied"]
    keys = set()
    for kind, table, idcol, done in (("invoice", "invoices", "charge_id", "paid"),
                                     ("redemption", "redemptions", "fulfillment_id", "redeemed")):
        for iid, status, rid, amount, gen, err in db.query(
                f"SELECT id, status, {idcol}, amount_cents, generation, last_error FROM {table}"):
            key = f"{kind}-{iid}"
            keys.add(key)
            got = applied.get(key)
            if gen != 1:
                v.append(f"{key}: generation {gen}, nobody requeued it")
            if status == done:
                if got is None:
                    v.append(f"{key} is {status} but the API holds no success for its key")
                elif got["id"] != rid or got["body"]["amount"] != amount:
                    v.append(f"{key}: recorded {rid} for {amount}, the API holds {got}")
            elif status == "failed":
                if got is not None:
                    v.append(f"{key} is failed but the API charged it ({got['id']})")
                if not err:
                    v.append(f"{key} is failed without a reason")
            else:
                v.append(f"{key} is still {status}")
    # A key the database does not know would be a charge under a second key.
    v += [f"{key}: charged, but no such item" for key in applied if key not in keys]
    for rid, status, amount, net, holds, revs in db.query(
            "SELECT r.id, r.status, r.amount_cents, coalesce(sum(l.amount_cents), 0), "
            "count(*) FILTER (WHERE l.kind = 'hold'), count(*) FILTER (WHERE l.kind = 'reversal') "
            "FROM redemptions r LEFT JOIN ledger_transactions l ON l.redemption_id = r.id "
            "GROUP BY r.id"):
        want = -amount if status == "redeemed" else 0
        if net != want or holds > 1 or revs > 1:
            v.append(f"redemption-{rid} is {status}: ledger nets {net} (expected {want}), "
                     f"{holds} holds, {revs} reversals")
    return v


def notify_latency(db):
    """Inserts one invoice on the primary and returns seconds until it is final."""
    t0 = time.time()
    iid = db.scalar("INSERT INTO invoices (customer_id, amount_cents, currency) "
                    "VALUES ('cus_wake', 777, 'usd') RETURNING id")
    wait_for(lambda: db.scalar("SELECT status <> 'pending' FROM invoices WHERE id = %s", (iid,)),
             POLL_MS / 1000 * 3, interval=0.01, message=f"invoice {iid} never finished")
    return db.scalar("SELECT extract(epoch FROM finished_at)::float8 FROM invoices "
                     "WHERE id = %s", (iid,)) - t0


def worker_configs(tmp_path, db, redis, fake_api, a, b):
    """Three workers: two in skip-locked mode, one in redis mode; the second
    lists the hosts the other way round (B first)."""
    ab = multi_host_conninfo([a, b], db.name)
    ba = multi_host_conninfo([b, a], db.name)
    common = {"worker.poll_interval_ms": POLL_MS, "worker.concurrency": 4,
              "worker.batch_size": 4, "billing_api.backoff_max_ms": 500}
    return [make_config(tmp_path, db, redis, fake_api, **common, **{
        "worker.id": name, "locks.mode": mode, "database.conninfo": dsn})
        for name, mode, dsn in (("fo-w1", "skip-locked", ab), ("fo-w2", "skip-locked", ba),
                                ("fo-w3", "redis", ab))]


def start_billing(tmp_path, db, redis, fake_api, a, b):
    cfgs = worker_configs(tmp_path, db, redis, fake_api, a, b)
    migrate(cfgs[0])
    sid = db.scalar("INSERT INTO subsidies (name) VALUES ('failover') RETURNING id")
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, %s)",
               (sid, SUBSIDY_FUNDS))
    fake_api.faults([], latency_ms=API_LATENCY_MS)
    workers = [Worker(cfg, f"w{i + 1}").start() for i, cfg in enumerate(cfgs)]
    producer = Producer(multi_host_conninfo([a, b], db.name), sid)
    producer.start()
    logs = lambda: "\n".join(f"--- {w.name}\n{w.log_tail(15)}" for w in workers)  # noqa: E731
    wait_for(lambda: done_count(db) >= 40, 30, message=logs)
    return cfgs, workers, producer, logs


def connected_to(worker, cluster):
    return f'connected to the database (host "{cluster.host}", port "{cluster.port}"' in worker.log()


def finish_and_check(db, cfg, workers, producer, fake_api, logs):
    """Stops the producer, drains, stops the workers and checks the books on DB."""
    producer.stop()
    wait_for(lambda: pending_count(db) == 0, 60, interval=0.2, message=logs)
    for w in workers:
        if w.alive():
            assert w.stop(timeout=20) == 0, w.log_tail()
    state = fake_api.state()
    assert books_violations(db, state) == []
    assert producer.negatives == []
    assert db.scalar("SELECT min(balance_cents) FROM subsidies") >= 0
    r = run_cli(cfg, "audit", timeout=60)
    assert r.returncode == 0 and "audit: clean" in r.stdout, r.stdout + r.stderr
    replays = sum(n - 1 for n in state["requests"].values() if n > 1)
    ambiguous = db.scalar("SELECT (SELECT count(*) FROM invoices WHERE ambiguous) + "
                          "(SELECT count(*) FROM redemptions WHERE ambiguous)")
    return {"items": done_count(db), "inserted_by_producer": producer.inserted,
            "producer_errors": producer.errors, "replayed_calls": replays,
            "ambiguous_items": ambiguous}


def read_only_lines(worker):
    return sum(1 for line in worker.log().splitlines()
               if re.search(r"read-only|read only", line))


# --------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------

def test_primary_killed_standby_promoted(tmp_path, pair, redis, fake_api, binary):
    """The primary dies (pg_ctl stop -m immediate) with calls in flight; the
    standby is promoted a second later, as a failover manager would after
    noticing.  Billing resumes there, nothing is lost or charged twice, the
    LISTEN connections follow, and the old primary coming back read-only
    (fenced, first in the conninfo) is passed over by a new worker."""
    a, b = pair
    db = new_database(a)
    cfgs, workers, producer, logs = start_billing(tmp_path, db, redis, fake_api, a, b)
    assert all(connected_to(w, a) for w in workers), logs()

    a.stop("immediate")
    t_kill = time.time()
    time.sleep(1.0)   # the failover manager's detection time
    t_promote = time.time()
    b.promote()
    promote_s = time.time() - t_promote
    db_b = Database(b, db.name)

    [resume] = wait_for(lambda: first_finished_after(db_b, t_promote), RESUME_BOUND_S,
                        interval=0.05, message=logs)
    # Every worker found the new primary and bills there (each claims, in
    # skip-locked mode and in redis mode alike, and w2 lists it first).
    wait_for(lambda: all(connected_to(w, b) for w in workers), RESUME_BOUND_S, message=logs)
    per_worker = wait_for(lambda: every_worker_resumed(db_b, t_promote, len(workers)),
                          RESUME_BOUND_S, message=logs)
    print(f"\nfailover: pg_ctl promote took {promote_s:.2f} s; first completion on the new "
          f"primary {resume:.2f} s after the promote ({resume + (t_promote - t_kill):.2f} s "
          f"after the kill); per worker {({k: round(v, 2) for k, v in sorted(per_worker.items())})}")
    assert resume < RESUME_BOUND_S

    # The old primary comes back, fenced read-only, first in the conninfo.
    with open(a.datadir / "postgresql.auto.conf", "a") as f:
        f.write("default_transaction_read_only = on\n")
    a.start()
    w4 = Worker(make_config(tmp_path, db_b, redis, fake_api, **{
        "worker.id": "fo-w4", "locks.mode": "skip-locked", "worker.poll_interval_ms": POLL_MS,
        "database.conninfo": multi_host_conninfo([a, b], db.name)}), "w4").start()
    workers.append(w4)
    wait_for(lambda: connected_to(w4, b), 15, message=w4.log)
    assert not connected_to(w4, a), w4.log()

    producer.stop()
    wait_for(lambda: pending_count(db_b) == 0, 60, interval=0.2, message=logs)
    latencies = [notify_latency(db_b) for _ in range(3)]
    print(f"failover: INSERT to final on the new primary, poll_interval_ms {POLL_MS}: "
          f"{', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
    assert max(latencies) < NOTIFY_BOUND_S, latencies

    stats = finish_and_check(db_b, cfgs[0], workers, producer, fake_api, logs)
    print(f"failover: {stats}")


def test_switchover_old_primary_turns_read_only(tmp_path, pair, redis, fake_api, binary):
    """A switchover: the primary is fenced read-only while the workers hold
    connections to it (default_transaction_read_only = on and a reload, as
    pg_auto_failover drains a primary; every write there fails with SQLSTATE
    25006), then the standby is promoted.  The old primary stays up, first
    in the conninfo of two workers.  Each worker must drop the connection on
    the first write refused and find the writable host, not retry its
    statements on a read-only server; and its LISTEN connection, which
    nothing breaks here, must follow the primary as well."""
    a, b = pair
    db = new_database(a)
    cfgs, workers, producer, logs = start_billing(tmp_path, db, redis, fake_api, a, b)

    db.execute("ALTER SYSTEM SET default_transaction_read_only = on")
    db.execute("SELECT pg_reload_conf()")
    fenced_lsn = db.scalar("SELECT pg_current_wal_lsn()")
    db_b = Database(b, db.name)
    wait_for(lambda: db_b.scalar("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (fenced_lsn,)),
             15, message="the standby did not catch up with the fenced primary")
    t_promote = time.time()
    b.promote()

    [resume] = wait_for(lambda: first_finished_after(db_b, t_promote), RESUME_BOUND_S,
                        interval=0.05, message=logs)
    wait_for(lambda: all(connected_to(w, b) for w in workers), RESUME_BOUND_S, message=logs)
    per_worker = wait_for(lambda: every_worker_resumed(db_b, t_promote, len(workers)),
                          RESUME_BOUND_S, message=logs)
    time.sleep(2.0)   # let billing run on the new primary: no loop may build up
    print(f"\nswitchover: first completion on the new primary {resume:.2f} s after the promote; "
          f"per worker {({k: round(v, 2) for k, v in sorted(per_worker.items())})}")
    assert resume < RESUME_BOUND_S
    counts = {w.name: read_only_lines(w) for w in workers}
    print(f"switchover: log lines about the read-only server per worker: {counts}")
    assert all(n <= READ_ONLY_LINES_MAX for n in counts.values()), logs()
    assert done_count(db_b, since=t_promote) > 20, logs()

    producer.stop()
    wait_for(lambda: pending_count(db_b) == 0, 60, interval=0.2, message=logs)
    latencies = [notify_latency(db_b) for _ in range(3)]
    print(f"switchover: INSERT to final on the new primary, poll_interval_ms {POLL_MS}: "
          f"{', '.join(f'{x * 1000:.0f} ms' for x in latencies)}")
    assert max(latencies) < NOTIFY_BOUND_S, (latencies, logs())

    # A connection cut while the workers are idle (the old primary's
    # sessions terminated, a proxy restarted): the claim a notification
    # wakes finds it gone, and the worker reconnects with its backoff
    # (200 ms first) and claims at once, not a poll_interval_ms later.
    cut = db_b.scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                      "WHERE application_name = 'billing-worker' AND datname = %s", (db.name,))
    assert cut == len(workers)
    latency = notify_latency(db_b)
    print(f"switchover: INSERT to final after the workers' connections were cut: "
          f"{latency * 1000:.0f} ms")
    assert latency < NOTIFY_BOUND_S, logs()

    stats = finish_and_check(db_b, cfgs[0], workers, producer, fake_api, logs)
    print(f"switchover: {stats}")

"""Through pgbouncer: session pooling, and transaction pooling (database.pooling).

A private pgbouncer (harness.PgBouncer, default_pool_size 5) stands in front
of the session's cluster.  In session pooling each worker keeps a server
connection for as long as it is connected, and the worker runs as it does on
a direct connection.  In transaction pooling each transaction may run on
another server connection, so with database.pooling = "transaction" the
worker prepares nothing by name (each statement goes unnamed, with its SQL),
sets its session settings inside every transaction with set_config(...,
true) instead of SET, LISTENs only on database.listen_conninfo (a direct
connection), and `migrate`, whose advisory lock is a session's, refuses to
run through the pooler.

Before this, in transaction pooling the workers logged thousands of
`prepared statement "claim_skip_invoice" already exists` and `"due" does not
exist`, drained slowly or stalled, and `once` did not end.
"""

import os
import time

import pytest

from harness import (PgBouncer, PgCluster, Worker, create_database, create_subsidy,
                     insert_invoices, insert_redemptions, ledger_balance, make_config, migrate,
                     reap_workers, run_cli, wait_for)
from test_durability import CRASH_SETTINGS, facts, settle_wal

WORKERS = 3
INVOICES = 1200
REDEMPTIONS = 600
ROUNDS = 3
# The bound is for a pooler that breaks the fleet's throughput (a statement
# failing and retried, every worker serialised on one server connection:
# a third of it), not for the cost of planning at every call under
# transaction pooling.  Over repeated runs on 2 cores, with two rounds
# each and the best of each compared, the ratio moved from 0.59 (a whole
# make test, transaction pooling) to 1.14; a build without any change to
# the store or the pooling paths fell below the old bound of 0.7 once in
# four runs of the transaction case (0.68, run after the session case).
MIN_RATIO = 0.5
# Each worker's share of the lock modes: two in redis mode and one claiming
# with FOR UPDATE SKIP LOCKED, so both claim statements run through the pooler.
MODES = ["redis", "redis", "skip-locked"]


@pytest.fixture(scope="module", params=["session", "transaction"])
def bouncer(request, pg):
    pg.start()
    b = PgBouncer(pg, request.param, default_pool_size=5)
    try:
        b.start()
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def txn_bouncer(pg):
    pg.start()
    b = PgBouncer(pg, "transaction", default_pool_size=5)
    try:
        b.start()
        yield b
    finally:
        b.cleanup()


def pooled(db, bouncer):
    """The config keys of a worker that goes through BOUNCER."""
    keys = {"database.conninfo": bouncer.conninfo(db.name)}
    if bouncer.pool_mode == "transaction":
        keys["database.pooling"] = "transaction"
    return keys


def finished(db):
    return db.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending') + "
                     "(SELECT count(*) FROM redemptions WHERE status = 'pending')")


SUBSIDIES = 10


def insert_batch(db, label, invoices, redemptions):
    """Invoices, and redemptions spread over SUBSIDIES funded subsidies; returns the ids."""
    sids = [create_subsidy(db, f"subsidy-{label}-{s}", redemptions // SUBSIDIES * 100)
            for s in range(SUBSIDIES)]
    inv = insert_invoices(db, invoices, customer=f"cus_{label}_{{i}}")
    red = []
    for s, sid in enumerate(sids):
        red += insert_redemptions(db, sid, redemptions // SUBSIDIES, 100,
                                  customer=f"learner-{label}-{s}-{{i}}")
    return sids, inv, red


def worker_configs(tmp_path, db, redis, fake_api, label, keys):
    return [make_config(tmp_path, db, redis, fake_api, **{
        "worker.id": f"{label}-w{i}", "locks.mode": MODES[i], "worker.concurrency": 32,
        "worker.batch_size": 32, **keys}) for i in range(WORKERS)]


def drain(tmp_path, db, redis, fake_api, label, keys):
    """Inserts a batch and lets WORKERS workers drain it; returns (invoice ids, redemption ids, s)."""
    sids, inv, red = insert_batch(db, label, INVOICES, REDEMPTIONS)
    workers = [Worker(c, f"{label}-w{i}")
               for i, c in enumerate(worker_configs(tmp_path, db, redis, fake_api, label, keys))]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    logs = lambda: "".join(w.log_tail(20) for w in workers)  # noqa: E731
    wait_for(lambda: finished(db) == 0, 60, interval=0.02, message=logs)
    elapsed = time.monotonic() - t0
    for w in workers:
        assert w.stop() == 0, w.log_tail()
        assert "prepared statement" not in w.log(), w.log_tail(30)
    for sid in sids:
        assert ledger_balance(db, sid) == 0
    return inv, red, elapsed


def once_ends(tmp_path, db, redis, fake_api, label, keys):
    """A small batch, then WORKERS `once` runs at a time until nothing is pending:
    each run must end by itself (one waiting on a busy subsidy leaves its retry
    to the next run, as a timer would)."""
    insert_batch(db, label, 60, 30)
    cfgs = worker_configs(tmp_path, db, redis, fake_api, label, keys)
    for run in range(5):
        workers = [Worker(c, f"{label}-once{run}-w{i}", args=("once",)).start()
                   for i, c in enumerate(cfgs)]
        for w in workers:
            assert w.wait(30) == 0, w.log_tail()
            assert "prepared statement" not in w.log(), w.log_tail(30)
        if finished(db) == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{finished(db)} items still pending after 5 once runs")


def test_three_workers_drain_through_pgbouncer(tmp_path, db, redis, fake_api, binary, bouncer):
    """Every item final, each charged once, the books clean, `once` ends,
    and throughput at least MIN_RATIO of a direct connection's measured
    here (the same items, workers and lock modes, drained first directly)."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    # First, and a warm-up for both runs that follow.
    once_ends(tmp_path, db, redis, fake_api, f"once-{bouncer.pool_mode}", pooled(db, bouncer))
    # Alternating, ROUNDS times each, and the best of each compared: one
    # drain is about a second on a small machine, where another process's
    # burst shows in a single run.
    direct_s, pooled_s, inv, red = [], [], [], []
    for round_ in range(ROUNDS):
        direct_s.append(drain(tmp_path, db, redis, fake_api, f"direct{round_}", {})[2])
        i, r, s = drain(tmp_path, db, redis, fake_api, f"pooled{round_}-{bouncer.pool_mode}",
                        pooled(db, bouncer))
        inv, red = inv + i, red + r
        pooled_s.append(s)

    total = INVOICES + REDEMPTIONS
    direct_rate, pooled_rate = total / min(direct_s, default=1), total / min(pooled_s, default=1)
    print(f"\npgbouncer {bouncer.pool_mode} pooling, {WORKERS} workers, {total} items a run: "
          f"direct {direct_rate:.0f} items/s (runs {', '.join(f'{x:.2f}' for x in direct_s)} s), "
          f"through pgbouncer {pooled_rate:.0f} items/s (runs "
          f"{', '.join(f'{x:.2f}' for x in pooled_s)} s), ratio {pooled_rate / direct_rate:.2f}")

    state = fake_api.state()
    assert {k: n for k, n in state["requests"].items() if n != 1} == {}, "duplicate calls"
    assert len(state["applied"]) == 2 * ROUNDS * total + 90
    assert db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid' AND id = ANY(%s)",
                     (inv,)) == ROUNDS * INVOICES
    assert db.scalar("SELECT count(*) FROM redemptions WHERE status = 'redeemed' "
                     "AND id = ANY(%s)", (red,)) == ROUNDS * REDEMPTIONS
    assert db.scalar("SELECT count(*) FROM invoices WHERE status <> 'paid'") == 0
    assert db.scalar("SELECT count(*) FROM redemptions WHERE status <> 'redeemed'") == 0
    pcfg = make_config(tmp_path, db, redis, fake_api, **pooled(db, bouncer))
    r = run_cli(pcfg, "audit")
    assert r.returncode == 0 and "audit: clean" in r.stdout, r.stdout + r.stderr
    r = run_cli(pcfg, "status")
    assert r.returncode == 0, r.stderr
    assert pooled_rate >= MIN_RATIO * direct_rate, (direct_rate, pooled_rate)


def test_transaction_pooling_leaks_no_setting_and_commits_claims_synchronously(
        tmp_path, db, redis, fake_api, binary, txn_bouncer):
    """The session's cluster defaults to synchronous_commit = off.  Every
    claim and hold must still commit with it on (it is read at commit, so
    what a trigger sees in the transaction is what the commit uses), with
    the worker's statement_timeout and lock_timeout, and none of them may be
    left on a server connection for the pooler's next client."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    assert db.scalar("SHOW synchronous_commit") == "off"   # the server default under test
    db.execute("""
        CREATE TABLE seen (tbl text, op text, sync text, stmt_timeout text, lock_timeout text);
        CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
          INSERT INTO seen VALUES (TG_TABLE_NAME, TG_OP, current_setting('synchronous_commit'),
                                   current_setting('statement_timeout'),
                                   current_setting('lock_timeout'));
          RETURN NULL; END $$;
        CREATE TRIGGER note_claim AFTER UPDATE OF fence ON invoices
          FOR EACH STATEMENT EXECUTE FUNCTION note();
        CREATE TRIGGER note_claim AFTER UPDATE OF fence ON redemptions
          FOR EACH STATEMENT EXECUTE FUNCTION note();
        CREATE TRIGGER note_hold AFTER INSERT ON ledger_transactions
          FOR EACH ROW WHEN (NEW.kind = 'hold') EXECUTE FUNCTION note();
    """)
    sid = create_subsidy(db, "sync", 2000)
    insert_invoices(db, 20)
    insert_redemptions(db, sid, 20, 100)
    w = Worker(make_config(tmp_path, db, redis, fake_api, **{
        "database.query_timeout_ms": 7000, **pooled(db, txn_bouncer)}), "w", args=("once",))
    assert w.start().wait(30) == 0, w.log_tail()
    assert finished(db) == 0

    rows = db.query("SELECT tbl, op, sync, stmt_timeout, lock_timeout FROM seen")
    assert {r[0] for r in rows} == {"invoices", "redemptions", "ledger_transactions"}, rows
    assert {r[2:] for r in rows} == {("on", "7s", "7s")}, rows
    # Every server connection the pooler holds: none kept a setting of the worker's.
    for _ in range(8):
        conn = txn_bouncer.connect(db.name)
        with conn.cursor() as cur:
            cur.execute("SELECT current_setting('synchronous_commit'), "
                        "current_setting('statement_timeout'), current_setting('lock_timeout')")
            assert cur.fetchone() == ("off", "0", "0")
        conn.close()
    assert "prepared statement" not in w.log()
    assert "transaction pooling" in w.log()


def test_migrate_through_a_transaction_pooler_refuses_and_says_what_to_do(
        tmp_path, db, redis, fake_api, binary, txn_bouncer):
    keys = pooled(db, txn_bouncer)
    cfg = make_config(tmp_path, db, redis, fake_api, **keys)
    r = run_cli(cfg, "migrate")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "migrate refused" in r.stderr and "advisory lock" in r.stderr, r.stderr
    assert "database.listen_conninfo" in r.stderr, r.stderr
    assert db.scalar("SELECT to_regclass('schema_version')") is None

    # Given a direct connection, it migrates through that one.
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        **keys, "database.listen_conninfo": db.dsn})
    r = run_cli(cfg, "migrate")
    assert r.returncode == 0, r.stderr
    assert "migrating through database.listen_conninfo" in r.stderr
    assert db.scalar("SELECT max(version) FROM schema_version") >= 8

    # The operator's other commands keep nothing across transactions: they work through it.
    cfg = make_config(tmp_path, db, redis, fake_api, **keys)
    for args in (["pause", "--reason", "maintenance"], ["status"], ["resume"], ["audit"]):
        r = run_cli(cfg, *args)
        assert r.returncode == 0, (args, r.stdout + r.stderr)


def test_listen_conninfo_wakes_a_worker_behind_a_transaction_pooler(
        tmp_path, db, redis, fake_api, binary, txn_bouncer):
    """Polling once a minute: only the notification, heard on the direct
    listen_conninfo, can explain a quick pick-up."""
    keys = {**pooled(db, txn_bouncer), "worker.poll_interval_ms": 60000}
    migrate(make_config(tmp_path, db, redis, fake_api))

    # Without listen_conninfo: no LISTEN at all, and one line says why.
    w = Worker(make_config(tmp_path, db, redis, fake_api, **keys), "poll-only").start()
    wait_for(lambda: "connected to the database" in w.log(), 10, message=w.log)
    assert w.stop() == 0
    assert w.log().count("a transaction pooler cannot keep a LISTEN") == 1, w.log()
    assert "listening for new items" not in w.log()

    w = Worker(make_config(tmp_path, db, redis, fake_api, **{
        **keys, "database.listen_conninfo": db.dsn}), "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 10, message=w.log)
    time.sleep(0.3)     # let the first (empty) poll pass
    latencies = []
    for round_ in range(3):
        t0 = time.monotonic()
        insert_invoices(db, 5)
        wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'")
                 == 5 * (round_ + 1), 5, interval=0.01, message=w.log)
        latencies.append(time.monotonic() - t0)
    print(f"\nINSERT to paid through a transaction pooler, woken by LISTEN on "
          f"listen_conninfo: {', '.join(f'{s * 1000:.0f} ms' for s in latencies)} "
          f"(poll_interval_ms 60000)")
    assert max(latencies) < 2.0, latencies
    assert w.stop() == 0


@pytest.fixture
def crash_setup(tmp_path):
    """test_durability.py's cluster that loses every asynchronous commit it
    can, a database in it, and a transaction pooler in front."""
    cluster = PgCluster(settings=CRASH_SETTINGS)
    bouncer = None
    try:
        cluster.start()
        admin = cluster.connect("postgres")
        try:
            database = create_database(cluster, admin)
        finally:
            admin.close()
        bouncer = PgBouncer(cluster, "transaction", default_pool_size=5).start()
        yield cluster, database, bouncer
    finally:
        reap_workers()
        if bouncer is not None:
            bouncer.cleanup()
        cluster.cleanup()


def test_claim_and_hold_survive_a_crash_behind_a_transaction_pooler(
        tmp_path, crash_setup, redis, fake_api, binary):
    """test_durability.py's crash, with the worker behind a transaction
    pooler: its settings come with each transaction, not the session, and
    the claim and the hold of a redemption whose call is in flight are on
    disk when PostgreSQL dies although the server's default is
    synchronous_commit = off."""
    cluster, db, bouncer = crash_setup
    assert db.scalar("SHOW synchronous_commit") == "off"
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "worker.id": "crash-pooled", "locks.ttl_ms": 5000, "billing_api.timeout_ms": 15000,
        **pooled(db, bouncer)})
    migrate(make_config(tmp_path, db, redis, fake_api))
    sid = create_subsidy(db, "crash", 1000)
    [rid] = insert_redemptions(db, sid, 1, 1000)
    key = f"redemption-{rid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 4000, "times": 1}])
    settle_wal(db)

    w = Worker(cfg, "w").start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 1, 20, message=w.log)
    cluster.stop("immediate")
    cluster.start()
    after_crash = facts(db, rid)
    assert after_crash == {"status": "pending", "fence": 1, "locked_by": "crash-pooled",
                           "leased": True, "ambiguous": False, "holds": 1}, after_crash
    wait_for(lambda: db.scalar("SELECT status FROM redemptions WHERE id = %s", (rid,))
             == "redeemed", 60, message=w.log)
    assert w.stop() == 0
    assert list(fake_api.state()["applied"]) == [key]
    assert ledger_balance(db, sid) == 0


def test_a_refused_completion_is_rolled_back_and_parked_through_a_transaction_pooler(
        tmp_path, db, redis, fake_api, binary, txn_bouncer):
    """A statement that fails inside the pipelined transaction (a producer's
    trigger refuses one completion) leaves that transaction aborted on a
    server connection the pooler holds for us: it is rolled back, the
    batch is recorded row by row, the poison row parked with the reason,
    and the connection serves the next statements."""
    migrate(make_config(tmp_path, db, redis, fake_api))
    db.execute("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
          IF NEW.status = 'paid' AND NEW.customer_id = 'poison' THEN
            RAISE EXCEPTION 'producer refuses invoice %', NEW.id; END IF;
          RETURN NEW; END $$;
        CREATE TRIGGER refuse BEFORE UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION refuse();
    """)
    good = insert_invoices(db, 30)
    [poison] = insert_invoices(db, 1, customer="poison")
    good += insert_invoices(db, 30)
    w = Worker(make_config(tmp_path, db, redis, fake_api, **{
        **pooled(db, txn_bouncer), "billing_api.backoff_max_ms": 60000}), "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 60,
             20, message=w.log)
    wait_for(lambda: "producer refuses invoice" in (db.scalar(
        "SELECT last_error FROM invoices WHERE id = %s", (poison,)) or ""), 20, message=w.log)
    assert w.stop() == 0
    assert db.scalar("SELECT status FROM invoices WHERE id = %s", (poison,)) == "pending"
    for bad in ("prepared statement", "no transaction in progress",
                "current transaction is aborted"):
        assert bad not in w.log(), w.log_tail()
    assert {k: n for k, n in fake_api.state()["requests"].items() if n != 1} == {}


def test_server_side_timeouts_bound_statements_through_a_transaction_pooler(
        tmp_path, db, redis, fake_api, binary, txn_bouncer):
    """statement_timeout and lock_timeout come with each transaction: a
    renewal that waits on a row a producer holds is cancelled by the server
    after query_timeout_ms, not dropped by the client's deadline a second
    later, which is all that would be left without them."""
    migrate(make_config(tmp_path, db, redis, fake_api))
    [iid] = insert_invoices(db, 1)
    fake_api.faults([{"match": {"key": f"invoice-{iid}"}, "action": "delay", "delay_ms": 4000,
                      "times": 1}])
    w = Worker(make_config(tmp_path, db, redis, fake_api, **{
        **pooled(db, txn_bouncer), "database.query_timeout_ms": 500,
        "locks.ttl_ms": 10000, "locks.renew_interval_ms": 200}), "w").start()
    wait_for(lambda: fake_api.state()["requests"].get(f"invoice-{iid}", 0) == 1, 10,
             message=w.log)
    producer = db.connect(autocommit=False)
    with producer.cursor() as cur:
        cur.execute("SELECT 1 FROM invoices WHERE id = %s FOR UPDATE", (iid,))
        wait_for(lambda: "canceling statement due to" in w.log(), 5, message=w.log)
    producer.rollback()
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (iid,)) == "paid",
             15, message=w.log)
    assert w.stop() == 0
    assert "did not answer within" not in w.log(), w.log_tail()


def test_listen_conninfo_is_a_secret_like_conninfo(tmp_path, db, redis, fake_api, binary,
                                                   txn_bouncer):
    """A password in database.listen_conninfo makes the file a secret file,
    as one in database.conninfo does; it is never printed, and a string
    libpq cannot parse is refused at start under the key's own name."""
    password = "Listen-Pw-7f3a"
    migrate(make_config(tmp_path, db, redis, fake_api))
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        **pooled(db, txn_bouncer), "database.listen_conninfo": f"{db.dsn} password={password}"})
    os.chmod(cfg, 0o644)
    for cmd in ("check-config", "once", "migrate"):
        r = run_cli(cfg, cmd, timeout=20)
        assert r.returncode == 2, (cmd, r.stdout + r.stderr)
        assert "configuration file with a password in database.listen_conninfo" in r.stderr
        assert password not in r.stdout + r.stderr
    os.chmod(cfg, 0o600)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 10, message=w.log)
    assert w.stop() == 0
    assert password not in w.log()

    bad = make_config(tmp_path, db, redis, fake_api, **{
        **pooled(db, txn_bouncer), "database.listen_conninfo": "host=db1 sslmode"})
    r = run_cli(bad, "check-config")
    assert r.returncode == 2, r.stdout + r.stderr
    assert '"database.listen_conninfo" is not a valid connection string' in r.stderr, r.stderr

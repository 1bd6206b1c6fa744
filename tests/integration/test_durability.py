"""What survives a crash of PostgreSQL: claims and holds, whatever the server's default.

A claim and a hold allow an API call, so they must be on disk before the
call is made.  A server may well run with synchronous_commit = off as its
default (many do, for speed); a session that inherits it commits without
waiting for the WAL flush, and a crash then forgets a claim and a hold whose
call the API has already carried out.  The worker's session therefore sets
synchronous_commit = on itself (store_connect in store/store.c); only the
completions opt out, per transaction, because a lost completion is replayed.

These tests run on a private cluster of their own, configured to lose
every asynchronous commit it can: fsync on (what reached the disk is what
counts), synchronous_commit off by default, and the WAL writer flushing
only every 10 s (its maximum), so an asynchronous commit made just before
a crash is still in the server's buffers when it dies.  The crash is
`pg_ctl stop -m immediate`: the processes die without writing anything
more.  It is a process crash, not a power loss, so no page can be torn and
full_page_writes stays as the other tests have it.
"""

import atexit

import pytest

from harness import (PgCluster, Worker, create_database, create_subsidy, drop_database,
                     insert_redemptions, ledger_balance, make_config, migrate, reap_workers,
                     run_cli, wait_for)

CRASH_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "off",
    "wal_writer_delay": "10s",
}

# Long enough for the crash and the restart to happen while the call is in
# flight, and short against the worker's API timeout (no timeout involved).
CALL_DELAY_MS = 4000
LEASE_MS = 5000


@pytest.fixture(scope="module")
def crash_pg():
    cluster = PgCluster(settings=CRASH_SETTINGS)
    atexit.register(cluster.cleanup)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
        atexit.unregister(cluster.cleanup)


@pytest.fixture
def crash_db(crash_pg):
    crash_pg.start()
    admin = crash_pg.connect("postgres")
    try:
        database = create_database(crash_pg, admin)
    finally:
        admin.close()
    try:
        yield database
    finally:
        reap_workers()
        crash_pg.start()
        # A new connection: the crash broke every one made before it.
        admin = crash_pg.connect("postgres")
        try:
            drop_database(admin, database)
        finally:
            admin.close()


def settle_wal(db):
    """Makes everything committed so far durable, and starts a fresh WAL segment.

    pg_switch_wal() writes and flushes the WAL up to the switch, so the
    producer's rows cannot be what the crash loses; the segment it opens
    starts on a page boundary, so the worker's next few records fill no
    WAL page of their own, and no page full of WAL wakes the WAL writer
    early.
    """
    db.execute("SELECT pg_switch_wal()")


def facts(db, rid):
    row = db.query("SELECT status, fence, locked_by, lease_until IS NOT NULL, ambiguous "
                   "FROM redemptions WHERE id = %s", (rid,))[0]
    holds = db.scalar("SELECT count(*) FROM ledger_transactions "
                      "WHERE redemption_id = %s AND kind = 'hold'", (rid,))
    return {"status": row[0], "fence": row[1], "locked_by": row[2], "leased": row[3],
            "ambiguous": row[4], "holds": holds}


@pytest.mark.parametrize("worker_dies", [False, True], ids=["worker_survives", "worker_dies_too"])
def test_claim_and_hold_survive_a_postgres_crash_with_async_commit_default(
        tmp_path, crash_pg, crash_db, redis, fake_api, binary, worker_dies):
    """store_connect's session settings (store/store.c): the claim
    (store_claim) and the hold (store_reserve, bw_reserve) commit
    synchronously even when the server's default is synchronous_commit =
    off, so a crash while the API call is in flight loses neither.

    worker_survives: the worker rides the crash out and records the call's
    answer under its surviving claim.  Before the fix the claim and the hold
    were gone after the restart, the item pending and not ambiguous, the
    producer's next redemption took the balance, and the first one ended
    `failed` with "insufficient funds" although the API had fulfilled it.

    worker_dies_too: the worker is killed with the server; the next
    worker's claim finds the lease of the dead one, marks the item
    ambiguous, reuses the hold, and the replay records the fulfillment.
    """
    db = crash_db
    assert db.scalar("SHOW synchronous_commit") == "off"   # the server default under test
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "worker.id": "crash-w1",
        "locks.ttl_ms": LEASE_MS,
        "billing_api.timeout_ms": 15000,
    })
    migrate(cfg)
    sid = create_subsidy(db, "crash", 1000)
    [rid] = insert_redemptions(db, sid, 1, 1000)
    key = f"redemption-{rid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": CALL_DELAY_MS,
                      "times": 1}])
    settle_wal(db)

    w1 = Worker(cfg, "w1").start()
    # Claimed, held, and the call has reached the API: crash at once.
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 1, 20, message=w1.log)
    crash_pg.stop("immediate")
    if worker_dies:
        w1.kill()
    crash_pg.start()
    after_crash = facts(db, rid)

    # A producer spends what it believes is left of the subsidy.
    [rid2] = insert_redemptions(db, sid, 1, 1000, customer="learner-second")
    workers = [w1]
    if worker_dies:
        workers.append(Worker(make_config(tmp_path, db, redis, fake_api, **{
            "worker.id": "crash-w2", "locks.ttl_ms": LEASE_MS,
            "billing_api.timeout_ms": 15000}), "w2").start())
    logs = lambda: "".join(w.log() for w in workers)  # noqa: E731
    wait_for(lambda: db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'") == 0,
             60, message=logs)
    for w in workers:
        if w.alive():
            assert w.stop() == 0
    state = fake_api.state()
    outcome = {r[0]: r[1:] for r in db.query(
        "SELECT id, status, fulfillment_id, ambiguous, last_error FROM redemptions")}

    assert after_crash == {"status": "pending", "fence": 1, "locked_by": "crash-w1",
                           "leased": True, "ambiguous": False, "holds": 1}, (
        f"the claim or the hold of redemption {rid} was lost in the crash: after the restart "
        f"{after_crash}; in the end {outcome}, the API fulfilled {sorted(state['applied'])}")
    status, fulfillment, ambiguous, _ = outcome[rid]
    assert status == "redeemed", outcome
    assert state["applied"][key]["id"] == fulfillment
    # The next claim saw the dead worker's lease: the call may have happened.
    assert ambiguous is worker_dies, outcome
    assert outcome[rid2][0] == "failed" and outcome[rid2][3] == "insufficient funds", outcome
    assert list(state["applied"]) == [key], state["applied"]
    assert f"redemption-{rid2}" not in state["requests"]
    assert ledger_balance(db, sid) == 0
    assert db.query("SELECT redemption_id, kind, amount_cents FROM ledger_transactions "
                    "WHERE redemption_id IS NOT NULL") == [(rid, "hold", -1000)]
    r = run_cli(cfg, "audit")
    assert r.returncode == 0 and "audit: clean" in r.stdout, r.stdout + r.stderr

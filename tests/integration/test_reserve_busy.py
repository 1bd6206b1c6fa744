"""A producer's lock on one subsidy row stalls nothing but that subsidy.

The worker runs one event loop, so a reservation that waits on a row lock
makes every other item of the process wait with it.  bw_reserve (schema
version 8) takes the subsidy's row and the redemption's own FOR UPDATE
SKIP LOCKED: a redemption whose row another transaction holds is answered
'busy', nothing is written for it, and the worker puts it back for a few
hundred milliseconds without a call and without counting an attempt.

Before that, with a producer holding one subsidy FOR UPDATE, each worker
that reached a redemption of it waited out lock_timeout (10 s), and the
fleet's other items nearly stopped: this test measured them at well under
a fifth of their rate before the hold.
"""

import threading
import time

import psycopg2
import pytest

from harness import (Worker, create_subsidy, insert_invoices, insert_redemptions, make_config,
                     migrate, run_cli, wait_for)

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role

WORKERS = 3
API_LATENCY_MS = 100
BEFORE_S = 6.0          # steady flow measured before the hold
HOLD_S = 12.0           # longer than lock_timeout (10 s with the default query timeout)
TICK_S = 0.05           # the producer inserts every tick ...
PER_TICK = 2            # ... this many invoices and this many redemptions


def finished_not_on(db, sid, since, until):
    """Items not on subsidy SID that reached a final state in [since, until)."""
    return db.scalar(
        "SELECT (SELECT count(*) FROM invoices WHERE status <> 'pending' "
        "        AND finished_at >= to_timestamp(%(a)s) AND finished_at < to_timestamp(%(b)s))"
        "     + (SELECT count(*) FROM redemptions WHERE status <> 'pending' "
        "        AND subsidy_id <> %(sid)s "
        "        AND finished_at >= to_timestamp(%(a)s) AND finished_at < to_timestamp(%(b)s))",
        {"a": since, "b": until, "sid": sid})


def open_items(db):
    return db.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending') + "
                     "(SELECT count(*) FROM redemptions WHERE status = 'pending')")


class Producer(threading.Thread):
    """Inserts invoices and redemptions of the OTHER subsidies at a steady
    rate, and samples every subsidy's balance as it goes.  Never touches
    the held subsidy: its insert would wait on the held row (the foreign
    key's FOR KEY SHARE conflicts with FOR UPDATE)."""

    def __init__(self, db, others):
        super().__init__(daemon=True)
        self.db, self.others = db, others
        self.stop_event = threading.Event()
        self.error = None
        self.lowest_balance = None
        self.inserted = 0

    def run(self):
        try:
            n = 0
            while not self.stop_event.is_set():
                insert_invoices(self.db, PER_TICK, customer=f"cus_{n}_{{i}}", amount=500)
                insert_redemptions(self.db, self.others[n % len(self.others)], PER_TICK, 100,
                                   customer=f"learner-{n}-{{i}}")
                self.inserted += 2 * PER_TICK
                low = self.db.scalar("SELECT min(balance_cents) FROM subsidies")
                if self.lowest_balance is None or low < self.lowest_balance:
                    self.lowest_balance = low
                n += 1
                time.sleep(TICK_S)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def test_a_locked_subsidy_row_stalls_only_its_own_redemptions(tmp_path, db, redis, fake_api,
                                                              binary):
    cfgs = [make_config(tmp_path, db, redis, fake_api, **{
        "log.level": "debug" if i == 0 else "info",
        # Deferrals must not count: dozens of them each would exhaust this.
        "billing_api.max_attempts": 2}) for i in range(WORKERS)]
    migrate(cfgs[0])
    fake_api.faults([], latency_ms=API_LATENCY_MS)
    held = create_subsidy(db, "held", 10_000_000)
    others = [create_subsidy(db, f"other-{i}", 10_000_000) for i in range(3)]
    # The held subsidy's redemptions wait until the lock is taken, then come
    # due throughout the hold (a producer cannot insert them then: see
    # Producer).
    n_held = 60
    held_ids = insert_redemptions(db, held, n_held, 100, customer="held-{i}")
    db.execute("UPDATE redemptions SET next_attempt_at = 'infinity' WHERE subsidy_id = %s",
               (held,))

    workers = [Worker(cfg, f"w{i}").start() for i, cfg in enumerate(cfgs)]
    producer = Producer(db, others)
    locker = db.connect(autocommit=False)
    try:
        producer.start()
        time.sleep(1.0)                         # warm up: connections, prepared statements
        t0 = time.time()
        time.sleep(BEFORE_S - 1.0)
        t1 = time.time()
        with locker.cursor() as cur:
            cur.execute("SELECT balance_cents FROM subsidies WHERE id = %s FOR UPDATE", (held,))
        t2 = time.time()
        # Not a write to the held row: no foreign key check, no wait.
        db.execute("UPDATE redemptions SET next_attempt_at = now() "
                   "+ (id - %s) * %s * interval '1 second' WHERE subsidy_id = %s",
                   (held_ids[0], (HOLD_S - 2) / n_held, held))
        time.sleep(HOLD_S)
        # Every one of its redemptions due by now met the lock at least once.
        assert db.scalar("SELECT count(*) FROM redemptions WHERE subsidy_id = %s "
                         "AND status <> 'pending'", (held,)) == 0
        locker.rollback()
        t3 = time.time()
        time.sleep(1.0)
        producer.stop_event.set()
        producer.join(10)
    finally:
        if not locker.closed:
            locker.rollback()
            locker.close()
        producer.stop_event.set()
    assert producer.error is None, producer.error

    before = finished_not_on(db, held, t0, t1) / (t1 - t0)
    during = finished_not_on(db, held, t2, t3) / (t3 - t2)
    print(f"\nitems not on the held subsidy: {before:.1f}/s before the hold, "
          f"{during:.1f}/s during it ({during / before:.2f}x); "
          f"producer offered {2 * PER_TICK / TICK_S:.0f}/s at most")
    assert before > 20, f"too little flow to measure: {before:.1f}/s"
    assert during >= 0.8 * before, f"{during:.1f}/s during the hold, {before:.1f}/s before"

    wait_for(lambda: open_items(db) == 0, 60, interval=0.2,
             message=lambda: f"{open_items(db)} open; {workers[0].log_tail()}")
    for w in workers:
        assert w.stop() == 0

    # Every item final, charged exactly once, once called.
    state = fake_api.state()
    applied, requests = state["applied"], state["requests"]
    for table, prefix, id_col, done in (("invoices", "invoice", "charge_id", "paid"),
                                        ("redemptions", "redemption", "fulfillment_id",
                                         "redeemed")):
        rows = db.query(f"SELECT id, status, {id_col}, attempts, ambiguous, last_error "
                        f"FROM {table}")
        assert rows
        for iid, status, result_id, attempts, ambiguous, err in rows:
            key = f"{prefix}-{iid}"
            assert status == done, (key, status, err)
            assert applied[key]["id"] == result_id, key
            assert requests[key] == 1, (key, requests[key])
            # A deferral is no attempt and no doubt.
            assert (attempts, ambiguous) == (1, False), (key, attempts, ambiguous, err)

    # The held subsidy's redemptions were put back, not failed for want of funds.
    assert db.scalar("SELECT count(*) FROM redemptions WHERE subsidy_id = %s "
                     "AND status = 'redeemed'", (held,)) == n_held
    deferred = db.scalar(
        "SELECT count(*) FROM attempts a JOIN redemptions r ON r.id = a.item_id "
        "WHERE a.kind = 'redemption' AND r.subsidy_id = %s AND a.class = 'not called' "
        "AND a.error LIKE '%%locked by another transaction%%'", (held,))
    assert deferred >= n_held // 2, deferred
    # Another worker's reservation on the same subsidy holds its row for a
    # few milliseconds and is skipped too: say how often that cost a delay.
    crossed = db.scalar(
        "SELECT count(*) FROM attempts a JOIN redemptions r ON r.id = a.item_id "
        "WHERE a.kind = 'redemption' AND r.subsidy_id <> %s AND a.class = 'not called' "
        "AND a.error LIKE '%%locked by another transaction%%'", (held,))
    print(f"deferrals: {deferred} on the held subsidy ({n_held} redemptions), {crossed} "
          f"on the others ({db.scalar('SELECT count(*) FROM redemptions') - n_held} "
          "redemptions, behind other workers' reservations)")
    assert db.scalar("SELECT count(*) FROM attempts WHERE error LIKE '%%insufficient%%'") == 0
    log0 = workers[0].log()
    assert "locked by another transaction; tried again in" in log0
    for w in workers:
        assert " error " not in w.log(), w.log_tail()

    # The books: each redemption holds exactly its amount once, balances
    # match their ledgers and never went below zero.
    for rid, net, holds in db.query(
            "SELECT r.id, coalesce(sum(l.amount_cents), 0), "
            "count(l.id) FILTER (WHERE l.kind = 'hold') FROM redemptions r "
            "LEFT JOIN ledger_transactions l ON l.redemption_id = r.id GROUP BY r.id"):
        assert (net, holds) == (-100, 1), (rid, net, holds)
    for sid, cached, total in db.query(
            "SELECT s.id, s.balance_cents, coalesce(sum(l.amount_cents), 0) FROM subsidies s "
            "LEFT JOIN ledger_transactions l ON l.subsidy_id = s.id GROUP BY s.id"):
        assert cached == total >= 0, (sid, cached, total)
    assert producer.lowest_balance is not None and producer.lowest_balance >= 0
    r = run_cli(cfgs[0], "audit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit: clean" in r.stdout


def test_reserve_skips_only_rows_other_transactions_hold(tmp_path, db, redis, fake_api, binary):
    """bw_reserve itself: a subsidy row another transaction holds makes its
    redemptions 'busy' at once, with nothing written, while the rest of the
    batch is reserved; a row the reservation itself locked (two redemptions
    of one subsidy) is not skipped; a redemption row another transaction
    holds is 'busy' too."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    locked, free = create_subsidy(db, "locked", 1000), create_subsidy(db, "free", 1000)
    a, b = insert_redemptions(db, locked, 2, 100)
    c, d, e = insert_redemptions(db, free, 3, 100)
    db.execute("UPDATE redemptions SET fence = 1")
    holder, reserver = db.connect(autocommit=False), db.connect(autocommit=False)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM subsidies WHERE id = %s FOR UPDATE", (locked,))
            cur.execute("SELECT 1 FROM redemptions WHERE id = %s FOR UPDATE", (e,))
        with reserver.cursor() as cur:
            cur.execute("SET lock_timeout = '5s'")
            began = time.monotonic()
            cur.execute("SELECT rid, result FROM bw_reserve(%s::bigint[], %s::bigint[])",
                        ([a, b, c, d, e], [1] * 5))
            results = dict(cur.fetchall())
            took = time.monotonic() - began
        reserver.commit()
    finally:
        holder.rollback()
        holder.close()
        reserver.close()
    assert results == {a: "busy", b: "busy", c: "held", d: "held", e: "busy"}
    assert took < 1.0, f"the reservation waited {took:.1f} s"
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (locked,)) == 1000
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (free,)) == 800
    holds = {r for (r,) in db.query("SELECT redemption_id FROM ledger_transactions "
                                    "WHERE kind = 'hold'")}
    assert holds == {c, d}


def test_a_busy_redemption_keeps_its_attempts_and_ambiguity(tmp_path, db, redis, fake_api,
                                                            binary):
    """The deferral through the worker: an ambiguous redemption with one
    attempt behind it, its subsidy locked, is put back again and again
    without a call; it stays ambiguous, its attempts stay 1 (max_attempts 2
    would otherwise fail it), and once the lock goes it is redeemed."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.max_attempts": 2,
                                                        "log.level": "debug"})
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 100)
    db.execute("UPDATE redemptions SET attempts = 1, ambiguous = true, "
               "last_error = 'timed out' WHERE id = %s", (rid,))
    holder = db.connect(autocommit=False)
    w = Worker(cfg, "w").start()
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM subsidies WHERE id = %s FOR UPDATE", (sid,))
        wait_for(lambda: w.log().count(f"redemption {rid}: subsidy {sid} or the redemption's "
                                       "row is locked") >= 3, 20, message=w.log)
        status, attempts, ambiguous = db.query(
            "SELECT status, attempts, ambiguous FROM redemptions WHERE id = %s", (rid,))[0]
        assert (status, attempts, ambiguous) == ("pending", 1, True)
        assert f"redemption-{rid}" not in fake_api.state()["requests"]
        assert db.scalar("SELECT count(*) FROM ledger_transactions WHERE redemption_id = %s",
                         (rid,)) == 0
    finally:
        holder.rollback()
        holder.close()
    wait_for(lambda: db.scalar("SELECT status FROM redemptions WHERE id = %s", (rid,))
             == "redeemed", 20, message=w.log)
    assert w.stop() == 0
    assert db.query("SELECT attempts, ambiguous FROM redemptions WHERE id = %s",
                    (rid,))[0] == (2, True)
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 900
    assert " error " not in w.log() and "warning" not in w.log(), w.log()


def test_a_producers_open_insert_does_not_make_its_subsidy_busy(tmp_path, db, redis, fake_api,
                                                                binary):
    """A producer's transaction that inserted a redemption and has not yet
    committed holds FOR KEY SHARE on its subsidy (the foreign key's check).
    The reservation takes the subsidy FOR NO KEY UPDATE, which does not
    conflict with it: the other redemptions of that subsidy are reserved,
    not deferred for as long as the producer's transaction stays open."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "busy-producer", 1000)
    (a,) = insert_redemptions(db, sid, 1, 100)
    db.execute("UPDATE redemptions SET fence = 1")
    producer, reserver = db.connect(autocommit=False), db.connect(autocommit=False)
    try:
        with producer.cursor() as cur:
            cur.execute("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                        "VALUES (%s, 'learner-open', 100)", (sid,))
        with reserver.cursor() as cur:
            cur.execute("SET lock_timeout = '5s'")
            cur.execute("SELECT rid, result FROM bw_reserve(%s::bigint[], %s::bigint[])",
                        ([a], [1]))
            results = dict(cur.fetchall())
        reserver.commit()
    finally:
        producer.rollback()
        producer.close()
        reserver.close()
    assert results == {a: "held"}
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 900

"""Redemptions against subsidy ledgers: the balance never goes negative."""

import random
import threading
import time

import psycopg2

import pytest

from harness import (migrate, Worker, create_subsidy, insert_redemptions, make_config, run_cli,
                     wait_for)

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role


def open_redemptions(db):
    return db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'")


def assert_redemption_books(db, fake_api):
    """Each redemption's ledger net is exact and agrees with the API's record."""
    applied = fake_api.state()["applied"]
    rows = db.query(
        "SELECT r.id, r.status, r.amount_cents, r.fulfillment_id, "
        "       coalesce(sum(l.amount_cents), 0), count(l.id) FILTER (WHERE l.kind = 'hold') "
        "FROM redemptions r LEFT JOIN ledger_transactions l ON l.redemption_id = r.id "
        "GROUP BY r.id ORDER BY r.id")
    for rid, status, amount, fid, net, holds in rows:
        key = f"redemption-{rid}"
        assert holds <= 1, f"{key} has {holds} holds"
        if status == "redeemed":
            assert net == -amount, f"{key} redeemed but nets {net}"
            assert applied[key]["id"] == fid
        elif status == "failed":
            assert net == 0, f"{key} failed but nets {net}"
            assert key not in applied, f"{key} failed but the API redeemed it"
        else:
            raise AssertionError(f"{key} still {status}")
    deposits = db.scalar("SELECT coalesce(sum(amount_cents), 0) FROM ledger_transactions "
                         "WHERE kind = 'deposit'")
    debits = -db.scalar("SELECT coalesce(sum(amount_cents), 0) FROM ledger_transactions "
                        "WHERE kind <> 'deposit'")
    assert debits <= deposits
    for sid, cached, total in db.query(
            "SELECT s.id, s.balance_cents, coalesce(sum(l.amount_cents), 0) FROM subsidies s "
            "LEFT JOIN ledger_transactions l ON l.subsidy_id = s.id GROUP BY s.id"):
        assert cached == total >= 0, f"subsidy {sid}: cached {cached}, ledger {total}"
    return rows


def audit_clean(cfg):
    r = run_cli(cfg, "audit")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit: clean" in r.stdout


def test_two_concurrent_reservations_against_10_let_one_through(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "tight", 10)
    r7, r4 = (db.scalar("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                        "VALUES (%s, %s, %s) RETURNING id", (sid, c, a))
              for c, a in (("a", 7), ("b", 4)))
    db.execute("UPDATE redemptions SET fence = 1")
    # Both transactions check the balance "at the same moment": the first holds
    # the subsidy's row while the second arrives, which is answered 'busy' at
    # once (schema version 8: no reservation waits on a row lock) with
    # nothing written; tried again once the first committed, it sees 3 left
    # and refuses.
    c1, c2 = db.connect(autocommit=False), db.connect(autocommit=False)
    try:
        cur1, cur2 = c1.cursor(), c2.cursor()
        cur1.execute("SELECT result FROM bw_reserve(ARRAY[%s]::bigint[], ARRAY[1]::bigint[])", (r7,))
        assert cur1.fetchone()[0] == "held"
        cur2.execute("SET lock_timeout = '5s'")
        began = time.monotonic()
        cur2.execute("SELECT result FROM bw_reserve(ARRAY[%s]::bigint[], ARRAY[1]::bigint[])", (r4,))
        assert cur2.fetchone()[0] == "busy"
        assert time.monotonic() - began < 1, "the second reservation waited for the first"
        c2.commit()
        c1.commit()
        cur2.execute("SELECT result FROM bw_reserve(ARRAY[%s]::bigint[], ARRAY[1]::bigint[])", (r4,))
        assert cur2.fetchone()[0] == "insufficient"
        c2.commit()
    finally:
        c1.close()
        c2.close()
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 3
    assert db.scalar("SELECT sum(amount_cents) FROM ledger_transactions WHERE subsidy_id = %s", (sid,)) == 3


def test_database_refuses_any_overdraft(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 10)
    rid = db.scalar("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                    "VALUES (%s, 'x', 11) RETURNING id", (sid,))
    try:
        db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind) "
                   "VALUES (%s, -11, %s, 'hold')", (sid, rid))
        raise AssertionError("an overdraft was accepted")
    except psycopg2.errors.CheckViolation:
        pass
    try:
        db.execute("UPDATE ledger_transactions SET amount_cents = 1000")
        raise AssertionError("the ledger was updated")
    except psycopg2.Error:
        pass


def test_redemption_flow(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "acme", 10000)
    ok = insert_redemptions(db, sid, 3, 2500)
    [declined] = insert_redemptions(db, sid, 1, 1000, customer="declined-{i}")
    [too_big] = insert_redemptions(db, sid, 1, 5000, customer="big-{i}")
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {rid: (status, err) for rid, status, err in
            db.query("SELECT id, status, last_error FROM redemptions")}
    for rid in ok:
        assert rows[rid][0] == "redeemed"
    assert rows[declined][0] == "failed" and "redemption_declined" in rows[declined][1]
    # 3 x 2500 leaves 2500 (the declined hold given back): 5000 is refused without a call.
    assert rows[too_big] == ("failed", "insufficient funds")
    state = fake_api.state()
    assert f"redemption-{too_big}" not in state["requests"]
    assert db.scalar("SELECT attempts FROM redemptions WHERE id = %s", (too_big,)) == 0
    body = state["applied"][f"redemption-{ok[0]}"]["body"]
    assert body == {"redemption_id": ok[0], "subsidy_id": sid, "customer": "learner-0", "amount": 2500}
    assert_redemption_books(db, fake_api)
    assert db.scalar("SELECT balance_cents FROM subsidies") == 2500
    audit_clean(cfg)


def test_hold_left_by_a_crash_is_reused_not_doubled(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 5000)
    [rid] = insert_redemptions(db, sid, 1, 3000)
    # The state a worker killed between its hold and its API call leaves behind.
    db.execute("UPDATE redemptions SET fence = 1, locked_by = 'dead:1', "
               "lease_until = now() - interval '1 s', next_attempt_at = now() - interval '1 s'")
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind) "
               "VALUES (%s, -3000, %s, 'hold')", (sid, rid))
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert db.query("SELECT status, ambiguous FROM redemptions") == [("redeemed", True)]
    assert db.scalar("SELECT count(*) FROM ledger_transactions WHERE redemption_id = %s", (rid,)) == 1
    assert db.scalar("SELECT balance_cents FROM subsidies") == 2000
    assert fake_api.state()["requests"][f"redemption-{rid}"] == 1
    audit_clean(cfg)


def test_worker_killed_mid_redemption_call(tmp_path, db, redis, fake_api, binary):
    cfg_a = make_config(tmp_path, db, redis, fake_api)
    cfg_b = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg_a)
    sid = create_subsidy(db, "s", 5000)
    [rid] = insert_redemptions(db, sid, 1, 3000)
    key = f"redemption-{rid}"
    fake_api.faults([{"match": {"key": key}, "action": "delay", "delay_ms": 2500, "times": 1}])
    a = Worker(cfg_a, "a").start()
    wait_for(lambda: fake_api.state()["requests"].get(key, 0) >= 1, 10)
    a.kill()
    b = Worker(cfg_b, "b").start()
    wait_for(lambda: open_redemptions(db) == 0, 30, message=b.log)
    assert b.stop() == 0
    assert_redemption_books(db, fake_api)
    assert db.scalar("SELECT count(*) FROM ledger_transactions WHERE redemption_id = %s", (rid,)) == 1
    audit_clean(cfg_b)


class Sampler(threading.Thread):
    """Reads every subsidy's balance, cached and summed, as often as it can."""

    def __init__(self, db):
        super().__init__(daemon=True)
        self.db = db
        self.stop_flag = threading.Event()
        self.samples = 0
        self.negatives = []

    def run(self):
        conn = self.db.connect()
        cur = conn.cursor()
        while not self.stop_flag.is_set():
            cur.execute("SELECT s.id, s.balance_cents, coalesce(sum(l.amount_cents), 0) "
                        "FROM subsidies s LEFT JOIN ledger_transactions l ON l.subsidy_id = s.id "
                        "GROUP BY s.id")
            for sid, cached, total in cur.fetchall():
                if cached < 0 or total < 0:
                    self.negatives.append((sid, cached, total))
            self.samples += 1
            time.sleep(0.005)
        conn.close()


def run_ledger_race(tmp_path, db, redis, fake_api, kill_randomly):
    modes = ["redis"] * 4 + ["skip-locked"] * 2 + ["auto"] * 2
    # Few calls per worker on a slow API: the race lasts seconds, so the
    # sampler and the deposits overlap it.
    cfgs = [make_config(tmp_path, db, redis, fake_api, **{"locks.mode": m, "worker.concurrency": 2,
                                                          "worker.batch_size": 2})
            for m in modes]
    migrate(cfgs[0])
    rng = random.Random(int(time.time()))
    subsidies = [create_subsidy(db, f"s{i}", 20000) for i in range(3)]
    # 300 redemptions averaging 500: 150 000 asked of 60 000 + 15 000 deposited later.
    for sid in subsidies:
        db.execute("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                   "SELECT %s, 'learner-' || g, 100 + (g * 37) %% 800 FROM generate_series(1, 100) g",
                   (sid,))
    fake_api.faults([], latency_ms=150)
    sampler = Sampler(db)
    sampler.start()
    workers = [Worker(c, f"w{i}-{m}") for i, (c, m) in enumerate(zip(cfgs, modes))]
    for w in workers:
        w.start()
    kills = 0
    deadline = time.time() + 90
    deposits = 0
    while open_redemptions(db) > 0 and time.time() < deadline:
        if deposits < 15:                       # producers fund while redemptions run
            assert open_redemptions(db) > 0
            db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, 1000)",
                       (rng.choice(subsidies),))
            deposits += 1
        if kill_randomly and kills < 12:
            victim = rng.choice(workers)
            victim.kill()
            kills += 1
            victim.start()
        time.sleep(rng.uniform(0.05, 0.25))
    wait_for(lambda: open_redemptions(db) == 0, 60, interval=0.2,
             message=lambda: f"{open_redemptions(db)} open")
    for w in workers:
        assert w.stop() == 0
    sampler.stop_flag.set()
    sampler.join(10)
    assert sampler.samples > 50, sampler.samples
    assert sampler.negatives == []
    rows = assert_redemption_books(db, fake_api)
    statuses = [r[1] for r in rows]
    assert statuses.count("redeemed") > 50 and statuses.count("failed") > 50
    audit_clean(cfgs[0])
    return kills


def test_eight_workers_with_concurrent_deposits_never_overdraw(tmp_path, db, redis, fake_api, binary):
    run_ledger_race(tmp_path, db, redis, fake_api, kill_randomly=False)


def test_eight_workers_killed_at_random_never_overdraw(tmp_path, db, redis, fake_api, binary):
    assert run_ledger_race(tmp_path, db, redis, fake_api, kill_randomly=True) > 0


def test_audit_reports_violations(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 300)
    # Redeemed without the hold that should stand as its debit.
    db.execute("UPDATE redemptions SET status = 'redeemed', fulfillment_id = 'rd_x'")
    db.execute("UPDATE subsidies SET balance_cents = 999")
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency, lease_until, locked_by) "
               "VALUES ('c', 1, 'usd', now() - interval '1 hour', 'gone:1')")
    r = run_cli(cfg, "audit")
    assert r.returncode == 1
    assert f"redemption {rid} is redeemed but its ledger rows net to 0" in r.stdout
    assert "cached balance 999 differs from its ledger sum 1000" in r.stdout
    assert "no worker is taking it" in r.stdout
    assert "audit: 3 violations" in r.stdout

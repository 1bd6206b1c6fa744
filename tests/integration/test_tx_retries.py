"""Deadlocks and serialization failures: the store redoes the statement or
transaction the server rolled back, a bounded number of times, counts and
logs each retry, and never records an outcome twice or loses one.

The failures are real server errors (SQLSTATE 40001 / 40P01) raised by
triggers the tests install, counted by sequences, which a rollback does not
reset: "fail the first N times" is exact.
"""

import re

from harness import (migrate, Worker, create_subsidy, insert_invoices, insert_redemptions,
                     make_config, wait_for)

RETRY = "hit a deadlock or serialization failure, retrying"

FAULT_FN = """
CREATE FUNCTION test_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- TG_ARGV: the sequence that counts, how many times to fail, the SQLSTATE.
    IF nextval(TG_ARGV[0]) <= TG_ARGV[1]::int THEN
        RAISE EXCEPTION 'injected % on %', TG_ARGV[2], TG_TABLE_NAME
            USING ERRCODE = TG_ARGV[2];
    END IF;
    RETURN NEW;
END $$
"""


def fail_first(db, name, op, table, when, times, sqlstate):
    """The first TIMES rows of TABLE that OP writes and match WHEN fail with SQLSTATE."""
    db.execute(f"CREATE SEQUENCE {name}_seq")
    db.execute(f"CREATE TRIGGER {name} BEFORE {op} ON {table} FOR EACH ROW "
               f"WHEN ({when}) EXECUTE FUNCTION test_fault('{name}_seq', '{times}', "
               f"'{sqlstate}')")


# A claim bumps the fence; a completion moves the status on.
CLAIM = "NEW.fence <> OLD.fence"
COMPLETION = "NEW.status <> OLD.status"


def stopped_line(w):
    m = re.search(r"stopped: .* (\d+) transaction retries", w.log())
    assert m, w.log()
    return int(m.group(1))


def test_claim_and_completion_are_redone_after_a_deadlock(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute(FAULT_FN)
    fail_first(db, "claim_fault", "UPDATE", "invoices", CLAIM, 2, "40P01")
    fail_first(db, "complete_fault", "UPDATE", "invoices", COMPLETION, 2, "40001")
    [iid] = insert_invoices(db, 1)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (iid,)) == "paid",
             20, message=w.log)
    assert w.stop() == 0
    log = w.log()
    assert log.count(f"claim of invoices {RETRY}") == 2, log
    assert log.count(f"completion of 1 items {RETRY}") == 2, log
    assert "could not record" not in log, log
    assert stopped_line(w) == 4
    assert fake_api.state()["requests"] == {f"invoice-{iid}": 1}
    assert db.scalar("SELECT attempts FROM invoices WHERE id = %s", (iid,)) == 1


def test_a_completion_is_redone_at_most_five_times_in_a_row(tmp_path, db, redis, fake_api, binary):
    """Seven failures: five in the first call, which gives up; the loop keeps
    the outcome and tries again after its backoff, where two more fail."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute(FAULT_FN)
    fail_first(db, "complete_fault", "UPDATE", "invoices", COMPLETION, 7, "40001")
    [iid] = insert_invoices(db, 1)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (iid,)) == "paid",
             20, message=w.log)
    assert w.stop() == 0
    log = w.log()
    before, gave_up, after = log.partition("could not record 1 outcome: complete: ")
    assert gave_up, log
    assert before.count(f"completion of 1 items {RETRY}") == 5, log
    assert after.count(f"completion of 1 items {RETRY}") == 2, log
    assert "recording outcomes again after" in after, log
    assert stopped_line(w) == 7
    assert fake_api.state()["requests"] == {f"invoice-{iid}": 1}


def test_a_reservation_is_redone_after_a_deadlock(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    db.execute(FAULT_FN)
    fail_first(db, "hold_fault", "INSERT", "ledger_transactions", "NEW.kind = 'hold'", 2, "40P01")
    [rid] = insert_redemptions(db, sid, 1, 300)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT status FROM redemptions WHERE id = %s", (rid,)) ==
             "redeemed", 20, message=w.log)
    assert w.stop() == 0
    log = w.log()
    assert log.count(f"reservation of 1 redemptions {RETRY}") == 2, log
    assert stopped_line(w) == 2
    assert db.query("SELECT kind, amount_cents FROM ledger_transactions "
                    "WHERE redemption_id = %s", (rid,)) == [("hold", -300)]
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 700


def test_both_kinds_are_redone_together(tmp_path, db, redis, fake_api, binary):
    """A batch of both kinds is one transaction: when the redemption fails
    after the invoice was written, the invoice is rolled back and written
    again with it, not turned away the second time as a claim lost."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    # Until the gate opens every completion fails, so both outcomes queue up;
    # once it is open, the redemption's first completion fails once more.
    db.execute("CREATE TABLE test_gate (open bool NOT NULL)")
    db.execute("INSERT INTO test_gate VALUES (false)")
    db.execute("CREATE SEQUENCE once_seq")
    db.execute("""
        CREATE FUNCTION test_gated() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NOT (SELECT open FROM test_gate) THEN
                RAISE EXCEPTION 'gate closed' USING ERRCODE = '40001';
            END IF;
            IF TG_TABLE_NAME = 'redemptions' AND nextval('once_seq') = 1 THEN
                RAISE EXCEPTION 'injected once' USING ERRCODE = '40P01';
            END IF;
            RETURN NEW;
        END $$""")
    for table in ("invoices", "redemptions"):
        db.execute(f"CREATE TRIGGER gate BEFORE UPDATE ON {table} FOR EACH ROW "
                   f"WHEN (NEW.status <> OLD.status) EXECUTE FUNCTION test_gated()")
    [iid] = insert_invoices(db, 1)
    [rid] = insert_redemptions(db, sid, 1, 300)
    w = Worker(cfg, "w").start()
    # Both called, and a flush carried both: from now on every flush does.
    wait_for(lambda: len(fake_api.state()["requests"]) == 2 and
             f"completion of 2 items {RETRY}" in w.log(), 20, message=w.log)
    db.execute("UPDATE test_gate SET open = true")
    wait_for(lambda: db.scalar("SELECT status FROM redemptions WHERE id = %s", (rid,)) ==
             "redeemed", 20, message=w.log)
    assert db.scalar("SELECT status FROM invoices WHERE id = %s", (iid,)) == "paid"
    # The redemption failed once after the gate opened, then went through.
    assert db.scalar("SELECT last_value FROM once_seq") == 2
    assert w.stop() == 0
    log = w.log()
    assert "was lost to another worker" not in log, log
    assert re.search(r"stopped: 2 done, .* 0 not recorded", log), log
    assert fake_api.state()["requests"] == {f"invoice-{iid}": 1, f"redemption-{rid}": 1}

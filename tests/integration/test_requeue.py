"""billing-worker requeue: a failed item back for a new charge attempt, under a new key.

Only failed items qualify (the contract: a failed item has no success at the
API under its key).  The new attempt is generation 2, 3 ...: its key is
invoice-17-2, so the API's stored refusal under invoice-17 is not replayed,
and the first generation's key stays what it was.  A redemption reserves
afresh in its new generation; the old hold and reversal still net to zero.
"""

import json
import re

import pytest

from harness import (Worker, create_subsidy, insert_invoices, insert_redemptions,
                     ledger_balance, make_config, migrate, run_cli, wait_for)

# The worker and the command run as billing_worker (sql/roles.sql): the grants are tested too.
pytestmark = pytest.mark.worker_role

ITEM_COLUMNS = ("status, generation, fence, attempts, blocked_calls, ambiguous, last_error, "
                "needs_operator, next_attempt_at, first_claimed_at, finished_at, locked_by, "
                "lease_until")


def row(db, table, item_id):
    return db.query(f"SELECT {ITEM_COLUMNS} FROM {table} WHERE id = %s", (item_id,))[0]


def once(cfg):
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr


def audit_clean(cfg):
    r = run_cli(cfg, "audit")
    assert r.returncode == 0 and "audit: clean" in r.stdout, r.stdout + r.stderr


def requeues(db):
    return db.query("SELECT kind, item_id, from_generation, reason, requeued_by "
                    "FROM requeues ORDER BY id")


def test_declined_invoice_is_paid_under_its_second_key(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    [good] = insert_invoices(db, 1)
    once(cfg)
    status, gen, fence, attempts, *_ = row(db, "invoices", bad)
    assert (status, gen, attempts) == ("failed", 1, 1)
    # The producer fixes the customer; an operator puts the invoice back.
    db.execute("UPDATE invoices SET customer_id = 'cus_fixed' WHERE id = %s", (bad,))
    r = run_cli(cfg, "requeue", "invoice", bad, "--reason", "customer updated the card")
    assert r.returncode == 0, r.stderr
    assert f'requeued invoice {bad}: generation 2, key "invoice-{bad}-2"' in r.stdout
    assert "requeued 1 invoice" in r.stdout
    # Pending and due as a fresh row would be, in generation 2, with the fence bumped
    # so no completion of generation 1 can land.
    (status, gen, fence2, attempts, blocked, ambiguous, last_error, operator, due,
     first_claimed, finished, locked_by, lease) = row(db, "invoices", bad)
    assert (status, gen, attempts, blocked, ambiguous, last_error, operator) == \
        ("pending", 2, 0, 0, False, None, None)
    assert fence2 == fence + 1
    assert (first_claimed, finished, locked_by, lease) == (None, None, None, None)
    assert db.scalar("SELECT next_attempt_at <= now() FROM invoices WHERE id = %s", (bad,))
    assert db.scalar("SELECT charge_id FROM invoices WHERE id = %s", (bad,)) is None
    [(kind, item_id, from_gen, reason, by)] = requeues(db)
    assert (kind, item_id, from_gen, reason) == ("invoice", bad, 1, "customer updated the card")
    assert re.fullmatch(r"\S+@\S+", by), by

    once(cfg)
    status, charge_id, attempts = db.query(
        "SELECT status, charge_id, attempts FROM invoices WHERE id = %s", (bad,))[0]
    assert (status, attempts) == ("paid", 1)
    state = fake_api.state()
    # The API saw both keys once each; the first generation's key is unchanged
    # (it still holds the refusal) and the new one the charge.
    assert state["requests"][f"invoice-{bad}"] == 1
    assert state["requests"][f"invoice-{bad}-2"] == 1
    assert state["results"][f"invoice-{bad}"]["status"] == 402
    assert state["applied"][f"invoice-{bad}-2"]["id"] == charge_id
    assert state["applied"][f"invoice-{bad}-2"]["body"]["customer"] == "cus_fixed"
    assert f"invoice-{bad}" not in state["applied"]
    # An item never requeued keeps the contract's key.
    assert f"invoice-{good}" in state["applied"] and f"invoice-{good}-2" not in state["requests"]
    audit_clean(cfg)


def test_a_running_worker_takes_a_requeue_at_once(tmp_path, db, redis, fake_api, binary):
    """requeue notifies the workers: none waits for its next poll (here 60 s)."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.poll_interval_ms": 60000})
    migrate(cfg)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    w = Worker(cfg, "w1").start()
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (bad,)) == "failed",
             15, message=w.log)
    db.execute("UPDATE invoices SET customer_id = 'cus_fixed' WHERE id = %s", (bad,))
    r = run_cli(cfg, "requeue", "invoice", bad, "--reason", "card updated")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: db.scalar("SELECT status FROM invoices WHERE id = %s", (bad,)) == "paid",
             10, message=w.log)
    assert f"invoice-{bad}-2" in fake_api.state()["applied"]
    assert w.stop() == 0


def test_dry_run_lists_and_changes_nothing(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    once(cfg)
    before = row(db, "invoices", bad)
    for args in (("invoice", bad), ("invoice", "--failed")):
        r = run_cli(cfg, "requeue", *args, "--dry-run", "--reason", "looking first")
        assert r.returncode == 0, r.stderr
        assert re.search(rf'^would requeue invoice {bad}: generation 2, key "invoice-{bad}-2" '
                         rf'\(failed \S+ \S+: .*card_declined.*\)$', r.stdout, re.M), r.stdout
        assert "dry run: 1 invoice would be requeued; nothing changed" in r.stdout
    assert row(db, "invoices", bad) == before
    assert requeues(db) == []
    assert fake_api.state()["requests"] == {f"invoice-{bad}": 1}


def test_paid_pending_and_missing_items_are_refused(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    [paid] = insert_invoices(db, 1)
    once(cfg)
    [pending] = insert_invoices(db, 1)
    before = {i: row(db, "invoices", i) for i in (bad, paid, pending)}
    # One item that may not be requeued stops the whole command: the failed one stays too.
    r = run_cli(cfg, "requeue", "invoice", bad, paid, "--reason", "retry")
    assert r.returncode == 1
    assert f"invoice {paid} is paid, not failed: only a failed item may be requeued" in r.stderr
    assert "a new attempt would charge it again" in r.stderr
    assert "nothing requeued: 1 of the invoices named may not be" in r.stderr
    r = run_cli(cfg, "requeue", "invoice", pending, "--reason", "retry")
    assert r.returncode == 1
    assert f"invoice {pending} is pending, not failed" in r.stderr
    assert "still being worked on" in r.stderr
    r = run_cli(cfg, "requeue", "invoice", 999999, "--reason", "retry")
    assert r.returncode == 1 and "invoice 999999 does not exist" in r.stderr
    # A redemption id is not an invoice id: the kind is the table.
    r = run_cli(cfg, "requeue", "redemption", bad, "--reason", "retry")
    assert r.returncode == 1 and f"redemption {bad} does not exist" in r.stderr
    assert r.stdout == ""
    assert {i: row(db, "invoices", i) for i in before} == before
    assert requeues(db) == []


def test_failed_selects_by_error_and_since(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    declined = insert_invoices(db, 4, customer="declined_{i}")
    bad_currency = insert_invoices(db, 2, currency="dollars")
    once(cfg)
    # Two of the declined ones failed long ago.
    old = declined[:2]
    db.execute("UPDATE invoices SET finished_at = now() - interval '3 hours' "
               "WHERE id = ANY(%s)", (old,))
    since = db.scalar("SELECT (now() - interval '1 hour')::text")
    r = run_cli(cfg, "requeue", "invoice", "--failed", "--error", "card_declined",
                "--since", since, "--reason", "processor outage")
    assert r.returncode == 0, r.stderr
    got = {int(m) for m in re.findall(r"^requeued invoice (\d+):", r.stdout, re.M)}
    assert got == set(declined[2:])
    assert "requeued 2 invoices" in r.stdout
    gens = dict(db.query("SELECT id, generation FROM invoices"))
    assert {i for i, g in gens.items() if g == 2} == set(declined[2:])
    assert db.scalar("SELECT count(*) FROM invoices WHERE status = 'failed'") == 4
    assert sorted(r[1] for r in requeues(db)) == sorted(declined[2:])
    # The pattern is a regular expression; with nothing left to match, nothing happens.
    r = run_cli(cfg, "requeue", "invoice", "--failed", "--error", "^currency is not",
                "--since", since, "--reason", "x", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert {int(m) for m in re.findall(r"^would requeue invoice (\d+):", r.stdout, re.M)} == \
        set(bad_currency)
    r = run_cli(cfg, "requeue", "redemption", "--failed", "--reason", "x")
    assert r.returncode == 0 and "no failed redemptions match: nothing to requeue" in r.stdout
    # A pattern or a time PostgreSQL cannot read is a usage error; nothing changes.
    r = run_cli(cfg, "requeue", "invoice", "--failed", "--error", "(", "--reason", "x")
    assert r.returncode == 2 and "invalid regular expression" in r.stderr
    r = run_cli(cfg, "requeue", "invoice", "--failed", "--since", "yesterday-ish",
                "--reason", "x")
    assert r.returncode == 2 and "timestamp" in r.stderr
    assert len(requeues(db)) == 2


def test_command_line_errors_exit_2(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [bad] = insert_invoices(db, 1, customer="declined_{i}")
    once(cfg)
    for args, message in [
            (("invoice", bad), "requeue needs --reason TEXT"),
            (("invoice", bad, "--reason", ""), "requeue needs --reason TEXT"),
            (("invoice", "--failed"), "requeue needs --reason TEXT"),
            ((), "requeue needs a KIND first"),
            (("refund", bad, "--reason", "x"), 'KIND must be "invoice" or "redemption"'),
            (("invoice", "--reason", "x"), "requeue needs the ids of the items, or --failed"),
            (("invoice", bad, "--failed", "--reason", "x"), "item ids or --failed, not both"),
            (("invoice", bad, "--error", "x", "--reason", "x"), "--since and --error choose"),
            (("invoice", "17x", "--reason", "x"), '"17x" is neither an option nor an item id'),
            (("invoice", "-3", "--reason", "x"), "invalid option -- '3'"),
            (("invoice", "--failed", "--reason"), "option '--reason' requires an argument")]:
        r = run_cli(cfg, "requeue", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert message in r.stderr, (args, r.stderr)
    assert db.scalar("SELECT status FROM invoices WHERE id = %s", (bad,)) == "failed"
    assert requeues(db) == []


def ledger_rows(db, rid):
    return db.query("SELECT generation, kind, amount_cents FROM ledger_transactions "
                    "WHERE redemption_id = %s ORDER BY generation, id", (rid,))


def test_redemption_short_of_funds_is_redeemed_after_a_deposit(tmp_path, db, redis, fake_api,
                                                                 binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "tight", 50)
    [rid] = insert_redemptions(db, sid, 1, 100)
    once(cfg)
    assert db.query("SELECT status, last_error FROM redemptions WHERE id = %s", (rid,)) == \
        [("failed", "insufficient funds")]
    assert ledger_rows(db, rid) == []        # refused before any hold
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) VALUES (%s, 100)",
               (sid,))
    r = run_cli(cfg, "requeue", "redemption", rid, "--reason", "subsidy topped up")
    assert r.returncode == 0, r.stderr
    assert f'key "redemption-{rid}-2"' in r.stdout
    once(cfg)
    status, fid, gen = db.query("SELECT status, fulfillment_id, generation FROM redemptions "
                                "WHERE id = %s", (rid,))[0]
    assert (status, gen) == ("redeemed", 2)
    assert fake_api.state()["applied"][f"redemption-{rid}-2"]["id"] == fid
    assert ledger_rows(db, rid) == [(2, "hold", -100)]
    assert ledger_balance(db, sid) == 50
    audit_clean(cfg)


def test_declined_redemption_keeps_its_first_pair_and_holds_anew(tmp_path, db, redis, fake_api,
                                                                   binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 100, customer="declined-{i}")
    once(cfg)
    assert db.scalar("SELECT status FROM redemptions WHERE id = %s", (rid,)) == "failed"
    assert ledger_rows(db, rid) == [(1, "hold", -100), (1, "reversal", 100)]
    db.execute("UPDATE redemptions SET customer_id = 'learner-fixed' WHERE id = %s", (rid,))
    r = run_cli(cfg, "requeue", "redemption", "--failed", "--reason", "learner re-enrolled")
    assert r.returncode == 0, r.stderr
    audit_clean(cfg)                         # pending in generation 2, nothing held yet
    once(cfg)
    status, fid = db.query("SELECT status, fulfillment_id FROM redemptions WHERE id = %s",
                           (rid,))[0]
    assert status == "redeemed"
    # Generation 1's hold and reversal net to zero; generation 2's hold is the debit.
    assert ledger_rows(db, rid) == [(1, "hold", -100), (1, "reversal", 100), (2, "hold", -100)]
    assert ledger_balance(db, sid) == 900
    state = fake_api.state()
    assert state["results"][f"redemption-{rid}"]["status"] == 402
    assert state["applied"][f"redemption-{rid}-2"]["id"] == fid
    audit_clean(cfg)


def test_audit_checks_every_generation(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 100, customer="declined-{i}")
    once(cfg)
    run_cli(cfg, "requeue", "redemption", rid, "--reason", "x")
    once(cfg)                                # declined again: generation 2 nets to zero
    assert ledger_rows(db, rid)[2:] == [(2, "hold", -100), (2, "reversal", 100)]
    audit_clean(cfg)
    # A hold left in a generation that is not the current one is money held for nothing.
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind, "
               "generation) VALUES (%s, -100, %s, 'hold', 3)", (sid, rid))
    r = run_cli(cfg, "audit")
    assert r.returncode == 1
    assert f"redemption {rid} is in generation 2 but its ledger rows in generation 3 net to " \
        "-100" in r.stdout


def test_status_failed_groups_by_reason_newest_first(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    declined = insert_invoices(db, 3, customer="declined_{i}")
    bad_currency = insert_invoices(db, 2, currency="dollars")
    insert_invoices(db, 2)
    sid = create_subsidy(db, "empty", 0)
    [rid] = insert_redemptions(db, sid, 1, 100)
    once(cfg)
    # The currency refusals are the newest, the redemption's the oldest.
    db.execute("UPDATE invoices SET finished_at = now() + interval '1 minute' "
               "WHERE id = ANY(%s)", (bad_currency,))
    db.execute("UPDATE redemptions SET finished_at = now() - interval '1 hour'")
    r = run_cli(cfg, "status", "--failed")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("failed items by reason, newest first: 6 items, 3 reasons\n"), out
    heads = re.findall(r"^  (\w+): (\d+) failed, newest ", out, re.M)
    assert heads == [("invoice", "2"), ("invoice", "3"), ("redemption", "1")], out
    assert "    reason: currency is not a three-letter ISO 4217 code\n" in out
    assert "    reason: insufficient funds\n" in out
    ids = re.findall(r"^    ids: (.*)$", out, re.M)
    assert ids[0] == ", ".join(str(i) for i in sorted(bad_currency, reverse=True))
    assert ids[2] == str(rid)

    r = run_cli(cfg, "status", "--json", "--failed")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["failed_items"] == 6 and doc["failed_truncated"] is False
    groups = [(g["kind"], g["count"], sorted(g["ids"])) for g in doc["failed"]]
    assert groups == [("invoice", 2, sorted(bad_currency)), ("invoice", 3, sorted(declined)),
                      ("redemption", 1, [rid])]
    assert "card_declined" in doc["failed"][1]["reason"]
    assert doc["failed"][1]["ids_truncated"] is False
    assert all(g["newest"] >= g["oldest"] for g in doc["failed"])
    # Plain status is unchanged by the option's existence.
    assert "failed items by reason" not in run_cli(cfg, "status").stdout

"""Hostile answers from the billing API (CONTRACT section 2).

Each answer below comes after the fake has applied the charge and stored its
result, so the only right move is to treat the answer as ambiguous, retry
the same key and take the id from the replay.  max_attempts is 1: a worker
that mistook any of them for "nothing happened" would give the item up as
failed at once, and the test would see it.
"""

import pytest

from harness import migrate, Worker, create_subsidy, insert_invoices, insert_redemptions, make_config, \
    run_cli, wait_for
from test_concurrency import assert_books_agree
from test_redemptions import assert_redemption_books

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role


def pending(db, table="invoices"):
    return db.scalar(f"SELECT count(*) FROM {table} WHERE status = 'pending'")


def run_until_settled(cfg, db, table="invoices", timeout=40):
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: pending(db, table) == 0, timeout, message=lambda: w.log())
    assert w.stop() == 0
    return w


# action, extra rule fields, a piece of the log line of the first attempt
HOSTILE = [
    ("oversize_after_effect", {}, "answer too large, cut off"),
    ("trickle_after_effect", {"delay_ms": 300}, "timed out"),
    ("garbage_after_effect", {}, 'without a readable "id"'),
    ("deep_json_after_effect", {}, 'without a readable "id"'),
    ("wrong_types_after_effect", {}, 'without a readable "id"'),
    ("missing_id_after_effect", {}, 'without a readable "id"'),
    ("long_id_after_effect", {}, 'without a readable "id"'),
    ("redirect_after_effect", {"status": 301}, "http 301 from the billing API (redirect not followed)"),
    ("redirect_after_effect", {"status": 302}, "http 302 from the billing API (redirect not followed)"),
    ("redirect_after_effect", {"status": 307}, "http 307 from the billing API (redirect not followed)"),
    ("redirect_before_effect", {"status": 308}, "http 308 from the billing API (redirect not followed)"),
]


@pytest.mark.parametrize("action,extra,reason", HOSTILE,
                         ids=[f"{a}-{e.get('status', '')}".rstrip("-") for a, e, _ in HOSTILE])
def test_hostile_answer_is_ambiguous_and_resolved_by_replay(tmp_path, db, redis, fake_api, binary,
                                                             action, extra, reason):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.max_attempts": 1, "billing_api.timeout_ms": 1500,
        "locks.ttl_ms": 5000, "locks.renew_interval_ms": 1000})
    migrate(cfg)
    [iid, other] = insert_invoices(db, 2)
    key = f"invoice-{iid}"
    fake_api.faults([{"match": {"key": key}, "action": action, "times": 1, **extra}])
    w = run_until_settled(cfg, db)

    status, attempts, charge_id, ambiguous = db.query(
        "SELECT status, attempts, charge_id, ambiguous FROM invoices WHERE id = %s", (iid,))[0]
    state = fake_api.state()
    assert state["fired"] == {"0": 1}
    assert (status, attempts, ambiguous) == ("paid", 2, True), w.log()
    assert state["requests"][key] == 2
    assert charge_id == state["applied"][key]["id"] and len(charge_id) < 64
    assert_books_agree(db, fake_api, expect_paid=2)
    line = next(ln for ln in w.log().splitlines() if f"invoice {iid}: retry" in ln)
    assert "may have taken effect" in line and reason in line, line
    # Only the fake's own record of followed redirects: nothing ever went there.
    assert fake_api.request("GET", "/_hostile/state")[2] == {"followed": 0}
    # One line per event: nothing the API sent spills over lines or floods the log.
    assert max(len(ln) for ln in w.log().splitlines()) < 2048


def test_trickle_is_cut_at_the_total_timeout(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.max_attempts": 1, "billing_api.timeout_ms": 1000,
        "billing_api.connect_timeout_ms": 500})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    # 200 body bytes at one every 500 ms would take over a minute to arrive.
    fake_api.faults([{"match": {}, "action": "trickle_after_effect", "delay_ms": 500, "times": 1}])
    w = run_until_settled(cfg, db)
    line = next(ln for ln in w.log().splitlines() if f"invoice {iid}: retry" in ln)
    ms = float(line.rsplit(", ", 1)[1].split(" ms")[0])
    assert 900 <= ms <= 3000, line
    assert db.scalar("SELECT status FROM invoices") == "paid"


def test_oversize_answer_for_a_redemption_keeps_its_hold(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.max_attempts": 1})
    migrate(cfg)
    sid = create_subsidy(db, "s", 10000)
    [rid] = insert_redemptions(db, sid, 1, 2500)
    fake_api.faults([{"match": {}, "action": "oversize_after_effect", "times": 1}])
    run_until_settled(cfg, db, "redemptions")
    assert db.scalar("SELECT attempts FROM redemptions WHERE id = %s", (rid,)) == 2
    rows = assert_redemption_books(db, fake_api)
    assert [r[1] for r in rows] == ["redeemed"]
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (sid,)) == 7500


def test_refusal_with_hostile_error_body_fails_with_a_clean_reason(tmp_path, db, redis, fake_api,
                                                                   binary):
    """A 4xx is definitive whatever its body: failed, with a one-line reason."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 1, customer="declined_x")
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    status, attempts, err = db.query("SELECT status, attempts, last_error FROM invoices")[0]
    assert (status, attempts) == ("failed", 1)
    assert err == "card_declined: Your card was declined."
    assert fake_api.state()["applied"] == {}

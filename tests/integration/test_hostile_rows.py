"""Hostile rows: what producers may write into the item tables.

Every row is either sent exactly as written (the fake's record of the body
it parsed is compared with the row) or refused before any call with a clear
last_error and attempts = 0.  Nothing crashes, nothing loops: each test
ends with a `once` run that must exit 0 on its own.
"""

import pytest

from harness import migrate, create_subsidy, insert_redemptions, make_config, run_cli
from test_redemptions import assert_redemption_books

# The worker connects as billing_worker (sql/roles.sql); migrate as the owner.
pytestmark = pytest.mark.worker_role

INT64_MAX = 2**63 - 1


def once(cfg):
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def add_invoice(db, customer, amount=1000, currency="usd"):
    return db.scalar("INSERT INTO invoices (customer_id, amount_cents, currency) "
                     "VALUES (%s, %s, %s) RETURNING id", (customer, amount, currency))


def invoice(db, iid):
    return db.query("SELECT status, attempts, last_error, charge_id FROM invoices WHERE id = %s",
                    (iid,))[0]


def test_megabyte_customer_ids_are_refused(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    huge = add_invoice(db, "c" * (4 << 20))
    just_over = add_invoice(db, "c" * 256)
    at_limit = add_invoice(db, "c" * 255)
    sid = create_subsidy(db, "s", 10000)
    [rid] = insert_redemptions(db, sid, 1, 100, customer="r" * (2 << 20))
    r = once(cfg)
    for iid in (huge, just_over):
        assert invoice(db, iid)[:3] == ("failed", 0, "customer_id is longer than 255 bytes")
    assert invoice(db, at_limit)[0] == "paid"
    assert db.query("SELECT status, attempts, last_error FROM redemptions WHERE id = %s", (rid,)) \
        == [("failed", 0, "customer_id is longer than 255 bytes")]
    state = fake_api.state()
    assert list(state["requests"]) == [f"invoice-{at_limit}"]
    assert state["applied"][f"invoice-{at_limit}"]["body"]["customer"] == "c" * 255
    # The refusal names the row, never its megabytes.
    assert max(len(line) for line in r.stderr.splitlines()) < 1024
    assert_redemption_books(db, fake_api)


ESCAPED = [
    'he said "hi"',
    "back\\slash\\\\",
    "\\u0041 is not A",
    "quote'and\"both",
    "Zoë Ñúñez",
    "顧客-42",
    "emoji-😀-𝄞",
    "</script><!--",
    "{\"id\": \"injected\"}",
]


def test_quotes_backslashes_and_non_ascii_are_sent_exactly(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    ids = {add_invoice(db, c): c for c in ESCAPED}
    sid = create_subsidy(db, "s", 10000)
    rids = dict(zip(insert_redemptions(db, sid, 2, 100, customer="ünï-\"{i}\"\\"),
                    ["ünï-\"0\"\\", "ünï-\"1\"\\"]))
    once(cfg)
    applied = fake_api.state()["applied"]
    for iid, customer in ids.items():
        assert invoice(db, iid)[0] == "paid"
        assert applied[f"invoice-{iid}"]["body"]["customer"] == customer
    for rid, customer in rids.items():
        assert applied[f"redemption-{rid}"]["body"]["customer"] == customer
    assert_redemption_books(db, fake_api)


@pytest.mark.parametrize("customer", [
    "tab\there", "new\nline", "cr\rhere", "bell\x07", "esc\x1b[31m", "del\x7f",
    "c1-\u0085-next-line", "c1-\u009b-csi",
], ids=["tab", "lf", "cr", "bel", "esc", "del", "nel", "csi"])
def test_control_characters_are_refused(tmp_path, db, redis, fake_api, binary, customer):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    iid = add_invoice(db, customer)
    once(cfg)
    assert invoice(db, iid)[:3] == (
        "failed", 0, "customer_id is not valid UTF-8 or holds control characters")
    assert fake_api.state()["total_requests"] == 0


def test_amounts_near_int64_max_are_sent_exactly(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    amounts = [INT64_MAX, INT64_MAX - 1, 2**53 + 1]     # 2^53 + 1: not a double
    ids = {add_invoice(db, f"cus_{i}", amount=a): a for i, a in enumerate(amounts)}
    rich = create_subsidy(db, "rich", INT64_MAX)
    poor = create_subsidy(db, "poor", 100)
    [r_ok] = insert_redemptions(db, rich, 1, INT64_MAX)
    [r_poor] = insert_redemptions(db, poor, 1, INT64_MAX)
    once(cfg)
    applied = fake_api.state()["applied"]
    for iid, amount in ids.items():
        assert invoice(db, iid)[0] == "paid"
        assert applied[f"invoice-{iid}"]["body"]["amount"] == amount
    assert applied[f"redemption-{r_ok}"]["body"]["amount"] == INT64_MAX
    assert db.query("SELECT status, last_error FROM redemptions WHERE id = %s", (r_poor,)) == \
        [("failed", "insufficient funds")]
    assert f"redemption-{r_poor}" not in applied
    rows = assert_redemption_books(db, fake_api)
    assert sorted(r[1] for r in rows) == ["failed", "redeemed"]
    assert db.scalar("SELECT balance_cents FROM subsidies WHERE id = %s", (rich,)) == 0


def test_unknown_currencies_are_the_apis_call(tmp_path, db, redis, fake_api, binary):
    """Three letters are sent as written; membership in ISO 4217 is the API's to judge."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sent = {add_invoice(db, f"cus_{c}", currency=c): c for c in ("xyz", "XTS", "Eur")}
    refused = {add_invoice(db, f"cus_r{i}", currency=c): c
               for i, c in enumerate(("x1z", "euro", "eu", "€ur", " us", ""))}
    once(cfg)
    applied = fake_api.state()["applied"]
    for iid, currency in sent.items():
        assert invoice(db, iid)[0] == "paid"
        assert applied[f"invoice-{iid}"]["body"]["currency"] == currency
    for iid in refused:
        assert invoice(db, iid)[:3] == (
            "failed", 0, "currency is not a three-letter ISO 4217 code")
        assert f"invoice-{iid}" not in applied

"""Answers that must never fail an item (CONTRACT section 2).

An item is paid/redeemed if and only if the billing API holds a success for
its key, and a failed item has none.  Two kinds of answer used to break that:

- a refusal after an attempt that may have taken effect: a 400, 401 or 422
  comes from a layer that answers before (or beside) the idempotency layer,
  so it says nothing about the earlier attempt, which may have charged;
- answers about the worker itself (401, 403, 404, 405: a wrong token or
  base URL, a proxy in the way), which used to fail the whole backlog.

Each test names the path it covers.  Each failed on the code before the
fix: the item ended `failed` while the fake API held its charge (or the
backlog ended failed).
"""

import os
import re
import secrets
import signal
import urllib.request

from test_ops import NotifyListener
from harness import (LOCALHOST, Worker, create_subsidy, free_port, insert_invoices,
                     insert_redemptions, ledger_balance, make_config, migrate, run_cli,
                     wait_for)


def row(db, table, iid, cols="status, attempts, ambiguous, last_error"):
    return db.query(f"SELECT {cols} FROM {table} WHERE id = %s", (iid,))[0]


def wrong_token_file(tmp_path):
    path = tmp_path / "wrong-token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(24) + "\n")
    return path


def slow_retry_config(tmp_path, db, redis, fake_api):
    """Calls time out after 300 ms; a retry waits a minute (the test decides when)."""
    return make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.timeout_ms": 300, "billing_api.connect_timeout_ms": 300,
        "billing_api.backoff_initial_ms": 60000, "billing_api.backoff_max_ms": 60000})


def time_out_after_effect(cfg, db, fake_api, table, iid):
    """Runs ITEM's first attempt, which times out after the API applied it.

    The worker is stopped before it can replay, so the row is pending,
    ambiguous, with one attempt; then it is made due again, as its retry
    would be.  Returns the result id the API holds for its key.
    """
    key = f"{table[:-1]}-{iid}"
    fake_api.faults([{"match": {"key": key}, "action": "timeout_after_effect",
                      "delay_ms": 1000, "times": 1}])
    w = Worker(cfg, "first").start()
    wait_for(lambda: row(db, table, iid)[1] == 1, 20, message=w.log)
    assert w.stop() == 0
    assert row(db, table, iid)[:3] == ("pending", 1, True)
    fake_api.faults([])
    db.execute(f"UPDATE {table} SET next_attempt_at = now() WHERE id = %s", (iid,))
    return fake_api.state()["applied"][key]["id"]


def make_ambiguous_invoice(tmp_path, db, redis, fake_api):
    """An invoice whose only attempt charged but timed out: (id, charge id)."""
    cfg = slow_retry_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    return iid, time_out_after_effect(cfg, db, fake_api, "invoices", iid)


def test_401_after_an_ambiguous_attempt_leaves_the_charge_pending(tmp_path, db, redis, fake_api,
                                                                    binary):
    """outcome_after_call, API_WORKER on an ambiguous item: a worker restarted
    with a wrong token gets 401 for a charged invoice.  It used to end failed
    with the charge standing at the API; now it stays pending, the worker
    says the API refuses it, and the right token records the charge."""
    iid, charge = make_ambiguous_invoice(tmp_path, db, redis, fake_api)
    bad = make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.token_file": str(wrong_token_file(tmp_path)),
        "worker.once_patience_ms": 2000})
    r = run_cli(bad, "once", timeout=60)
    status, attempts, ambiguous, err = row(db, "invoices", iid)
    assert status == "pending", (status, err, r.stderr)
    assert ambiguous and attempts >= 2 and "unauthorized" in err
    assert r.returncode == 1
    assert "the billing API refused this worker for" in r.stderr
    assert row(db, "invoices", iid, "blocked_calls")[0] == attempts - 1

    # The next scheduled run, with the token fixed.
    db.execute("UPDATE invoices SET next_attempt_at = now() WHERE id = %s", (iid,))
    good = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(good, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert row(db, "invoices", iid, "status, charge_id") == ("paid", charge), r.stderr


def test_422_after_an_ambiguous_attempt_waits_for_an_operator(tmp_path, db, redis, fake_api,
                                                               binary):
    """outcome_after_call, API_KEY_REUSED on an ambiguous item: a producer
    changed amount_cents after an attempt that charged.  The 422 proves an
    earlier request reached the API; it used to fail the invoice.  Now it
    stays pending, `status` and `audit` list it with the answer, and putting
    the row back lets the replay record the charge."""
    iid, charge = make_ambiguous_invoice(tmp_path, db, redis, fake_api)
    db.execute("UPDATE invoices SET amount_cents = amount_cents + 1 WHERE id = %s", (iid,))
    cfg = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    status, attempts, ambiguous, err = row(db, "invoices", iid)
    assert status == "pending", (status, err)
    assert ambiguous and attempts == 2 and "key_reused" in err
    assert f"invoice {iid}: left pending for an operator" in r.stderr
    note = row(db, "invoices", iid, "needs_operator")[0]
    assert "may have taken effect" in note

    st = run_cli(cfg, "status")
    assert st.returncode == 0, st.stderr
    assert re.search(rf"needs an operator .*: 1\n  invoice {iid}  attempts 2", st.stdout), st.stdout
    assert "key_reused" in st.stdout
    au = run_cli(cfg, "audit")
    assert au.returncode == 1
    assert f"invoice {iid} needs an operator" in au.stdout

    db.execute("UPDATE invoices SET amount_cents = amount_cents - 1, next_attempt_at = now() "
               "WHERE id = %s", (iid,))
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert row(db, "invoices", iid, "status, charge_id, needs_operator") == ("paid", charge, None)


def test_400_after_an_ambiguous_redemption_keeps_its_hold(tmp_path, db, redis, fake_api, binary):
    """outcome_after_call, API_REFUSED on an ambiguous redemption: the API
    fulfilled it, the answer was lost, and the replay met a 400 (validation
    happens before the idempotency layer).  Failing it reversed the hold and
    gave back funds that were spent; now the hold stays and it is redeemed
    once the API answers."""
    cfg = slow_retry_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    sid = create_subsidy(db, "s", 1000)
    [rid] = insert_redemptions(db, sid, 1, 700)
    key = f"redemption-{rid}"
    time_out_after_effect(cfg, db, fake_api, "redemptions", rid)
    fake_api.faults([{"match": {"key": key}, "action": "status", "status": 400, "times": 1}])
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    status, attempts, ambiguous, err = row(db, "redemptions", rid)
    assert status == "pending", (status, err)
    assert ledger_balance(db, sid) == 300       # the hold stands: the money was spent
    assert ambiguous and attempts == 2

    db.execute("UPDATE redemptions SET next_attempt_at = now() WHERE id = %s", (rid,))
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert row(db, "redemptions", rid, "status, fulfillment_id") == \
        ("redeemed", fake_api.state()["applied"][key]["id"])
    assert ledger_balance(db, sid) == 300
    assert run_cli(cfg, "audit").returncode == 0


def scrape(port):
    with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def test_a_wrong_token_fails_no_item_and_sighup_resumes(tmp_path, db, redis, fake_api, binary):
    """api_refused / may_claim / reload_token: a mistyped token during a
    rotation.  The whole backlog used to end failed (401 was a refusal of
    each item).  Now the worker logs one error naming the status and the
    base URL (never the token), takes no new items but a probe now and then,
    shows it in status and metrics, never fails an item however many 401s
    it gets, and takes up the work at once on SIGHUP with the fixed file."""
    port = free_port()
    token_file = wrong_token_file(tmp_path)
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.token_file": str(token_file), "billing_api.max_attempts": 1,
        "worker.concurrency": 4, "worker.batch_size": 4,
        "metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    insert_invoices(db, 20)
    notify = NotifyListener()
    w = Worker(cfg, "w", env={"NOTIFY_SOCKET": notify.address}).start()
    # The first batch, then a probe after 1 s and 2 s more: each a 401, and
    # with max_attempts 1 each would have been the item's last attempt.
    wait_for(lambda: fake_api.state()["total_requests"] >= 4 + 2, 30, message=w.log)
    assert db.scalar("SELECT count(*) FROM invoices WHERE status <> 'pending'") == 0
    requests = fake_api.state()["total_requests"]
    assert requests <= 4 + 3, requests      # one probe at a time, backing off
    log = w.log()
    assert len(re.findall(r"the billing API at .* answered http 401", log)) == 1, log
    assert f'"{fake_api.url}"' in log
    assert token_file.read_text().strip() not in log
    assert fake_api.token not in log
    assert "billing_worker_api_blocked 1" in scrape(port)
    st = run_cli(cfg, "status")
    assert re.search(r"workers the billing API refuses .*: 1\n  \"test-worker-", st.stdout), \
        st.stdout
    assert "http 401" in st.stdout
    wait_for(lambda: notify.seen("STATUS=taking no new items: the billing API refuses this "
                                 "worker: http 401"), 10, message=lambda: notify.messages)
    notify.close()

    # The operator fixes the file and reloads.
    token_file.write_text(fake_api.token + "\n")
    w.reload()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 20, 20,
             message=w.log)
    assert "lets this worker in again" in w.log()
    assert "billing_worker_api_blocked 0" in scrape(port)
    st = run_cli(cfg, "status")
    assert "workers the billing API refuses (taking no new items): 0" in st.stdout
    assert db.scalar("SELECT count(*) FROM invoices WHERE blocked_calls > 0") >= 1
    assert w.stop() == 0


def test_a_404_from_a_proxy_is_outlasted_without_sighup(tmp_path, db, redis, fake_api, binary):
    """api_admitted: a routing layer answers 404 for a while (a wrong base
    URL, a proxy being reconfigured).  No item fails, and once the API
    answers again the probe lets the worker resume by itself."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.max_attempts": 1})
    migrate(cfg)
    fake_api.faults([{"match": {}, "action": "status", "status": 404, "times": 6}])
    insert_invoices(db, 10)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 10, 40,
             message=w.log)
    assert db.scalar("SELECT count(*) FROM invoices WHERE status = 'failed'") == 0
    assert "answered http 404" in w.log()
    assert "lets this worker in again (http 200)" in w.log()
    assert w.stop() == 0


def test_an_ambiguous_item_past_the_key_ttl_is_not_retried(tmp_path, db, redis, fake_api, binary):
    """outcome_before_call: the API keeps keys for a bounded time
    (billing_api.idempotency_key_ttl_s).  An item that may have charged and
    whose first claim is older than that must not be sent again under the
    same key: the API may have forgotten it, and the retry would charge
    twice.  It stays pending, not due, and status and audit list it with
    its age."""
    iid, charge = make_ambiguous_invoice(tmp_path, db, redis, fake_api)
    key = f"invoice-{iid}"
    db.execute("UPDATE invoices SET first_claimed_at = now() - interval '2 days' WHERE id = %s",
               (iid,))
    before = fake_api.state()["requests"][key]
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"billing_api.idempotency_key_ttl_s": 86400})
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert fake_api.state()["requests"][key] == before
    status, attempts, ambiguous, err = row(db, "invoices", iid)
    assert (status, attempts, ambiguous) == ("pending", 1, True)
    assert "no answer from the billing API" in err     # the answer that made it ambiguous
    note, never = row(db, "invoices", iid, "needs_operator, next_attempt_at = 'infinity'")
    assert "idempotency key may have expired: first claimed 1728" in note and never
    st = run_cli(cfg, "status")
    assert re.search(rf"invoice {iid}  attempts 1  first claimed 1728\d\ds ago", st.stdout), st.stdout
    au = run_cli(cfg, "audit")
    assert au.returncode == 1 and "idempotency key may have expired" in au.stdout
    # Without a ttl (keys kept forever) the same item would be replayed: see
    # test_timeout_after_effect_ends_paid_once_via_replay.

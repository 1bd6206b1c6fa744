"""audit --since-last-clean (schema version 9): only the items finished
since the newest clean run, remembered in audit_runs.

Both commands run as billing_worker (sql/roles.sql), as in production: the
audit records its runs with the role's own INSERT grant.  Violations are
injected as the owner, as a buggy producer or a hand edit would.
"""

import pytest

from harness import (create_subsidy, insert_invoices, insert_redemptions, make_config, migrate,
                     run_cli)

pytestmark = pytest.mark.worker_role


def finished_books(tmp_path, db, redis, fake_api):
    """Invoices and redemptions all finished by a worker; the config."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 4)
    sid = create_subsidy(db, "s", 10000)
    insert_redemptions(db, sid, 3, 500)
    r = run_cli(cfg, "once", timeout=60)
    assert r.returncode == 0, r.stderr
    assert db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 4
    assert db.scalar("SELECT count(*) FROM redemptions WHERE status = 'redeemed'") == 3
    return cfg, sid


def runs(db):
    return db.query("SELECT mode, violations FROM audit_runs ORDER BY id")


def test_a_violation_finished_after_the_clean_run_is_caught(tmp_path, db, redis, fake_api,
                                                            binary):
    cfg, sid = finished_books(tmp_path, db, redis, fake_api)
    full = run_cli(cfg, "audit")
    assert full.returncode == 0, full.stdout + full.stderr
    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 0, inc.stdout + inc.stderr
    assert "items finished since" in inc.stdout and "audit: clean" in inc.stdout
    assert runs(db) == [("full", 0), ("incremental", 0)]

    # A redemption recorded redeemed without its hold: the ledger never paid for it.
    [rid] = insert_redemptions(db, sid, 1, 700)
    db.execute("UPDATE redemptions SET status = 'redeemed', fulfillment_id = 'rd_forged', "
               "finished_at = now() WHERE id = %s", (rid,))
    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 1, inc.stdout + inc.stderr
    assert f"redemption {rid} is redeemed but its ledger rows net to 0" in inc.stdout
    assert "audit: 1 violation" in inc.stdout
    # A run with violations does not move the mark: the next one reports it again.
    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 1 and f"redemption {rid} is redeemed" in inc.stdout
    assert runs(db)[-2:] == [("incremental", 1), ("incremental", 1)]


def test_a_violation_older_than_the_clean_run_is_left_to_the_full_audit(tmp_path, db, redis,
                                                                        fake_api, binary):
    """By design: a finished row is final (only requeue changes it again, and
    that finishes it anew, after the mark), so what a clean run saw stays
    clean; a hand edit of an old row is the full audit's to find, on its
    daily timer.  Rechecking old rows is what the incremental run saves."""
    cfg, sid = finished_books(tmp_path, db, redis, fake_api)
    # Finished an hour ago: well before the clean run's mark, margin included.
    db.execute("UPDATE redemptions SET finished_at = now() - interval '1 hour'")
    db.execute("UPDATE invoices SET finished_at = now() - interval '1 hour'")
    assert run_cli(cfg, "audit").returncode == 0
    rid = db.scalar("SELECT min(id) FROM redemptions")
    amount = db.scalar("SELECT amount_cents FROM redemptions WHERE id = %s", (rid,))
    # A reversal of a redeemed redemption: its funds given back though it was spent.
    db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, kind) "
               "VALUES (%s, %s, %s, 'reversal')", (sid, amount, rid))

    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 0, inc.stdout + inc.stderr
    full = run_cli(cfg, "audit")
    assert full.returncode == 1
    assert f"redemption {rid} is redeemed but its ledger rows net to 0" in full.stdout
    # The dirty full run leaves the mark where the clean one put it.
    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 0, inc.stdout
    assert runs(db) == [("full", 0), ("incremental", 0), ("full", 1), ("incremental", 0)]


def test_without_a_clean_run_it_checks_everything(tmp_path, db, redis, fake_api, binary):
    cfg, sid = finished_books(tmp_path, db, redis, fake_api)
    [rid] = insert_redemptions(db, sid, 1, 700)
    db.execute("UPDATE redemptions SET status = 'redeemed', fulfillment_id = 'rd_forged', "
               "finished_at = now() - interval '1 day' WHERE id = %s", (rid,))
    inc = run_cli(cfg, "audit", "--since-last-clean")
    assert inc.returncode == 1, inc.stdout + inc.stderr
    assert "no clean run recorded yet: checking every item" in inc.stdout
    assert f"redemption {rid} is redeemed but its ledger rows net to 0" in inc.stdout
    # It ran as the full audit, and is recorded so.
    assert runs(db) == [("full", 1)]


def test_the_option_belongs_to_audit(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    r = run_cli(cfg, "status", "--since-last-clean")
    assert r.returncode == 2
    assert "does not belong to \"status\"" in r.stderr

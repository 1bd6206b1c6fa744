"""A worker that looks healthy must not have stopped: slots, spins, exits.

Each test names the path it covers, and each failed on the code before the
fix: the worker dropped every item once `concurrency` rows were parked, spun
a core (thousands of failing statements and log lines a second) while it
could not record outcomes, never ended a `once` run with Redis down, exited
1 on a `systemctl stop` while waiting for the database, and warned about
worker.id at every SIGHUP.
"""

import os
import signal
import time

from harness import (LOCALHOST, Worker, free_port, insert_invoices, make_config, migrate,
                     run_cli, wait_for)


def count(db, status):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = %s", (status,))


def cpu_seconds(pid):
    """User + system CPU time of PID so far (from /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_parked_rows_give_their_slots_back(tmp_path, db, redis, fake_api, binary):
    """record_one_by_one: a row whose completion the database refuses is
    parked and its flight freed.  The flight used to be freed without going
    back on the free stack: after `concurrency` parked rows, every claimed
    item was dropped ("no free slot") and re-claimed later as ambiguous,
    never called."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "worker.concurrency": 2, "worker.batch_size": 2})
    migrate(cfg)
    poison = insert_invoices(db, 2)
    db.execute("UPDATE invoices SET attempts = 2147483647")
    w = Worker(cfg, "w").start()
    wait_for(lambda: all("could not record the outcome" in l for l in [w.log()]) and
             w.log().count("left pending for an operator") >= 2, 20, message=w.log)
    good = insert_invoices(db, 6)
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid' "
                               "AND id = ANY(%s)", (good,)) == 6, 15, message=w.log)
    assert "no free slot" not in w.log()
    assert db.scalar("SELECT count(*) FROM invoices WHERE id = ANY(%s) AND status = 'pending'",
                     (poison,)) == 2
    assert w.stop() == 0


def test_outcomes_the_database_refuses_for_a_non_data_reason_back_off(tmp_path, db, redis,
                                                                       fake_api, binary):
    """flush / flush_failed: a completion refused for a reason other than
    its data (a full disk, 53100, here raised by a trigger; a read-only
    server 25006; a missing privilege 42501).  The flush used to be retried
    on every turn of the loop: thousands of failing statements and log lines
    a second and a core busy.  Now it backs off, logs once, and records
    everything once the database accepts it again."""
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute("""
        CREATE FUNCTION refuse_completion() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.lease_until IS NULL AND OLD.lease_until IS NOT NULL THEN
                RAISE EXCEPTION 'could not extend file: No space left on device'
                    USING ERRCODE = 'disk_full';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse_completion BEFORE UPDATE ON invoices
            FOR EACH ROW EXECUTE FUNCTION refuse_completion();""")
    insert_invoices(db, 5)
    w = Worker(cfg, "w").start()
    wait_for(lambda: fake_api.state()["total_requests"] == 5 and
             "could not record" in w.log(), 20, message=w.log)
    time.sleep(0.5)
    cpu0, lines0 = cpu_seconds(w.pid), len(w.log().splitlines())
    time.sleep(3)
    cpu, lines = cpu_seconds(w.pid) - cpu0, len(w.log().splitlines()) - lines0
    assert cpu < 0.5, f"{cpu:.2f} CPU-seconds in 3 s while the database refused"
    assert lines < 5, w.log()
    assert w.log().count("could not record") == 1
    assert count(db, "paid") == 0
    db.execute("DROP TRIGGER refuse_completion ON invoices")
    wait_for(lambda: count(db, "paid") == 5, 20, message=w.log)
    assert "recording outcomes again after" in w.log()
    # Each call was made once: the outcomes were kept, not repeated.
    assert fake_api.state()["total_requests"] == 5
    assert w.stop() == 0


def test_queued_outcomes_do_not_spin_while_the_database_is_down(tmp_path, pg, db, redis,
                                                                 fake_api, binary):
    """The loop's wait with queued outcomes: it used to be 0 whenever an
    outcome was queued, so a worker holding outcomes while the database was
    down spun a core (2.97 CPU-seconds in 3 s).  Now it sleeps until the
    next reconnect attempt."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.ttl_ms": 60000,
                                                        "locks.renew_interval_ms": 20000})
    migrate(cfg)
    fake_api.faults([], latency_ms=1500)
    insert_invoices(db, 3)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE locked_by IS NOT NULL") == 3,
             10, message=w.log)
    pg.stop("fast")
    try:
        wait_for(lambda: fake_api.state()["total_requests"] >= 3, 10, message=w.log)
        time.sleep(2)       # the answers are in: three outcomes queued
        cpu0 = cpu_seconds(w.pid)
        time.sleep(3)
        cpu = cpu_seconds(w.pid) - cpu0
    finally:
        pg.start()
    assert cpu < 0.5, f"{cpu:.2f} CPU-seconds in 3 s while the database was down"
    wait_for(lambda: count(db, "paid") == 3, 30, message=w.log)
    assert w.stop() == 0


def test_once_with_redis_down_ends(tmp_path, db, fake_api, binary):
    """once_out_of_patience, claims failing: in redis mode with Redis
    unreachable, `once` used to wait forever (a timer unit stuck).  It now
    has worker.once_patience_ms of patience, as for the database, then
    exits 1 with the reason."""
    cfg = make_config(tmp_path, db, None, fake_api, **{"worker.once_patience_ms": 2000})
    migrate(cfg)
    insert_invoices(db, 3)
    t0 = time.monotonic()
    r = run_cli(cfg, "once", timeout=30)
    took = time.monotonic() - t0
    assert r.returncode == 1, r.stderr
    assert "claims kept failing for" in r.stderr and "redis" in r.stderr
    assert took < 10, took
    assert count(db, "pending") == 3


def test_sigterm_while_waiting_for_the_database_exits_0(tmp_path, db, redis, fake_api, binary):
    """loop_run after first_connect: SIGTERM while the database cannot be
    reached at start used to exit 1, so `systemctl stop` marked the unit
    failed.  A stop asked for is a clean exit."""
    dead = f"host={LOCALHOST} port={free_port()} dbname=nothing user=nobody connect_timeout=1"
    cfg = make_config(tmp_path, db, redis, fake_api, **{"database.conninfo": dead})
    w = Worker(cfg, "w").start()
    wait_for(lambda: "could not connect to the database" in w.log(), 10, message=w.log)
    assert w.stop(timeout=10) == 0
    assert "stopped while waiting for the database" in w.log()


def test_sighup_with_the_default_worker_id_warns_about_nothing(tmp_path, db, redis, fake_api,
                                                               binary):
    """reload: with worker.id left at its default (hostname:pid), every
    SIGHUP used to warn "changes to worker.id need a restart", comparing
    the resolved id with the file's "".  What the operator wrote is
    compared now; a real change still warns."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.id": None})
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 10, message=w.log)
    w.reload()
    wait_for(lambda: "configuration reloaded" in w.log(), 10, message=w.log)
    assert "need a restart" not in w.log()
    text = cfg.read_text().replace("worker = {", 'worker = {\n  id = "renamed";')
    cfg.write_text(text)
    w.reload()
    wait_for(lambda: w.log().count("configuration reloaded") == 2, 10, message=w.log)
    assert "changes to worker.id need a restart" in w.log()
    assert w.stop() == 0


def test_a_read_only_server_makes_the_worker_reconnect_not_loop(tmp_path, db, redis, fake_api,
                                                                binary):
    """store_set_error on 25006: a session on a read-only server (a standby,
    or a primary demoted after a failover; here default_transaction_read_only)
    fails every write.  The worker used to retry the statement on the same
    connection; it now drops the connection so a multi-host conninfo can find
    the writable host, reconnects with backoff (no spin), and bills once the
    server takes writes again."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"database.conninfo":
                                                        f"{db.dsn} application_name=bw-ro"})
    migrate(cfg)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "listening for new items" in w.log(), 10, message=w.log)
    wait_for(lambda: count(db, "paid") == 0 and "listening" in w.log(), 5)
    db.execute(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
    try:
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE application_name = 'bw-ro'")
        insert_invoices(db, 3)
        wait_for(lambda: "the server is read-only: dropping the connection" in w.log(), 15,
                 message=w.log)
        cpu0 = cpu_seconds(w.pid)
        time.sleep(3)
        assert cpu_seconds(w.pid) - cpu0 < 0.5
        # Reconnects back off (200 ms doubling), and the young deaths are logged once.
        assert w.log().count("connected to the database") < 10, w.log()
        assert w.log().count("the server is read-only") == 1, w.log()
        assert count(db, "paid") == 0
    finally:
        db.execute(f'ALTER DATABASE "{db.name}" RESET default_transaction_read_only')
    wait_for(lambda: count(db, "paid") == 3, 30, message=w.log)
    assert w.stop() == 0

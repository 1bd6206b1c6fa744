"""Log lines as an operator's tools read them: journal priorities, JSON fields,
and no noise from libraries at start."""

import json
import os
import re
import urllib.request

from harness import (migrate, LOCALHOST, Worker, free_port, insert_invoices, make_config, run_cli,
                     wait_for)

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def stream_id(path):
    """What systemd puts in JOURNAL_STREAM for the stream that is PATH: "device:inode"."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def worker_lines(log):
    """The worker's own lines (the harness writes "==== ..." headers)."""
    return [line for line in log.splitlines() if line and not line.startswith("====")]


def test_journal_stream_gets_syslog_priorities(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    paid = insert_invoices(db, 3)
    [declined] = insert_invoices(db, 1, customer="declined_x")
    w = Worker(cfg, "journal")
    w.log_path.touch()  # the harness appends to it: the inode stays the same
    w.env = {**os.environ, "JOURNAL_STREAM": stream_id(w.log_path)}
    w.start()
    wait_for(lambda: pending(db) == 0, 30, message=w.log_tail)
    assert w.stop() == 0
    lines = worker_lines(w.log())
    assert lines
    bad = [line for line in lines if not re.match(r"<[3467]>" + STAMP + " ", line)]
    assert bad == []
    for iid in paid:
        assert any(re.match(rf"<6>{STAMP} info .* invoice {iid}: paid, id ", line)
                   for line in lines), iid
    assert any(re.match(rf"<4>{STAMP} warning .* invoice {declined}: failed: ", line)
               for line in lines)


def test_inherited_journal_stream_of_another_file_is_ignored(tmp_path, db, redis, fake_api,
                                                              binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 2)
    # The variable survives into a shell started from a unit, whose stderr is not the journal.
    w = Worker(cfg, "not-journal", env={"JOURNAL_STREAM": stream_id(cfg)})
    w.start()
    wait_for(lambda: pending(db) == 0, 30, message=w.log_tail)
    assert w.stop() == 0
    lines = worker_lines(w.log())
    assert lines and all(re.match(STAMP + " ", line) for line in lines), lines


def test_json_outcome_lines_carry_fields(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"log.format": "json"})
    migrate(cfg)
    ids = insert_invoices(db, 3)
    [declined] = insert_invoices(db, 1, customer="declined_x")
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stderr.splitlines()]
    paid = {o["id"]: o for o in objs if o.get("outcome") == "paid"}
    assert sorted(paid) == ids
    for o in paid.values():
        assert o["kind"] == "invoice" and o["item"] == o["id"]
        assert o["http_status"] == 200 and o["attempt"] == 1
        assert isinstance(o["latency_ms"], float) and o["latency_ms"] > 0
        assert o["msg"].startswith(f"invoice {o['id']}: paid, id ")
    [failed] = [o for o in objs if o.get("outcome") == "failed"]
    assert failed["id"] == declined and failed["level"] == "warning"
    assert failed["http_status"] == 402 and "latency_ms" in failed


def test_metrics_start_prints_no_libmicrohttpd_warning(tmp_path, db, redis, fake_api, binary):
    port = free_port()
    cfg = make_config(tmp_path, db, redis, fake_api, **{"metrics.listen": f"{LOCALHOST}:{port}"})
    migrate(cfg)
    w = Worker(cfg, "metrics").start()

    def scraped():
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as resp:
            return resp.status == 200

    wait_for(scraped, 20, ignore=(OSError,), message=w.log_tail)
    assert w.stop() == 0
    log = w.log()
    assert "MHD_OPTION_EXTERNAL_LOGGER" not in log, log
    assert "metrics endpoint:" not in log, log
    assert [line for line in worker_lines(log) if " warning " in line or " error " in line] == []


def test_database_warnings_are_log_lines_not_raw_stderr(tmp_path, db, redis, fake_api, binary):
    """A WARNING the server sends on the worker's session (a producer's
    trigger, a shutdown in progress) goes through the log, so JSON logs stay
    JSON: libpq's default notice processor printed it raw on stderr."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{"log.format": "json"})
    migrate(cfg)
    db.execute("""
        CREATE FUNCTION warn_on_paid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.status = 'paid' THEN
                RAISE WARNING 'invoice % paid: a producer''s trigger says hello', NEW.id;
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER warn_on_paid BEFORE UPDATE ON invoices
            FOR EACH ROW EXECUTE FUNCTION warn_on_paid();
    """)
    insert_invoices(db, 2)
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    objs = [json.loads(line) for line in r.stderr.splitlines()]
    said = [o for o in objs if "says hello" in o["msg"]]
    assert len(said) == 2, r.stderr
    assert all(o["level"] == "warning" for o in said)

"""Secrets: file modes, and the token and passwords never reaching any output.

The harness writes its token files 0600; the tests here loosen them on
purpose.  The database password is real in test_no_secret_in_any_output:
the worker logs in as a role that PostgreSQL asks a password of.
"""

import os
import secrets

import pytest

from harness import (migrate, WORKER_ROLE, Worker, apply_roles, create_subsidy, free_port, insert_invoices,
                     insert_redemptions, make_config, run_cli, wait_for)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_readable_token_file_is_refused(tmp_path, db, redis, fake_api, binary, mode):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    insert_invoices(db, 1)
    os.chmod(fake_api.token_file, mode)
    for cmd in ("check-config", "once", "run"):
        r = run_cli(cfg, cmd, timeout=20)
        assert r.returncode == 2, (cmd, r.stderr)
        assert (f'billing_api.token_file "{fake_api.token_file}" is readable by group or others '
                f"(mode {mode:04o}): make it readable by its owner only (chmod 600), or set "
                "worker.allow_readable_secrets = true") in r.stderr
    assert fake_api.state()["total_requests"] == 0


def test_readable_token_file_accepted_with_a_warning_when_allowed(tmp_path, db, redis, fake_api,
                                                                  binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.allow_readable_secrets": True})
    migrate(cfg)
    insert_invoices(db, 1)
    os.chmod(fake_api.token_file, 0o644)
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    assert "is readable by group or others (mode 0644); accepted because " \
           "worker.allow_readable_secrets is set" in r.stderr
    assert db.scalar("SELECT status FROM invoices") == "paid"


def test_readable_redis_password_file_is_refused(tmp_path, db, redis, fake_api, binary):
    pw = tmp_path / "redis-password"
    pw.write_text("not-used\n")
    os.chmod(pw, 0o644)
    cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.password_file": str(pw)})
    migrate(cfg)
    for cmd in ("check-config", "once"):
        r = run_cli(cfg, cmd, timeout=20)
        assert r.returncode == 2, (cmd, r.stderr)
        assert f'redis.password_file "{pw}" is readable by group or others (mode 0644)' in r.stderr
    # skip-locked never reads it
    cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.password_file": str(pw),
                                                        "locks.mode": "skip-locked"})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    r = run_cli(cfg, "once", timeout=20)
    assert r.returncode == 0, r.stderr
    assert "redis.password_file" not in r.stderr
    assert "not-used" not in r.stderr


def test_config_file_with_a_password_must_be_private(tmp_path, db, redis, fake_api, binary):
    password = "Pw-" + secrets.token_hex(8)
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"database.conninfo": f"{db.dsn} password={password}"})
    migrate(make_config(tmp_path, db, redis, fake_api))
    os.chmod(cfg, 0o644)
    for cmd in ("check-config", "status", "once", "migrate"):
        r = run_cli(cfg, cmd, timeout=20)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "configuration file with a password in database.conninfo" in r.stderr
        assert "is readable by group or others (mode 0644)" in r.stderr
        assert password not in r.stdout + r.stderr
    os.chmod(cfg, 0o600)
    r = run_cli(cfg, "status")
    assert r.returncode == 0, r.stderr
    assert run_cli(cfg, "check-config").returncode == 0


def private_config(tmp_path, db, redis, fake_api, conninfo, **overrides):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"database.conninfo": conninfo,
                                                        **overrides})
    os.chmod(cfg, 0o600)
    return cfg


PASSWORD = "Pw-" + secrets.token_hex(10)


@pytest.mark.parametrize("conninfo,expect", [
    # libpq's own message, which never holds the password
    (f"host=127.0.0.1 port={{port}} dbname=x user=postgres password={PASSWORD}",
     "could not connect to the database: "),
    # the server's message quotes the database name, here the password itself
    (f"host=127.0.0.1 port={{pg_port}} dbname={PASSWORD} user=postgres password={PASSWORD}",
     'database "[redacted]" does not exist'),
    # libpq's parse errors quote the string: withheld
    (f"host=127.0.0.1 port={{port}} password={PASSWORD} {PASSWORD}-tail dbname=x",
     "is not a valid connection string (libpq's message is not shown: it may quote the password)"),
    (f"postgresql://postgres:{PASSWORD}%zz@127.0.0.1:{{port}}/x",
     "is not a valid connection string"),
], ids=["refused", "echoed-by-server", "unparsable", "bad-uri"])
def test_conninfo_password_never_printed(tmp_path, db, redis, fake_api, binary, pg, conninfo,
                                         expect):
    conninfo = conninfo.format(port=free_port(), pg_port=pg.port)
    cfg = private_config(tmp_path, db, redis, fake_api, conninfo)
    # A string libpq cannot parse is a configuration error, refused before
    # any connect; one it parses fails at the connect, which may heal.
    unparsable = "valid connection string" in expect
    for cmd in ("status", "migrate", "audit") + (("check-config",) if unparsable else ()):
        r = run_cli(cfg, cmd, timeout=30)
        assert r.returncode == (2 if unparsable else 1), (cmd, r.stderr)
        assert expect in r.stderr, r.stderr
        assert PASSWORD not in r.stdout + r.stderr
    if unparsable:
        r = run_cli(cfg, "run", timeout=30)
        assert r.returncode == 2, r.stderr
        assert expect in r.stderr and PASSWORD not in r.stdout + r.stderr
        return
    # The daemon's retry lines too.
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: w.log().count("retrying in") >= 2, 20, message=lambda: w.log())
    w.stop()
    assert expect in w.log()
    assert PASSWORD not in w.log()


SECRET_ROLE = "bw_secret_login"


@pytest.fixture
def password_role(pg, db):
    """A login role that PostgreSQL asks a password of, with billing_worker's rights."""
    password = "Pw-" + secrets.token_hex(12)
    db.execute(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{WORKER_ROLE}') "
               f"THEN CREATE ROLE {WORKER_ROLE} LOGIN; END IF; "
               f"IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{SECRET_ROLE}') "
               f"THEN CREATE ROLE {SECRET_ROLE} LOGIN INHERIT; END IF; END $$")
    db.execute(f"GRANT {WORKER_ROLE} TO {SECRET_ROLE}")
    db.execute(f"ALTER ROLE {SECRET_ROLE} PASSWORD %s", (password,))
    hba = pg.datadir / "pg_hba.conf"
    line = f"host all {SECRET_ROLE} 127.0.0.1/32 scram-sha-256\n"
    text = hba.read_text()
    if line not in text:
        with open(hba, "r+") as f:          # in place: the file stays postgres's
            f.write(line + text)
        db.execute("SELECT pg_reload_conf()")
    yield password


def test_no_secret_in_any_output(tmp_path, db, redis, fake_api, binary, password_role):
    password = password_role
    owner = make_config(tmp_path, db, redis, fake_api)
    migrate(owner)
    apply_roles(db)
    cfg = private_config(tmp_path, db, redis, fake_api,
                         f"host={db.host} port={db.port} dbname={db.name} user={SECRET_ROLE} "
                         f"password={password}", **{"log.level": "debug"})
    bad = private_config(tmp_path, db, redis, fake_api,
                         f"host={db.host} port={db.port} dbname={db.name} user={SECRET_ROLE} "
                         f"password={password}-wrong")

    ids = insert_invoices(db, 6)
    insert_invoices(db, 1, customer="declined_{i}")
    sid = create_subsidy(db, "s", 1000)
    insert_redemptions(db, sid, 2, 100)
    fake_api.faults([{"match": {"key": f"invoice-{ids[0]}"}, "action": "status", "status": 503,
                      "times": 1},
                     {"match": {"key": f"invoice-{ids[1]}"}, "action": "status", "status": 401,
                      "times": 1}])
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'") +
             db.scalar("SELECT count(*) FROM redemptions WHERE status = 'pending'") == 0, 30,
             message=lambda: w.log())
    # What another local user could see of the process: argv and environment.
    with open(f"/proc/{w.pid}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    with open(f"/proc/{w.pid}/environ", "rb") as f:
        environ = f.read().decode(errors="replace")
    assert db.query("SELECT DISTINCT usename FROM pg_stat_activity "
                    "WHERE application_name = 'billing-worker'") == [(SECRET_ROLE,)]
    w.reload()
    wait_for(lambda: "configuration reloaded" in w.log(), 10)
    assert w.stop() == 0

    outputs = {"worker log": w.log(), "cmdline": cmdline, "environ": environ}
    for cmd in ("status", "audit"):
        r = run_cli(cfg, cmd)
        assert r.returncode == 0, r.stderr
        outputs[cmd] = r.stdout + r.stderr
    r = run_cli(bad, "status")
    assert r.returncode == 1 and "password authentication failed" in r.stderr
    outputs["wrong password"] = r.stdout + r.stderr
    outputs["fake api"] = fake_api.log()

    assert "debug" in outputs["worker log"] and "calling the billing API" in outputs["worker log"]
    lines = sum(len(text.splitlines()) for text in outputs.values())
    assert lines > 20
    for name, text in outputs.items():
        for line in text.splitlines():
            assert fake_api.token not in line, f"token in {name}: {line}"
            assert password not in line, f"database password in {name}: {line}"
    headers = fake_api.state()["last_headers"][f"invoice-{ids[2]}"]
    assert headers["Authorization"] == "Bearer <redacted>"   # the token was sent, and right
    # The 401 is about the worker: logged (without the token), then the probe pays it.
    assert "answered http 401 (injected: injected 401)" in outputs["worker log"]
    assert db.scalar("SELECT status FROM invoices WHERE id = %s", (ids[1],)) == "paid"

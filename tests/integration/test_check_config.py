"""check-config refuses what run would refuse, and run refuses it with exit 2.

The unit runs check-config as ExecStartPre and has RestartPreventExitStatus=2:
a file check-config passes must not then make run fail with a status that
systemd restarts every RestartSec.  So each refusal here is asked of both:
check-config exits 2 with the message, and run exits 2 with the same one,
before a single request reaches the API.

check-config --connect then asks the servers, a line each, sending no token.
"""

import json
import os
import re
import shutil
import subprocess

import pytest

from harness import (REPO_ROOT, FakeApi, RedisError, Worker, free_port, insert_invoices, make_config,
                     make_test_ca, migrate, redis_command, run_cli, wait_for)


def changelog_version():
    first = (REPO_ROOT / "debian" / "changelog").read_text().splitlines()[0]
    return re.match(r"^\S+ \(([^)]+)\)", first).group(1)


def private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def refused_alike(cfg, message, env=None, api=None):
    """check-config and run both exit 2 saying MESSAGE; nothing reached the API."""
    for cmd in ("check-config", "run", "once"):
        r = run_cli(cfg, cmd, timeout=30, env=env)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert message in r.stderr, (cmd, r.stderr)
        assert "configuration is valid" not in r.stdout
    if api is not None:
        assert api.state()["total_requests"] == 0


# --------------------------------------------------------------------------
# Each refusal, in both commands
# --------------------------------------------------------------------------

def test_missing_token_file(tmp_path, db, redis, fake_api, binary):
    missing = tmp_path / "no-token"
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.token_file": str(missing)})
    migrate(cfg)
    refused_alike(cfg, f'could not open billing_api.token_file "{missing}": No such file or directory',
                  api=fake_api)


def test_empty_token_file(tmp_path, db, redis, fake_api, binary):
    empty = private(tmp_path / "empty-token", "\n")
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.token_file": str(empty)})
    migrate(cfg)
    refused_alike(cfg, f'billing_api.token_file "{empty}" is empty', api=fake_api)


def test_readable_token_file(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    os.chmod(fake_api.token_file, 0o644)
    refused_alike(cfg, f'billing_api.token_file "{fake_api.token_file}" is readable by group or '
                       "others (mode 0644)", api=fake_api)


def test_credential_is_checked_instead_of_the_token_file(tmp_path, db, redis, fake_api, binary):
    creds = tmp_path / "creds"
    creds.mkdir()
    private(creds / "api-token", "")
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    refused_alike(cfg, f'credential "{creds / "api-token"}" is empty', env=env, api=fake_api)
    # the good token file beside it does not make the empty credential pass
    private(creds / "api-token", fake_api.token + "\n")
    r = run_cli(cfg, "check-config", env=env)
    assert r.returncode == 0, r.stderr


def test_redis_password_file_only_when_redis_is_used(tmp_path, db, redis, fake_api, binary):
    missing = tmp_path / "no-redis-password"
    for mode in ("redis", "auto"):
        cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.password_file": str(missing),
                                                            "locks.mode": mode})
        migrate(cfg)
        refused_alike(cfg, f'could not open redis.password_file "{missing}": No such file or '
                           "directory", api=fake_api)
    cfg = make_config(tmp_path, db, redis, fake_api, **{"redis.password_file": str(missing),
                                                        "locks.mode": "skip-locked"})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr


def test_redis_password_credential(tmp_path, db, redis, fake_api, binary):
    creds = tmp_path / "creds"
    creds.mkdir()
    private(creds / "api-token", fake_api.token + "\n")
    (creds / "redis-password").write_text("pw\n")
    os.chmod(creds / "redis-password", 0o640)
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    refused_alike(cfg, f'credential "{creds / "redis-password"}" is readable by group or others',
                  env={"CREDENTIALS_DIRECTORY": str(creds)}, api=fake_api)


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "not-pem", "unreadable"])
def test_bad_ca_file(tmp_path, db, redis, fake_api, binary, case):
    ca = tmp_path / "ca.pem"
    message = {
        "missing": f'could not open billing_api.ca_file "{ca}": No such file or directory',
        "empty": f'billing_api.ca_file "{ca}" is empty',
        "directory": f'billing_api.ca_file "{ca}" is not a regular file',
        "not-pem": f'billing_api.ca_file "{ca}" holds no PEM certificate',
        "unreadable": f'could not open billing_api.ca_file "{ca}": Permission denied',
    }[case]
    if case == "empty":
        ca.write_text("")
    elif case == "directory":
        ca.mkdir()
    elif case == "not-pem":
        ca.write_text("this is not a certificate\n")
    elif case == "unreadable":
        ca.write_text("-----BEGIN CERTIFICATE-----\n")
        os.chmod(ca, 0)
        if os.access(ca, os.R_OK):
            pytest.skip("running as a user that reads any file (root)")
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.ca_file": str(ca)})
    migrate(cfg)
    refused_alike(cfg, message, api=fake_api)


def test_world_readable_ca_file_is_fine(tmp_path, db, redis, fake_api, binary):
    # A CA certificate is public: unlike a secret file, 0644 is no problem.
    _, _, ca = make_test_ca(tmp_path, "ca")
    os.chmod(ca, 0o644)
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.ca_file": str(ca)})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("error") == 0, r.stderr


def test_unparsable_conninfo(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"database.conninfo": "host=127.0.0.1 dbname"})
    refused_alike(cfg, '"database.conninfo" is not a valid connection string: missing "=" after '
                       '"dbname" in connection info string', api=fake_api)


def test_unparsable_conninfo_with_a_password_is_not_quoted(tmp_path, db, redis, fake_api, binary):
    password = "Pw-unquoted-7e1c"
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"database.conninfo": f"host=127.0.0.1 password={password} {password}x"})
    os.chmod(cfg, 0o600)
    refused_alike(cfg, '"database.conninfo" is not a valid connection string (libpq\'s message is '
                       "not shown: it may quote the password)", api=fake_api)
    for cmd in ("check-config", "run"):
        r = run_cli(cfg, cmd, timeout=30)
        assert password not in r.stdout + r.stderr


def test_config_with_a_password_readable_by_others(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api,
                      **{"database.conninfo": f"{db.dsn} password=Pw-in-the-file"})
    os.chmod(cfg, 0o644)
    refused_alike(cfg, f'configuration file with a password in database.conninfo "{cfg}" is '
                       "readable by group or others (mode 0644)", api=fake_api)
    r = run_cli(cfg, "check-config")
    assert "Pw-in-the-file" not in r.stdout + r.stderr


def test_every_problem_is_reported_at_once(tmp_path, db, redis, fake_api, binary):
    ca, token = tmp_path / "no-ca.pem", tmp_path / "no-token"
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.ca_file": str(ca),
                                                        "billing_api.token_file": str(token),
                                                        "database.conninfo": "dbname"})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 2
    for what in ('"database.conninfo" is not a valid connection string',
                 f'could not open billing_api.ca_file "{ca}"',
                 f'could not open billing_api.token_file "{token}"'):
        assert what in r.stderr, r.stderr
    assert f'billing-worker: "{cfg}": the worker would refuse to start' in r.stderr


def test_batch_larger_than_concurrency_is_a_warning(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.concurrency": 4,
                                                        "worker.batch_size": 10})
    migrate(cfg)
    line = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1)
                if "batch_size" in text)
    warning = (f'{cfg}:{line}: warning: "worker.batch_size" (10) is greater than '
               '"worker.concurrency" (4): a poll takes at most 4 items')
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    assert warning in r.stderr
    insert_invoices(db, 2)
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    assert warning in r.stderr


def test_a_good_file_passes_quietly(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.batch_size": 16})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0 and r.stdout == f"{cfg}: configuration is valid\n", r
    assert r.stderr == ""
    # check-config reads the token as run does, and never prints it
    assert fake_api.token not in r.stdout + r.stderr


def test_relative_include_is_beside_the_file_from_any_directory(tmp_path, db, redis, fake_api,
                                                                binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "limits.conf").write_text('@include "log.conf"\n')
    (conf_d / "log.conf").write_text("log = {\n  level = \"debug\";\n  level = \"info\";\n};\n")
    text = cfg.read_text().replace('log = {\n  level = "info";\n};\n', "")
    cfg.write_text(text + '@include "conf.d/limits.conf"\n')
    # run_cli works in the repository, far from the file (as systemd's / is)
    r = run_cli(cfg, "check-config")
    assert r.returncode == 2, r
    assert (f'{conf_d / "log.conf"}:3: duplicate setting "log.level" (first set at '
            f'{conf_d / "log.conf"}:2)') in r.stderr
    (conf_d / "log.conf").write_text('log = { level = "debug"; };\n')
    r = run_cli(cfg, "check-config")
    assert r.returncode == 0, r.stderr
    insert_invoices(db, 1)
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    assert " debug " in r.stderr
    (conf_d / "limits.conf").write_text('@include "missing.conf"\n')
    for cmd in ("check-config", "run"):
        r = run_cli(cfg, cmd)
        assert r.returncode == 2
        assert (f'{conf_d / "limits.conf"}:1: could not open @include file '
                f'"{conf_d / "missing.conf"}": No such file or directory') in r.stderr


# --------------------------------------------------------------------------
# --connect
# --------------------------------------------------------------------------

def test_connect_all_answer(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert lines[0] == f"{cfg}: configuration is valid"
    assert lines[1].startswith('database: answered (host "') and \
        lines[1].endswith("), schema up to date"), lines
    assert lines[2] == f'redis: "{redis.server.host}:{redis.server.port}" answered PONG', lines
    assert lines[3].startswith(f'billing api: "{fake_api.url}": TCP connect to 127.0.0.1 port ') and \
        lines[3].endswith("(no request sent)"), lines
    assert len(lines) == 4
    assert fake_api.state()["total_requests"] == 0


def test_connect_says_what_did_not_answer(tmp_path, db, fake_api, binary):
    # redis=None and an unmigrated database
    cfg = make_config(tmp_path, db, None, fake_api)
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "configuration is valid" in r.stdout
    assert re.search(r"^database: answered \(.*\), but could not read the schema version", r.stdout,
                     re.M), r.stdout
    assert re.search(r'^redis: no answer at "127\.0\.0\.1:\d+": ', r.stdout, re.M), r.stdout
    assert "billing api: " in r.stdout and "TCP connect" in r.stdout
    fake_api.stop()
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 1
    assert re.search(r'^billing api: no answer from "http://[^"]+": ', r.stdout, re.M), r.stdout


def test_connect_one_line_per_server_when_the_database_is_down(tmp_path, db, fake_api, binary):
    cfg = make_config(tmp_path, db, None, fake_api,
                      **{"database.conninfo": f"host=127.0.0.1 port={free_port()} dbname=x"})
    r = run_cli(cfg, "check-config", "--connect", timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert len(lines) == 4, lines
    assert lines[1].startswith("database: no answer: could not connect to the database: ")
    assert "Connection refused Is the server running" in lines[1], lines[1]
    assert lines[2].startswith("redis: no answer at ") and lines[3].startswith("billing api: ")


def test_connect_skip_locked_needs_no_redis(tmp_path, db, fake_api, binary):
    cfg = make_config(tmp_path, db, None, fake_api, **{"locks.mode": "skip-locked"})
    migrate(cfg)
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert 'redis: not used (locks.mode "skip-locked")' in r.stdout


@pytest.fixture
def redis_with_password(tmp_path):
    """A private redis-server that asks for AUTH: (host, port, password)."""
    password = "redis-pw-" + os.urandom(6).hex()
    port = free_port()
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind",
         "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
         "--requirepass", password, "--daemonize", "no"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis_command("127.0.0.1", port, "AUTH", password) == "OK", 10,
                 ignore=(OSError, ConnectionError, RedisError))
        yield "127.0.0.1", port, password
    finally:
        proc.kill()
        proc.wait()


def test_connect_redis_with_auth(tmp_path, db, fake_api, binary, redis_with_password):
    host, port, password = redis_with_password
    pw = private(tmp_path / "redis-password", password + "\n")
    cfg = make_config(tmp_path, db, None, fake_api, **{"redis.port": port,
                                                       "redis.password_file": str(pw)})
    migrate(cfg)
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f'redis: "{host}:{port}" answered PONG (after AUTH)\n' in r.stdout
    assert password not in r.stdout + r.stderr
    private(pw, "not-the-password\n")
    r = run_cli(cfg, "check-config", "--connect")
    assert r.returncode == 1
    assert re.search(rf'^redis: no answer at "{host}:{port}": authentication failed', r.stdout,
                     re.M), r.stdout
    assert "not-the-password" not in r.stdout + r.stderr


def test_connect_tls_handshake_with_the_ca_file(tmp_path, db, redis, binary):
    cert, key, ca = make_test_ca(tmp_path, "good", ("localhost",))
    api = FakeApi(tmp_path, tls=(cert, key, ca), url_host="localhost")
    api.start()
    try:
        slow = {"billing_api.connect_timeout_ms": 5000, "billing_api.timeout_ms": 5000}
        cfg = make_config(tmp_path, db, redis, api, **{"billing_api.ca_file": str(ca), **slow})
        migrate(cfg)
        r = run_cli(cfg, "check-config", "--connect")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "TLS handshake with " in r.stdout
        assert "certificate and host name verified (no request sent)" in r.stdout
        # another CA: the handshake fails, and says so
        _, _, other = make_test_ca(tmp_path, "other", ("localhost",))
        cfg = make_config(tmp_path, db, redis, api, **{"billing_api.ca_file": str(other), **slow})
        r = run_cli(cfg, "check-config", "--connect")
        assert r.returncode == 1
        assert re.search(r"^billing api: no answer from \"https://localhost:\d+\": .*certificate",
                         r.stdout, re.M), r.stdout
        assert api.state()["total_requests"] == 0
    finally:
        api.stop()


# --------------------------------------------------------------------------
# The command line and the version
# --------------------------------------------------------------------------

def test_version(binary):
    want = f"billing-worker {changelog_version()}\n"
    for args in (("--version",), ("version",), ("-c", "/nonexistent", "version")):
        r = run_cli(None, *args)
        assert r.returncode == 0 and r.stdout == want, (args, r)


def test_help_and_usage(binary):
    r = run_cli(None, "--help")
    assert r.returncode == 0 and "--config FILE" in r.stdout and "version" in r.stdout
    for args in (("--json",), ("--json", "status"), ("--connect", "check-config"),
                 ("check-config", "--json"), ("status", "--connect"),
                 ("--no-such-option",), ("frobnicate",), ("status", "extra")):
        r = run_cli(None, *args)
        assert r.returncode == 2, (args, r)
        assert "usage: billing-worker" in r.stderr


def test_long_options_anywhere(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    for args in (("--config", cfg, "check-config"), (f"--config={cfg}", "check-config"),
                 ("check-config", "--config", cfg), ("check-config", "-c", cfg)):
        r = run_cli(None, *args)
        assert r.returncode == 0 and "configuration is valid" in r.stdout, (args, r.stderr)
    r = run_cli(None, "status", "--config", cfg, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["version"] == changelog_version()


def test_version_in_status_json_and_the_start_line(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    doc = json.loads(run_cli(cfg, "status", "--json").stdout)
    assert list(doc)[0] == "version" and doc["version"] == changelog_version()
    w = Worker(cfg, "w").start()
    wait_for(lambda: "starting (" in w.log(), 10, message=w.log)
    assert re.search(r"starting \(run, lock mode redis, concurrency \d+, batch \d+, version "
                     + re.escape(changelog_version()) + r"\)", w.log()), w.log()
    assert w.stop() == 0

"""make install: layout, modes, PREFIX and DESTDIR, the config kept on
reinstall; and the man pages are lint-clean."""

import os
import shutil
import stat
import subprocess

import pytest

from harness import REPO_ROOT


def make_install(*args):
    r = subprocess.run(["make", "-s", "install", *args], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_install_honours_destdir_and_prefix(tmp_path):
    root = tmp_path / "root"
    make_install(f"DESTDIR={root}", "PREFIX=/opt/bw")
    binary = root / "opt/bw/sbin/billing-worker"
    conf = root / "etc/billing-worker/billing-worker.conf"
    assert mode(binary) == 0o755
    assert mode(conf) == 0o640
    assert conf.read_text() == (REPO_ROOT / "config/billing-worker.conf.example").read_text()
    assert mode(root / "opt/bw/share/doc/billing-worker/examples/billing-worker.conf.example") == 0o644
    assert mode(root / "opt/bw/share/man/man8/billing-worker.8") == 0o644
    assert mode(root / "opt/bw/share/man/man5/billing-worker.conf.5") == 0o644
    # What an operator reads and runs, beside the binary.
    for doc in ["README.md", "SECURITY.md", "RELIABILITY.md", "configuration.md"]:
        assert mode(root / "opt/bw/share/doc/billing-worker" / doc) == 0o644, doc
    roles = root / "opt/bw/share/billing-worker/sql/roles.sql"
    assert mode(roles) == 0o644
    assert roles.read_text() == (REPO_ROOT / "sql/roles.sql").read_text()
    rules = root / "opt/bw/share/billing-worker/prometheus/billing-worker.rules.yml"
    assert mode(rules) == 0o644
    assert rules.read_text() == (REPO_ROOT / "prometheus/billing-worker.rules.yml").read_text()
    unit = root / "opt/bw/lib/systemd/system/billing-worker.service"
    assert mode(unit) == 0o644
    # The unit runs the binary where it was installed, not where DESTDIR staged it.
    assert "ExecStart=/opt/bw/sbin/billing-worker -c /etc/billing-worker/billing-worker.conf run" \
        in unit.read_text()
    assert str(root) not in unit.read_text()
    assert "\nLimitNOFILE=65536\n" in unit.read_text()
    # Nothing outside DESTDIR.
    assert sorted(p.name for p in root.iterdir()) == ["etc", "opt"]


def test_reinstall_keeps_an_edited_config(tmp_path):
    root = tmp_path / "root"
    make_install(f"DESTDIR={root}", "PREFIX=/usr")
    conf = root / "etc/billing-worker/billing-worker.conf"
    conf.write_text("# edited by the operator\n")
    r = make_install(f"DESTDIR={root}", "PREFIX=/usr")
    assert conf.read_text() == "# edited by the operator\n"
    assert "keeping the existing" in r.stdout
    assert (root / "usr/sbin/billing-worker").exists()


def test_installed_example_config_is_valid(tmp_path):
    root = tmp_path / "root"
    make_install(f"DESTDIR={root}", "PREFIX=/usr")
    # check-config reads the token as the unit hands it over: a credential
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-token").write_text("example-token\n")
    (creds / "api-token").chmod(0o600)
    cmd = [str(root / "usr/sbin/billing-worker"), "-c",
           str(root / "etc/billing-worker/billing-worker.conf"), "check-config"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30,
                       env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    assert r.returncode == 0, r.stderr
    # without one, the missing token file is what run would refuse
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    if not os.path.exists("/etc/billing-worker/api-token"):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)
        assert r.returncode == 2
        assert 'could not open billing_api.token_file "/etc/billing-worker/api-token"' in r.stderr


@pytest.mark.parametrize("page", ["billing-worker.8", "billing-worker.conf.5"])
def test_man_page_lint(page):
    path = REPO_ROOT / "man" / page
    if shutil.which("mandoc"):
        r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(path)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr
    r = subprocess.run(["man", "--warnings", "-l", str(path)], capture_output=True, text=True,
                       timeout=30, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "billing-worker" in r.stdout

"""The Debian package, installed for real: dpkg -i, the files and their
modes, an operator's chmod surviving a reinstall and an upgrade, remove
(binary gone, configuration kept) and purge (configuration and its
statoverride gone), and what the maintainer scripts ask systemd at each
step.

The .deb is built once with `make deb` (which also fails on any lintian
error or warning), or taken from BW_DEB.  This installs into the real
root, so it needs root and a machine where billing-worker is not
installed; CI is both.  There is no systemd as PID 1 here: the first
install and the purge run as they are (the scripts must cope), and the
reinstall, upgrade and remove run with /run/systemd/system faked in a
private mount namespace and systemctl and deb-systemd-invoke replaced by
stubs that record their arguments.
"""

import grp
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from harness import REPO_ROOT

PKG = "billing-worker"
CONF = Path("/etc/billing-worker/billing-worker.conf")
SBIN = Path("/usr/sbin/billing-worker")
UNIT_DIR = Path("/lib/systemd/system")
DOC_DIR = Path("/usr/share/doc/billing-worker")
UNITS = ["billing-worker.service", "billing-worker@.service", "billing-worker-once.service",
         "billing-worker-once.timer", "billing-worker-audit.service",
         "billing-worker-audit.timer"]
# What a maintainer script must never ask of systemd on install or upgrade.
ACTIONS = {"start", "stop", "restart", "try-restart", "reload-or-restart", "enable", "disable"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs a package: run as root")


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=kw.pop("timeout", 300), **kw)
    return r


def package_status():
    r = run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", PKG])
    return r.stdout.strip() if r.returncode == 0 else ""


def statoverride():
    r = run(["dpkg-statoverride", "--list", str(CONF)])
    return r.stdout.split() if r.returncode == 0 else None


def mode(path):
    st = path.stat()
    return (pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name,
            stat.S_IMODE(st.st_mode))


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """The package to test: BW_DEB, or one `make deb` builds now."""
    given = os.environ.get("BW_DEB")
    if given:
        path = Path(given)
        assert path.is_file(), f"BW_DEB={given} does not exist"
        return path
    # Not the flags of a make that runs these tests (SANITIZE=1 would build
    # an instrumented package elsewhere).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    start = time.monotonic()
    r = run(["make", "-s", "deb"], cwd=REPO_ROOT, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    print(f"make deb: {time.monotonic() - start:.0f} s")
    debs = sorted((REPO_ROOT / "build/deb").glob(f"{PKG}_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


@pytest.fixture(scope="module")
def newer_deb(deb, tmp_path_factory):
    """The same package under a higher version: a real upgrade, conffile unchanged."""
    work = tmp_path_factory.mktemp("repack")
    tree = work / "tree"
    assert run(["dpkg-deb", "-R", str(deb), str(tree)]).returncode == 0
    control = tree / "DEBIAN/control"
    lines = control.read_text().splitlines()
    version = next(line.split(": ", 1)[1] for line in lines if line.startswith("Version: "))
    control.write_text("\n".join(f"Version: {version}+upgrade1" if line.startswith("Version: ")
                                 else line for line in lines) + "\n")
    out = work / f"{PKG}_{version}+upgrade1.deb"
    r = run(["dpkg-deb", "-Zgzip", "-b", str(tree), str(out)])
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def clean_machine():
    """Refuses to touch a machine where the package is in use; purges afterwards."""
    if package_status() not in ("", "un", "pn"):
        pytest.skip(f"{PKG} is installed here ({package_status()}); this test would remove it "
                    f"(dpkg --purge {PKG} first)")
    if CONF.parent.exists() or SBIN.exists():
        pytest.skip(f"{CONF.parent} or {SBIN} exists outside the package; this test would "
                    "remove it")
    yield
    dpkg("--purge", PKG)


class FakeSystemd:
    """Runs commands with /run/systemd/system present and systemctl stubbed."""

    def __init__(self, tmp_path):
        self.bin = tmp_path / "stubs"
        self.bin.mkdir()
        self.log = tmp_path / "calls.log"
        for name in ["systemctl", "deb-systemd-invoke"]:
            stub = self.bin / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {self.log}\nexit 0\n')
            stub.chmod(0o755)

    def wrap(self, cmd):
        script = ('mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/system && '
                  f'PATH={self.bin}:$PATH exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]

    def calls(self):
        """The calls recorded since the last look."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        self.log.unlink()
        return lines


def dpkg(*args, systemd=None):
    """dpkg, retried while another process holds its lock (a shared CI host)."""
    cmd = ["dpkg", "--force-confold", *args]
    if systemd is not None:
        cmd = systemd.wrap(cmd)
    deadline = time.monotonic() + 300
    while True:
        r = run(cmd, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode == 0 or "lock" not in r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(2)


def check_installed(version):
    assert package_status() == "ii"
    assert run(["dpkg-query", "-W", "-f=${Version}", PKG]).stdout == version
    assert mode(SBIN) == ("root", "root", 0o755)
    assert not Path("/usr/bin/billing-worker").exists()
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        assert mode(UNIT_DIR / unit)[2] == 0o644
        assert "/usr/bin/billing-worker" not in text, unit
        if unit.endswith(".service"):
            assert "ExecStart=/usr/sbin/billing-worker -c /etc/billing-worker/" in text, unit
    for unit in ["billing-worker.service", "billing-worker@.service"]:
        assert "\nLimitNOFILE=65536\n" in (UNIT_DIR / unit).read_text(), unit
    roles = Path("/usr/share/billing-worker/sql/roles.sql")
    assert mode(roles)[2] == 0o644
    assert roles.read_text() == (REPO_ROOT / "sql/roles.sql").read_text()
    rules = Path("/usr/share/billing-worker/prometheus/billing-worker.rules.yml")
    assert mode(rules)[2] == 0o644
    assert rules.read_text() == (REPO_ROOT / "prometheus/billing-worker.rules.yml").read_text()
    for doc in ["README.md", "SECURITY.md", "RELIABILITY.md", "configuration.md"]:
        assert (DOC_DIR / doc).exists() or (DOC_DIR / f"{doc}.gz").exists(), doc
    assert (Path("/usr/share/man/man8/billing-worker.8.gz")).exists()
    assert run(["dpkg-query", "-W", "-f=${Conffiles}", PKG]).stdout.split()[0] == str(CONF)
    # check-config opens the token as the unit hands it over: a credential.
    creds = Path(tempfile.mkdtemp(prefix="bw-deb-creds-"))
    try:
        (creds / "api-token").write_text("example-token\n")
        (creds / "api-token").chmod(0o600)
        r = run([str(SBIN), "-c", str(CONF), "check-config"],
                env={**os.environ, "CREDENTIALS_DIRECTORY": str(creds)})
    finally:
        shutil.rmtree(creds, ignore_errors=True)
    assert r.returncode == 0, r.stderr


def test_install_upgrade_remove_purge(tmp_path, deb, newer_deb, clean_machine):
    systemd = FakeSystemd(tmp_path)
    version = run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()

    # First install, no systemd: the user exists, the config is the group's,
    # through a statoverride, and nothing else was asked.
    r = dpkg("-i", str(deb))
    assert r.returncode == 0, r.stdout + r.stderr
    check_installed(version)
    pwd.getpwnam("billing-worker")
    assert mode(CONF) == ("root", "billing-worker", 0o640)
    assert statoverride() == ["root", "billing-worker", "640", str(CONF)]
    assert (CONF.read_text() ==
            (REPO_ROOT / "config/billing-worker.conf.example").read_text())

    # The operator tightens the file (a password in database.conninfo).
    CONF.chmod(0o600)

    # Reinstall over itself, with systemd: the mode stays; systemd rereads
    # the units; nothing is started, stopped or restarted.
    r = dpkg("-i", str(deb), systemd=systemd)
    assert r.returncode == 0, r.stdout + r.stderr
    check_installed(version)
    assert mode(CONF) == ("root", "billing-worker", 0o600)
    calls = systemd.calls()
    assert "systemctl --system daemon-reload" in calls, calls
    assert not [c for c in calls if c.startswith("deb-systemd-invoke")], calls
    assert not [c for c in calls if set(c.split()) & ACTIONS], calls

    # A real upgrade to a higher version: the same.
    r = dpkg("-i", str(newer_deb), systemd=systemd)
    assert r.returncode == 0, r.stdout + r.stderr
    check_installed(f"{version}+upgrade1")
    assert mode(CONF) == ("root", "billing-worker", 0o600)
    calls = systemd.calls()
    assert "systemctl --system daemon-reload" in calls, calls
    assert not [c for c in calls if c.startswith("deb-systemd-invoke")], calls
    assert not [c for c in calls if set(c.split()) & ACTIONS], calls

    # Remove, with systemd: every unit is stopped, template instances by
    # pattern, timers first; the binary goes; the configuration stays, as
    # the operator left it.
    r = dpkg("--remove", PKG, systemd=systemd)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = systemd.calls()
    stops = [c for c in calls if c.startswith("deb-systemd-invoke stop")]
    assert stops == [
        "deb-systemd-invoke stop billing-worker-once.timer billing-worker-audit.timer",
        "deb-systemd-invoke stop billing-worker.service billing-worker@*.service "
        "billing-worker-once.service billing-worker-audit.service",
    ], calls
    assert "systemctl --system daemon-reload" in calls, calls
    assert package_status() == "rc"
    assert not SBIN.exists()
    assert not (UNIT_DIR / "billing-worker.service").exists()
    assert mode(CONF) == ("root", "billing-worker", 0o600)
    assert statoverride() is not None

    # Purge, no systemd: the configuration, its directory and its override
    # go; the system user stays (Debian never reuses a uid that owned files).
    r = dpkg("--purge", PKG)
    assert r.returncode == 0, r.stdout + r.stderr
    assert package_status() in ("", "un", "pn")
    assert not CONF.exists()
    assert not CONF.parent.exists()
    assert statoverride() is None
    pwd.getpwnam("billing-worker")
    assert shutil.which("billing-worker") is None

"""The systemd units: they verify, they are hardened (offline exposure at
most 2.0), and the four services share one hardening block.

The units name /usr/sbin/billing-worker; `make install PREFIX=<tmp>` writes
the staged binary's path into them instead, so `systemd-analyze verify`
(which checks that ExecStart= is executable and that the man pages named in
Documentation= exist) runs on exactly what is installed.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import REPO_ROOT

UNIT_DIR = REPO_ROOT / "systemd"
SERVICES = ["billing-worker.service", "billing-worker@.service",
            "billing-worker-once.service", "billing-worker-audit.service"]
TIMERS = ["billing-worker-once.timer", "billing-worker-audit.timer"]
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                reason="systemd-analyze not installed (apt-get install systemd)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """make install under a temporary PREFIX; returns that prefix."""
    prefix = tmp_path_factory.mktemp("prefix")
    r = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}", f"SYSCONFDIR={prefix}/etc"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return prefix


def test_every_unit_is_installed(installed):
    names = sorted(p.name for p in (installed / "lib/systemd/system").iterdir())
    assert names == sorted(SERVICES + TIMERS)
    assert names == sorted(p.name for p in UNIT_DIR.iterdir())


@pytest.mark.parametrize("unit", SERVICES + TIMERS)
def test_unit_verifies(installed, unit):
    path = installed / "lib/systemd/system" / unit
    text = path.read_text()
    assert f"{installed}/sbin/billing-worker" in text or unit.endswith(".timer")
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True,
                       env={**os.environ, "MANPATH": str(installed / "share/man")}, timeout=60)
    # Unknown keys and bad values are only warnings: any output is a failure.
    assert r.returncode == 0 and r.stderr == "" and r.stdout == "", r.stdout + r.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_at_most_2(unit):
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(UNIT_DIR / unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, r.stdout


def hardening(unit):
    text = (UNIT_DIR / unit).read_text()
    block = text.split("# Hardening:", 1)[1]
    block = block.split("\n[", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_services_share_one_hardening_block():
    first = hardening(SERVICES[0])
    assert "ProtectSystem=strict" in first and "CapabilityBoundingSet=" in first
    assert "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6" in first
    assert "SystemCallFilter=@system-service" in first
    assert "MemoryDenyWriteExecute=yes" in first
    for unit in SERVICES[1:]:
        assert hardening(unit) == first, unit


def test_daemon_units_notify_watchdog_and_credential():
    for unit in ["billing-worker.service", "billing-worker@.service"]:
        text = (UNIT_DIR / unit).read_text()
        assert re.search(r"^Type=notify$", text, re.M)
        assert re.search(r"^WatchdogSec=\d+", text, re.M)
        assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, re.M)
        assert re.search(r"^Restart=on-failure$", text, re.M)
        assert re.search(r"^User=billing-worker$", text, re.M)
        # The name the binary looks for in $CREDENTIALS_DIRECTORY (worker/main.c).
        assert re.search(r"^LoadCredential=api-token:/etc/billing-worker/api-token$", text, re.M)
    assert "/etc/billing-worker/%i.conf run" in (UNIT_DIR / "billing-worker@.service").read_text()

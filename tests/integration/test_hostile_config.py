"""A configuration file that once took the daemon down on SIGHUP.

libconfig 1.5's scanner calls exit() when an @include names a directory and
blocks on a FIFO (found by tests/fuzz/config.c).  A reload of such a file
must be logged and the running configuration kept, like any bad file.
"""

import os

import pytest

from harness import Worker, insert_invoices, make_config, run_cli, wait_for


@pytest.mark.parametrize("target", ["directory", "fifo"])
def test_reload_with_an_include_of_a_non_file_keeps_running(tmp_path, db, redis, fake_api, binary,
                                                            target):
    cfg = make_config(tmp_path, db, redis, fake_api)
    assert run_cli(cfg, "migrate").returncode == 0
    included = tmp_path / "included"
    if target == "directory":
        included.mkdir()
    else:
        os.mkfifo(included)
    w = Worker(cfg, "w").start()
    wait_for(lambda: "starting" in w.log(), 10)
    good = cfg.read_text()

    cfg.write_text(good + f'@include "{included}"\n')
    r = run_cli(cfg, "check-config", timeout=10)
    assert r.returncode == 2
    assert f'@include "{included}" is not a regular file' in r.stderr
    w.reload()
    wait_for(lambda: "keeping the running configuration" in w.log(), 10, message=w.log)
    assert f'@include "{included}" is not a regular file' in w.log()

    insert_invoices(db, 3)
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 3, 20,
             message=w.log)
    assert w.stop() == 0

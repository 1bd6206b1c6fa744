"""TLS to the billing API, and plain http only where it cannot be sniffed.

The fake API serves HTTPS with a certificate from a throwaway CA made by
openssl in the test.  A peer that cannot be verified is never sent
anything: the fake's count of requests stays at zero and the item is a
transient failure (CONTRACT section 2: nothing was done).
"""

import pytest

from harness import migrate, FakeApi, Worker, insert_invoices, make_config, make_test_ca, run_cli, wait_for


# Time enough to load a CA store and finish (or fail) a handshake on its
# merits even under valgrind (make valgrind), not by the connect timeout.
SLOW_HANDSHAKE = {"billing_api.connect_timeout_ms": 5000, "billing_api.timeout_ms": 5000}


@pytest.fixture
def tls_api(tmp_path):
    """The fake API over HTTPS, certificate for "localhost" only, URL https://localhost:PORT."""
    cert, key, ca = make_test_ca(tmp_path, "good", ("localhost",))
    api = FakeApi(tmp_path, tls=(cert, key, ca), url_host="localhost")
    api.start()
    try:
        yield api
    finally:
        api.stop()


def test_verified_with_ca_file(tmp_path, db, redis, tls_api, binary):
    cfg = make_config(tmp_path, db, redis, tls_api, **{"billing_api.ca_file": str(tls_api.tls[2]),
                                                       **SLOW_HANDSHAKE})
    migrate(cfg)
    ids = insert_invoices(db, 3)
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    applied = tls_api.state()["applied"]
    for iid, status, charge_id in db.query("SELECT id, status, charge_id FROM invoices"):
        assert status == "paid" and applied[f"invoice-{iid}"]["id"] == charge_id
    assert len(applied) == len(ids)


def refused_and_never_sent(tmp_path, db, redis, api, **overrides):
    cfg = make_config(tmp_path, db, redis, api, **{"billing_api.max_attempts": 1000,
                                                   **SLOW_HANDSHAKE, **overrides})
    migrate(cfg)
    [iid] = insert_invoices(db, 1)
    w = Worker(cfg, "w1")
    w.start()
    wait_for(lambda: db.scalar("SELECT attempts FROM invoices") >= 2, 30,
             message=lambda: w.log())
    assert w.stop() == 0
    status, ambiguous, err = db.query("SELECT status, ambiguous, last_error FROM invoices")[0]
    assert (status, ambiguous) == ("pending", False)
    assert err.startswith("could not reach the billing API: "), err
    assert api.state()["total_requests"] == 0
    assert f"invoice {iid}: retry in" in w.log()
    return err


def test_wrong_ca_is_refused_and_nothing_sent(tmp_path, db, redis, tls_api, binary):
    _, _, other_ca = make_test_ca(tmp_path, "other", ("localhost",))
    err = refused_and_never_sent(tmp_path, db, redis, tls_api,
                                 **{"billing_api.ca_file": str(other_ca)})
    assert "certificate" in err.lower() or "issuer" in err.lower(), err


def test_system_store_does_not_trust_a_private_ca(tmp_path, db, redis, tls_api, binary):
    err = refused_and_never_sent(tmp_path, db, redis, tls_api)
    assert "certificate" in err.lower() or "issuer" in err.lower(), err


def test_hostname_mismatch_is_refused_and_nothing_sent(tmp_path, db, redis, tls_api, binary):
    # The certificate names localhost; the worker is pointed at 127.0.0.1.
    tls_api.url_host = "127.0.0.1"
    err = refused_and_never_sent(tmp_path, db, redis, tls_api,
                                 **{"billing_api.ca_file": str(tls_api.tls[2])})
    assert "127.0.0.1" in err or "name" in err.lower(), err


def test_unreadable_ca_file_fails_at_start(tmp_path, db, redis, tls_api, binary):
    cfg = make_config(tmp_path, db, redis, tls_api,
                      **{"billing_api.ca_file": str(tmp_path / "missing.pem")})
    migrate(cfg)
    insert_invoices(db, 1)
    for cmd in ("check-config", "once"):
        r = run_cli(cfg, cmd)
        assert r.returncode == 2, (cmd, r.stderr)
        assert f'could not open billing_api.ca_file "{tmp_path / "missing.pem"}"' in r.stderr
    assert tls_api.state()["total_requests"] == 0


def test_plain_http_to_loopback_is_fine(tmp_path, db, redis, fake_api, binary):
    for url in (fake_api.url, fake_api.url.replace("127.0.0.1", "localhost")):
        cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.base_url": url})
        r = run_cli(cfg, "check-config")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("url", ["http://billing.example.com", "http://10.1.2.3:8080/v1",
                                 "http://[2001:db8::1]/", "http://localhost.example.com"])
def test_plain_http_elsewhere_is_refused_at_start(tmp_path, db, redis, fake_api, binary, url):
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.base_url": url})
    for cmd in ("check-config", "once", "run"):
        r = run_cli(cfg, cmd, timeout=20)
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert '"billing_api.base_url" uses http:// to a host that is not loopback' in r.stderr


def test_allow_insecure_http_warns_at_start(tmp_path, db, redis, fake_api, binary):
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "billing_api.base_url": "http://billing.example.com",
        "billing_api.allow_insecure_http": True})
    migrate(cfg)
    # Nothing is due, so nothing is sent anywhere: the run only starts and ends.
    r = run_cli(cfg, "once")
    assert r.returncode == 0, r.stderr
    assert "is plain http to a host that is not loopback" in r.stderr


def test_credentials_in_base_url_are_refused(tmp_path, db, redis, fake_api, binary):
    url = fake_api.url.replace("://", "://user:hunter2@")
    cfg = make_config(tmp_path, db, redis, fake_api, **{"billing_api.base_url": url})
    r = run_cli(cfg, "check-config")
    assert r.returncode == 2
    assert "must not hold a user or password" in r.stderr
    assert "hunter2" not in r.stderr + r.stdout


def test_http2_offered_but_http11_spoken(tmp_path, db, redis, binary):
    """billing/api.c pins CURLOPT_HTTP_VERSION to HTTP/1.1 (CONTRACT section 2).

    An API that offers h2 by ALPN must still be spoken to in HTTP/1.1: over
    one HTTP/2 connection every call shares its fate, and one stream reset
    or GOAWAY makes all the calls in flight on it ambiguous.  libcurl picks
    h2 when the server offers it unless told otherwise; this fake then
    cannot answer it, and before the pin no invoice was ever paid.
    """
    cert, key, ca = make_test_ca(tmp_path, "alpn", ("localhost",))
    api = FakeApi(tmp_path, tls=(cert, key, ca), url_host="localhost", alpn=("h2", "http/1.1"))
    api.start()
    try:
        cfg = make_config(tmp_path, db, redis, api, **{"billing_api.ca_file": str(ca),
                                                       **SLOW_HANDSHAKE})
        migrate(cfg)
        ids = insert_invoices(db, 3)
        w = Worker(cfg, "w").start()
        # libcurl always offers ALPN; the test's own control requests offer
        # none, and count as "none".
        worker_alpn = lambda: {p: n for p, n in api.state()["alpn"].items()  # noqa: E731
                               if p != "none"}
        alpn = wait_for(worker_alpn, 20, message=w.log)
        assert set(alpn) == {"http/1.1"}, f"negotiated {alpn}; worker log:\n{w.log_tail()}"
        wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 3,
                 20, message=w.log)
        assert w.stop() == 0
        assert set(worker_alpn()) == {"http/1.1"}
        assert sorted(api.state()["applied"]) == sorted(f"invoice-{i}" for i in ids)
    finally:
        api.stop()

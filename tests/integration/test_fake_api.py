"""Tests of the fake billing API itself (tests/fake_api.py).

Self-contained: starts its own fake on port 0 as a subprocess and talks to it
with http.client only. Uses no fixture from any conftest.py.
"""

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

FAKE = Path(__file__).resolve().parents[1] / "fake_api.py"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
TOKEN = "test-token-3f9a"


# --------------------------------------------------------------------------
# The fake, as a subprocess
# --------------------------------------------------------------------------

class Fake:
    def __init__(self, tmpdir):
        self.tmpdir = tmpdir
        self.token_file = os.path.join(tmpdir, "token")
        with open(self.token_file, "w") as f:
            f.write(TOKEN + "\n")
        self.ready_file = os.path.join(tmpdir, "ready")
        self.stderr = open(os.path.join(tmpdir, "stderr.log"), "wb")
        self.proc = subprocess.Popen(
            [PYTHON, str(FAKE), "--host", "127.0.0.1", "--port", "0",
             "--token-file", self.token_file, "--ready-file", self.ready_file],
            stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL)
        self.port = self._read_ready(10.0)

    def _read_ready(self, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise RuntimeError("fake_api did not print READY: %r" % buf)
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.stop()
                    raise RuntimeError("fake_api exited before READY: %r" % buf)
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        assert line.startswith("READY "), line
        return int(line.split()[1])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        return self.proc.returncode

    # ---- HTTP helpers ----------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=10.0, raw=None):
        """One request on a fresh connection; returns (status, headers dict, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (
                json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def post(self, path, body, key, token=TOKEN, headers=None, **kw):
        h = {"Content-Type": "application/json"}
        if token is not None:
            h["Authorization"] = "Bearer " + token
        if key is not None:
            h["Idempotency-Key"] = key
        h.update(headers or {})
        return self.request("POST", path, body=body, headers=h, **kw)

    def charge(self, invoice_id, customer="cus_42", amount=1999, currency="usd", key=None, **kw):
        body = {"invoice_id": invoice_id, "customer": customer, "amount": amount,
                "currency": currency}
        return self.post("/v1/charges", body,
                         key if key is not None else "invoice-%d" % invoice_id, **kw)

    def redeem(self, redemption_id, customer="learner-9", amount=2500, subsidy_id=7,
               key=None, **kw):
        body = {"redemption_id": redemption_id, "subsidy_id": subsidy_id, "customer": customer,
                "amount": amount}
        return self.post("/v1/redemptions", body,
                         key if key is not None else "redemption-%d" % redemption_id, **kw)

    def faults(self, rules, latency_ms=0):
        st, _, body = self.request("POST", "/_control/faults",
                                   body={"latency_ms": latency_ms, "rules": rules})
        assert st == 200, body

    def state(self):
        st, _, body = self.request("GET", "/_control/state")
        assert st == 200
        return json.loads(body)

    def reset(self):
        st, _, _ = self.request("POST", "/_control/reset")
        assert st == 200


@pytest.fixture(scope="module")
def fakeapi_server():
    with tempfile.TemporaryDirectory(prefix="fakeapi-test-") as d:
        fake = Fake(d)
        try:
            yield fake
        finally:
            rc = fake.stop()
            with open(os.path.join(d, "stderr.log"), "rb") as e:
                err = e.read()
            assert rc == 0, "fake_api exited with %r: %r" % (rc, err[-2000:])
            assert b"Traceback" not in err, err[-4000:].decode(errors="replace")


@pytest.fixture
def fake(fakeapi_server):
    fakeapi_server.reset()
    yield fakeapi_server
    assert fakeapi_server.proc.poll() is None, "fake_api died"


def jbody(b):
    return json.loads(b)


# --------------------------------------------------------------------------
# Charges and idempotency
# --------------------------------------------------------------------------

def test_ready_file_written(fake):
    with open(fake.ready_file) as f:
        assert int(f.read().strip()) == fake.port


def test_charge_succeeds_and_replays(fake):
    st, h, b = fake.charge(17)
    assert st == 200
    assert h["content-type"] == "application/json"
    assert int(h["content-length"]) == len(b)
    assert "idempotent-replayed" not in h
    doc = jbody(b)
    assert doc["object"] == "charge"
    assert doc["id"].startswith("ch_") and len(doc["id"]) == 3 + 24
    int(doc["id"][3:], 16)
    assert (doc["amount"], doc["customer"], doc["currency"], doc["invoice_id"]) == \
        (1999, "cus_42", "usd", 17)

    # the same body in another key order is the same body
    st2, h2, b2 = fake.post("/v1/charges", {"currency": "usd", "amount": 1999,
                                            "customer": "cus_42", "invoice_id": 17},
                            "invoice-17")
    assert st2 == 200
    assert h2["idempotent-replayed"] == "true"
    assert jbody(b2)["id"] == doc["id"]
    assert b2 == b

    s = fake.state()
    assert list(s["applied"]) == ["invoice-17"]
    a = s["applied"]["invoice-17"]
    assert a["id"] == doc["id"] and a["path"] == "/v1/charges"
    assert a["body"] == {"invoice_id": 17, "customer": "cus_42", "amount": 1999, "currency": "usd"}
    assert isinstance(a["at"], (int, float))
    assert s["results"]["invoice-17"] == {"status": 200, "body": doc}
    assert s["requests"]["invoice-17"] == 2


def test_changed_body_same_key_is_422(fake):
    st, _, b = fake.charge(18, amount=100)
    assert st == 200
    first = jbody(b)["id"]
    st, h, b = fake.charge(18, amount=200)
    assert st == 422
    err = jbody(b)["error"]
    assert err["type"] == "idempotency_error" and err["code"] == "key_reused"
    assert "idempotent-replayed" not in h
    s = fake.state()
    assert s["results"]["invoice-18"]["status"] == 200       # 422 not stored
    assert s["applied"]["invoice-18"]["id"] == first
    assert s["applied"]["invoice-18"]["body"]["amount"] == 100
    # the original body still replays
    st, h, b = fake.charge(18, amount=100)
    assert st == 200 and jbody(b)["id"] == first and h["idempotent-replayed"] == "true"


def test_concurrent_same_key_during_delay_is_409(fake):
    fake.faults([{"match": {"key": "invoice-20"}, "action": "delay", "delay_ms": 1500,
                  "times": 1}])
    out = {}

    def slow():
        out["slow"] = fake.charge(20)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    st, h, b = fake.charge(20)
    assert st == 409
    err = jbody(b)["error"]
    assert err["type"] == "conflict" and err["code"] == "in_progress"
    assert fake.state()["applied"] == {}
    t.join(10)
    st1, _, b1 = out["slow"]
    assert st1 == 200
    # another key was not blocked meanwhile; and now the key replays
    st, h, b = fake.charge(20)
    assert st == 200 and h["idempotent-replayed"] == "true"
    assert jbody(b)["id"] == jbody(b1)["id"]
    s = fake.state()
    assert s["requests"]["invoice-20"] == 3
    assert s["fired"] == {"0": 1}


def test_concurrent_same_key_during_latency_is_409(fake):
    fake.faults([], latency_ms=1000)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fake.charge(21)))
    t.start()
    time.sleep(0.3)
    st, _, b = fake.charge(21)
    assert st == 409
    t.join(10)
    assert out["r"][0] == 200


def test_other_keys_not_blocked_by_delay(fake):
    fake.faults([{"match": {"key": "invoice-22"}, "action": "delay", "delay_ms": 1500}])
    t = threading.Thread(target=lambda: fake.charge(22))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    st, _, _ = fake.charge(23)
    assert st == 200
    assert time.monotonic() - t0 < 1.0
    t.join(10)


def test_declined_customer_402_and_replay(fake):
    st, h, b = fake.charge(30, customer="declined_card")
    assert st == 402
    err = jbody(b)["error"]
    assert err == {"type": "card_error", "code": "card_declined",
                   "message": "Your card was declined."}
    st2, h2, b2 = fake.charge(30, customer="declined_card")
    assert st2 == 402 and b2 == b and h2["idempotent-replayed"] == "true"
    s = fake.state()
    assert s["applied"] == {}
    assert s["results"]["invoice-30"]["status"] == 402


def test_later_generation_keys_are_their_own_slot(fake):
    """invoice-<id>-<generation> (generation >= 2) is accepted for the body's id, as
    billing-worker requeue sends it, and replays nothing stored under another key."""
    assert fake.charge(31, customer="declined_card")[0] == 402
    st, h, b = fake.charge(31, customer="cus_fixed", key="invoice-31-2")
    assert st == 200 and "idempotent-replayed" not in h
    st2, h2, b2 = fake.charge(31, customer="cus_fixed", key="invoice-31-2")
    assert st2 == 200 and b2 == b and h2["idempotent-replayed"] == "true"
    assert fake.redeem(32, key="redemption-32-3")[0] == 200
    # Not another id's key, not generation 0 or 1 spelled out, not a padded or signed one.
    for key in ("invoice-30-2", "invoice-31-1", "invoice-31-0", "invoice-31-02",
                "invoice-31-+2", "invoice-31-", "invoice-31-2-2", "invoice-31-x"):
        st, _, b = fake.charge(31, customer="cus_fixed", key=key)
        assert st == 400, key
        assert "Idempotency-Key must be invoice-31" in jbody(b)["error"]["message"]
    s = fake.state()
    assert set(s["applied"]) == {"invoice-31-2", "redemption-32-3"}
    assert s["results"]["invoice-31"]["status"] == 402


def test_wrong_token_401(fake):
    st, _, b = fake.charge(40, token="nope")
    assert st == 401
    assert jbody(b) == {"error": {"type": "auth_error", "code": "unauthorized",
                                  "message": "bad token"}}
    st, _, _ = fake.charge(40, token=None)
    assert st == 401
    s = fake.state()
    assert s["applied"] == {} and s["results"] == {}
    assert s["requests"]["invoice-40"] == 2
    st, _, _ = fake.charge(40, token="nope")
    assert fake.state()["last_headers"]["invoice-40"]["Authorization"] == "<wrong>"
    st, _, _ = fake.charge(40)
    assert st == 200
    assert fake.state()["last_headers"]["invoice-40"]["Authorization"] == "Bearer <redacted>"


def test_token_file_is_reread(fake):
    try:
        with open(fake.token_file, "w") as f:
            f.write("  rotated-token  \n")
        os.utime(fake.token_file, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert fake.charge(41)[0] == 401
        assert fake.charge(41, token="rotated-token")[0] == 200
    finally:
        with open(fake.token_file, "w") as f:
            f.write(TOKEN + "\n")
        os.utime(fake.token_file, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert fake.charge(41)[0] == 200


# --------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------

def test_status_429_retry_after_times(fake):
    fake.faults([{"match": {"key_prefix": "invoice-"}, "action": "status", "status": 429,
                  "retry_after": 2, "times": 2}])
    for _ in range(2):
        st, h, b = fake.charge(50)
        assert st == 429
        assert h["retry-after"] == "2"
        assert jbody(b) == {"error": {"type": "api_error", "code": "injected",
                                      "message": "injected 429"}}
        s = fake.state()
        assert s["applied"] == {} and s["results"] == {}
    st, h, b = fake.charge(50)
    assert st == 200 and "idempotent-replayed" not in h
    s = fake.state()
    assert s["fired"] == {"0": 2}
    assert s["requests"]["invoice-50"] == 3
    assert "invoice-50" in s["applied"]


def test_status_503_without_retry_after(fake):
    fake.faults([{"match": {}, "action": "status", "status": 503, "times": 1}])
    st, h, _ = fake.redeem(51)
    assert st == 503 and "retry-after" not in h
    assert fake.redeem(51)[0] == 200


def test_rule_order_match_and_probability(fake):
    fake.faults([
        {"match": {"customer_prefix": "slow"}, "action": "status", "status": 500, "probability": 0},
        {"match": {"key": "invoice-61"}, "action": "status", "status": 502},
        {"match": {"customer_prefix": "slow"}, "action": "status", "status": 504},
    ])
    assert fake.charge(60)[0] == 200
    assert fake.charge(61)[0] == 502
    assert fake.charge(62, customer="slowpoke")[0] == 504
    assert fake.state()["fired"] == {"1": 1, "2": 1}


def test_timeout_after_effect_applies(fake):
    fake.faults([{"match": {"key": "invoice-70"}, "action": "timeout_after_effect",
                  "delay_ms": 3000, "times": 1}])
    with pytest.raises((socket.timeout, TimeoutError)):
        fake.charge(70, timeout=0.5)
    s = fake.state()
    assert "invoice-70" in s["applied"]
    cid = s["applied"]["invoice-70"]["id"]
    st, h, b = fake.charge(70)
    assert st == 200 and h["idempotent-replayed"] == "true" and jbody(b)["id"] == cid


def test_garbage_after_effect(fake):
    fake.faults([{"match": {"key": "invoice-71"}, "action": "garbage_after_effect",
                  "times": 1}])
    st, h, b = fake.charge(71)
    assert st == 200 and b == b"not json{"
    assert int(h["content-length"]) == len(b)
    with pytest.raises(ValueError):
        json.loads(b)
    s = fake.state()
    cid = s["applied"]["invoice-71"]["id"]
    st, h, b = fake.charge(71)
    assert st == 200 and jbody(b)["id"] == cid and h["idempotent-replayed"] == "true"


def test_close_before_effect_applies_nothing(fake):
    fake.faults([{"match": {"key": "invoice-72"}, "action": "close_before_effect",
                  "times": 1}])
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        fake.charge(72)
    s = fake.state()
    assert s["applied"] == {} and s["results"] == {}
    assert s["requests"]["invoice-72"] == 1
    st, h, b = fake.charge(72)
    assert st == 200 and "idempotent-replayed" not in h


def test_close_after_effect_applies(fake):
    fake.faults([{"match": {"key": "redemption-73"}, "action": "close_after_effect",
                  "times": 1}])
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        fake.redeem(73)
    rid = fake.state()["applied"]["redemption-73"]["id"]
    st, h, b = fake.redeem(73)
    assert st == 200 and jbody(b)["id"] == rid and h["idempotent-replayed"] == "true"


def test_hang_applies_nothing(fake):
    fake.faults([{"match": {"key": "invoice-74"}, "action": "hang", "delay_ms": 300,
                  "times": 1}])
    t0 = time.monotonic()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        fake.charge(74)
    assert time.monotonic() - t0 >= 0.25
    s = fake.state()
    assert s["applied"] == {} and s["results"] == {}


# --------------------------------------------------------------------------
# Redemptions
# --------------------------------------------------------------------------

def test_redemptions(fake):
    st, h, b = fake.redeem(5)
    assert st == 200
    doc = jbody(b)
    assert doc["object"] == "redemption"
    assert doc["id"].startswith("rd_") and len(doc["id"]) == 27
    assert (doc["redemption_id"], doc["subsidy_id"], doc["amount"], doc["customer"]) == \
        (5, 7, 2500, "learner-9")
    st, h, b2 = fake.redeem(5)
    assert st == 200 and h["idempotent-replayed"] == "true" and b2 == b
    assert fake.redeem(5, amount=1)[0] == 422

    st, h, b = fake.redeem(6, customer="declined-learner")
    assert st == 402
    err = jbody(b)["error"]
    assert err["type"] == "card_error" and err["code"] == "redemption_declined"
    st, h, b3 = fake.redeem(6, customer="declined-learner")
    assert st == 402 and b3 == b and h["idempotent-replayed"] == "true"

    # the key must match the id; charge keys are not redemption keys
    assert fake.redeem(8, key="redemption-9")[0] == 400
    assert fake.redeem(8, key="invoice-8")[0] == 400
    s = fake.state()
    assert set(s["applied"]) == {"redemption-5"}
    assert s["applied"]["redemption-5"]["path"] == "/v1/redemptions"


# --------------------------------------------------------------------------
# Bad input, protocol
# --------------------------------------------------------------------------

@pytest.mark.parametrize("body,key,ctype", [
    ({"invoice_id": 1, "customer": "c", "amount": 1, "currency": "usd"}, None, "application/json"),
    ({"invoice_id": 1, "customer": "c", "amount": 1, "currency": "usd"}, "invoice-1", "text/plain"),
    ({"invoice_id": 1, "customer": "c", "amount": 1, "currency": "usd"}, "invoice-2",
     "application/json"),
    ({"invoice_id": "1", "customer": "c", "amount": 1, "currency": "usd"}, "invoice-1",
     "application/json"),
    ({"invoice_id": True, "customer": "c", "amount": 1, "currency": "usd"}, "invoice-True",
     "application/json"),
    ({"invoice_id": 1, "customer": "c", "amount": 1.5, "currency": "usd"}, "invoice-1",
     "application/json"),
    ({"invoice_id": 1, "customer": "c", "amount": 1}, "invoice-1", "application/json"),
    ({"invoice_id": 1, "customer": None, "amount": 1, "currency": "usd"}, "invoice-1",
     "application/json"),
    ([1, 2, 3], "invoice-1", "application/json"),
])
def test_bad_requests_400(fake, body, key, ctype):
    h = {"Content-Type": ctype}
    st, _, b = fake.post("/v1/charges", body, key, headers=h)
    assert st == 400
    err = jbody(b)["error"]
    assert err["type"] == "invalid_request" and err["code"] == "bad_request"
    assert fake.state()["results"] == {}


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null", b"[" * 100000 + b"]" * 100000,
                                 b'{"invoice_id": 1e999}', b"1" * 5000])
def test_bad_json_400(fake, raw):
    h = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN,
         "Idempotency-Key": "invoice-1"}
    st, _, b = fake.request("POST", "/v1/charges", headers=h, raw=raw)
    assert st == 400
    assert jbody(b)["error"]["code"] == "bad_request"


def test_malformed_http_does_not_kill_server(fake):
    for junk in (b"GARBAGE\r\n\r\n", b"POST /v1/charges HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                 b"POST /v1/charges HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"\x00\x01\x02\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
            s.sendall(junk)
            data = b""
            try:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except ConnectionResetError:
                pass
            assert data.startswith(b"HTTP/1."), (junk, data)
            assert data.split(b" ", 2)[1][:1] in (b"4", b"5")
    # a client that sends half a body and goes away
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as s:
        s.sendall(b"POST /v1/charges HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"a\"")
    assert fake.charge(80)[0] == 200


def test_keep_alive_and_content_length(fake):
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    try:
        h = {"Content-Type": "application/json", "Authorization": "Bearer " + TOKEN}
        ids = []
        for i in range(90, 95):
            body = json.dumps({"invoice_id": i, "customer": "c", "amount": 1,
                               "currency": "eur"}).encode()
            conn.request("POST", "/v1/charges", body=body,
                         headers=dict(h, **{"Idempotency-Key": "invoice-%d" % i}))
            r = conn.getresponse()
            data = r.read()
            assert r.status == 200 and int(r.getheader("Content-Length")) == len(data)
            assert not r.will_close
            ids.append(jbody(data)["id"])
        # 4xx answers keep the connection too
        conn.request("POST", "/v1/charges", body=b"{", headers=dict(h, **{"Idempotency-Key": "x"}))
        r = conn.getresponse()
        r.read()
        assert r.status == 400 and not r.will_close
        conn.request("GET", "/_control/state")
        r = conn.getresponse()
        s = jbody(r.read())
        assert [s["applied"]["invoice-%d" % i]["id"] for i in range(90, 95)] == ids
        assert len(set(ids)) == 5
    finally:
        conn.close()


def test_unknown_paths_and_methods(fake):
    assert fake.request("GET", "/nope")[0] == 404
    assert fake.request("POST", "/v1/charges/")[0] == 404
    st, h, _ = fake.request("GET", "/v1/charges")
    assert st == 405
    assert fake.request("POST", "/_control/state")[0] == 405
    assert fake.request("GET", "/_control/reset")[0] == 405
    st, _, b = fake.request("POST", "/_control/faults", raw=b"{bad")
    assert st == 400
    st, _, b = fake.request("POST", "/_control/faults",
                            body={"rules": [{"action": "explode"}]})
    assert st == 400
    st, _, b = fake.request("POST", "/_control/faults",
                            body={"rules": [{"action": "status", "match": {"colour": "red"}}]})
    assert st == 400


# --------------------------------------------------------------------------
# State and reset
# --------------------------------------------------------------------------

def test_state_counts_and_reset(fake):
    fake.faults([{"match": {"key": "invoice-101"}, "action": "status", "status": 500,
                  "times": 1}])
    fake.charge(100)
    fake.charge(100)
    fake.charge(101)
    fake.charge(101)
    fake.charge(102, token="bad")
    fake.redeem(100)
    fake.post("/v1/charges", {"x": 1}, None)    # no key: counted in total only
    s = fake.state()
    assert s["requests"] == {"invoice-100": 2, "invoice-101": 2, "invoice-102": 1,
                             "redemption-100": 1}
    assert s["total_requests"] == 7
    assert sum(s["per_second"].values()) == 7
    assert all(k.isdigit() for k in s["per_second"])
    assert s["fired"] == {"0": 1}
    assert set(s["applied"]) == {"invoice-100", "invoice-101", "redemption-100"}
    lh = s["last_headers"]["invoice-100"]
    assert lh["Idempotency-Key"] == "invoice-100"
    assert lh["Authorization"] == "Bearer <redacted>"
    assert TOKEN not in json.dumps(s)

    fake.reset()
    s = fake.state()
    assert s == {"applied": {}, "results": {}, "requests": {}, "total_requests": 0,
                 "per_second": {}, "last_headers": {}, "fired": {}, "alpn": {},
                 "faulted": {}, "conflicts": {}}
    # rules are gone too, and old keys are new again
    st, h, _ = fake.charge(101)
    assert st == 200 and "idempotent-replayed" not in h


def test_faults_replace_previous_settings(fake):
    fake.faults([{"match": {}, "action": "status", "status": 500}])
    assert fake.charge(110)[0] == 500
    fake.faults([])
    assert fake.charge(110)[0] == 200


def test_concurrent_load(fake):
    errors = []

    def worker(base):
        try:
            for i in range(base, base + 20):
                st, _, b = fake.charge(i)
                assert st == 200
                st2, _, b2 = fake.charge(i)
                assert st2 == 200 and b2 == b
        except Exception as e:  # noqa
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(1000 + 100 * n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    s = fake.state()
    assert len(s["applied"]) == 160
    assert s["total_requests"] == 320


def test_same_key_race_applies_once(fake):
    fake.faults([], latency_ms=50)
    results = []
    lock = threading.Lock()
    barrier = threading.Barrier(10)

    def go():
        barrier.wait()
        r = fake.charge(2000)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) >= 1 and set(statuses) <= {200, 409}
    ids = {jbody(r[2])["id"] for r in results if r[0] == 200}
    assert len(ids) == 1
    assert len(fake.state()["applied"]) == 1


# --------------------------------------------------------------------------
# Process lifecycle
# --------------------------------------------------------------------------

def test_sigterm_exits_cleanly_even_with_hanging_request():
    with tempfile.TemporaryDirectory(prefix="fakeapi-term-") as d:
        f = Fake(d)
        try:
            f.faults([{"match": {}, "action": "hang", "delay_ms": 60000}])
            t = threading.Thread(target=lambda: pytest.raises(Exception, f.charge, 1, timeout=30))
            t.start()
            time.sleep(0.3)
            t0 = time.monotonic()
            f.proc.send_signal(signal.SIGTERM)
            rc = f.proc.wait(10)
            assert rc == 0
            assert time.monotonic() - t0 < 5
            t.join(10)
        finally:
            f.stop()
        with open(os.path.join(d, "stderr.log"), "rb") as e:
            assert b"Traceback" not in e.read()


def test_sigint_exits_cleanly():
    with tempfile.TemporaryDirectory(prefix="fakeapi-int-") as d:
        f = Fake(d)
        try:
            f.proc.send_signal(signal.SIGINT)
            assert f.proc.wait(10) == 0
        finally:
            f.stop()


def test_state_counts_faults_and_conflicts_per_key(fake_api):
    """The chaos suite's per-key counts: answers by a fault rule, and 409s."""
    from harness import wait_for
    fake_api.faults([{"match": {"key": "invoice-7"}, "action": "status", "status": 503, "times": 2},
                     {"match": {"key": "invoice-8"}, "action": "delay", "delay_ms": 600}])
    body = {"invoice_id": 7, "customer": "c", "amount": 1, "currency": "usd"}
    hdrs = {"Authorization": f"Bearer {fake_api.token}", "Idempotency-Key": "invoice-7"}
    assert [fake_api.request("POST", "/v1/charges", body, hdrs)[0] for _ in range(3)] == [503, 503, 200]
    body8 = {**body, "invoice_id": 8}
    hdrs8 = {**hdrs, "Idempotency-Key": "invoice-8"}
    slow = threading.Thread(target=fake_api.request, args=("POST", "/v1/charges", body8, hdrs8))
    slow.start()
    wait_for(lambda: fake_api.state()["requests"].get("invoice-8") == 1, 5)
    assert fake_api.request("POST", "/v1/charges", body8, hdrs8)[0] == 409
    slow.join(5)
    s = fake_api.state()
    assert s["faulted"] == {"invoice-7": 2}            # a delay is not a fault answer
    assert s["conflicts"] == {"invoice-8": 1}
    fake_api.reset()
    assert fake_api.state()["faulted"] == {} and fake_api.state()["conflicts"] == {}

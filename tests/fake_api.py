#!/usr/bin/python3
"""Fake billing API for the integration tests.

Implements CONTRACT section 2 (POST /v1/charges, POST /v1/redemptions with
idempotency keys) plus fault injection (POST /_control/faults), a record of
what it applied (GET /_control/state) and a reset (POST /_control/reset).
See docs/internal/fake-api-spec.md.

    /usr/bin/python3 tests/fake_api.py --host 127.0.0.1 --port 0 \
        --token-file PATH [--ready-file PATH] [--verbose]

Prints exactly one line "READY <port>" on stdout once listening.
Python 3 standard library only.
"""

import argparse
import hmac
import json
import os
import random
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20  # larger request bodies are refused (400) and the connection closed
ARRIVALS_MAX = 100000  # /_control/arrivals keeps the times of this many requests

CHARGES = "/v1/charges"
REDEMPTIONS = "/v1/redemptions"
BUSINESS_PATHS = (CHARGES, REDEMPTIONS)

ACTIONS = (
    "status",
    "delay",
    "timeout_after_effect",
    "close_before_effect",
    "close_after_effect",
    "garbage_after_effect",
    "hang",
)
MATCH_FIELDS = ("key", "key_prefix", "customer_prefix")

# Request fields per endpoint: (name, type), and the key prefix / id field.
SCHEMAS = {
    CHARGES: {
        "fields": (("invoice_id", int), ("customer", str), ("amount", int), ("currency", str)),
        "key_prefix": "invoice-",
        "id_field": "invoice_id",
    },
    REDEMPTIONS: {
        "fields": (("redemption_id", int), ("subsidy_id", int), ("customer", str), ("amount", int)),
        "key_prefix": "redemption-",
        "id_field": "redemption_id",
    },
}


def is_later_generation(key, want):
    """True for WANT-<n>, n >= 2 written plainly: the key of a requeued item
    (its generation n), as `billing-worker requeue` gives it."""
    suffix = key[len(want) + 1:] if key.startswith(want + "-") else ""
    return (suffix.isascii() and suffix.isdigit() and not suffix.startswith("0")
            and int(suffix) >= 2)


class BadRequest(Exception):
    """Invalid input; answered with 400 invalid_request/bad_request."""


def error_body(etype, code, message):
    return {"error": {"type": etype, "code": code, "message": message}}


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --------------------------------------------------------------------------
# Shared state
# --------------------------------------------------------------------------

class Rule:
    __slots__ = ("index", "match", "action", "times_left", "probability",
                 "status", "retry_after", "delay_ms")

    def matches(self, key, customer):
        m = self.match
        if "key" in m and key != m["key"]:
            return False
        if "key_prefix" in m and not key.startswith(m["key_prefix"]):
            return False
        if "customer_prefix" in m and not customer.startswith(m["customer_prefix"]):
            return False
        return True


def parse_faults(doc):
    """Validate a /_control/faults body; returns (latency_ms, [Rule]). Raises BadRequest."""
    if not isinstance(doc, dict):
        raise BadRequest("faults body must be a JSON object")
    unknown = set(doc) - {"latency_ms", "rules"}
    if unknown:
        raise BadRequest("unknown fields: %s" % ", ".join(sorted(unknown)))
    latency = doc.get("latency_ms", 0)
    if latency is None:
        latency = 0
    if not is_number(latency) or latency < 0 or latency != latency:
        raise BadRequest("latency_ms must be a number >= 0")
    rules_doc = doc.get("rules", [])
    if rules_doc is None:
        rules_doc = []
    if not isinstance(rules_doc, list):
        raise BadRequest("rules must be a list")
    rules = []
    for i, rd in enumerate(rules_doc):
        where = "rules[%d]" % i
        if not isinstance(rd, dict):
            raise BadRequest("%s must be an object" % where)
        unknown = set(rd) - {"match", "action", "times", "probability",
                             "status", "retry_after", "delay_ms"}
        if unknown:
            raise BadRequest("%s: unknown fields: %s" % (where, ", ".join(sorted(unknown))))
        r = Rule()
        r.index = i
        match = rd.get("match", {})
        if match is None:
            match = {}
        if not isinstance(match, dict):
            raise BadRequest("%s.match must be an object" % where)
        for k, v in match.items():
            if k not in MATCH_FIELDS:
                raise BadRequest("%s.match: unknown field %r" % (where, k))
            if not isinstance(v, str):
                raise BadRequest("%s.match.%s must be a string" % (where, k))
        r.match = dict(match)
        action = rd.get("action")
        if action not in ACTIONS:
            raise BadRequest("%s.action must be one of %s" % (where, ", ".join(ACTIONS)))
        r.action = action
        times = rd.get("times")
        if times is not None and (not is_int(times) or times < 0):
            raise BadRequest("%s.times must be an integer >= 0" % where)
        r.times_left = times
        prob = rd.get("probability", 1)
        if prob is None:
            prob = 1
        if not is_number(prob) or not (0 <= prob <= 1):
            raise BadRequest("%s.probability must be a number in 0..1" % where)
        r.probability = prob
        status = rd.get("status", 503 if action == "status" else None)
        if status is not None and (not is_int(status) or not (100 <= status <= 599)):
            raise BadRequest("%s.status must be an integer HTTP status" % where)
        r.status = status if status is not None else 503
        retry_after = rd.get("retry_after")
        if retry_after is not None:
            if is_number(retry_after):
                if retry_after != retry_after or retry_after < 0:
                    raise BadRequest("%s.retry_after must be >= 0" % where)
                if isinstance(retry_after, float) and retry_after.is_integer():
                    retry_after = int(retry_after)
                retry_after = str(retry_after)
            elif isinstance(retry_after, str):
                if not retry_after or any(c in retry_after for c in "\r\n"):
                    raise BadRequest("%s.retry_after: bad value" % where)
            else:
                raise BadRequest("%s.retry_after must be a number or a string" % where)
        r.retry_after = retry_after
        delay = rd.get("delay_ms", 0)
        if delay is None:
            delay = 0
        if not is_number(delay) or delay < 0 or delay != delay:
            raise BadRequest("%s.delay_ms must be a number >= 0" % where)
        r.delay_ms = delay
        rules.append(r)
    return latency, rules


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self._clear()

    def _clear(self):
        # Caller holds the lock (or is the constructor).
        self.generation = getattr(self, "generation", 0) + 1
        self.results = {}      # key -> {"status", "body" (dict), "raw" (bytes), "canon" (str)}
        self.applied = {}      # key -> {"id", "path", "body", "at"}
        self.inflight = {}     # key -> owner token
        self.requests = {}     # key -> count
        self.total_requests = 0
        self.per_second = {}   # "<unix second>" -> count
        self.arrivals = []     # time.time() of each request, the first ARRIVALS_MAX
        self.last_headers = {}
        self.fired = {}        # "<rule index>" -> count
        self.alpn = {}         # TLS: protocol chosen by ALPN ("none": no ALPN) -> handshakes
        self.latency_ms = 0
        self.rules = []

    def reset(self):
        with self.lock:
            self._clear()

    def set_faults(self, latency_ms, rules):
        with self.lock:
            self.latency_ms = latency_ms
            self.rules = rules
            self.fired = {}

    def count_request(self, key, headers):
        now = str(int(time.time()))
        with self.lock:
            self.total_requests += 1
            self.per_second[now] = self.per_second.get(now, 0) + 1
            if len(self.arrivals) < ARRIVALS_MAX:
                self.arrivals.append(time.time())
            if key is not None:
                self.requests[key] = self.requests.get(key, 0) + 1
                self.last_headers[key] = headers

    def pick_rule(self, key, customer):
        """First rule that matches, has times left and wins its roll; decrements it."""
        with self.lock:
            for r in self.rules:
                if r.times_left is not None and r.times_left <= 0:
                    continue
                if not r.matches(key, customer):
                    continue
                if r.probability < 1 and random.random() >= r.probability:
                    continue
                if r.times_left is not None:
                    r.times_left -= 1
                idx = str(r.index)
                self.fired[idx] = self.fired.get(idx, 0) + 1
                return r
        return None

    def snapshot(self):
        with self.lock:
            doc = {
                "applied": self.applied,
                "results": {k: {"status": v["status"], "body": v["body"]}
                            for k, v in self.results.items()},
                "requests": self.requests,
                "total_requests": self.total_requests,
                "per_second": self.per_second,
                "last_headers": self.last_headers,
                "fired": self.fired,
                "alpn": self.alpn,
            }
            # Serialise under the lock: the dicts are mutated by other threads.
            return json.dumps(doc).encode()


# --------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(self, addr, state, token_file, verbose):
        host = addr[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.state = state
        self.token_file = token_file
        self.verbose = verbose
        self._token_lock = threading.Lock()
        self._token_cache = (None, None)  # (stat signature, token)
        super().__init__(addr, Handler)

    def server_bind(self):
        # HTTPServer.server_bind does a reverse lookup (socket.getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def handle_error(self, request, client_address):
        # Errors are already handled per request; only report when verbose.
        if self.verbose:
            super().handle_error(request, client_address)

    def token(self):
        """The expected token: the token file's content, stripped (re-read when it changes)."""
        try:
            st = os.stat(self.token_file)
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            return None
        with self._token_lock:
            if self._token_cache[0] == sig:
                return self._token_cache[1]
        try:
            with open(self.token_file, "rb") as f:
                tok = f.read().decode("utf-8", "replace").strip()
        except OSError:
            return None
        with self._token_lock:
            self._token_cache = (sig, tok)
        return tok


class Closed(Exception):
    """Close the connection without answering."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-billing-api/1"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 300  # idle keep-alive connections are dropped after this

    # ---- plumbing ----------------------------------------------------------

    def version_string(self):
        return self.server_version

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("%s - [%s] %s\n" % (
                self.client_address[0], self.log_date_time_string(), fmt % args))

    def send_error(self, code, message=None, explain=None):
        # Used by BaseHTTPRequestHandler for malformed requests: answer JSON,
        # always with a status line (HTTP/0.9 is not supported).
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        try:
            short, _ = self.responses.get(code, ("Error", ""))
        except Exception:
            short = "Error"
        body = error_body("invalid_request", "bad_request" if code == 400 else "http_%d" % code,
                          message or short)
        self.close_connection = True
        self.send_json(code, body, extra={"Connection": "close"})

    def send_raw(self, status, raw, content_type="application/json", extra=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(raw)))
        if extra:
            for k, v in extra.items():
                self.send_header(k, v)
        if self.close_connection:
            if not extra or "Connection" not in extra:
                self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and status >= 200 and status not in (204, 304):
            self.wfile.write(raw)

    def send_json(self, status, obj, extra=None):
        self.send_raw(status, json.dumps(obj).encode(), extra=extra)

    def bad_request(self, message, close=False):
        if close:
            self.close_connection = True
        self.send_json(400, error_body("invalid_request", "bad_request", message))

    def read_body(self):
        """Read the body by Content-Length. Returns bytes, or None if a 400 was sent."""
        te = self.headers.get("Transfer-Encoding")
        if te is not None and te.strip().lower() != "identity":
            self.bad_request("Transfer-Encoding is not supported; send Content-Length", close=True)
            return None
        cls = self.headers.get_all("Content-Length") or []
        if not cls:
            return b""
        if len(set(v.strip() for v in cls)) != 1:
            self.bad_request("conflicting Content-Length headers", close=True)
            return None
        v = cls[0].strip()
        if not v.isdigit() or not v.isascii():
            self.bad_request("bad Content-Length", close=True)
            return None
        n = int(v)
        if n > MAX_BODY:
            self.bad_request("body too large", close=True)
            return None
        data = self.rfile.read(n) if n else b""
        if len(data) != n:
            raise Closed()  # the client went away mid-body
        return data

    def sleep_ms(self, ms):
        if ms and ms > 0:
            time.sleep(ms / 1000.0)

    # ---- dispatch ----------------------------------------------------------

    def dispatch(self):
        try:
            self._dispatch()
        except Closed:
            self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True
        except Exception:
            # A bug in this file. Closing without an answer is the safe choice:
            # the client treats it as ambiguous and retries with the same key.
            self.close_connection = True
            traceback.print_exc(file=sys.stderr)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = dispatch

    def _dispatch(self):
        path = self.path.split("?", 1)[0]
        if path.startswith("http://") or path.startswith("https://"):
            # absolute-form request target
            rest = path.split("://", 1)[1]
            path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        body = self.read_body()
        if body is None:
            return
        if path.startswith(HOSTILE_PREFIX):
            return hostile_control(self, path)
        if path in BUSINESS_PATHS:
            self.business(path, body)
        elif path == "/_control/state":
            if self.command not in ("GET", "HEAD"):
                return self.method_not_allowed("GET")
            self.send_raw(200, self.server.state.snapshot())
        elif path == "/_control/arrivals":
            # When each request came, for tests that need finer than per_second.
            if self.command not in ("GET", "HEAD"):
                return self.method_not_allowed("GET")
            with self.server.state.lock:
                raw = json.dumps(self.server.state.arrivals).encode()
            self.send_raw(200, raw)
        elif path == "/_control/faults":
            if self.command != "POST":
                return self.method_not_allowed("POST")
            try:
                doc = json.loads(body) if body.strip() else {}
                latency, rules = parse_faults(doc)
            except BadRequest as e:
                return self.bad_request(str(e))
            except (ValueError, RecursionError):
                return self.bad_request("body is not valid JSON")
            self.server.state.set_faults(latency, rules)
            self.send_json(200, {"ok": True, "latency_ms": latency, "rules": len(rules)})
        elif path == "/_control/reset":
            if self.command != "POST":
                return self.method_not_allowed("POST")
            self.server.state.reset()
            self.send_json(200, {"ok": True})
        else:
            self.send_json(404, error_body("invalid_request", "not_found",
                                           "no such path: %s" % path[:200]))

    def method_not_allowed(self, allow):
        self.send_json(405, error_body("invalid_request", "method_not_allowed",
                                       "use %s" % allow), extra={"Allow": allow})

    # ---- business endpoints ---------------------------------------------

    def business(self, path, raw_body):
        state = self.server.state
        key = self.headers.get("Idempotency-Key")
        if key is not None:
            key = key.strip()

        # Authorization
        expected = self.server.token()
        auth = self.headers.get("Authorization")
        auth_ok = False
        if auth is not None and expected:
            want = ("Bearer " + expected).encode()
            auth_ok = hmac.compare_digest(auth.strip().encode("utf-8", "replace"), want)

        if key:
            hdrs = {}
            for name, value in self.headers.items():
                if name.lower() == "authorization":
                    value = "Bearer <redacted>" if auth_ok else "<wrong>"
                hdrs[name] = value
        else:
            hdrs = None
        state.count_request(key or None, hdrs)

        if self.command != "POST":
            return self.method_not_allowed("POST")
        if not auth_ok:
            return self.send_json(401, error_body("auth_error", "unauthorized", "bad token"))

        ctype = self.headers.get("Content-Type")
        if ctype is None or ctype.split(";", 1)[0].strip().lower() != "application/json":
            return self.bad_request("Content-Type must be application/json")
        if not key:
            return self.bad_request("Idempotency-Key header is required")

        try:
            doc = self.validate(path, raw_body, key)
        except BadRequest as e:
            return self.bad_request(str(e))

        rule = state.pick_rule(key, doc["customer"])
        action = rule.action if rule else None
        if action in HOSTILE_ACTIONS:
            return hostile_answer(self, rule, path, key, doc)

        if action == "status":
            extra = {"Retry-After": rule.retry_after} if rule.retry_after is not None else None
            return self.send_json(rule.status, error_body(
                "api_error", "injected", "injected %d" % rule.status), extra=extra)
        if action == "close_before_effect":
            raise Closed()
        if action == "hang":
            self.sleep_ms(rule.delay_ms)
            raise Closed()

        owner = None
        if action == "delay":
            owner = object()
            with state.lock:
                if key in state.inflight:
                    conflict = True
                else:
                    conflict = False
                    state.inflight[key] = owner
            if conflict:
                status, raw, replayed = self.conflict_response()
            else:
                try:
                    self.sleep_ms(rule.delay_ms)
                except BaseException:
                    self.release(key, owner)
                    raise
                status, raw, replayed = self.idempotent(path, key, doc, owner)
        else:
            status, raw, replayed = self.idempotent(path, key, doc, None)

        if action == "timeout_after_effect":
            self.sleep_ms(rule.delay_ms)
            raise Closed()
        if action == "close_after_effect":
            raise Closed()
        if action == "garbage_after_effect":
            return self.send_raw(200, b"not json{")
        extra = {"Idempotent-Replayed": "true"} if replayed else None
        self.send_raw(status, raw, extra=extra)

    def validate(self, path, raw_body, key):
        try:
            doc = json.loads(raw_body)
        except (ValueError, RecursionError):
            raise BadRequest("body is not valid JSON")
        if not isinstance(doc, dict):
            raise BadRequest("body must be a JSON object")
        schema = SCHEMAS[path]
        for name, typ in schema["fields"]:
            if name not in doc:
                raise BadRequest("missing field: %s" % name)
            v = doc[name]
            ok = is_int(v) if typ is int else isinstance(v, typ)
            if not ok:
                raise BadRequest("field %s must be %s" % (
                    name, "an integer" if typ is int else "a string"))
        want = "%s%d" % (schema["key_prefix"], doc[schema["id_field"]])
        if key != want and not is_later_generation(key, want):
            raise BadRequest("Idempotency-Key must be %s (or %s-<generation>, generation >= 2)"
                             % (want, want))
        return doc

    def conflict_response(self):
        raw = json.dumps(error_body("conflict", "in_progress",
                                    "a request with this key is being processed")).encode()
        return 409, raw, False

    def release(self, key, owner):
        state = self.server.state
        with state.lock:
            if state.inflight.get(key) is owner:
                del state.inflight[key]

    def idempotent(self, path, key, doc, owner):
        """Idempotency handling and processing. owner: the in-flight token if the caller
        already marked the key in flight (delay action). Returns (status, raw, replayed)."""
        state = self.server.state
        canon = canonical(doc)
        with state.lock:
            held = owner is not None and state.inflight.get(key) is owner
            if key in state.inflight and not held:
                return self.conflict_response()
            stored = state.results.get(key)
            if stored is not None:
                if held:
                    del state.inflight[key]
                if stored["canon"] == canon:
                    return stored["status"], stored["raw"], True
                raw = json.dumps(error_body(
                    "idempotency_error", "key_reused",
                    "this Idempotency-Key was used with a different body")).encode()
                return 422, raw, False
            if not held:
                owner = object()
                state.inflight[key] = owner
            generation = state.generation
            latency = state.latency_ms
        try:
            self.sleep_ms(latency)
            status, body = self.decide(path, doc)
            raw = json.dumps(body).encode()
            with state.lock:
                # A reset while we were processing forgets this request too.
                if state.generation == generation:
                    state.results[key] = {"status": status, "body": body, "raw": raw,
                                          "canon": canon}
                    if 200 <= status < 300:
                        state.applied[key] = {"id": body["id"], "path": path, "body": doc,
                                              "at": time.time()}
        finally:
            self.release(key, owner)
        return status, raw, False

    def decide(self, path, doc):
        declined = doc["customer"].startswith("declined")
        if path == CHARGES:
            if declined:
                return 402, error_body("card_error", "card_declined", "Your card was declined.")
            return 200, {"id": "ch_" + secrets.token_hex(12), "object": "charge",
                         "amount": doc["amount"], "customer": doc["customer"],
                         "currency": doc["currency"], "invoice_id": doc["invoice_id"]}
        if declined:
            return 402, error_body("card_error", "redemption_declined",
                                   "The redemption was declined.")
        return 200, {"id": "rd_" + secrets.token_hex(12), "object": "redemption",
                     "redemption_id": doc["redemption_id"], "subsidy_id": doc["subsidy_id"],
                     "amount": doc["amount"], "customer": doc["customer"]}


# --------------------------------------------------------------------------
# Hostile answers and TLS (issue 7).  Kept apart from the faults above: each
# action applies the request first (the charge happened, the result is
# stored under the key, so a later request replays it), then answers in a
# way a well-behaved API never would.  The worker must treat every one as
# ambiguous and resolve it through the replay.
#
#   oversize_after_effect     200, a valid body with an "id", padded to 96 KiB
#   trickle_after_effect      200 and Content-Length, then one body byte every
#                             delay_ms (default 200): only a total timeout ends it
#   wrong_types_after_effect  200 {"id": 12345, "object": ["charge"]}
#   missing_id_after_effect   200 {"object": "charge", "status": "succeeded"}
#   long_id_after_effect      200 {"id": "ch_" + 10000 x "a"}
#   deep_json_after_effect    200 with 60000 nested "[" (a parser stack bomb, under the cap)
#   redirect_after_effect     `status` (301, 302, 307, 308) to /_hostile/followed
#   redirect_before_effect    the same, nothing applied
#
# GET /_hostile/state -> {"followed": n}: requests that followed a redirect.
# --------------------------------------------------------------------------

HOSTILE_ACTIONS = (
    "oversize_after_effect",
    "trickle_after_effect",
    "wrong_types_after_effect",
    "missing_id_after_effect",
    "long_id_after_effect",
    "deep_json_after_effect",
    "redirect_after_effect",
    "redirect_before_effect",
)
ACTIONS = ACTIONS + HOSTILE_ACTIONS
HOSTILE_PREFIX = "/_hostile/"
OVERSIZE_BYTES = 96 * 1024

_followed = {"count": 0}
_followed_lock = threading.Lock()


def hostile_control(handler, path):
    if path == HOSTILE_PREFIX + "followed":
        with _followed_lock:
            _followed["count"] += 1
        return handler.send_json(404, error_body("invalid_request", "not_found",
                                                 "redirects are not to be followed"))
    if path == HOSTILE_PREFIX + "state":
        with _followed_lock:
            return handler.send_json(200, {"followed": _followed["count"]})
    return handler.send_json(404, error_body("invalid_request", "not_found", "no such path"))


def hostile_answer(handler, rule, path, key, doc):
    action = rule.action
    if action == "redirect_before_effect":
        return handler.send_raw(rule.status, b"", extra={"Location": HOSTILE_PREFIX + "followed"})
    status, raw, replayed = handler.idempotent(path, key, doc, None)
    if status != 200:
        # A 409 (in flight elsewhere) or a stored refusal: answer it as is.
        return handler.send_raw(status, raw)
    real = json.loads(raw)
    if action == "oversize_after_effect":
        real["padding"] = "x" * OVERSIZE_BYTES
        return handler.send_raw(200, json.dumps(real).encode())
    if action == "wrong_types_after_effect":
        return handler.send_json(200, {"id": 12345, "object": ["charge"]})
    if action == "missing_id_after_effect":
        return handler.send_json(200, {"object": "charge", "status": "succeeded"})
    if action == "long_id_after_effect":
        return handler.send_json(200, {"id": "ch_" + "a" * 10000})
    if action == "deep_json_after_effect":
        return handler.send_raw(200, b"[" * 60000)
    if action == "redirect_after_effect":
        return handler.send_raw(rule.status, b"", extra={"Location": HOSTILE_PREFIX + "followed"})
    if action == "trickle_after_effect":
        interval = rule.delay_ms or 200
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(raw)))
        handler.end_headers()
        handler.wfile.flush()
        for i in range(len(raw)):
            handler.sleep_ms(interval)
            handler.wfile.write(raw[i:i + 1])
            handler.wfile.flush()
        return None
    raise AssertionError("unhandled hostile action %s" % action)


def enable_tls(server, cert, key, alpn=None):
    """Serves HTTPS; the handshake runs in each connection's own thread.

    alpn: protocols to offer by ALPN, in order of preference (e.g. ["h2",
    "http/1.1"], as an HTTP/2-capable API would).  This server only speaks
    HTTP/1.1, so a client that picks h2 gets answers it cannot read, as it
    would from a real API whose HTTP/2 it does not want.  The protocol each
    handshake settled on is counted in the state's "alpn".
    """
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    server.socket = ctx.wrap_socket(server.socket, server_side=True,
                                    do_handshake_on_connect=False)
    plain = server.finish_request

    def finish_request(request, client_address):
        try:
            request.settimeout(10)
            request.do_handshake()
            request.settimeout(None)
            proto = request.selected_alpn_protocol() or "none"
            with server.state.lock:
                server.state.alpn[proto] = server.state.alpn.get(proto, 0) + 1
        except (ssl.SSLError, OSError) as e:
            # A client that refused our certificate: nothing reached the API.
            if server.verbose:
                sys.stderr.write("fake_api: TLS handshake failed: %s\n" % e)
            return
        plain(request, client_address)

    server.finish_request = finish_request


# Chaos extensions (tests/chaos): per-key counts of injected faults and 409s
# --------------------------------------------------------------------------
#
# The chaos suite separates repeated calls caused by injected API faults
# from those caused by lost leases (a paused or killed worker whose item
# was taken over).  For that it needs, per key, how many requests a fault
# rule answered ("faulted") and how many got 409 because another request
# with the key was in flight ("conflicts").  These wrap the code above
# rather than change it; GET /_control/state gains the two maps.
#
# An outage of the API is a fault rule that answers every request without
# applying anything (see tests/chaos/chaos.py), never a restart: this
# process's memory is the API's durable store, and a restart would forget
# the results it must replay.

_base_clear = State._clear
_base_pick_rule = State.pick_rule
_base_snapshot = State.snapshot
_base_conflict_response = Handler.conflict_response


def _chaos_clear(self):
    _base_clear(self)
    self.faulted = {}      # key -> requests answered by a fault rule (not "delay")
    self.conflicts = {}    # key -> requests answered 409 in_progress


def _chaos_pick_rule(self, key, customer):
    rule = _base_pick_rule(self, key, customer)
    if rule is not None and rule.action != "delay":
        with self.lock:
            self.faulted[key] = self.faulted.get(key, 0) + 1
    return rule


def _chaos_snapshot(self):
    doc = json.loads(_base_snapshot(self))
    with self.lock:
        doc["faulted"] = dict(self.faulted)
    with _conflicts_lock:
        doc["conflicts"] = dict(self.conflicts)
    return json.dumps(doc).encode()


# conflict_response() is called with State.lock held on one path and not on
# the other, so the 409 counts have a lock of their own.
_conflicts_lock = threading.Lock()


def _chaos_conflict_response(self):
    key = (self.headers.get("Idempotency-Key") or "").strip()
    conflicts = self.server.state.conflicts
    with _conflicts_lock:
        conflicts[key] = conflicts.get(key, 0) + 1
    return _base_conflict_response(self)


State._clear = _chaos_clear
State.pick_rule = _chaos_pick_rule
State.snapshot = _chaos_snapshot
Handler.conflict_response = _chaos_conflict_response


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description="Fake billing API for the integration tests.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--token-file", required=True,
                    help="file holding the expected bearer token (stripped)")
    ap.add_argument("--ready-file", help="write the listening port here once ready")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    ap.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    ap.add_argument("--tls-key", help="the certificate's private key (PEM)")
    ap.add_argument("--tls-alpn", help="protocols to offer by ALPN, comma-separated "
                    "(e.g. h2,http/1.1); default: no ALPN")
    args = ap.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server = Server((args.host, args.port), State(), args.token_file, args.verbose)
    except OSError as e:
        sys.stderr.write("fake_api: cannot listen on %s:%d: %s\n" % (args.host, args.port, e))
        return 1
    if args.tls_cert:
        enable_tls(server, args.tls_cert, args.tls_key,
                   args.tls_alpn.split(",") if args.tls_alpn else None)
    port = server.server_address[1]

    if args.ready_file:
        tmp = "%s.tmp.%d" % (args.ready_file, os.getpid())
        with open(tmp, "w") as f:
            f.write("%d\n" % port)
        os.replace(tmp, args.ready_file)

    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="serve", daemon=True)
    thread.start()
    try:
        sys.stdout.write("READY %d\n" % port)
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass

    while not stop.is_set():
        stop.wait(1.0)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    if args.verbose:
        sys.stderr.write("fake_api: stopped\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

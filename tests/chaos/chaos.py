#!/usr/bin/python3
"""Chaos suite for billing-worker: break everything at random, then check the books.

    /usr/bin/python3 tests/chaos/chaos.py [--profile full|ci] [--seed N] [options]

Starts a private PostgreSQL cluster, redis-server and the fake billing API
(tests/integration/harness.py), migrates, seeds invoices and redemptions
over a few subsidies with limited balances (more arrive during the run,
with deposits), runs several workers in redis, skip-locked and auto mode,
and for a bounded window injects faults at random from a seeded RNG:

    kill              SIGKILL of a worker at a random moment, restarted
    kill_in_complete  SIGKILL while its completion statement waits on a row lock
    kill_after_hold   SIGKILL after its holds were committed, before its API calls
    pause             SIGSTOP for longer than ttl_ms, then SIGCONT
    redis_restart     redis-server SIGKILLed, restarted on the same port
    pg_restart        pg_ctl restart -m immediate: a crash, asynchronous commits lost
    api_5xx, api_429, api_slow, api_timeout   fault rules of the fake API for a while
    api_outage        every request dropped or answered 503, nothing applied

then stops injecting, lets the workers drain, and checks CONTRACT section 1
against the database and the fake API's own record.  Prints the figures and
exits 1 on any violation (2 when the run itself could not be carried out).
Replay a run with the seed it printed: --seed N.  The timing of processes
is not replayed, only the choice and order of faults.
"""

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))

import psycopg2  # noqa: E402

import harness  # noqa: E402
from harness import (FakeApi, PgCluster, RedisServer, Worker, create_database,  # noqa: E402
                     make_config, run_cli, wait_for)

PROFILES = {
    # At least 5000 items, several of every fault, a one-minute API outage.
    "full": dict(invoices=3200, redemptions=2000, subsidies=5, workers=6, concurrency=5,
                 window=300, outage=60, fault_gap=(1.5, 4.0), drain_timeout=420),
    # Bounded for `make test`: about two minutes on 2 cores.
    "ci": dict(invoices=700, redemptions=400, subsidies=3, workers=4, concurrency=7,
               window=55, outage=8, fault_gap=(1.0, 2.5), drain_timeout=150),
}

TTL_MS = 3000
RENEW_MS = 800
API_TIMEOUT_MS = 2000
# Every call takes this long, so items stay in flight and the kills land on work.
BASE_LATENCY_MS = 800
# Worker statements: statement_timeout, lock_timeout and the client deadline.
QUERY_TIMEOUT_MS = 3000
MODES = ("redis", "skip-locked", "auto")
# The cluster keeps what reached the disk (fsync on) but, as many servers
# do, commits asynchronously by default: a worker that inherited that
# default would lose claims and holds in a pg_restart (a crash).  The
# worker sets synchronous_commit itself; the producers here do not, so
# their rows, too, may be lost in a crash, which is what a real producer
# with that default would see.
PG_SETTINGS = {"fsync": "on", "synchronous_commit": "off"}
API_FAULT_KINDS = ("api_5xx", "api_429", "api_slow", "api_timeout")
WORKER_FAULT_KINDS = ("kill", "kill_in_complete", "kill_after_hold", "pause")
SERVER_FAULT_KINDS = ("redis_restart", "pg_restart")
ALL_KINDS = WORKER_FAULT_KINDS + SERVER_FAULT_KINDS + API_FAULT_KINDS + ("api_outage",)

COMPLETE_PREFIXES = ("UPDATE invoices AS t SET status", "WITH upd AS (UPDATE redemptions")
RESERVE_PREFIX = "SELECT rid, result FROM bw_reserve"


def log(msg):
    print(f"{time.strftime('%H:%M:%S')} chaos: {msg}", flush=True)


class Sampler(threading.Thread):
    """Samples every subsidy's balance (cache and ledger sum) all through the run."""

    def __init__(self, pg, dbname):
        super().__init__(daemon=True, name="sampler")
        self.pg, self.dbname = pg, dbname
        self.stop_flag = threading.Event()
        self.samples = 0
        self.negatives = []

    def run(self):
        conn = None
        while not self.stop_flag.is_set():
            try:
                if conn is None or conn.closed:
                    conn = self.pg.connect(self.dbname)
                with conn.cursor() as cur:
                    cur.execute("SELECT s.id, s.balance_cents, coalesce(sum(l.amount_cents), 0) "
                                "FROM subsidies s LEFT JOIN ledger_transactions l "
                                "ON l.subsidy_id = s.id GROUP BY s.id")
                    for sid, cached, total in cur.fetchall():
                        if cached < 0 or total < 0:
                            self.negatives.append((time.time(), sid, cached, total))
                self.samples += 1
            except psycopg2.Error:
                if conn is not None:
                    conn.close()
                conn = None         # PostgreSQL restarting: try again shortly
            self.stop_flag.wait(0.05)
        if conn is not None:
            conn.close()


class Chaos:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.workdir = Path(tempfile.mkdtemp(prefix="bw-chaos-"))
        self.pg = self.redis = self.api = self.db = self.admin = None
        self.workers = []
        self.worker_ids = {}
        self.faults = Counter()
        self.notes = []                   # what the targeted kills saw
        self.api_rules = {}               # kind -> (until, rules)
        self.api_lock = threading.Lock()
        self.timers = []
        self.producer_done = threading.Event()
        self.items_total = 0
        self.subsidies = []
        self.deposits = 0
        self.outage_backlog = {}

    # ---- setup ----------------------------------------------------------

    def start_servers(self):
        self.pg = PgCluster(settings=PG_SETTINGS)
        self.pg.start()
        self.admin = self.pg.connect("postgres")
        self.db = create_database(self.pg, self.admin)
        self.redis = RedisServer()
        self.redis.start()
        self.api = FakeApi(self.workdir)
        self.api.start()
        log(f"postgres :{self.pg.port}, redis :{self.redis.port}, fake API :{self.api.port}, "
            f"work dir {self.workdir}")

    def start_workers(self):
        n = self.args.workers
        for i in range(n):
            mode = MODES[i % len(MODES)]
            cfg = make_config(self.workdir, self.db, self.redis, self.api, **{
                "worker.id": f"chaos-w{i}-{mode}",
                # application_name names the worker in pg_stat_activity, so
                # the targeted kills can tell whose statement is waiting.
                "database.conninfo": f"{self.db.dsn} application_name=chaos-w{i}-{mode}",
                "worker.concurrency": self.args.concurrency,
                "worker.batch_size": self.args.concurrency,
                "worker.poll_interval_ms": 200,
                "locks.mode": mode,
                "locks.ttl_ms": TTL_MS,
                "locks.renew_interval_ms": RENEW_MS,
                "billing_api.timeout_ms": API_TIMEOUT_MS,
                "billing_api.connect_timeout_ms": 500,
                "billing_api.max_attempts": 12,
                "billing_api.backoff_initial_ms": 100,
                "billing_api.backoff_max_ms": 2000,
                "redis.command_timeout_ms": 1000,
                "database.query_timeout_ms": QUERY_TIMEOUT_MS,
            })
            if i == 0:
                r = run_cli(cfg, "migrate")
                if r.returncode != 0:
                    raise RuntimeError(f"migrate failed: {r.stderr}")
                self.cfg0 = cfg
            w = Worker(cfg, f"w{i}-{mode}")
            self.worker_ids[w.name] = f"chaos-w{i}-{mode}"
            self.workers.append(w)
        for w in self.workers:
            w.start()

    def seed(self):
        """Subsidies with limited balances; a first share of the items."""
        a = self.args
        for s in range(a.subsidies):
            sid = self.db.scalar("INSERT INTO subsidies (name) VALUES (%s) RETURNING id",
                                 (f"chaos-{s}",))
            # Funds for about half of what will be asked of it.
            budget = a.redemptions // a.subsidies * 500 // 2
            self.db.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents) "
                            "VALUES (%s, %s)", (sid, budget))
            self.subsidies.append(sid)
        # A few rows the worker must refuse before any call (bad data).
        self.db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) VALUES "
                        "('', 100, 'usd'), ('cus_bad_currency', 100, 'dollars'), "
                        "(repeat('x', 300), 100, 'usd'), ('tab' || chr(9) || 'here', 100, 'usd')")
        self.items_total += 4
        self.insert_batch(a.invoices * 2 // 5, a.redemptions * 2 // 5)

    def insert_batch(self, n_inv, n_red):
        rng = self.rng
        if n_inv > 0:
            rows = []
            for _ in range(n_inv):
                declined = rng.random() < 0.05
                rows.append((("declined_" if declined else "cus_") + str(rng.randrange(10**6)),
                             rng.randrange(100, 20000), rng.choice(("usd", "eur", "gbp"))))
            self.db.execute_values("INSERT INTO invoices (customer_id, amount_cents, currency) "
                                   "VALUES %s", rows)
        if n_red > 0:
            rows = []
            for _ in range(n_red):
                declined = rng.random() < 0.05
                rows.append((rng.choice(self.subsidies),
                             ("declined-" if declined else "learner-") + str(rng.randrange(10**6)),
                             rng.randrange(100, 900)))
            self.db.execute_values("INSERT INTO redemptions (subsidy_id, customer_id, amount_cents) "
                                   "VALUES %s", rows)
        self.items_total += n_inv + n_red

    def producer(self, seconds):
        """Inserts the rest of the items, and deposits, evenly over SECONDS:
        each round inserts what is due by the clock, so a round held up (a
        restart, a lock) is caught up by the next instead of running late."""
        a = self.args
        total_inv = a.invoices - a.invoices * 2 // 5
        total_red = a.redemptions - a.redemptions * 2 // 5
        rng = random.Random(self.rng.random())
        t0 = time.monotonic()
        done_inv = done_red = 0
        next_deposit = 0.0
        try:
            while done_inv < total_inv or done_red < total_red:
                elapsed = time.monotonic() - t0
                frac = 1.0 if self.producer_done.is_set() else min(1.0, elapsed / seconds)
                n_inv = int(total_inv * frac) - done_inv
                n_red = int(total_red * frac) - done_red
                self._retry_db(lambda: self.insert_batch(n_inv, n_red))
                done_inv += n_inv
                done_red += n_red
                if elapsed >= next_deposit:
                    sid = rng.choice(self.subsidies)
                    self._retry_db(lambda: self.db.execute(
                        "INSERT INTO ledger_transactions (subsidy_id, amount_cents) "
                        "VALUES (%s, %s)", (sid, rng.randrange(1000, 20000))))
                    self.deposits += 1
                    next_deposit = elapsed + rng.uniform(1, 4)
                if frac < 1.0:
                    time.sleep(0.5)
        finally:
            self.producer_done.set()

    def _retry_db(self, fn, timeout=60):
        return wait_for(lambda: fn() or True, timeout, interval=0.5,
                        ignore=(psycopg2.OperationalError, psycopg2.InterfaceError))

    # ---- API fault rules --------------------------------------------------

    def push_api_rules(self):
        """Installs the union of the API fault kinds active now (outage first)."""
        now = time.monotonic()
        with self.api_lock:
            for kind in [k for k, (until, _) in self.api_rules.items() if until <= now]:
                del self.api_rules[kind]
            rules = []
            for kind in sorted(self.api_rules, key=lambda k: k != "api_outage"):
                rules.extend(self.api_rules[kind][1])
            latency = BASE_LATENCY_MS
            try:
                self.api.faults(rules, latency_ms=latency)
            except Exception as e:   # noqa: BLE001 - the API may be busy; next push fixes it
                log(f"could not set API faults: {e}")

    def api_fault(self, kind, seconds, rules):
        with self.api_lock:
            self.api_rules[kind] = (time.monotonic() + seconds, rules)
        self.push_api_rules()
        self.later(seconds + 0.05, self.push_api_rules)

    def later(self, seconds, fn):
        t = threading.Timer(seconds, fn)
        t.daemon = True
        t.start()
        self.timers.append(t)

    # ---- worker faults ----------------------------------------------------

    def live_workers(self):
        """Running workers, those with items in flight first-choice: a fault
        on an idle worker proves little."""
        live = [w for w in self.workers if w.alive() and not w._paused]
        try:
            busy = {r[0] for r in self.db.query(
                "SELECT locked_by FROM invoices WHERE locked_by IS NOT NULL AND status = 'pending' "
                "UNION SELECT locked_by FROM redemptions WHERE locked_by IS NOT NULL "
                "AND status = 'pending'")}
        except psycopg2.Error:
            return live
        return [w for w in live if self.worker_ids[w.name] in busy] or live

    def restart_later(self, w):
        self.later(self.rng.uniform(0.0, 1.5), lambda: None if w.alive() else w.start())

    def fault_kill(self):
        w = self.rng.choice(self.live_workers() or self.workers)
        w.kill()
        self.restart_later(w)
        return True

    def fault_pause(self):
        live = self.live_workers()
        if not live:
            return False
        w = self.rng.choice(live)
        w.pause()
        self.later(TTL_MS / 1000 + self.rng.uniform(0.5, 3.0), w.resume)
        return True

    def _blocked(self, cur):
        """(pid, application_name, query) of the backends waiting on a lock we hold."""
        # Activity is snapshotted once per transaction: look afresh each time.
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT pid, application_name, query FROM pg_stat_activity "
                    "WHERE pg_backend_pid() = ANY (pg_blocking_pids(pid))")
        return cur.fetchall()

    def _by_app(self, app):
        return next(w for w in self.workers if self.worker_ids[w.name] == app)

    def fault_kill_in_complete(self):
        """Holds the row locks of a worker's items until its completion
        statement waits on them, then kills it there.  A renewal or claim
        that blocks first gives up after lock_timeout (QUERY_TIMEOUT_MS), and
        the worker goes on to record its outcomes: so wait through those."""
        live = self.live_workers()
        if not live:
            return False
        w = self.rng.choice(live)
        wid = self.worker_ids[w.name]
        conn = self.pg.connect(self.db.name, autocommit=False)
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '1s'")
                n = 0
                for table in ("invoices", "redemptions"):
                    cur.execute(f"SELECT id FROM {table} WHERE locked_by = %s AND "
                                "status = 'pending' FOR UPDATE SKIP LOCKED", (wid,))
                    n += cur.rowcount
                if n == 0:
                    return False
                # A claim, a renewal, another claim may each wait out lock_timeout first.
                deadline = time.monotonic() + 3 * QUERY_TIMEOUT_MS / 1000 + 2
                while time.monotonic() < deadline:
                    mine = [q for _, app, q in self._blocked(cur) if app == wid]
                    if mine and mine[0].startswith(COMPLETE_PREFIXES):
                        w.kill()
                        self.notes.append(f"kill_in_complete: {w.name} killed inside its "
                                          f"completion statement ({n} rows held)")
                        self.restart_later(w)
                        return True
                    time.sleep(0.01)
                return False
        finally:
            conn.rollback()
            conn.close()

    def fault_kill_after_hold(self):
        """Blocks reservations at their hold's insert; freezes the first
        worker found waiting there; lets its holds commit; kills it before it
        can make its API calls.  Holds written, API never called."""
        conn = self.pg.connect(self.db.name, autocommit=False)
        w = None
        try:
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '1s'")
                # bw_reserve skips a subsidy row another transaction holds
                # (SKIP LOCKED: 'busy', nothing written), so it is stopped at
                # the hold's INSERT instead, its rows locked: SHARE blocks
                # every write to the ledger (holds, reversals, deposits) but
                # not the producer's new redemptions, nor reads.
                cur.execute("LOCK TABLE ledger_transactions IN SHARE MODE")
                deadline = time.monotonic() + 4
                found = None
                while found is None and time.monotonic() < deadline:
                    for pid, app, q in self._blocked(cur):
                        if q.startswith(RESERVE_PREFIX) and app in self.worker_ids.values():
                            found = (pid, app)
                            break
                    else:
                        time.sleep(0.02)
                if found is None:
                    return False
                pid, app = found
                w = self._by_app(app)
                w.pause()
                conn.rollback()         # its reservation goes ahead and commits
                wait_for(lambda: self.db.scalar(
                    "SELECT state <> 'active' OR query NOT LIKE 'SELECT rid%%' "
                    "FROM pg_stat_activity WHERE pid = %s", (pid,)) is not False, 5)
            held = [r[0] for r in self.db.query(
                "SELECT r.id FROM redemptions r JOIN ledger_transactions l "
                "ON l.redemption_id = r.id AND l.kind = 'hold' "
                "WHERE r.locked_by = %s AND r.status = 'pending'", (app,))]
            state = self.api.state()
            uncalled = [rid for rid in held if f"redemption-{rid}" not in state["requests"]]
            w.kill()
            self.restart_later(w)
            self.notes.append(f"kill_after_hold: {w.name} killed holding {len(held)} "
                              f"redemptions, {len(uncalled)} of them never called")
            if not uncalled:
                self.faults["kill"] += 1    # a kill all the same, at a less telling moment
            return bool(uncalled)
        finally:
            if not conn.closed:
                conn.rollback()
                conn.close()
            if w is not None and w.alive():
                w.resume()

    # ---- server faults ----------------------------------------------------

    def fault_redis_restart(self):
        self.redis.stop()
        time.sleep(self.rng.uniform(0.2, 3.0))
        self.redis.start()
        return True

    def fault_pg_restart(self):
        # A crash, not a shutdown: nothing more is written, so every commit
        # whose WAL was still in the server's buffers is gone after recovery.
        self.pg.restart("immediate")
        return True

    # ---- API faults -------------------------------------------------------

    def fault_api_5xx(self):
        self.api_fault("api_5xx", self.rng.uniform(2, 6), [
            {"match": {}, "action": "status", "status": self.rng.choice((500, 502, 503)),
             "probability": 0.3}])
        return True

    def fault_api_429(self):
        self.api_fault("api_429", self.rng.uniform(2, 6), [
            {"match": {}, "action": "status", "status": 429, "retry_after": self.rng.choice((1, 2)),
             "probability": 0.3}])
        return True

    def fault_api_slow(self):
        self.api_fault("api_slow", self.rng.uniform(2, 6), [
            {"match": {}, "action": "delay", "delay_ms": self.rng.randrange(300, 1800),
             "probability": 0.5}])
        return True

    def fault_api_timeout(self):
        self.api_fault("api_timeout", self.rng.uniform(2, 6), [
            {"match": {}, "action": "timeout_after_effect", "delay_ms": API_TIMEOUT_MS + 1000,
             "probability": 0.2},
            {"match": {}, "action": "close_after_effect", "probability": 0.05},
            {"match": {}, "action": "garbage_after_effect", "probability": 0.05}])
        return True

    def fault_api_outage(self, seconds):
        # Nothing is applied: half the requests see the connection dropped
        # (ambiguous to the worker), the rest 503.
        self.api_fault("api_outage", seconds, [
            {"match": {}, "action": "close_before_effect", "probability": 0.5},
            {"match": {}, "action": "status", "status": 503}])
        return True

    # ---- the run ----------------------------------------------------------

    def watch_recovery(self, seconds):
        """Measures how long after the API outage the backlog it left takes
        to fall back to what was open when it began."""
        before = self._retry_db(self.open_items)
        self.outage_backlog = {"open items when the outage began": before}

        def watch():
            time.sleep(seconds)
            peak, t_end = 0, time.monotonic()
            while time.monotonic() - t_end < 600:
                try:
                    n = self.open_items()
                except psycopg2.Error:
                    n = None
                if n is not None:
                    peak = max(peak, n)
                    if n <= before:
                        break
                time.sleep(0.5)
            self.outage_backlog.update({
                "open items when it ended": peak,
                "seconds to work that backlog off": round(time.monotonic() - t_end, 1)})

        threading.Thread(target=watch, daemon=True).start()

    def inject(self, window):
        a = self.args
        start = time.monotonic()
        end = start + window
        # The outage starts at a random moment in the middle of the window.
        outage_at = start + self.rng.uniform(0.25, 0.55) * window
        outage_done = False
        # Every kind at least a few times: a shuffled deck, refilled when empty.
        deck = []
        while time.monotonic() < end:
            now = time.monotonic()
            if not outage_done and now >= outage_at:
                log(f"fault api_outage for {a.outage} s")
                self.watch_recovery(a.outage)
                self.fault_api_outage(a.outage)
                self.faults["api_outage"] += 1
                outage_done = True
            if not deck:
                deck = list(WORKER_FAULT_KINDS * 2 + SERVER_FAULT_KINDS + API_FAULT_KINDS)
                self.rng.shuffle(deck)
            kind = deck.pop()
            # The targeted kills need the right moment: a few tries each.
            for _ in range({"kill_after_hold": 6, "kill_in_complete": 2}.get(kind, 1)):
                try:
                    done = getattr(self, "fault_" + kind)()
                except Exception as e:  # noqa: BLE001 - a fault that could not be made is logged
                    log(f"fault {kind} could not be injected: {e!r}")
                    done = False
                if done:
                    break
            if done:
                self.faults[kind] += 1
                log(f"fault {kind}")
            elif kind in ("kill_in_complete", "kill_after_hold"):
                self.faults[kind + " (missed)"] += 1
            time.sleep(self.rng.uniform(*a.fault_gap))

    def calm(self):
        """Ends every fault: rules cleared, servers up, workers running."""
        with self.api_lock:
            self.api_rules.clear()
        for t in self.timers:
            t.cancel()
        self.api.faults([], latency_ms=BASE_LATENCY_MS)
        self.redis.start()
        self.pg.start()
        for w in self.workers:
            if w._paused:
                w.resume()
            if not w.alive():
                w.start()

    def open_items(self):
        """Pending items the fleet still works on: those left for an operator
        (needs_operator) wait for a human, and check() judges them."""
        return self.db.scalar("SELECT (SELECT count(*) FROM invoices WHERE status = 'pending' "
                              "AND needs_operator IS NULL) + (SELECT count(*) FROM redemptions "
                              "WHERE status = 'pending' AND needs_operator IS NULL)")

    def run(self):
        a = self.args
        log(f"seed {a.seed} (replay with --seed {a.seed}); profile {a.profile}: "
            f"{a.invoices} invoices, {a.redemptions} redemptions, {a.subsidies} subsidies, "
            f"{a.workers} workers, {a.window} s of faults, {a.outage} s API outage")
        self.start_servers()
        self.start_workers()
        self.seed()
        self.sampler = Sampler(self.pg, self.db.name)
        self.sampler.start()
        producer = threading.Thread(target=self.producer, args=(a.window * 0.85,), daemon=True)
        producer.start()
        t0 = time.monotonic()
        self.inject(a.window)
        producer.join(30)
        self.producer_done.set()        # late: insert the rest now
        producer.join(60)
        self.calm()
        log(f"faults stopped after {time.monotonic() - t0:.0f} s; draining")
        t_drain = time.monotonic()
        wait_for(lambda: self.open_items() == 0, a.drain_timeout, interval=0.5,
                 message=lambda: f"{self.open_items()} items still open",
                 ignore=(psycopg2.OperationalError, psycopg2.InterfaceError))
        self.drain_s = time.monotonic() - t_drain
        for w in self.workers:
            rc = w.stop(timeout=30)
            if rc != 0:
                self.notes.append(f"{w.name} exited {rc} on SIGTERM")
        self.sampler.stop_flag.set()
        self.sampler.join(10)
        return self.check()

    # ---- the books --------------------------------------------------------

    def check(self):
        v = []
        state = self.api.state()
        applied, results = state["applied"], state["results"]
        rows = []
        for_operator = set()        # "invoice 4": pending for a human, no request made
        for kind, table, idcol in (("invoice", "invoices", "charge_id"),
                                   ("redemption", "redemptions", "fulfillment_id")):
            done = "paid" if kind == "invoice" else "redeemed"
            for iid, status, rid, amount, attempts, err, note in self.db.query(
                    f"SELECT id, status, {idcol}, amount_cents, attempts, last_error, "
                    f"needs_operator FROM {table}"):
                key = f"{kind}-{iid}"
                rows.append((key, status))
                got = applied.get(key)
                if status == "pending" and note is not None and key not in state["requests"]:
                    # A bad row whose refusal was lost in a crash: the next claim
                    # found its lease run out, so an attempt may have been made,
                    # and the worker rightly will not fail it by itself.  The
                    # API's record shows no request ever came: an operator's case.
                    self.notes.append(f"{key}: left for an operator ({note}); the API never "
                                      f"saw its key")
                    for_operator.add(f"{kind} {iid}")
                elif status == "pending":
                    v.append(f"{key} is not final after the drain")
                elif status == done:
                    if got is None:
                        v.append(f"{key} is {status} but the API holds no success for its key")
                    elif got["id"] != rid:
                        v.append(f"{key}: recorded id {rid}, the API holds {got['id']}")
                    elif got["body"]["amount"] != amount:
                        v.append(f"{key}: amount {amount}, the API charged {got['body']['amount']}")
                elif status == "failed":
                    if got is not None:
                        v.append(f"{key} is failed but the API charged it ({got['id']})")
                    if not err:
                        v.append(f"{key} is failed without a reason")
                res = results.get(key)
                if res is not None and 200 <= res["status"] < 300 and status != done:
                    v.append(f"{key}: the API stored a success but the item is {status}")
        keys = {k for k, _ in rows}
        for key in applied:
            if key not in keys:
                v.append(f"{key}: the API charged an item the database does not have")
        # Redemptions against the ledger.
        for rid, status, amount, net, holds, revs in self.db.query(
                "SELECT r.id, r.status, r.amount_cents, coalesce(sum(l.amount_cents), 0), "
                "count(*) FILTER (WHERE l.kind = 'hold'), count(*) FILTER (WHERE l.kind = 'reversal') "
                "FROM redemptions r LEFT JOIN ledger_transactions l ON l.redemption_id = r.id "
                "GROUP BY r.id"):
            want = -amount if status == "redeemed" else 0
            if net != want:
                v.append(f"redemption-{rid} is {status}; its ledger nets {net}, expected {want}")
            if holds > 1 or revs > 1:
                v.append(f"redemption-{rid}: {holds} holds, {revs} reversals")
        for t, sid, cached, total in self.sampler.negatives:
            v.append(f"subsidy {sid} sampled negative: cached {cached}, ledger {total}")
        audit = run_cli(self.cfg0, "audit", timeout=120)
        # audit lists the items left for an operator too; those judged above pass.
        others = [line for line in audit.stdout.splitlines() if line.startswith("violation") and
                  not any(line.startswith(f"violation (needs an operator): {item} needs ")
                          for item in for_operator)]
        audit_ok = ("audit: clean" in audit.stdout if audit.returncode == 0 else
                    audit.returncode == 1 and not others)
        if not audit_ok:
            v.append(f"audit not clean (exit {audit.returncode}): {audit.stdout.strip()} "
                     f"{audit.stderr.strip()}")
        self.report(state, rows, v)
        return v

    def worker_log_counts(self):
        c = Counter()
        patterns = {
            "outcome not recorded (claim lost)": "outcome not recorded",
            "lease lost (renewal)": "lease lost to another worker",
            "calls timed out": "timed out",
            "fell back to SKIP LOCKED (auto)": "SKIP LOCKED until it returns",
            "parked (completion refused)": "could not record the outcome",
            "redis lock lost (renewal)": "redis lock lost",
            "claim lost before reserve": "claim lost before its funds",
            "database reachable again": "database reachable again",
            "redis unreachable": "redis unreachable",
            "redis reachable again": "redis reachable again",
        }
        for w in self.workers:
            text = w.log()
            for name, pat in patterns.items():
                c[name] += text.count(pat)
            c["worker starts"] += text.count("==== ")
        return c

    def report(self, state, rows, v):
        reqs = state["requests"]
        faulted = state.get("faulted", {})
        conflicts = state.get("conflicts", {})
        items = len(rows)
        calls = sum(reqs.values())
        extra = sum(max(0, n - 1) for n in reqs.values())
        # Each call a fault rule answered forces one more call under that key.
        # A call whose result was turned away by the fence ("outcome not
        # recorded") was repeated by the claim's new holder, and a call
        # answered 409 overlapped another holder's: both are lock loss.  The
        # rest: calls of killed workers repeated by the next holder, answers
        # slowed past the timeout, outcomes queued through a database outage
        # that outlasted their lease.
        by_fault = sum(min(max(0, reqs.get(k, 0) - 1), n) for k, n in faulted.items())
        logs = self.worker_log_counts()
        not_recorded = logs["outcome not recorded (claim lost)"]
        overlap = sum(conflicts.values())
        other = max(0, extra - by_fault - not_recorded - overlap)
        status = Counter(s for _, s in rows)
        fig = {
            "seed": self.args.seed,
            "items": items,
            "by status": dict(sorted(status.items())),
            "deposits during the run": self.deposits,
            "faults injected": dict(sorted(self.faults.items())),
            "API calls": calls,
            "API calls per item": round(calls / items, 3) if items else 0,
            "items called more than once": sum(1 for n in reqs.values() if n > 1),
            "extra calls (beyond the first per key)": extra,
            "  after an injected API fault": by_fault,
            "  lock loss: result turned away by the fence": not_recorded,
            "  lock loss: 409, overlapping another holder's call": overlap,
            "  other: killed worker's call repeated, slow answer past the timeout": other,
            "max calls for one key": max(reqs.values()) if reqs else 0,
            "worker log": dict(sorted(logs.items())),
            "balance samples": self.sampler.samples,
            "API outage": self.outage_backlog,
            "time to drain after the faults stopped (s)": round(self.drain_s, 1),
            "violations": len(v),
        }
        print(json.dumps(fig, indent=2), flush=True)
        for n in self.notes[:20]:
            print("  note: " + n)
        for x in v[:50]:
            print("VIOLATION: " + x, flush=True)
        if len(v) > 50:
            print(f"... and {len(v) - 50} more violations")
        self.figures = fig

    def cleanup(self, keep):
        for t in self.timers:
            t.cancel()
        harness.reap_workers()
        for thing in (self.api,):
            if thing is not None:
                thing.stop()
        if self.redis is not None:
            self.redis.cleanup()
        if self.db is not None and self.admin is not None:
            try:
                self.db.close()
            except Exception:  # noqa: BLE001
                pass
        if self.admin is not None:
            self.admin.close()
        if self.pg is not None:
            self.pg.cleanup()
        if keep:
            log(f"logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--seed", type=int, default=None, help="replay the faults of an earlier run")
    for name, typ in (("invoices", int), ("redemptions", int), ("subsidies", int),
                      ("workers", int), ("concurrency", int), ("window", float), ("outage", float),
                      ("drain_timeout", float)):
        ap.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs) even when clean")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    for k, val in PROFILES[args.profile].items():
        if getattr(args, k, None) is None:
            setattr(args, k, val)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "big")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not harness.BINARY.is_file():
        print(f"{harness.BINARY} does not exist: run `make` first", file=sys.stderr)
        return 2
    chaos = Chaos(args)
    violations = None
    try:
        violations = chaos.run()
    except (AssertionError, RuntimeError, KeyboardInterrupt, SystemExit) as e:
        log(f"the run failed: {e!r}")
        for w in chaos.workers:
            print(f"--- {w.name} log tail ---\n{w.log_tail(30)}")
        log(f"seed {args.seed}: replay with --seed {args.seed}")
        return 2
    finally:
        # Servers, workers and timers go whatever happened; the logs stay
        # when something went wrong.
        chaos.cleanup(keep=args.keep or violations is None or bool(violations))
    if args.json:
        Path(args.json).write_text(json.dumps(chaos.figures, indent=2) + "\n")
    log(f"seed {args.seed}: {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    sys.exit(main())

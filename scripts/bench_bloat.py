#!/usr/bin/env python3
"""make bench-bloat: the fleet's cost of finding and claiming work while a
long transaction pins the xmin horizon.

A PostgreSQL queue rarely dies of a crash; it dies slowly when something
(a report, a session idle in transaction, a standby with
hot_standby_feedback) holds the oldest snapshot back: vacuum cannot remove
the row versions every claim and completion leaves behind, and a poll that
walks them gets slower with every minute.  This scenario measures it:

  1. the fast-API capacity of the fleet (or --capacity ITEMS/S): the e2e
     run of bench.py with --workers processes;
  2. a producer INSERTs invoices at --fraction of it (a batch every 100 ms,
     from its own connection, as producers do), the fleet works them;
  3. phases: baseline (--baseline-seconds), pinned (--pin-seconds: one
     session holds BEGIN; SELECT txid_current(); throughout), after
     (--after-seconds, once it committed).

Per phase: completions/s, the backlog at its end, n_dead_tup of invoices,
and the mean execution time of the poll (due) and claim statements from
pg_stat_statements, reset at each phase's start.  Every worker's /metrics
is scraped every 5 s, as a Prometheus server would (the backlog gauges cost
a query, which a pin slows too), and each phase says how many turns of the
workers' loops took over 50 ms.  Targets: pinned
throughput ≥ 95 % of the baseline's, backlog at the pinned phase's end
≤ 2 × the baseline's, poll and claim means ≤ 3 × the baseline's.

Usage: make bench-bloat [BLOAT_ARGS="--pin-seconds 120 --capacity 6000"]
"""

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402

# The statements that find due work and those that claim it, by the start of
# their text in pg_stat_statements (both designs: the due query over the
# pending index and the id cursor's).
# pg_stat_statements shows the text with its constants as $N ("> 0" reads
# "> $6"), so a pattern stops at the first constant.
POLL_PATTERNS = ("SELECT kind, id, note FROM%", "WITH c AS (SELECT CASE WHEN $2::bigint >%")
CLAIM_PATTERNS = ("UPDATE invoices AS t SET fence%",)
# The completion, by primary key: what bloat costs the write path alone.
COMPLETE_PATTERNS = ("WITH upd AS (UPDATE invoices AS t SET status%",)


class Producer(threading.Thread):
    """A steady INSERT rate from its own connection, a batch every 100 ms."""

    def __init__(self, pg, rate):
        super().__init__(daemon=True)
        self.conn = pg.connect("bench")
        self.rate = rate
        self.inserted = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def count(self):
        with self.lock:
            return self.inserted

    def run(self):
        t0 = time.monotonic()
        tick = 0
        with self.conn.cursor() as cur:
            while not self.stopping.is_set():
                tick += 1
                want = int(self.rate * 0.1 * tick) - self.count()
                if want > 0:
                    cur.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
                                "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g",
                                (want,))
                    with self.lock:
                        self.inserted += want
                delay = t0 + 0.1 * tick - time.monotonic()
                if delay > 0:
                    self.stopping.wait(delay)
        self.conn.close()


def mean_ms(b, patterns):
    """Calls-weighted mean execution time of the statements matching PATTERNS."""
    return stmt_stats(b, patterns)[:2]


def stmt_stats(b, patterns):
    """Of the statements matching PATTERNS: mean execution ms per call,
    calls, plans, and mean planning ms per call (which the execution time
    leaves out: a statement planned at every call pays both)."""
    where = " OR ".join(["query LIKE %s"] * len(patterns))
    calls, total, plans, plan_ms = b.sql(
        f"SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0), "
        f"coalesce(sum(plans), 0), coalesce(sum(total_plan_time), 0) "
        f"FROM pg_stat_statements WHERE {where}", patterns)[0]
    calls = int(calls)
    if not calls:
        return float("nan"), 0, int(plans), float("nan")
    return float(total) / calls, calls, int(plans), float(plan_ms) / calls


def backlog(b):
    return b.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def dead_tuples(b):
    b.sql("SELECT pg_stat_clear_snapshot()")
    return b.scalar("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'invoices'")


def phase(b, prod, scraper, name, seconds, holder=None):
    b.sql("SELECT pg_stat_statements_reset()")
    n0, q0, t0 = prod.count(), backlog(b), time.monotonic()
    slow0 = scraper.slow_turns()
    if holder is not None:
        holder.start()
    time.sleep(seconds)
    n1, q1, t1 = prod.count(), backlog(b), time.monotonic()
    poll, ncall, nplan, poll_plan = stmt_stats(b, POLL_PATTERNS)
    if ncall == 0:
        raise RuntimeError(f"{name}: no poll matched {POLL_PATTERNS} in pg_stat_statements")
    claim, ccall = mean_ms(b, CLAIM_PATTERNS)
    done_ms, _ = mean_ms(b, COMPLETE_PATTERNS)
    r = {"phase": name, "seconds": t1 - t0, "done_s": ((n1 - n0) - (q1 - q0)) / (t1 - t0),
         "in_s": (n1 - n0) / (t1 - t0), "backlog": q1, "dead": dead_tuples(b),
         "poll_ms": poll, "poll_calls": ncall, "poll_plans": nplan, "poll_plan_ms": poll_plan,
         "claim_ms": claim, "claim_calls": ccall, "complete_ms": done_ms,
         "slow_turns": scraper.slow_turns() - slow0}
    print(f"  {name:8s} {r['seconds']:5.0f} s: {r['done_s']:8,.0f} completions/s (inserted "
          f"{r['in_s']:,.0f}/s), backlog {q1:,}, dead tuples {r['dead']:,}, poll "
          f"{poll:.3f} ms ({ncall:,} calls; {nplan:,} plans, {poll_plan:.3f} ms of planning a "
          f"call), claim {claim:.3f} ms ({ccall:,} calls), completion "
          f"{done_ms:.3f} ms, loop turns over 50 ms {r['slow_turns']:.0f}", flush=True)
    return r


class Scraper(threading.Thread):
    """GET /metrics of each port every INTERVAL s; keeps the last answers."""

    def __init__(self, ports, interval=5.0):
        super().__init__(daemon=True)
        self.ports, self.interval = ports, interval
        self.last = {}
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.interval):
            for port in self.ports:
                try:
                    self.last[port] = bench.Bench.scrape(port)
                except OSError:
                    pass

    def slow_turns(self):
        """Turns over 50 ms so far, all workers, as of the last scrapes."""
        return sum(m["billing_worker_loop_stall_seconds_count"] -
                   m['billing_worker_loop_stall_seconds_bucket{le="0.05"}']
                   for m in self.last.values())

    def longest_ms(self):
        return max((m["billing_worker_loop_stall_max_seconds"] * 1000
                    for m in self.last.values()), default=0.0)


class Pin(threading.Thread):
    """One session holding the xmin horizon: BEGIN; SELECT txid_current();"""

    def __init__(self, pg, seconds):
        super().__init__(daemon=True)
        self.conn = pg.connect("bench", autocommit=False)
        self.seconds = seconds

    def run(self):
        with self.conn.cursor() as cur:
            cur.execute("SELECT txid_current()")
            time.sleep(self.seconds)
        self.conn.commit()
        self.conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capacity", type=float, help="fast-API items/s of the fleet (measured if not given)")
    ap.add_argument("--capacity-items", type=int, default=20000)
    ap.add_argument("--fraction", type=float, default=0.7)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--lock-mode", choices=("redis", "skip-locked", "auto"), default="redis")
    ap.add_argument("--baseline-seconds", type=float, default=60)
    ap.add_argument("--pin-seconds", type=float, default=600)
    ap.add_argument("--after-seconds", type=float, default=60)
    ap.add_argument("--binary", type=Path, help="another build (e.g. of main), side by side")
    ap.add_argument("--keep", action="store_true", help="keep the worker logs and configs")
    a = ap.parse_args()
    # Run in the background, SIGINT is ignored: SIGTERM cleans up as well.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if a.binary is not None:
        bench.BINARY = a.binary.resolve()
    if not bench.BINARY.exists():
        sys.exit(f"{bench.BINARY} is missing: run make")
    a.only, a.items = ["e2e"], a.capacity_items
    b = bench.Bench(a)
    prod = None
    procs = []
    try:
        b.start()
        # Planning counted beside execution (stmt_stats).
        b.sql("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
        b.sql("SELECT pg_reload_conf()")
        over = {"locks.mode": a.lock_mode}
        cap = a.capacity
        if cap is None:
            cap = b.e2e(a.workers, **over)[0]
            print(f"  capacity: {cap:,.0f} items/s ({a.workers} workers, fast API, "
                  f"{a.capacity_items:,} invoices)", flush=True)
        rate = cap * a.fraction
        print(f"bench-bloat: {bench.BINARY}; {a.workers} workers, {a.lock_mode} locks; producer "
              f"{rate:,.0f} invoices/s ({a.fraction:.0%} of {cap:,.0f}/s); phases {a.baseline_seconds:g}"
              f" / {a.pin_seconds:g} / {a.after_seconds:g} s", flush=True)
        b.reset()
        ports = [bench.harness.free_port() for _ in range(a.workers)]
        for port in ports:
            procs += b.workers(1, b.fast_url, **over, **{"metrics.listen": f"127.0.0.1:{port}"})
        scraper = Scraper(ports)
        scraper.start()
        prod = Producer(b.pg, rate)
        prod.start()
        # Into the steady state, with statistics: TRUNCATE left the planner
        # an empty table, and claims planned for it take 500 ms at a real
        # backlog until autovacuum's first ANALYZE (production has them).
        time.sleep(10)
        b.sql("ANALYZE invoices")
        time.sleep(5)
        # And caught up: a baseline phase that starts behind measures the
        # catch-up, not the steady state (2026-12-03: 11 856 completions/s
        # against 10 620 inserted, so the pinned phase's 99.8 % of its
        # inserts read as 88 % of the baseline).
        steady = max(rate * 0.2, 500)
        t_warm = time.monotonic()
        while backlog(b) > steady and time.monotonic() - t_warm < 120:
            time.sleep(0.5)
        print(f"  warm-up: backlog {backlog(b):,} after {time.monotonic() - t_warm + 15:.0f} s",
              flush=True)
        res = [phase(b, prod, scraper, "baseline", a.baseline_seconds)]
        pin = Pin(b.pg, a.pin_seconds)
        res.append(phase(b, prod, scraper, "pinned", a.pin_seconds, holder=pin))
        pin.join()
        res.append(phase(b, prod, scraper, "after", a.after_seconds))
        scraper.stopping.set()
        prod.stopping.set()
        prod.join()
        prod = None
        b.stop_workers(procs)
        procs = []
        base, pinned = res[0], res[1]
        print("\n| phase | s | completions/s | backlog at end | dead tuples | poll mean | "
              "poll plans, planning a call | claim mean | completion mean | loop turns over 50 ms |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
        for r in res:
            print(f"| {r['phase']} | {r['seconds']:.0f} | {r['done_s']:,.0f} | {r['backlog']:,} | "
                  f"{r['dead']:,} | {r['poll_ms']:.3f} ms | {r['poll_plans']:,} of "
                  f"{r['poll_calls']:,}, {r['poll_plan_ms']:.3f} ms | {r['claim_ms']:.3f} ms | "
                  f"{r['complete_ms']:.3f} ms | {r['slow_turns']:.0f} |")
        print(f"\ncompletions / inserts: " + ", ".join(f"{r['phase']} {r['done_s'] / r['in_s']:.1%}"
                                                    for r in res))
        print(f"longest turn of any worker's loop: {scraper.longest_ms():.0f} ms")
        print(f"pinned / baseline: throughput {pinned['done_s'] / base['done_s']:.0%} (≥ 95 %), "
              f"backlog {pinned['backlog'] / max(base['backlog'], 1):.2f} × (≤ 2 ×), poll "
              f"{pinned['poll_ms'] / base['poll_ms']:.2f} × (≤ 3 ×), claim "
              f"{pinned['claim_ms'] / base['claim_ms']:.2f} × (≤ 3 ×)")
    finally:
        if prod is not None:
            prod.stopping.set()
            prod.join()
        for p in procs:
            bench.stop(p)
        b.close()


if __name__ == "__main__":
    main()

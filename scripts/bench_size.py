"""The `size` scenario of make bench: what the worker's statements and the
operator's commands cost as the tables grow.

One private database is filled once with --size-finished finished items
(80 % paid invoices, 20 % redeemed redemptions with their hold rows, over
100 funded subsidies; finished_at spread over 30 days up to now), loaded by
INSERT ... SELECT generate_series with triggers off (the rows are made
consistent by construction, so the audit is clean), then VACUUM ANALYZE.

Then, with those rows present:
  status, status --json, backlog   wall time of `billing-worker status` (the
                   process, connect included), and the metrics' backlog query
                   (store/report.c store_sql_backlog, read from the source so it
                   cannot drift) run by hand: median of 5 each
  audit            `billing-worker audit` (full), then, after the 1 000 items
                   of the first step were finished by a worker,
                   `audit --since-last-clean`
  due, claim, completion
                   pending invoices in steps 1 000 -> 100 000 -> 1 000 000
                   (added to what is left, then ANALYZE); at each step one
                   worker (default configuration, fast nginx API) runs about
                   3 s, and pg_stat_statements, reset before, gives the mean
                   execution time of the worker's own statements: the due
                   query, the claim (redis mode: by ids) and the completion
                   batch.  Measured from the worker's real traffic, with its
                   prepared statements' real plans, rather than by hand; with
                   how often each was planned and what planning cost a call,
                   which the execution time leaves out.
"""

import re
import statistics
import subprocess
import time

import bench

DAYS = 30
NSUB = 100


def add_args(ap):
    ap.add_argument("--size-finished", type=int, default=10_000_000,
                    help="finished items in the tables for the size rows (--quick: 200 000)")


def quick(a):
    a.size_finished = 200_000


def backlog_sql():
    """store_sql_backlog of store/report.c, its string literals joined."""
    src = (bench.ROOT / "store" / "report.c").read_text()
    body = src[src.index("const char store_sql_backlog[] ="):]
    body = body[:body.index(";\n")]
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body)).replace("$1", "%(cap)s")


class Size:
    def __init__(self, b):
        self.b = b
        self.n = b.args.size_finished
        if not hasattr(b, "fast_url"):
            b.nginx, b.fast_url = bench.start_nginx(b.work)
        # The audit's statements are bounded by query_timeout_ms: a full audit
        # of ten million rows takes longer than the default 30 s.
        self.cfg = b.config(b.fast_url, **{"database.query_timeout_ms": 600000})

    def cli(self, *args):
        t0 = time.monotonic()
        r = subprocess.run([str(bench.BINARY), "-c", str(self.cfg), *args],
                           capture_output=True, text=True)
        secs = time.monotonic() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {r.returncode}: {r.stdout}{r.stderr}")
        return secs, r.stdout

    def median_cli(self, *args, runs=5):
        times = [self.cli(*args)[0] for _ in range(runs)]
        return statistics.median(times), self.cli(*args)[1]

    def load(self):
        b, n = self.b, self.n
        ninv, nred = n * 8 // 10, n - n * 8 // 10
        b.reset()
        t0 = time.monotonic()
        b.sql("ALTER SYSTEM SET max_wal_size = '8GB'")
        b.sql("ALTER SYSTEM SET maintenance_work_mem = '512MB'")
        b.sql("SELECT pg_reload_conf()")
        with b.conn.cursor() as cur:
            cur.execute("BEGIN")
            # Triggers and foreign-key checks off for the load: the rows below
            # are consistent by construction (each redemption one hold, each
            # subsidy's cached balance its ledger sum).
            cur.execute("SET LOCAL session_replication_role = replica")
            cur.execute("SET LOCAL synchronous_commit = off")
            cur.execute("INSERT INTO subsidies (name) SELECT 'size-' || s "
                        "FROM generate_series(1, %s) s", (NSUB,))
            cur.execute(
                "INSERT INTO invoices (customer_id, amount_cents, currency, status, charge_id, "
                " attempts, fence, next_attempt_at, created_at, updated_at, finished_at) "
                "SELECT 'cus_' || (i %% 50000), 1000 + i %% 5000, 'usd', 'paid', 'ch_' || i, 1, 1, "
                " f - interval '2 seconds', f - interval '2 seconds', f, f "
                "FROM (SELECT i, now() - %s * interval '1 day' * (1 - i::float8 / %s) AS f "
                "      FROM generate_series(1, %s) i) g", (DAYS, ninv, ninv))
            cur.execute(
                "INSERT INTO redemptions (subsidy_id, customer_id, amount_cents, status, "
                " fulfillment_id, attempts, fence, next_attempt_at, created_at, updated_at, "
                " finished_at) "
                "SELECT 1 + i %% %s, 'learner-' || (i %% 50000), 100 + i %% 100, 'redeemed', "
                " 'rd_' || i, 1, 1, f - interval '2 seconds', f - interval '2 seconds', f, f "
                "FROM (SELECT i, now() - %s * interval '1 day' * (1 - i::float8 / %s) AS f "
                "      FROM generate_series(1, %s) i) g", (NSUB, DAYS, nred, nred))
            cur.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, created_at) "
                        "SELECT id, 1000000000000, now() - interval '31 days' FROM subsidies")
            cur.execute("INSERT INTO ledger_transactions (subsidy_id, amount_cents, redemption_id, "
                        " kind, created_at) "
                        "SELECT subsidy_id, -amount_cents, id, 'hold', created_at FROM redemptions")
            cur.execute("UPDATE subsidies s SET balance_cents = l.total FROM "
                        "(SELECT subsidy_id, sum(amount_cents) AS total FROM ledger_transactions "
                        " GROUP BY subsidy_id) l WHERE l.subsidy_id = s.id")
            cur.execute("COMMIT")
        load_s = time.monotonic() - t0
        b.sql("VACUUM ANALYZE")
        b.sql("CHECKPOINT")
        print(f"  size: {n:,} finished items loaded in {load_s:.0f} s, VACUUM ANALYZE and "
              f"checkpoint after {time.monotonic() - t0:.0f} s", flush=True)

    def add_pending(self, target):
        b = self.b
        have = b.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")
        with b.conn.cursor() as cur:
            cur.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
                        "SELECT 'cus_p' || i, 1999, 'usd' FROM generate_series(1, %s) i",
                        (max(target - have, 0),))
        b.sql("ANALYZE invoices")
        return b.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")

    def backlog_ms(self, runs=5):
        q, cap = backlog_sql(), 100000
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            self.b.sql(q, {"cap": cap})
            times.append(time.monotonic() - t0)
        return statistics.median(times) * 1000

    def statements(self, seconds=3.0):
        """One worker for SECONDS; the worker's statements' mean cost."""
        b = self.b
        b.sql("SELECT pg_stat_statements_reset()")
        procs = b.workers(1, b.fast_url)
        time.sleep(seconds)
        b.stop_workers(procs)

        def one(pattern):
            calls, total, rows, hit, read, dirtied, written, fpi, plans, plan_ms = b.sql(
                "SELECT coalesce(sum(calls), 0), coalesce(sum(total_exec_time), 0), "
                "coalesce(sum(rows), 0), coalesce(sum(shared_blks_hit), 0), "
                "coalesce(sum(shared_blks_read), 0), coalesce(sum(shared_blks_dirtied), 0), "
                "coalesce(sum(shared_blks_written), 0), coalesce(sum(wal_fpi), 0), "
                "coalesce(sum(plans), 0), coalesce(sum(total_plan_time), 0) "
                "FROM pg_stat_statements WHERE query LIKE %s", (pattern,))[0]
            calls, total, rows, plan_ms = int(calls), float(total), int(rows), float(plan_ms)
            per = (lambda v: float(v) / calls) if calls else (lambda v: 0.0)
            return {"calls": calls, "ms": total / calls if calls else float("nan"),
                    "plans": int(plans), "plan_ms": per(plan_ms),
                    "rows": per(rows), "hit": per(hit), "read": per(read),
                    "dirtied": per(dirtied), "written": per(written), "fpi": per(fpi)}
        return {"due": one("%SELECT kind, id, note FROM (%"),
                "claim": one("UPDATE invoices AS t SET fence%"),
                "completion": one("WITH upd AS (UPDATE invoices AS t SET status%")}


def run(b, lines):
    # Planning counted too, for these rows only (it costs a little at every
    # plan, and the baseline rows compare builds): a statement planned at
    # every call pays it beside its run, which total_exec_time leaves out.
    b.sql("ALTER SYSTEM SET pg_stat_statements.track_planning = on")
    b.sql("SELECT pg_reload_conf()")
    try:
        _run(b, lines)
    finally:
        b.sql("ALTER SYSTEM RESET pg_stat_statements.track_planning")
        b.sql("SELECT pg_reload_conf()")


def _run(b, lines):
    s = Size(b)
    n = s.n
    s.load()
    steps = [1000, 100_000, 1_000_000] if n >= 1_000_000 else [1000, 10_000, 100_000]
    pending = s.add_pending(steps[0])
    st_s, st_out = s.median_cli("status")
    stj_s, _ = s.median_cli("status", "--json")
    bl_ms = s.backlog_ms()
    estimated = "~" in st_out
    au_s, _ = s.cli("audit")
    print(f"  size: at {n:,} finished, {pending:,} pending: status {st_s * 1000:.0f} ms "
          f"(--json {stj_s * 1000:.0f} ms), backlog query {bl_ms:.1f} ms, full audit "
          f"{au_s:.1f} s", flush=True)
    label = f"{n:,} finished items"
    lines.append(f"| `status`, {label}, {pending:,} pending (process wall time, median of 5) | "
                 f"{st_s * 1000:.0f} ms (`--json` {stj_s * 1000:.0f} ms) | done counts "
                 f"{'estimated' if estimated else 'exact'} | < 100 ms |")
    lines.append(f"| metrics' backlog query, {label} (median of 5) | {bl_ms:.1f} ms | | < 100 ms |")
    lines.append(f"| `audit` (full), {label} | {au_s:.1f} s | | |")

    results = []
    for i, target in enumerate(steps):
        if i > 0:
            pending = s.add_pending(target)
        m = s.statements()
        results.append((pending, m))
        print(f"  size: {pending:,} pending: due {m['due']['ms']:.2f} ms, claim "
              f"{m['claim']['ms']:.2f} ms ({m['claim']['rows']:.0f} rows), completion "
              f"{m['completion']['ms']:.2f} ms ({m['completion']['rows']:.0f} rows)", flush=True)
        for what in ("due", "claim", "completion"):
            x = m[what]
            print(f"  size:   {what}: {x['calls']} calls, {x['plans']} plans ({x['plan_ms']:.2f} ms "
                  f"of planning a call); per call {x['hit']:.0f} buffers hit, "
                  f"{x['read']:.1f} read, {x['dirtied']:.1f} dirtied, {x['written']:.1f} "
                  f"written, {x['fpi']:.1f} full-page images", flush=True)
        if i == 0:
            inc_s, inc_out = s.cli("audit", "--since-last-clean")
            print(f"  size: incremental audit {inc_s * 1000:.0f} ms", flush=True)
    base = results[0][1]
    for pending, m in results:
        for what, name in (("due", "due query"), ("claim", "claim (by ids, redis mode)"),
                           ("completion", "completion batch")):
            x = m[what]
            ratio = x["ms"] / base[what]["ms"] if base[what]["ms"] else float("nan")
            target = "≤ 1.5 × at 1 000" if what == "claim" and pending >= 1_000_000 else ""
            lines.append(f"| {name}, {pending:,} pending + {label}: mean per call "
                         f"(pg_stat_statements, {x['calls']} calls, {x['rows']:.0f} rows each; "
                         f"{x['plans']} plans, {x['plan_ms']:.2f} ms of planning a call) | "
                         f"{x['ms']:.2f} ms | {ratio:.2f} × at {results[0][0]:,} | {target} |")
    lines.append(f"| `audit --since-last-clean`, {label} (after {results[0][0]:,} finished "
                 f"since the full run) | {inc_s * 1000:.0f} ms | {inc_s / au_s:.1%} of the full "
                 f"audit | < 1 s |")
    # At the largest backlog: what the pending rows themselves cost status.
    st2_s, _ = s.median_cli("status", runs=3)
    bl2_ms = s.backlog_ms(runs=3)
    lines.append(f"| `status` / backlog query, {label}, {results[-1][0]:,} pending | "
                 f"{st2_s * 1000:.0f} ms / {bl2_ms:.1f} ms | | |")

"""The peer queue beside us, in the same bench run: `make bench PEER=graphile-worker`.

A figure typed in from another day compares two machines, not two queues.
This runs graphile-worker 0.17 on the bench's own PostgreSQL, against the
bench's own nginx (the fast API), for the same invoices, each job an HTTP
POST to <fast_url>/v1/charges (the body and headers of CONTRACT section 2)
and one UPDATE of the invoice, alternating with our e2e runs, and prints
the ratio measured in that run.

The peer is installed with npm into a scratch folder outside the project
(BW_PEER_DIR, default /var/tmp/billing-worker-bench-peer), reused once
installed: it never becomes a dependency of billing-worker.

bench.py calls install() before it starts anything (so a missing npm or an
unreachable registry fails in seconds, not after the other rows) and run()
after its other scenarios, with its Bench: ours runs through Bench.e2e, the
peer through the same reset, the same INSERT and the same wait_drained.
"""

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("graphile-worker",)
VERSION = "0.17"                       # the peer's release line the targets speak of
PEER_DIR = Path(os.environ.get("BW_PEER_DIR", "/var/tmp/billing-worker-bench-peer"))
TARGETS = {1: 3.0, 4: 8.0}             # ours / peer, in the same run

# The peer's documented performance settings: graphile-worker's "Performance"
# page (https://worker.graphile.org/docs/performance) gives the configuration
# its figures were measured with: concurrentJobs 24, maxPoolSize 25,
# localQueue { size: 500 }, completeJobBatchDelay 0, failJobBatchDelay 0
# (the batching options the 0.17 release notes introduce: "This can
# significantly reduce load on the database").  Jobs are added in bulk with
# graphile_worker.add_jobs (its SQL API, one call for the whole batch).
# NO_LOG_SUCCESS=1 is the peer's own switch (dist/worker.js) to skip the
# info line it logs for every job: our workers run at log.level = warn.
PRESET = """{
  concurrentJobs: 24,
  maxPoolSize: 25,
  localQueue: { size: 500 },
  completeJobBatchDelay: 0,
  failJobBatchDelay: 0,
}"""

# One job: the POST our worker makes (CONTRACT section 2: same body, same
# headers, same Idempotency-Key), then the UPDATE that records it, on the
# pool graphile-worker gives the task.  Node's http with a keep-alive agent,
# one socket per concurrent job, as our workers keep theirs.
RUNNER = r"""'use strict';
const http = require('http');
const { run } = require('graphile-worker');

const api = new URL(process.env.BENCH_API_URL);
const token = process.env.BENCH_API_TOKEN;
const preset = PRESET;
const agent = new http.Agent({ keepAlive: true, maxSockets: preset.concurrentJobs });

function post(path, body, key) {
  return new Promise((resolve, reject) => {
    const req = http.request({
      host: api.hostname, port: api.port, path, method: 'POST', agent,
      headers: {
        'Authorization': `Bearer ${token}`,
        'Content-Type': 'application/json',
        'Content-Length': Buffer.byteLength(body),
        'Idempotency-Key': key,
      },
    }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks).toString() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

const taskList = {
  async charge(p, helpers) {
    const body = JSON.stringify({ invoice_id: p.id, customer: p.customer, amount: p.amount,
                                  currency: p.currency });
    const res = await post('/v1/charges', body, `invoice-${p.id}`);
    if (res.status !== 200 && res.status !== 201) throw new Error(`billing API: HTTP ${res.status}`);
    const chargeId = JSON.parse(res.body).id;
    await helpers.withPgClient((c) => c.query(
      "UPDATE invoices SET status = 'paid', charge_id = $2, finished_at = now(), " +
      "attempts = attempts + 1 WHERE id = $1", [p.id, chargeId]));
  },
};

async function main() {
  const runner = await run({
    taskList,
    preset: { worker: { connectionString: process.env.DATABASE_URL, ...preset } },
  });
  require('fs').writeFileSync(process.env.BENCH_READY_FILE, 'ready\n');
  await runner.promise;
}

main().catch((e) => { console.error(e); process.exit(1); });
""".replace("PRESET", PRESET)


class PeerError(RuntimeError):
    """The peer could not be installed or run; the message says which step."""


def _module_dir():
    return PEER_DIR / "node_modules" / "graphile-worker"


def _installed_version():
    import json
    try:
        return json.loads((_module_dir() / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install(name):
    """Installs the peer into PEER_DIR unless the right version is there;
    returns its version.  Raises PeerError naming what failed."""
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}: known are {', '.join(PEERS)}")
    have = _installed_version()
    if have and have.startswith(VERSION + "."):
        return have
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise PeerError(f"{tool} is not installed: the peer {name} needs Node.js and npm")
    PEER_DIR.mkdir(parents=True, exist_ok=True)
    print(f"  peer: npm install --prefix {PEER_DIR} {name}@{VERSION}", flush=True)
    try:
        r = subprocess.run(["npm", "install", "--prefix", str(PEER_DIR), "--no-audit", "--no-fund",
                            f"{name}@{VERSION}"], capture_output=True, text=True, timeout=300,
                           cwd=PEER_DIR)
    except subprocess.TimeoutExpired:
        raise PeerError(f"npm install {name}@{VERSION} did not finish in 300 s "
                        f"(is the npm registry reachable?)") from None
    if r.returncode != 0:
        # npm's first lines name the cause (code, then the failed request);
        # the rest is a stack trace and a pointer to its debug log.
        said = (r.stderr or r.stdout).strip().splitlines()
        tail = "\n".join([l for l in said if " code " in l or "FetchError" in l or
                           "404" in l][:3] or said[:4])
        raise PeerError(f"npm install {name}@{VERSION} into {PEER_DIR} failed "
                        f"(exit {r.returncode}):\n{tail}")
    have = _installed_version()
    if not (have and have.startswith(VERSION + ".")):
        raise PeerError(f"npm install {name}@{VERSION} left version {have} in {PEER_DIR}")
    return have


class Peer:
    def __init__(self, bench):
        self.b = bench
        self.url = (f"postgres://{bench.pg.superuser}@127.0.0.1:{bench.pg.port}/bench")
        self.runner = bench.work / "peer-runner.js"
        self.runner.write_text(RUNNER)
        self.n = 0

    def env(self):
        return {**os.environ, "DATABASE_URL": self.url, "BENCH_API_URL": self.b.fast_url,
                "BENCH_API_TOKEN": self.b.token.read_text().strip(),
                "NODE_PATH": str(PEER_DIR / "node_modules"), "NO_LOG_SUCCESS": "1"}

    def migrate(self):
        """The peer's schema (graphile_worker) in the bench database, once,
        before any process starts: with its own CLI."""
        cli = _module_dir() / "dist" / "cli.js"
        r = subprocess.run(["node", str(cli), "--schema-only", "-c", self.url], env=self.env(),
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise PeerError(f"graphile-worker --schema-only failed: {r.stderr.strip()[-500:]}")

    def start(self, nproc):
        """NPROC peer processes, each ready (its run() resolved: schema
        checked, pool up, LISTENing) before the next starts."""
        procs = []
        try:
            for _ in range(nproc):
                self.n += 1
                log = self.b.work / f"peer-{self.n}.log"
                ready = self.b.work / f"peer-{self.n}.ready"
                with open(log, "w") as out:
                    p = subprocess.Popen(["node", str(self.runner)],
                                         env={**self.env(), "BENCH_READY_FILE": str(ready)},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         cwd=self.b.work)  # its crontab, tasks/: none
                procs.append(p)
                t0 = time.monotonic()
                while not ready.exists():
                    if p.poll() is not None or time.monotonic() - t0 > 30:
                        tail = "\n".join(log.read_text(errors="replace").splitlines()[-10:])
                        raise PeerError(f"graphile-worker did not start:\n{tail}")
                    time.sleep(0.05)
        except BaseException:
            self.stop(procs)
            raise
        return procs

    @staticmethod
    def stop(procs):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def e2e(self, nproc):
        """The peer's run, shaped as Bench.e2e: the same reset, the invoices
        inserted as for ours, timed by the database's clock from the first
        INSERT to the last invoice paid.  Returns items/s, the peer's CPU
        seconds (its own processes, by pid: the PostgreSQL split of
        Bench.e2e counts every postgres on the machine, other clusters
        too, so it is left out) and the elapsed seconds.  The jobs are added
        in the INSERT's own statement, so the clock starts where ours does."""
        b, n = self.b, self.b.args.items
        b.reset()
        b.sql("TRUNCATE graphile_worker._private_jobs, graphile_worker._private_job_queues")
        procs = self.start(nproc)
        try:
            cpu0 = b.cpu_seconds(procs)
            b.sql("WITH inv AS (INSERT INTO invoices (customer_id, amount_cents, currency) "
                  "SELECT 'cus_' || g, 1000, 'usd' FROM generate_series(1, %s) g "
                  "RETURNING id, customer_id, amount_cents, currency) "
                  "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY(SELECT ROW('charge', "
                  "json_build_object('id', id, 'customer', customer_id, 'amount', amount_cents, "
                  "'currency', currency), NULL, NULL, NULL, NULL, NULL, NULL)"
                  "::graphile_worker.job_spec FROM inv ORDER BY id))", (n,))
            elapsed = b.wait_drained(n, 600)
            cpu = b.cpu_seconds(procs) - cpu0
            for p in procs:
                if p.poll() is not None:
                    raise PeerError(f"graphile-worker exited {p.returncode} during the run")
        finally:
            self.stop(procs)
        paid = b.scalar("SELECT count(*) FROM invoices WHERE status = 'paid' AND charge_id = 'ch_bench'")
        if paid != n:
            raise PeerError(f"graphile-worker paid {paid} of {n} invoices with the API's charge id")
        return n / elapsed, cpu, elapsed


def run(bench, name, lines):
    """Ours, peer, ours, peer at 1 and 4 processes; one table row each into
    LINES.  A peer that fails mid-run costs its rows, not the table."""
    try:
        _run(bench, name, lines)
    except PeerError as e:
        print(f"  peer {name}: {e}", file=sys.stderr, flush=True)
        lines.append(f"| peer {name} | not measured: {str(e).splitlines()[0]} | | |")


def _run(bench, name, lines):
    version = install(name)
    peer = Peer(bench)
    peer.migrate()
    k = bench.args.items / 1000
    for p in (1, 4):
        ours, theirs = [], []
        # Three alternating runs each, the medians (as bench.py's baseline rows).
        for _ in range(3):
            ours.append(bench.e2e(p))
            theirs.append(peer.e2e(p))
        rate_o = statistics.median(r[0] for r in ours)
        rate_t = statistics.median(r[0] for r in theirs)
        cpu_o = statistics.median(r[1] for r in ours) / k
        cpu_t = statistics.median(r[1] for r in theirs) / k
        ratio = rate_o / rate_t
        print(f"  peer {name} {version}, {p} proc: ours {rate_o:,.0f} items/s "
              f"({', '.join(f'{r[0]:,.0f}' for r in ours)}), peer {rate_t:,.0f} items/s "
              f"({', '.join(f'{r[0]:,.0f}' for r in theirs)}); {ratio:.2f} ×; CPU s per 1 000 "
              f"items: worker {cpu_o:.3f} / peer {cpu_t:.3f}",
              flush=True)
        target = TARGETS[p]
        lines.append(f"| e2e, {p} process{'es' if p > 1 else ''}, fast API: ours / {name} "
                     f"{version} (medians of 3 alternating runs: "
                     f"{', '.join(f'{r[0]:,.0f}' for r in ours)} / "
                     f"{', '.join(f'{r[0]:,.0f}' for r in theirs)}; CPU s per 1 000 items "
                     f"{cpu_o:.3f} / {cpu_t:.3f}) | {rate_o:,.0f} / {rate_t:,.0f} items/s | "
                     f"{ratio:.2f} × | ≥ {target:g} × |")

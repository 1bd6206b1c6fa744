#!/bin/sh
# demo.sh: billing-worker on sample data, with private servers (`make demo`).
#
# Starts, in a temp dir and on free 127.0.0.1 ports: a PostgreSQL cluster,
# a redis-server and the fake billing API (tests/fake_api.py).  Then:
#   billing-worker migrate
#   inserts 200 invoices (every 10th customer is "declined-...": they end
#   failed), 3 subsidies with deposits and 60 redemptions (some larger than
#   what is left of their subsidy's balance, some declined)
#   runs 3 workers side by side: locks.mode redis, skip-locked and auto
#   waits until nothing is pending (at most DEMO_TIMEOUT seconds, 120)
#   stops them with SIGTERM, prints `billing-worker status` and a summary.
# Everything it started is stopped, and the temp dir removed, on exit
# (KEEP=1 keeps the temp dir, with every log, for a look).
#
# As root, PostgreSQL runs as the `postgres` user (it refuses root); its
# superuser is `postgres` either way.  Debian's own servers on 5432 and 6379
# are neither used nor disturbed.
#
# Overrides: BIN (the worker binary), FAKE_API, PYTHON, PG_BINDIR,
# DEMO_TIMEOUT, KEEP.
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${BIN:-$ROOT/build/billing-worker}
FAKE_API=${FAKE_API:-$ROOT/tests/fake_api.py}
PYTHON=${PYTHON:-/usr/bin/python3}
DEMO_TIMEOUT=${DEMO_TIMEOUT:-120}
KEEP=${KEEP:-0}
MODES="redis skip-locked auto"

say() { printf '\n==== %s\n' "$*"; }
note() { printf '  %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers

find_pg_bindir() {
	if [ -n "${PG_BINDIR:-}" ]; then
		echo "$PG_BINDIR"
		return 0
	fi
	best='' bestv=0
	for d in /usr/lib/postgresql/*/bin; do
		[ -x "$d/initdb" ] || continue
		v=${d#/usr/lib/postgresql/}
		v=${v%/bin}
		v=${v%%.*}
		case $v in '' | *[!0-9]*) continue ;; esac
		if [ "$v" -gt "$bestv" ]; then
			best=$d bestv=$v
		fi
	done
	if [ -n "$best" ]; then
		echo "$best"
		return 0
	fi
	if d=$(pg_config --bindir 2>/dev/null) && [ -x "$d/initdb" ]; then
		echo "$d"
		return 0
	fi
	if d=$(command -v initdb); then
		dirname "$d"
		return 0
	fi
	return 1
}

free_port() {
	"$PYTHON" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# as_pg CMD...: runs a PostgreSQL server tool as the cluster's owner.
as_pg() {
	if [ "$(id -u)" -eq 0 ]; then
		runuser -u postgres -- "$@"
	else
		"$@"
	fi
}

# pq DB PSQL-ARGS...: psql as the superuser, stopping at the first error.
pq() {
	db=$1
	shift
	"$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -P pager=off \
		-h 127.0.0.1 -p "$PG_PORT" -U postgres -d "$db" "$@"
}

# wait_until SECONDS WHAT CMD...: runs CMD every 0.2 s until it succeeds.
wait_until() {
	limit=$(($1 * 5))
	what=$2
	shift 2
	i=0
	until "$@" >/dev/null 2>&1; do
		i=$((i + 1))
		if [ "$i" -ge "$limit" ]; then
			echo "demo: timed out waiting for $what" >&2
			return 1
		fi
		sleep 0.2
	done
}

alive() { kill -0 "$1" 2>/dev/null; }

show_tail() {
	# show_tail FILE [LINES]
	if [ -s "$1" ]; then
		echo "  --- last lines of $1:"
		tail -n "${2:-15}" "$1" | sed 's/^/  | /'
	fi
}

# ---------------------------------------------------------------- cleanup

TMP=
PG_RUNNING=0
REDIS_PID=
API_PID=
WORKER_PIDS=

cleanup() {
	rc=$?
	trap - EXIT INT TERM HUP
	set +e
	for pid in $WORKER_PIDS $API_PID $REDIS_PID; do
		alive "$pid" && kill -KILL "$pid" 2>/dev/null
	done
	for pid in $WORKER_PIDS $API_PID $REDIS_PID; do
		wait "$pid" 2>/dev/null
	done
	if [ "$PG_RUNNING" = 1 ]; then
		as_pg "$PGBIN/pg_ctl" stop -D "$TMP/pg/data" -m fast -w >/dev/null 2>&1 ||
			as_pg "$PGBIN/pg_ctl" stop -D "$TMP/pg/data" -m immediate -w >/dev/null 2>&1
	fi
	if [ -n "$TMP" ] && [ -d "$TMP" ]; then
		if [ "$KEEP" = 1 ]; then
			echo "demo: kept $TMP (configs, logs, the stopped cluster)"
		else
			rm -rf "$TMP"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------- checks

[ -x "$BIN" ] || die "$BIN not found: build it first (make all)"
[ -f "$FAKE_API" ] || die "$FAKE_API not found"
[ -x "$PYTHON" ] || die "$PYTHON not found"
command -v redis-server >/dev/null || die "redis-server not found (make deps)"
command -v redis-cli >/dev/null || die "redis-cli not found (make deps)"
PGBIN=$(find_pg_bindir) || die "PostgreSQL server binaries not found (make deps)"
if [ "$(id -u)" -eq 0 ]; then
	id postgres >/dev/null 2>&1 || die "running as root needs a postgres user (apt-get install postgresql)"
	command -v runuser >/dev/null || die "running as root needs runuser"
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/bw-demo.XXXXXX")
say "working in $TMP"

# ---------------------------------------------------------------- PostgreSQL

say "PostgreSQL ($PGBIN)"
mkdir "$TMP/pg" "$TMP/pg/sock"
if [ "$(id -u)" -eq 0 ]; then
	chmod 711 "$TMP"    # postgres must reach $TMP/pg; the rest stays root's
	chown -R postgres:postgres "$TMP/pg"
fi
PG_PORT=$(free_port)
as_pg "$PGBIN/initdb" -D "$TMP/pg/data" -U postgres --auth=trust -E UTF8 \
	--no-locale --no-sync >"$TMP/initdb.log" 2>&1 || {
	cat "$TMP/initdb.log" >&2
	die "initdb failed"
}
cat >>"$TMP/pg/data/postgresql.conf" <<EOF

# billing-worker demo
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/pg/sock'
fsync = off
synchronous_commit = off
max_connections = 200
EOF
as_pg "$PGBIN/pg_ctl" start -w -t 60 -D "$TMP/pg/data" -l "$TMP/pg/postgres.log" >/dev/null || {
	show_tail "$TMP/pg/postgres.log" 30 >&2
	die "PostgreSQL did not start"
}
PG_RUNNING=1
pq postgres -c 'CREATE DATABASE billing'
DSN="host=127.0.0.1 port=$PG_PORT dbname=billing user=postgres"
note "listening on 127.0.0.1:$PG_PORT, database billing"

# ---------------------------------------------------------------- Redis

say "redis-server"
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
	--dir "$TMP" --daemonize no >"$TMP/redis.log" 2>&1 </dev/null &
REDIS_PID=$!
wait_until 10 "redis-server" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping || {
	show_tail "$TMP/redis.log" >&2
	die "redis-server did not start"
}
note "listening on 127.0.0.1:$REDIS_PORT"

# ---------------------------------------------------------------- fake API

say "fake billing API ($FAKE_API)"
(umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$TMP/api-token")
"$PYTHON" "$FAKE_API" --host 127.0.0.1 --port 0 --token-file "$TMP/api-token" \
	>"$TMP/fake-api.out" 2>"$TMP/fake-api.log" </dev/null &
API_PID=$!
api_ready() { grep -q '^READY [0-9][0-9]*$' "$TMP/fake-api.out"; }
wait_until 15 "the fake API's READY line" api_ready || {
	show_tail "$TMP/fake-api.log" >&2
	die "the fake API did not start"
}
API_PORT=$(sed -n 's/^READY \([0-9][0-9]*\)$/\1/p' "$TMP/fake-api.out" | head -n 1)
note "listening on 127.0.0.1:$API_PORT"

# ---------------------------------------------------------------- configs

# write_config MODE: one config per worker, differing in locks.mode and id.
write_config() {
	cat >"$TMP/worker-$1.conf" <<EOF
worker = {
  id = "demo-$1";
  concurrency = 16;
  batch_size = 50;
  poll_interval_ms = 200;
  shutdown_timeout_ms = 5000;
};
database = { conninfo = "$DSN"; };
redis = {
  host = "127.0.0.1";
  port = $REDIS_PORT;
  connect_timeout_ms = 500;
};
locks = {
  mode = "$1";
  ttl_ms = 5000;
  renew_interval_ms = 1500;
};
billing_api = {
  base_url = "http://127.0.0.1:$API_PORT";
  token_file = "$TMP/api-token";
  timeout_ms = 2000;
  connect_timeout_ms = 500;
  max_attempts = 5;
  backoff_initial_ms = 100;
  backoff_max_ms = 2000;
};
log = { level = "info"; };
EOF
}
for mode in $MODES; do
	write_config "$mode"
done
CONF=$TMP/worker-redis.conf

# ---------------------------------------------------------------- migrate

say "billing-worker migrate"
"$BIN" -c "$CONF" migrate || die "migrate failed (exit $?)"

# ---------------------------------------------------------------- sample data

say "sample data"
pq billing <<'EOF'
-- 200 invoices; every 10th customer is declined by the fake API.
INSERT INTO invoices (customer_id, amount_cents, currency)
SELECT CASE WHEN i % 10 = 0 THEN 'declined-' || i ELSE 'cus_' || i END,
       500 + (i * 37) % 5000,
       (ARRAY['usd', 'eur', 'gbp'])[1 + i % 3]
  FROM generate_series(1, 200) AS i;

-- 3 subsidies, funded by deposits.
INSERT INTO subsidies (name) VALUES ('acme-2026'), ('globex-pilot'), ('initech-small');
INSERT INTO ledger_transactions (subsidy_id, amount_cents)
SELECT s.id, d.amount
  FROM subsidies s
  JOIN (VALUES ('acme-2026', 60000), ('acme-2026', 40000),
               ('globex-pilot', 30000), ('initech-small', 5000)) AS d (name, amount)
    ON d.name = s.name;

-- 60 redemptions, 20 per subsidy.  acme's all fit; globex's add up to
-- 50000 of 30000; initech's first (8000) is larger than its whole balance.
-- Every 15th learner is declined by the fake API.
INSERT INTO redemptions (subsidy_id, customer_id, amount_cents)
SELECT s.id,
       CASE WHEN i % 15 = 0 THEN 'declined-learner-' || s.id || '-' || i
            ELSE 'learner-' || s.id || '-' || i END,
       CASE s.name WHEN 'initech-small' THEN CASE WHEN i = 1 THEN 8000 ELSE 1000 END
                   ELSE 2500 END
  FROM subsidies s, generate_series(1, 20) AS i;
EOF
pq billing -At -F ' ' -c "SELECT 'invoices:', count(*) FROM invoices" \
	-c "SELECT 'subsidies:', count(*) FROM subsidies" \
	-c "SELECT 'deposits:', count(*), 'total:', sum(amount_cents) FROM ledger_transactions" \
	-c "SELECT 'redemptions:', count(*), 'asked:', sum(amount_cents) FROM redemptions" |
	sed 's/^/  /'

# ---------------------------------------------------------------- workers

say "3 workers: $MODES"
for mode in $MODES; do
	"$BIN" -c "$TMP/worker-$mode.conf" run >"$TMP/worker-$mode.log" 2>&1 </dev/null &
	WORKER_PIDS="$WORKER_PIDS $!"
	note "worker demo-$mode: pid $!, log $TMP/worker-$mode.log"
done

pending() {
	pq billing -At -c "SELECT (SELECT count(*) FROM invoices WHERE status = 'pending')
	                        + (SELECT count(*) FROM redemptions WHERE status = 'pending')"
}

say "waiting until nothing is pending (at most ${DEMO_TIMEOUT}s)"
start=$(date +%s)
last_report=0
drained=0
while :; do
	left=$(pending) || left='?'
	now=$(date +%s)
	elapsed=$((now - start))
	if [ "$left" = 0 ]; then
		drained=1
		note "all done after ${elapsed}s"
		break
	fi
	running=0
	for pid in $WORKER_PIDS; do
		if alive "$pid"; then running=$((running + 1)); fi
	done
	if [ "$running" -eq 0 ]; then
		note "every worker has exited, $left items still pending"
		break
	fi
	if [ "$elapsed" -ge "$DEMO_TIMEOUT" ]; then
		note "timed out after ${elapsed}s, $left items still pending"
		break
	fi
	if [ $((elapsed - last_report)) -ge 5 ]; then
		note "${elapsed}s: $left pending, $running workers running"
		last_report=$elapsed
	fi
	sleep 0.5
done

say "stopping the workers (SIGTERM)"
for pid in $WORKER_PIDS; do
	if alive "$pid"; then kill -TERM "$pid"; fi
done
# shellcheck disable=SC2086 # split on purpose
set -- $MODES
for pid in $WORKER_PIDS; do
	mode=$1
	shift
	i=0
	while alive "$pid" && [ "$i" -lt 75 ]; do   # 15 s: shutdown_timeout_ms is 5 s
		sleep 0.2
		i=$((i + 1))
	done
	if alive "$pid"; then
		kill -KILL "$pid" 2>/dev/null || true
		note "demo-$mode did not stop within 15s: killed"
	fi
	code=0
	wait "$pid" || code=$?
	note "demo-$mode exited with status $code"
	if [ "$code" -ne 0 ] || [ "$drained" != 1 ]; then
		show_tail "$TMP/worker-$mode.log"
	fi
done
WORKER_PIDS=

# ---------------------------------------------------------------- results

say "billing-worker status"
"$BIN" -c "$CONF" status || note "(status exited with $?)"

say "billing-worker audit (the ledger and item invariants, from the database alone)"
"$BIN" -c "$CONF" audit || note "(audit exited with $?: see the violations above)"

say "summary"
pq billing <<'EOF'
\echo 'invoices by status'
SELECT status, count(*) AS items, sum(amount_cents) AS cents, max(attempts) AS max_attempts
  FROM invoices GROUP BY status ORDER BY status;
\echo 'redemptions by status'
SELECT status, count(*) AS items, sum(amount_cents) AS cents, max(attempts) AS max_attempts
  FROM redemptions GROUP BY status ORDER BY status;
\echo 'why items failed'
SELECT 'invoice' AS kind, last_error, count(*) FROM invoices WHERE status = 'failed' GROUP BY last_error
UNION ALL
SELECT 'redemption', last_error, count(*) FROM redemptions WHERE status = 'failed' GROUP BY last_error
ORDER BY 1, 3 DESC;
\echo 'subsidies: the balance must equal deposits - redeemed, and never be negative'
SELECT id, name, deposits, redeemed, ledger_balance, cached_balance,
       CASE WHEN ledger_balance = deposits - redeemed AND ledger_balance >= 0
                 AND cached_balance = ledger_balance
            THEN 'ok' ELSE 'MISMATCH' END AS "check"
  FROM (SELECT s.id, s.name,
               (SELECT COALESCE(sum(amount_cents), 0) FROM ledger_transactions l
                 WHERE l.subsidy_id = s.id AND l.redemption_id IS NULL) AS deposits,
               (SELECT COALESCE(sum(amount_cents), 0) FROM redemptions r
                 WHERE r.subsidy_id = s.id AND r.status = 'redeemed') AS redeemed,
               (SELECT COALESCE(sum(amount_cents), 0) FROM ledger_transactions l
                 WHERE l.subsidy_id = s.id) AS ledger_balance,
               s.balance_cents AS cached_balance
          FROM subsidies s) AS b
 ORDER BY id;
EOF

if [ "$drained" != 1 ]; then
	die "items were still pending when the workers were stopped"
fi
say "demo finished"

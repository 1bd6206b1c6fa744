#!/bin/sh
# install-deps.sh: makes sure the Debian packages needed to build and test
# billing-worker are installed.  Runs before every `make test` and `make demo`,
# so when nothing is missing it only asks dpkg and exits 0.
#
# Missing packages are installed with apt-get when running as root; otherwise
# the exact command to run is printed and the script exits 1.
#
# Note: installing postgresql and redis-server also starts Debian's own
# servers (5432, 6379).  Nothing here uses them: the tests and the demo start
# private servers on free ports.
#
# Arguments name extra packages for one target.  BW_SKIP_DEPS=1 skips the check
# (e.g. on a machine that is not Debian but has everything).
set -eu

# clang and libclang-rt-14-dev (libFuzzer; only a Recommends of clang) for
# `make fuzz`, valgrind for `make valgrind`, openssl for the TLS tests' CA,
# prometheus for promtool (`make lint-rules`; it also starts a Prometheus
# server on 9090 under systemd, which nothing here uses).  pgbouncer and
# redis-sentinel for the pooling and failover tests, which start private ones
# (the packages also start Debian's own on 6432 and 26379, unused here).
PACKAGES="build-essential pkg-config libhiredis-dev libpq-dev libcurl4-openssl-dev
libconfig-dev libcmocka-dev libjansson-dev libsystemd-dev libmicrohttpd-dev postgresql
redis-server redis-sentinel pgbouncer systemd mandoc prometheus
python3 python3-psycopg2 python3-pytest curl procps iproute2
clang libclang-rt-14-dev valgrind openssl"

# Extra packages for one target: `make bench` adds nginx-light, `make deb`
# the Debian packaging tools.
if [ $# -gt 0 ]; then
	PACKAGES="$PACKAGES $*"
fi

if [ "${BW_SKIP_DEPS:-0}" = 1 ]; then
	exit 0
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
	echo "install-deps.sh: dpkg-query not found: this is not a Debian system." >&2
	# shellcheck disable=SC2086
	echo "Install the equivalents of:" $PACKAGES >&2
	echo "then run with BW_SKIP_DEPS=1." >&2
	exit 1
fi

# One dpkg-query for all of them; packages it does not know are reported on
# stderr and left out of stdout, so "missing" is whatever is not listed as
# installed (that also covers removed-but-configured "rc" packages).
# shellcheck disable=SC2086
installed=" $(dpkg-query -W -f='${Package} ${Status}\n' $PACKAGES 2>/dev/null |
	awk '$NF == "installed" && $(NF-1) == "ok" { printf "%s ", $1 }') " || true

missing=
for p in $PACKAGES; do
	case "$installed" in
	*" $p "*) ;;
	*) missing="$missing $p" ;;
	esac
done
missing=${missing# }

if [ -z "$missing" ]; then
	exit 0
fi

echo "install-deps.sh: missing packages: $missing"

if [ "$(id -u)" -ne 0 ]; then
	echo "Run as root, or install them with:" >&2
	echo "  sudo apt-get install -y --no-install-recommends $missing" >&2
	exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
# shellcheck disable=SC2086
apt-get install -y --no-install-recommends $missing
echo "install-deps.sh: installed: $missing"

# billing-worker: a plain Makefile with explicit sources.
#
#   make                 build build/billing-worker
#   make test            unit tests (cmocka) + integration tests (real PostgreSQL,
#                        redis-server and the fake billing API, started in a temp dir)
#   make demo            install what is missing, build, run workers on sample data
#   make unit            unit tests only
#   make integration     integration tests only (PYTEST_ARGS="-k name" to pick)
#   make bench           throughput, latency and cost figures (BENCH_ARGS="--quick")
#   make bench PEER=graphile-worker   the same, with that peer queue run beside us,
#                        alternating, and the ratio measured in the run
#   make bench-bloat     the poll and claim with the xmin horizon pinned (BLOAT_ARGS=...)
#   make install         daemon (sbin), systemd units, config, man pages under DESTDIR/PREFIX
#   make lint-man        check the man pages with mandoc -T lint (part of make test)
#   make lint-rules      check the Prometheus alerting rules and run their tests with
#                        promtool (part of make test)
#   make deb             build the Debian package in build/deb (dpkg-buildpackage)
#   make test SANITIZE=1 the same, built with ASan + UBSan in build-san/
#   make valgrind        integration tests with the worker under valgrind memcheck
#   make fuzz            every libFuzzer target for FUZZ_SECONDS (default 60) each
#   make chaos           the full chaos run: >= 5000 items, every fault kind, a one-minute
#                        API outage (about 10 minutes; CHAOS_ARGS="--seed N" to replay)
#   make chaos-ci        the short chaos run that `make test` includes (about 2 minutes)

CC       ?= gcc
PREFIX   ?= /usr/local
# A daemon and its admin commands, man section 8: sbin, as pgbouncer and redis-server.
SBINDIR  ?= $(PREFIX)/sbin
MANDIR   ?= $(PREFIX)/share/man
DOCDIR   ?= $(PREFIX)/share/doc/billing-worker
# Files an operator uses but the binary never reads: sql/roles.sql, the
# Prometheus alerting rules.
DATADIR  ?= $(PREFIX)/share/billing-worker
# systemd reads /usr/local/lib/systemd/system too, so units follow PREFIX.
UNITDIR  ?= $(PREFIX)/lib/systemd/system
# The binary's default config is /etc/billing-worker/billing-worker.conf
# (CONTRACT section 3), whatever the prefix.
SYSCONFDIR ?= /etc
DESTDIR  ?=
# Instrumented objects live in their own tree and never mix with plain ones.
ifeq ($(SANITIZE),1)
BUILD    ?= build-san
else
BUILD    ?= build
endif
PKGS     := libpq hiredis libcurl libconfig jansson libsystemd libmicrohttpd
PYTHON   ?= /usr/bin/python3

WARN     := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wwrite-strings -Wformat=2 -Werror \
            -Wno-format-truncation  # we truncate into fixed buffers on purpose
CFLAGS   ?= -O2 -g
# The version lives in one place, debian/changelog's top entry, which is
# also the version dpkg-buildpackage gives the package: the binary and the
# .deb cannot disagree.
VERSION  := $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog)
ifeq ($(VERSION),)
$(error could not read the version from debian/changelog)
endif
CPPFLAGS += -D_GNU_SOURCE -I. -I$(BUILD) -DBW_VERSION='"$(VERSION)"'
ALL_CFLAGS = -std=c17 $(WARN) $(CFLAGS) $(SAN_FLAGS) -MMD -MP \
             $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS     := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null || echo -lcmocka)

ifeq ($(SANITIZE),1)
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif

# Modules: common at the bottom; config, store, billing and locks each use common
# alone; worker (the loop and the claim step) uses them all.
COMMON_SRC  := common/log.c common/item.c common/metrics.c common/clock.c common/jitter.c \
               common/backoff.c common/redis.c
CONFIG_SRC  := config/config.c
STORE_SRC   := store/store.c store/exec.c store/deadline.c store/pq.c store/sqlbuf.c store/conninfo.c \
               store/claim.c store/complete.c store/reserve.c store/park.c store/migrate.c \
               store/report.c store/audit.c store/listen.c store/workers.c store/pause.c store/history.c \
               store/requeue.c \
               $(BUILD)/migrations.c
BILLING_SRC := billing/api.c billing/response.c billing/outcome.c billing/pace.c \
               billing/fleet.c
LOCKS_SRC   := locks/lock.c locks/redis_lock.c
WORKER_SRC  := worker/loop.c worker/claim.c worker/telemetry.c worker/notify.c worker/metrics_http.c \
               worker/preflight.c worker/probe.c \
               worker/secret.c worker/main.c

LIB_SRC := $(COMMON_SRC) $(CONFIG_SRC) $(STORE_SRC) $(BILLING_SRC) $(LOCKS_SRC) \
           $(filter-out worker/main.c,$(WORKER_SRC))
BIN_SRC := $(LIB_SRC) worker/main.c

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(patsubst $(BUILD)/%,%,$(1)))

BIN := $(BUILD)/billing-worker

UNIT_TESTS := test_config test_backoff test_response test_outcome test_item test_pace test_fleet \
              test_metrics test_log test_conninfo test_loop
UNIT_BINS  := $(addprefix $(BUILD)/tests/,$(UNIT_TESTS))

# What each unit test links besides itself: the module under test alone.
test_config_DEPS   := $(CONFIG_SRC)
test_backoff_DEPS  := common/backoff.c
test_response_DEPS := billing/response.c common/log.c
test_outcome_DEPS  := billing/outcome.c common/backoff.c billing/response.c common/item.c common/log.c
test_item_DEPS     := common/item.c
test_pace_DEPS     := billing/pace.c
# The fleet's budget against a fake Redis connection (defined in the test).
test_fleet_DEPS    := billing/fleet.c billing/pace.c common/clock.c common/log.c
test_metrics_DEPS  := common/metrics.c common/item.c
test_log_DEPS      := common/log.c
test_conninfo_DEPS := store/conninfo.c
# The loop against fakes of the store, locks, API client, telemetry and
# secrets (defined in the test itself); the pure modules are the real ones.
test_loop_DEPS     := worker/loop.c billing/outcome.c common/backoff.c billing/response.c \
                      common/item.c common/log.c common/clock.c common/jitter.c \
                      common/metrics.c config/config.c

# Extra link flags of a unit test: test_item makes strdup fail on demand.
test_item_LDFLAGS  := -Wl,--wrap=strdup

UNITS := billing-worker.service billing-worker@.service billing-worker-once.service \
         billing-worker-once.timer billing-worker-audit.service billing-worker-audit.timer
MANPAGES := man/billing-worker.8 man/billing-worker.conf.5
RULES    := prometheus/billing-worker.rules.yml
RULES_TESTS := tests/prometheus/billing-worker.rules.test.yml
# What an operator reads before deploying, installed beside the example.
DOCS     := README.md SECURITY.md RELIABILITY.md docs/configuration.md

.PHONY: all test unit integration demo deps clean install uninstall check-deps lint-man lint-rules deb bench bench-bloat \
        valgrind fuzz fuzz-build chaos chaos-ci

all: $(BIN)

$(BIN): $(call obj,$(BIN_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(LDFLAGS) -o $@ $^ $(LIBS)

# A new changelog entry changes BW_VERSION, which -MMD cannot see.
$(BUILD)/obj/%.o: %.c debian/changelog
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(CPPFLAGS) -c -o $@ $<

$(BUILD)/obj/migrations.o: $(BUILD)/migrations.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(CPPFLAGS) -c -o $@ $<

# Migrations are compiled into the binary so an installed worker needs no
# files beside it to create or upgrade the schema.
$(BUILD)/migrations.c: scripts/embed-sql.sh $(sort $(wildcard sql/[0-9]*.sql))
	@mkdir -p $(dir $@)
	sh scripts/embed-sql.sh $(sort $(wildcard sql/[0-9]*.sql)) > $@.tmp && mv $@.tmp $@

.SECONDEXPANSION:
$(BUILD)/tests/%: tests/unit/%.c $$(call obj,$$($$*_DEPS))
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(CPPFLAGS) $(LDFLAGS) $($*_LDFLAGS) -o $@ $(filter %.c %.o,$^) $(LIBS) $(CMOCKA_LIBS)

deps:
	sh scripts/install-deps.sh

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $(UNIT_SAN_ENV) $$t; done

# The harness runs whatever BW_BINARY names.  Under SANITIZE=1 every report
# goes to a file (a worker's stderr is its log, which tests read), and the
# run fails when any file appears: a leak or an error in a worker that the
# test itself did not notice still fails the build.
SAN_LOGS := $(abspath $(BUILD))/sanitizer-logs
ifeq ($(SANITIZE),1)
SAN_ENV := ASAN_OPTIONS=log_path=$(SAN_LOGS)/asan:detect_leaks=1:detect_stack_use_after_return=1:strict_string_checks=1:check_initialization_order=1 \
           UBSAN_OPTIONS=log_path=$(SAN_LOGS)/ubsan:print_stacktrace=1:halt_on_error=1 \
           LSAN_OPTIONS=suppressions=$(abspath tests/lsan.supp):print_suppressions=0
endif
UNIT_SAN_ENV := LSAN_OPTIONS=suppressions=$(abspath tests/lsan.supp):print_suppressions=0

integration: $(BIN)
	@rm -rf $(SAN_LOGS); mkdir -p $(SAN_LOGS)
	$(SAN_ENV) BW_BINARY=$(abspath $(BIN)) $(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)
	@if [ -n "$$(ls -A $(SAN_LOGS))" ]; then \
		echo "sanitizer reports from worker processes:"; cat $(SAN_LOGS)/*; exit 1; fi

# The worker under valgrind memcheck through a wrapper (tests/valgrind-worker.sh)
# that fails on any error or definite leak.  Only the tests that tolerate a
# worker 20-50 times slower: one worker at a time, no throughput races, no
# kills or pauses timed against leases (those run under SANITIZE=1 instead).
VALGRIND_TESTS ?= test_invoices.py test_redemptions.py test_hostile_api.py \
                  test_hostile_rows.py test_secrets.py test_tls.py
VALGRIND_K ?= not several_hosts and not killed and not eight_workers and not trickle
valgrind: $(BIN)
	@rm -rf $(BUILD)/valgrind-logs; mkdir -p $(BUILD)/valgrind-logs
	BW_REAL_BINARY=$(abspath $(BIN)) BW_VALGRIND_LOGS=$(abspath $(BUILD))/valgrind-logs \
	BW_BINARY=$(abspath tests/valgrind-worker.sh) \
	$(PYTHON) -m pytest -q $(addprefix tests/integration/,$(VALGRIND_TESTS)) -k "$(VALGRIND_K)" $(PYTEST_ARGS)
	sh tests/valgrind-check.sh $(BUILD)/valgrind-logs

# Kill, pause and restart everything at random, then check the books
# against the fake API's record (tests/chaos/chaos.py, RELIABILITY.md).
chaos: $(BIN)
	$(SAN_ENV) BW_BINARY=$(abspath $(BIN)) $(PYTHON) tests/chaos/chaos.py --profile full $(CHAOS_ARGS)

chaos-ci: $(BIN)
	$(SAN_ENV) BW_BINARY=$(abspath $(BIN)) $(PYTHON) tests/chaos/chaos.py --profile ci $(CHAOS_ARGS)

test: deps
	$(MAKE) unit
	$(MAKE) lint-man
	$(MAKE) lint-rules
	$(MAKE) integration
	$(MAKE) chaos-ci

# mandoc exits non-zero on any warning at this level or above.
lint-man:
	mandoc -T lint -W warning $(MANPAGES)

# promtool (Debian's prometheus package): the rules load, and each alert
# fires from its test's input series where it should, and only there.
lint-rules:
	promtool check rules $(RULES)
	promtool test rules $(RULES_TESTS)

# The units name /usr/sbin/billing-worker (the Debian package's path); other
# prefixes get their own path written in.  An existing config is never
# overwritten; the example always goes to the docs.
install: $(BIN)
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(MANDIR)/man8 \
	    $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(DOCDIR)/examples $(DESTDIR)$(DATADIR)/sql \
	    $(DESTDIR)$(DATADIR)/prometheus
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/billing-worker
	install -m 0755 $(BIN) $(DESTDIR)$(SBINDIR)/billing-worker
	for u in $(UNITS); do \
	    sed 's|/usr/sbin/billing-worker|$(SBINDIR)/billing-worker|g' systemd/$$u \
	        > $(DESTDIR)$(UNITDIR)/$$u.tmp && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.tmp && \
	    mv $(DESTDIR)$(UNITDIR)/$$u.tmp $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	install -m 0644 man/billing-worker.8 $(DESTDIR)$(MANDIR)/man8/billing-worker.8
	install -m 0644 man/billing-worker.conf.5 $(DESTDIR)$(MANDIR)/man5/billing-worker.conf.5
	install -m 0644 config/billing-worker.conf.example \
	    $(DESTDIR)$(DOCDIR)/examples/billing-worker.conf.example
	install -m 0644 $(DOCS) $(DESTDIR)$(DOCDIR)/
	install -m 0644 sql/roles.sql $(DESTDIR)$(DATADIR)/sql/roles.sql
	install -m 0644 $(RULES) $(DESTDIR)$(DATADIR)/prometheus/
	@conf=$(DESTDIR)$(SYSCONFDIR)/billing-worker/billing-worker.conf; \
	if [ -e "$$conf" ]; then \
	    echo "install: keeping the existing $$conf"; \
	else \
	    install -m 0640 config/billing-worker.conf.example "$$conf" && \
	    echo "install: $$conf (0640; edit database.conninfo and billing_api.base_url)"; \
	    if [ -z "$(DESTDIR)" ] && getent group billing-worker >/dev/null; then \
	        chgrp billing-worker "$$conf"; \
	    fi; \
	fi

# Also removes the binary an older install put in $(PREFIX)/bin.
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/billing-worker $(DESTDIR)$(PREFIX)/bin/billing-worker \
	    $(DESTDIR)$(MANDIR)/man8/billing-worker.8 \
	    $(DESTDIR)$(MANDIR)/man5/billing-worker.conf.5 \
	    $(DESTDIR)$(DOCDIR)/examples/billing-worker.conf.example \
	    $(addprefix $(DESTDIR)$(DOCDIR)/,$(notdir $(DOCS))) $(DESTDIR)$(DATADIR)/sql/roles.sql \
	    $(addprefix $(DESTDIR)$(DATADIR)/prometheus/,$(notdir $(RULES)))
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	@echo "uninstall: $(SYSCONFDIR)/billing-worker is left in place"

# Builds ../billing-worker_*.deb from a copy of the tree in build/deb, so the
# working tree stays clean (tracked files only), and fails on any lintian
# error or warning.  tests/integration/test_deb.py installs, upgrades,
# removes and purges what it builds.
deb:
	sh scripts/install-deps.sh dpkg-dev debhelper lintian fakeroot
	rm -rf $(BUILD)/deb && mkdir -p $(BUILD)/deb/src
	git ls-files -z | xargs -0 cp --parents -t $(BUILD)/deb/src
	cd $(BUILD)/deb/src && dpkg-buildpackage -us -uc -b
	lintian --info --fail-on error,warning $(BUILD)/deb/billing-worker_*.changes

demo: deps
	$(MAKE) all
	sh scripts/demo.sh

# Throughput, latency and cost, all measured in one run (see BENCHMARKS.md).
# PEER=graphile-worker runs that queue beside us in the same run (npm installs
# it outside the project, in BW_PEER_DIR) and prints the ratio measured.
PEER     ?=
# The 100 ms API of make bench: one epoll thread, answers due in arrival order.
$(BUILD)/delay_api: tests/bench/delay_api.c
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) $(CPPFLAGS) -o $@ $<

bench: all $(BUILD)/delay_api
	sh scripts/install-deps.sh nginx-light
	$(PYTHON) scripts/bench.py $(BENCH_ARGS) $(if $(PEER),--peer $(PEER))

# The poll and claim under a pinned xmin horizon (over 12 minutes; shorter
# with BLOAT_ARGS="--pin-seconds 120"; see BENCHMARKS.md).
bench-bloat: all
	sh scripts/install-deps.sh nginx-light
	$(PYTHON) scripts/bench_bloat.py $(BLOAT_ARGS)


# libFuzzer targets (clang), in their own tree: tests/fuzz/NAME.c drives one
# parser with the committed seeds in tests/fuzz/NAME/.  New inputs go to
# build-fuzz/corpus/NAME, crashes to build-fuzz/crashes/; each crash found
# becomes a unit test and a fix.
FUZZ_CC      ?= clang
FUZZ_BUILD   := build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined \
                -fno-omit-frame-pointer
FUZZ_TARGETS := config classify retry_after item header conninfo
fuzz_config_DEPS      := config/config.c
fuzz_classify_DEPS    := billing/response.c
fuzz_retry_after_DEPS := billing/response.c
fuzz_item_DEPS        := common/item.c
fuzz_header_DEPS      := billing/response.c
fuzz_conninfo_DEPS    := store/conninfo.c
FUZZ_BINS := $(addprefix $(FUZZ_BUILD)/fuzz_,$(FUZZ_TARGETS))

$(FUZZ_BUILD)/obj/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) -std=c17 $(filter-out -Wformat=2 -Wno-format-truncation,$(WARN)) $(FUZZ_FLAGS) -D_GNU_SOURCE -I. \
	    $(shell pkg-config --cflags $(PKGS) 2>/dev/null) -MMD -MP -c -o $@ $<

fuzz_obj = $(patsubst %.c,$(FUZZ_BUILD)/obj/%.o,$(1))
$(FUZZ_BUILD)/fuzz_%: $(FUZZ_BUILD)/obj/tests/fuzz/%.o $$(call fuzz_obj,$$(fuzz_$$*_DEPS))
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer -o $@ $^ $(LIBS)

fuzz-build: $(FUZZ_BINS)

fuzz: fuzz-build
	@set -e; for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_BUILD)/corpus/$$t $(FUZZ_BUILD)/crashes; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		$(UNIT_SAN_ENV) $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
		    -rss_limit_mb=2048 -print_final_stats=1 \
		    -artifact_prefix=$(FUZZ_BUILD)/crashes/$$t- \
		    $(FUZZ_BUILD)/corpus/$$t tests/fuzz/$$t 2>$(FUZZ_BUILD)/$$t.log || \
		    { tail -n 60 $(FUZZ_BUILD)/$$t.log; exit 1; }; \
		grep -E '^(stat::number_of_executed_units|stat::new_units_added|#[0-9]+.*DONE)' \
		    $(FUZZ_BUILD)/$$t.log || true; \
	done

clean:
	rm -rf $(BUILD) build-san $(FUZZ_BUILD)

-include $(shell find $(BUILD) $(FUZZ_BUILD) -name '*.d' 2>/dev/null)

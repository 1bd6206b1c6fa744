# billing-worker: a plain Makefile with explicit sources.
#
#   make                 build build/billing-worker
#   make test            unit tests (cmocka) + integration tests (real PostgreSQL,
#                        redis-server and the fake billing API, started in a temp dir)
#   make demo            install what is missing, build, run workers on sample data
#   make unit            unit tests only
#   make integration     integration tests only (PYTEST_ARGS="-k name" to pick)
#   make chaos           the full chaos run: >= 5000 items, every fault kind, a one-minute
#                        API outage (about 10 minutes; CHAOS_ARGS="--seed N" to replay)
#   make chaos-ci        the short chaos run that `make test` includes (about 2 minutes)

CC       ?= gcc
PREFIX   ?= /usr/local
BUILD    ?= build
PKGS     := libpq hiredis libcurl libconfig jansson
PYTHON   ?= /usr/bin/python3

WARN     := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes \
            -Wwrite-strings -Wformat=2 -Werror \
            -Wno-format-truncation  # we truncate into fixed buffers on purpose
CFLAGS   ?= -O2 -g
CPPFLAGS += -D_GNU_SOURCE -I. -I$(BUILD)
ALL_CFLAGS = -std=c17 $(WARN) $(CFLAGS) $(SAN_FLAGS) -MMD -MP \
             $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LIBS     := $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm
CMOCKA_LIBS := $(shell pkg-config --libs cmocka 2>/dev/null || echo -lcmocka)

ifeq ($(SANITIZE),1)
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
endif

# Modules, bottom up: common -> store -> billing -> locks -> worker.
COMMON_SRC  := common/log.c common/item.c
CONFIG_SRC  := config/config.c
STORE_SRC   := store/store.c store/deadline.c store/park.c store/migrate.c store/report.c store/audit.c \
               $(BUILD)/migrations.c
BILLING_SRC := billing/api.c billing/response.c billing/backoff.c billing/outcome.c
LOCKS_SRC   := locks/lock.c locks/redis_lock.c
WORKER_SRC  := worker/loop.c worker/main.c

LIB_SRC := $(COMMON_SRC) $(CONFIG_SRC) $(STORE_SRC) $(BILLING_SRC) $(LOCKS_SRC) worker/loop.c
BIN_SRC := $(LIB_SRC) worker/main.c

obj = $(patsubst %.c,$(BUILD)/obj/%.o,$(patsubst $(BUILD)/%,%,$(1)))

BIN := $(BUILD)/billing-worker

UNIT_TESTS := test_config test_backoff test_response test_outcome test_item
UNIT_BINS  := $(addprefix $(BUILD)/tests/,$(UNIT_TESTS))

# What each unit test links besides itself: the module under test alone.
test_config_DEPS   := $(CONFIG_SRC)
test_backoff_DEPS  := billing/backoff.c
test_response_DEPS := billing/response.c common/log.c
test_outcome_DEPS  := billing/outcome.c billing/backoff.c billing/response.c common/item.c common/log.c
test_item_DEPS     := common/item.c

.PHONY: all test unit integration chaos chaos-ci demo deps clean install check-deps

all: $(BIN)

$(BIN): $(call obj,$(BIN_SRC))
	@mkdir -p $(dir $@)
	$(CC) $(ALL_CFLAGS) -o $@ $^ $(LIBS)

$(BUILD)/obj/%.o: %.c
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
	$(CC) $(ALL_CFLAGS) $(CPPFLAGS) -o $@ $(filter %.c %.o,$^) $(LIBS) $(CMOCKA_LIBS)

deps:
	sh scripts/install-deps.sh

unit: $(UNIT_BINS)
	@set -e; for t in $(UNIT_BINS); do echo "== $$t"; $$t; done

integration: $(BIN)
	$(PYTHON) -m pytest -q tests/integration $(PYTEST_ARGS)

# Kill, pause and restart everything at random, then check the books
# against the fake API's record (tests/chaos/chaos.py, RELIABILITY.md).
chaos: $(BIN)
	$(PYTHON) tests/chaos/chaos.py --profile full $(CHAOS_ARGS)

chaos-ci: $(BIN)
	$(PYTHON) tests/chaos/chaos.py --profile ci $(CHAOS_ARGS)

test: deps
	$(MAKE) unit
	$(MAKE) integration
	$(MAKE) chaos-ci

demo: deps
	$(MAKE) all
	sh scripts/demo.sh

clean:
	rm -rf $(BUILD)

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)

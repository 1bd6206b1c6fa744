"""A poll reads a few pages, whatever the planner's statistics say.

The due query finds first attempts by walking the primary key from the
worker's cursor (store/claim.c, sql/010_due_cursor.sql).  Written as a
plain range with the first-attempt test beside it, the planner was free to
read the whole pending range instead (through the pending-only due index,
or a bitmap of the primary key) and sort it, whenever its statistics made
the test look selective: on a table mostly finished, where attempts = 0 is
rare, or on one never analyzed.  Then every poll cost a read of every
pending row: 12.5 ms at 20 000 pending, 4 ms a poll and most of the
database's time in make bench.

The same held for skip-locked mode's claim, which walks the same range.
Measured on the worker's own prepared statements, with pg_stat_statements
in a cluster of this test's own: the shared buffers each touches
per call, with 40 000 pending behind 300 000 finished.
"""

import time

import pytest

from harness import PgCluster, Worker, create_database, drop_database, make_config, migrate, wait_for

FINISHED = 300000
PENDING = 40000

# store/claim.c: the due query (sql_due) and both claims (by ids in redis
# mode, sql_claim_skip in skip-locked mode).
STATEMENTS = {"due query": "%SELECT kind, id, note FROM (%",
              "claim": "UPDATE invoices AS t SET fence%"}


@pytest.fixture(scope="module")
def stats_cluster():
    cluster = PgCluster(settings={"shared_preload_libraries": "'pg_stat_statements'",
                                  "pg_stat_statements.track": "all"})
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def stats_db(stats_cluster):
    """A database of its own per test; pg_stat_statements is reset by each test
    before it measures, and its patterns match this database's statements only
    while no other test runs in the cluster."""
    admin = stats_cluster.connect("postgres")
    database = create_database(stats_cluster, admin)
    try:
        yield database
    finally:
        drop_database(admin, database)
        admin.close()


def statement_stats(db, pattern):
    """calls, rows and shared buffers of the statements matching PATTERN."""
    return db.query("SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(rows), 0)::bigint, "
                    "coalesce(sum(shared_blks_hit + shared_blks_read), 0)::bigint "
                    "FROM pg_stat_statements WHERE query LIKE %s", (pattern,))[0]


def buffers(db, pattern):
    calls, _, blocks = statement_stats(db, pattern)
    return calls, blocks


def load_finished(db):
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency, status, charge_id, "
               " attempts, fence, finished_at) "
               "SELECT 'cus_' || i, 1000, 'usd', 'paid', 'ch_' || i, 1, 1, now() "
               "FROM generate_series(1, %s) i", (FINISHED,))


def load_pending(db, n, prefix="cus_p"):
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
               "SELECT %s || i, 1000, 'usd' FROM generate_series(1, %s) i", (prefix, n))


def load(db):
    load_finished(db)
    load_pending(db, PENDING)


def set_statistics(db, analyzed):
    """The planner's statistics of invoices: fresh, or none at all."""
    if analyzed:
        db.execute("ANALYZE invoices")
    else:
        # As after a restore or a bulk load before autovacuum came by.
        db.execute("DELETE FROM pg_statistic WHERE starelid = 'invoices'::regclass")
        db.execute("UPDATE pg_class SET reltuples = -1, relpages = 0 "
                   "WHERE oid = 'invoices'::regclass")


@pytest.mark.parametrize("mode", ["redis", "skip-locked"])
@pytest.mark.parametrize("analyzed", [True, False], ids=["finished-history-stats", "no-stats"])
def test_a_poll_reads_a_few_pages_behind_a_finished_history(tmp_path, stats_db, redis, fake_api,
                                                           binary, analyzed, mode):
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": mode})
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    load(db)
    set_statistics(db, analyzed)
    # A slow API keeps the backlog there while the worker polls and claims.
    fake_api.faults([], latency_ms=200)
    db.execute("SELECT pg_stat_statements_reset()")
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'")
             >= FINISHED + 600, 60, message=w.log)
    assert w.stop() == 0
    # From the cursor on: the rows in flight, then one claim's worth of due
    # ones, about one buffer each (50-110 a call here); the cursor's first
    # lookup reads the pending rows once.  Reading the whole pending range
    # every time, as the planner chose without statistics before, was 1 650
    # a due query and 870 a skip-locked claim.
    for what, pattern in STATEMENTS.items():
        calls, blocks = buffers(db, pattern)
        assert calls >= 10, (what, calls, w.log())
        print(f"{mode}: {what}: {calls} calls, {blocks / calls:.1f} buffers a call")
        assert blocks / calls < 400, (what, calls, blocks)


def test_the_cursors_first_lookup_reads_the_pending_rows_not_the_history(tmp_path, stats_db, redis,
                                                                         fake_api, binary):
    """A starting worker looks its cursor up from scratch: the lowest first
    attempt.  As min(id) over the table, the planner walked the primary key
    from id 1 to the first match, past the whole finished history (20 916
    buffers, 152 ms behind a million finished rows; the first poll of every
    worker at start and every 5 minutes).  It reads the pending rows instead."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    load(db)
    db.execute("ANALYZE invoices")
    db.execute("SELECT pg_stat_statements_reset()")
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") > FINISHED,
             30, message=w.log)
    assert w.stop() == 0
    calls, blocks = buffers(db, STATEMENTS["due query"])
    print(f"first polls: {calls} calls, {blocks} buffers")
    # A poll from the cursor reads up to about 150 buffers; what is left is
    # the first lookup's: about 700 for the pending rows, over 6 000 for the
    # finished ones (2 761 and 9 675 in all, 16 and 24 calls, when written).
    assert calls >= 1 and blocks - 150 * calls < FINISHED // 100, (calls, blocks)


def test_a_poll_does_not_walk_the_rows_in_flight(tmp_path, stats_db, redis, fake_api, binary):
    """Rows claimed and leased elsewhere stay in the first set (a lease that
    runs out must be found again), so the cursor's front stops at the oldest
    of them.  Each poll walked from there past every row in flight in the
    fleet, and the finished ones among them, to the free ones: about 2 000
    rows, 2.8 ms a poll, with four processes in make bench.  An ordinary
    poll looks for free rows from where the last one found them; only a
    sweep (every 2 s) walks from the front.  Here 3 000 rows are leased by
    another worker for 10 minutes in front of the free ones."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency, fence, locked_by, "
               " lease_until, next_attempt_at) "
               "SELECT 'cus_l' || i, 1000, 'usd', 1, 'other-worker', now() + interval '10 min', "
               " now() + interval '10 min' FROM generate_series(1, 3000) i")
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
               "SELECT 'cus_p' || i, 1000, 'usd' FROM generate_series(1, 20000) i")
    db.execute("ANALYZE invoices")
    fake_api.faults([], latency_ms=200)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") >= 100,
             30, message=w.log)
    db.execute("SELECT pg_stat_statements_reset()")
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") >= 1500,
             60, message=w.log)
    assert w.stop() == 0
    # None of the leased rows was touched.
    assert db.scalar("SELECT count(*) FROM invoices WHERE locked_by = 'other-worker' "
                     "AND fence = 1 AND status = 'pending'") == 3000
    calls, blocks = buffers(db, STATEMENTS["due query"])
    print(f"rows in flight in front: {calls} calls, {blocks / calls:.1f} buffers a call")
    # Walking the 3 000 leased rows (one heap page per 40 or so, each
    # tuple checked) was 278 buffers a poll; from the free ones on it is
    # about 40, a sweep's share included.
    assert calls >= 10 and blocks / calls < 150, (calls, blocks)


def test_a_worker_alone_offers_the_locks_one_claims_worth(tmp_path, stats_db, redis, fake_api,
                                                           binary):
    """In redis mode the due query offers the locks a window of candidates
    several times a claim, shuffled, so that workers polling together take
    different items.  A worker alone offered 4 x and locked a random
    quarter, so the oldest items stayed behind and the cursor's front
    lagged far behind the newest: 256 rows a due query where 64 were
    wanted (1.77 against 0.68 ms a poll, one process, make bench's e2e,
    side by side).  The window now follows the fleet's registry: alone,
    one claim's worth (the first claim, before a grant has counted the
    fleet, still offers 4 x)."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.concurrency": 64,
                                                        "worker.batch_size": 64})
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
               "SELECT 'cus_p' || i, 1000, 'usd' FROM generate_series(1, 5000) i")
    db.execute("ANALYZE invoices")
    fake_api.faults([], latency_ms=100)
    db.execute("SELECT pg_stat_statements_reset()")
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") >= 1500,
             60, message=w.log)
    assert w.stop() == 0
    def per_call(pattern):
        calls, rows = db.query("SELECT coalesce(sum(calls), 0)::bigint, "
                               "coalesce(sum(rows), 0)::bigint FROM pg_stat_statements "
                               "WHERE query LIKE %s", (pattern,))[0]
        return calls, rows / calls if calls else 0.0

    due_calls, due_rows = per_call(STATEMENTS["due query"])
    claim_calls, claim_rows = per_call(STATEMENTS["claim"])
    print(f"a worker alone: {due_calls} due queries of {due_rows:.1f} rows, "
          f"{claim_calls} claims of {claim_rows:.1f}")
    # A claim's worth of candidates and the two fronts a poll; at 4 x the
    # due query returned about four times what each claim took.
    assert due_calls >= 10 and claim_calls >= 10, (due_calls, claim_calls)
    assert due_rows < 2 * claim_rows + 2, (due_rows, claim_rows)


def index_reads(db):
    """Index tuples read so far from each index of invoices that holds only
    pending rows (the pending-age and unleased indexes, and the retry index)."""
    return dict(db.query("SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes "
                         "WHERE relname = 'invoices' AND indexrelname IN "
                         "('invoices_pending_age', 'invoices_unleased', 'invoices_retry_due')"))


@pytest.mark.parametrize("mode", ["redis", "skip-locked"])
def test_statements_by_id_go_by_primary_key_under_stale_statistics(
        tmp_path, stats_db, redis, fake_api, binary, mode):
    """A claim by ids, a renewal and a completion name their rows by id, so
    the primary key is the only index they need.  Each tested "status =
    'pending'" beside its ids, which matches every pending-only index's
    predicate, and with statistics from before a bulk load (42 pending rows
    counted, 40 000 there) the planner read every pending row through
    invoices_pending_age and hashed them, in most calls: one completion of
    64 rows was 690 buffers and 25.8 ms against 256 and 0.46 ms by primary
    key (EXPLAIN ANALYZE in a scratch database; BENCHMARKS.md).  With a
    million pending it reads a million."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api, **{"locks.mode": mode,
                                                        "locks.ttl_ms": 5000,
                                                        "locks.renew_interval_ms": 100})
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    db.execute("ALTER TABLE invoices SET (autovacuum_enabled = false)")
    load_finished(db)
    load_pending(db, 42, "cus_s")
    db.execute("ANALYZE invoices")
    load_pending(db, PENDING)
    # Each call outlives a renewal or two, so leases in flight are renewed.
    fake_api.faults([], latency_ms=300)
    before = index_reads(db)
    db.execute("SELECT pg_stat_statements_reset()")
    w = Worker(cfg, "w").start()
    # Counted in the history, so that the waiting reads none of the indexes
    # measured (a count by status may go through them too).
    wait_for(lambda: db.scalar("SELECT count(*) FROM attempts") >= 400, 60, message=w.log)
    assert w.stop() == 0
    after = index_reads(db)
    read = sum(after[name] - before[name] for name in after)
    calls, per_row = {}, {}
    for what, pattern in {"completion": "WITH upd AS (UPDATE invoices AS t%",
                          "renewal": "UPDATE invoices AS t SET lease_until%",
                          "claim": STATEMENTS["claim"]}.items():
        calls[what], rows, blocks = statement_stats(db, pattern)
        per_row[what] = blocks / max(rows, 1)
        print(f"{mode}: {what}: {calls[what]} calls, {per_row[what]:.1f} buffers a row")
    print(f"{mode}: pending-only index tuples read: {read}")
    assert min(calls.values()) >= 5, (calls, w.log())
    # By primary key a completion is 19 buffers a row and a renewal 15;
    # reading the pending rows they were 110-142 and 34-37, in either mode.
    assert per_row["completion"] < 60 and per_row["renewal"] < 25, per_row
    # What is left reads the pending rows once: the due query's cursor,
    # looked up from scratch at start (40 042 tuples).  The three
    # statements by id read them in most calls: 8.1 million index tuples,
    # 200 times the pending rows, and 98 buffers a row for the claim
    # against 20 by primary key.  Skip-locked mode's claim looks for
    # retries too, through the retry index of version 11; through that of
    # version 10, whose predicate every pending-only index's matches, its
    # custom plans read every pending row through invoices_pending_age
    # instead (160 264-200 444 tuples run alone, 2.2 million in one make
    # test).
    assert read < 2 * PENDING, read


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "no-stats"])
def test_the_due_query_is_planned_once_whatever_the_statistics(tmp_path, stats_db, redis, fake_api,
                                                               binary, analyzed):
    """PostgreSQL plans a prepared statement for its parameters' values
    (a custom plan) as long as those plans look cheaper than one plan for
    any values.  With the statistics of a table that has rows, the due
    query's always did, so it was planned again at every poll: 1.3 ms of
    planning against 0.25 ms of running, on the path every claim waits
    on (make bench, after a row that analyzed a loaded table).  Without
    statistics it was planned once after five runs.  It is written to be
    served by the same indexes whatever the values (store/claim.c), and
    the daemon's session now plans it once (store/store.c, session_setup),
    either way."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api)
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    # For the worker's sessions in this database only: the other tests of
    # this cluster count buffers, and planning's would be counted with them.
    db.execute(f'ALTER DATABASE "{db.name}" SET pg_stat_statements.track_planning = on')
    load(db)
    set_statistics(db, analyzed)
    fake_api.faults([], latency_ms=100)
    db.execute("SELECT pg_stat_statements_reset()")
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                               "WHERE query LIKE %s", (STATEMENTS["due query"],)) >= 40,
             60, message=w.log)
    assert w.stop() == 0
    calls, plans, plan_ms = db.query("SELECT sum(calls)::bigint, sum(plans)::bigint, "
                                     "sum(total_plan_time) FROM pg_stat_statements "
                                     "WHERE query LIKE %s", (STATEMENTS["due query"],))[0]
    print(f"due query: {calls} calls, {plans} plans, {plan_ms:.1f} ms planning")
    # Once per connection (the worker has one for its statements).  Before,
    # analyzed: 43 plans for 42 polls here, 70.8 ms of planning.
    assert calls >= 40 and plans <= 2, (calls, plans, w.log())


def test_an_idle_poll_is_one_statement(tmp_path, stats_db, redis, fake_api, binary):
    """An idle worker's cost is one due query per poll and a registry
    heartbeat every 10 s (≤ 1 query/s in make bench).  Planning the due
    query once must not cost a statement of its own at every poll, as a
    set_config before each due query did (1.90 statements/s idle)."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.poll_interval_ms": 200})
    migrate(cfg)
    db.execute("CREATE EXTENSION pg_stat_statements")
    w = Worker(cfg, "w").start()
    # Past its start (session settings, prepares, the first lookups).
    wait_for(lambda: db.scalar("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                               "WHERE query LIKE %s", (STATEMENTS["due query"],)) >= 3,
             30, message=w.log)
    db.execute("SELECT pg_stat_statements_reset()")
    time.sleep(4)
    rows = db.query("SELECT calls, left(query, 60) FROM pg_stat_statements s "
                    "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() "
                    "AND query NOT LIKE '%%pg_stat_statements%%'")
    assert w.stop() == 0
    polls = sum(c for c, q in rows if q.startswith("WITH c AS"))
    others = [(c, q) for c, q in rows if not q.startswith("WITH c AS")]
    print(f"idle 4 s: {polls} polls, others {others}")
    # About 20 polls at 200 ms.  Besides them only what runs once or every
    # 10 s: the heartbeat, the LISTEN session's start (its settings, the
    # schema check, LISTEN).  The set_config before each due query was 20.
    assert polls >= 10, (rows, w.log())
    assert max((c for c, _ in others), default=0) <= 2, others


def leaf_entries(db):
    """Entries on the leaf pages of each index of invoices, live or dead
    (pageinspect): what the writes so far put there."""
    return dict(db.query(
        "SELECT i.indexrelid::regclass::text, (SELECT coalesce(sum(s.live_items + s.dead_items), 0) "
        "  FROM generate_series(1, pg_relation_size(i.indexrelid) / "
        "       current_setting('block_size')::int - 1) AS b, "
        "       bt_page_stats(i.indexrelid::regclass::text, b::int) AS s WHERE s.type = 'l') "
        "FROM pg_index i WHERE i.indrelid = 'invoices'::regclass"))


def test_a_claim_writes_an_entry_only_where_it_must(tmp_path, stats_db, redis, fake_api, binary):
    """A claim moves next_attempt_at, so it is never a HOT update: its row
    version gets an entry in every index whose predicate it satisfies.  The
    due index of schema 1 held every pending row version by time, leased
    ones too, and since schema 10 only the backlog gauge read it: one
    B-tree insertion in three of every claim, for a gauge.  Its successor
    (schema 12) leaves leased rows out, so a claim writes the primary key
    and the pending rows' created_at index, and nothing else.  Here 50 rows
    are claimed and held in flight by a slow API, with vacuum off."""
    db = stats_db
    cfg = make_config(tmp_path, db, redis, fake_api, **{"worker.concurrency": 50,
                                                        "worker.batch_size": 50})
    migrate(cfg)
    db.execute("CREATE EXTENSION pageinspect")
    db.execute("ALTER TABLE invoices SET (autovacuum_enabled = false)")
    db.execute("INSERT INTO invoices (customer_id, amount_cents, currency) "
               "SELECT 'cus_' || i, 1000, 'usd' FROM generate_series(1, 50) i")
    before = leaf_entries(db)
    fake_api.faults([], latency_ms=5000)
    w = Worker(cfg, "w").start()
    wait_for(lambda: db.scalar("SELECT count(*) FROM invoices WHERE lease_until IS NOT NULL") == 50,
             30, message=w.log)
    after = leaf_entries(db)
    w.kill()
    grew = {name: after[name] - before.get(name, 0) for name in after
            if after[name] != before.get(name, 0)}
    print(f"entries written by 50 claims: {grew}")
    assert grew == {"invoices_pkey": 50, "invoices_pending_age": 50}, grew
    # The gauge's own index holds the rows as inserted, the claims left out.
    assert before["invoices_unleased"] == 50 and after["invoices_unleased"] == 50

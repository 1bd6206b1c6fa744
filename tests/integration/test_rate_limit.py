"""billing_api.max_requests_per_second is one budget for the whole fleet."""

import time

from harness import Worker, insert_invoices, make_config, migrate, wait_for


def pending(db):
    return db.scalar("SELECT count(*) FROM invoices WHERE status = 'pending'")


def per_second(fake_api):
    """Requests per wall-clock second, oldest first."""
    counts = fake_api.state()["per_second"]
    return [counts[k] for k in sorted(counts, key=int)]


def start_fleet(tmp_path, db, redis, fake_api, modes, **overrides):
    cfgs = [make_config(tmp_path, db, redis, fake_api, **{"locks.mode": m, **overrides})
            for m in modes]
    migrate(cfgs[0])
    return [Worker(c, f"w{i}-{m}").start() for i, (c, m) in enumerate(zip(cfgs, modes))]


def test_three_workers_share_one_budget(tmp_path, db, redis, fake_api, binary):
    workers = start_fleet(tmp_path, db, redis, fake_api, ["redis", "redis", "auto"],
                          **{"billing_api.max_requests_per_second": 40})
    for w in workers:
        wait_for(lambda: "connected to redis" in w.log(), 10, message=w.log)
    insert_invoices(db, 200)
    wait_for(lambda: pending(db) == 0, 60, interval=0.2)
    for w in workers:
        assert w.stop() == 0
    counts = per_second(fake_api)
    # 40/s plus the 2 calls the budget may bank; whole seconds in the middle
    # run near the limit (the ends are partial seconds).
    assert max(counts) <= 44, counts
    assert len(counts) >= 5, counts
    assert max(counts[1:-1]) >= 30, counts
    # The budget was shared, not one worker's alone.
    assert sum(1 for w in workers if ': paid, id' in w.log()) >= 2


def test_a_429_pauses_every_worker(tmp_path, db, redis, fake_api, binary):
    fake_api.faults([{"match": {}, "action": "status", "status": 429, "retry_after": 2,
                      "times": 1}], latency_ms=20)
    workers = start_fleet(tmp_path, db, redis, fake_api, ["redis", "redis", "redis"],
                          **{"worker.concurrency": 2})
    for w in workers:
        wait_for(lambda: "connected to redis" in w.log(), 10, message=w.log)
    insert_invoices(db, 150)
    wait_for(lambda: pending(db) == 0, 60, interval=0.2)
    for w in workers:
        assert w.stop() == 0
    # The 429 answered the first request; its 2 s pause holds every worker,
    # not just the one told.  Calls granted before the pause was known may
    # still start in the first few hundred milliseconds (they were claimed
    # already), but none in the rest of the pause.  By arrival time, not by
    # wall-clock second: a first burst that straddles a second's boundary
    # is not a violation.
    arrivals = fake_api.arrivals()
    first = arrivals[0]
    during = [round(t - first, 3) for t in arrivals if first + 0.4 <= t < first + 1.9]
    assert during == [], (during, arrivals[:12])
    assert sum(1 for w in workers if "answered 429" in w.log()) == 1
    assert db.scalar("SELECT count(*) FROM invoices WHERE status = 'paid'") == 150


def test_even_share_while_redis_is_down(tmp_path, db, redis_server, redis, fake_api, binary):
    workers = start_fleet(tmp_path, db, redis, fake_api, ["auto", "auto"],
                          **{"billing_api.max_requests_per_second": 40})
    # A first round through Redis tells each worker there are two of them.
    insert_invoices(db, 20)
    wait_for(lambda: pending(db) == 0, 30, interval=0.1)
    fake_api.reset()
    redis_server.stop()
    try:
        insert_invoices(db, 120)
        wait_for(lambda: pending(db) == 0, 60, interval=0.2)
    finally:
        redis_server.start()
    for w in workers:
        assert w.stop() == 0
        assert "SKIP LOCKED until it returns" in w.log()
    counts = per_second(fake_api)
    # Each takes 20/s locally: the fleet stays near 40/s without Redis.
    assert max(counts) <= 46, counts
    assert len(counts) >= 3, counts


def test_the_budget_pays_only_for_items_locked(tmp_path, db, redis, fake_api, binary):
    """Covers the claim step's give-back (worker/claim.c, billing/fleet.c): the fleet's
    budget grants a claim its calls before the items are locked, and a claim that finds
    its items held by another worker puts the grant straight back. Claims that start no
    call must not drain the bucket, or the fleet would bill below its rate whenever
    workers contend."""
    cfg = make_config(tmp_path, db, redis, fake_api, **{
        "locks.mode": "redis", "billing_api.max_requests_per_second": 1})
    migrate(cfg)
    ids = insert_invoices(db, 3)
    for i in ids:
        redis.command("SET", f"billing-worker:lock:invoice:{i}", "another-worker:0", "PX", 60_000)
    w = Worker(cfg, "contended").start()
    # Every grant registers the worker and writes the bucket.
    wait_for(lambda: redis.command("HGET", "billing-worker:rate:bucket", "tokens") is not None
             and redis.command("ZCARD", "billing-worker:workers") == 1, 10, message=w.log_tail)
    samples = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        samples.append(float(redis.command("HGET", "billing-worker:rate:bucket", "tokens")))
        time.sleep(0.03)
    # A claim spends the one banked call for a moment only, between its grant and the
    # give-back; without the give-back the bucket would sit near empty (1 call a second).
    assert sum(1 for s in samples if s >= 0.99) >= 0.8 * len(samples), samples
    assert fake_api.state()["total_requests"] == 0
    for i in ids:
        redis.command("DEL", f"billing-worker:lock:invoice:{i}")
    wait_for(lambda: pending(db) == 0, 15, interval=0.2, message=w.log_tail)
    assert w.stop() == 0
    assert fake_api.state()["total_requests"] == 3


def test_a_worker_that_stops_leaves_the_registry(tmp_path, db, redis, fake_api, binary):
    """The registry counts the workers that asked for a grant in the last
    10 s: each one's share of the rate is the rate over that count, and its
    candidate window as many times its claim.  A worker that stopped
    cleanly counted for 10 s more, so after a restart the survivors ran on
    a smaller share and a wider window than the fleet had.  It leaves at
    its stop now."""
    fake_api.faults([], latency_ms=50)      # both claim while the backlog lasts
    workers = start_fleet(tmp_path, db, redis, fake_api, ["redis", "redis"],
                          **{"worker.concurrency": 4})
    insert_invoices(db, 200)
    wait_for(lambda: redis.command("ZCARD", "billing-worker:workers") == 2, 10,
             message=workers[0].log_tail)
    wait_for(lambda: pending(db) == 0, 30, interval=0.2)
    assert workers[0].stop() == 0
    members = redis.command("ZRANGE", "billing-worker:workers", 0, -1)
    assert len(members) == 1, members
    assert workers[1].stop() == 0
    assert redis.command("ZCARD", "billing-worker:workers") == 0

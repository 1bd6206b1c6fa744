#ifndef BW_STORE_H
#define BW_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "common/completion.h"
#include "common/item.h"

/*
 * The PostgreSQL side of billing-worker: claims, lease renewals, fenced
 * completions, the schema and the read-only reports.  One connection per
 * handle, prepared statements, every statement a transaction of its own
 * (so no transaction is ever open while an API call is in flight).
 *
 * Every function returns 0 on success or -1 on failure with the reason in
 * store_errmsg().  After a failure store_connected() tells whether the
 * connection itself broke (reconnect and try again later) or the statement
 * failed on a live connection.  Serialization failures and deadlocks are
 * retried inside, a bounded number of times, and counted.
 */
typedef struct store store;

/* Creates a handle; nothing is connected yet.  CONNINFO is copied. */
int store_new(const char *conninfo, const char *worker_id, store **ret)
	__attribute__((warn_unused_result));
void store_free(store *st);

/*
 * The longest a statement may take (default 30 s): sent as
 * statement_timeout at the next connect, and enforced by the client too,
 * one second later, so a frozen or cut-off server cannot stall the caller.
 */
void store_set_query_timeout(store *st, int timeout_ms);

/*
 * Whether CONNINFO leads to a transaction pooler (database.pooling =
 * "transaction", pgbouncer's pool_mode = transaction), which may serve each
 * transaction from another server connection.  Then no statement is
 * prepared by name (each is sent unnamed, with its SQL), and the session
 * settings of store_connect() are set inside every transaction instead of
 * once per session: every statement outside a transaction of the caller's
 * becomes BEGIN with the settings, the statement, COMMIT.  Default off:
 * prepared statements and one SET per session.  Applies from the next
 * connect.
 */
void store_set_pooling(store *st, bool transaction);

/*
 * Whether completions also write the attempts history (history.enabled,
 * default on).  Applies to the next completion.
 */
void store_set_history(store *st, bool on);

/*
 * Deletes the history of finished items older than DAYS, at most LIMIT
 * rows (one short statement: it never holds a long lock); *RET_N says how
 * many went, so a caller can tell whether more are left.
 */
int store_prune_history(store *st, int days, int limit, int *ret_n)
	__attribute__((warn_unused_result));

/*
 * Prints KIND's item ID, its ledger rows (redemptions) and its history to
 * OUT, as text or one JSON document.  *RET_FOUND is false when there is no
 * such item.
 */
int store_show(store *st, enum item_kind kind, int64_t id, bool json, FILE *out,
    bool *ret_found) __attribute__((warn_unused_result));

/* (Re)connects and prepares the statements.  Logs the target without its password. */
int store_connect(store *st) __attribute__((warn_unused_result));
bool store_connected(const store *st);
/*
 * The same connect, for the daemon's loop, without blocking: starts it
 * (any old connection is closed), then the loop polls store_connect_fd()
 * for store_connect_events() and calls store_connect_drive() until it
 * returns 1 (connected, the session set up as by store_connect(); that
 * last step is statements with the client deadline) or -1 (failed,
 * store_errmsg() says why).  0: still connecting.  store_connecting() is
 * true in between, and store_connect_deadline() says by when the drive
 * must run even if nothing arrives.
 */
int store_connect_start(store *st) __attribute__((warn_unused_result));
bool store_connecting(const store *st);
int store_connect_fd(const store *st);
short store_connect_events(const store *st);
int64_t store_connect_deadline(const store *st);
int store_connect_drive(store *st, short revents, int64_t now)
	__attribute__((warn_unused_result));
/*
 * The daemon's way (default off, for the commands): the connection stays
 * in libpq's pipeline and non-blocking mode once up, and every statement
 * is a job on it (store/pq.c): the loop's own statements asynchronous,
 * the rare ones waited for within their deadline.  store_connect() then
 * opens it that way too, waiting.  Set before the first connect.
 */
void store_set_pipeline(store *st, bool on);
const char *store_errmsg(const store *st);
/*
 * Writes what a connected handle is connected to into BUF: host, port and
 * database, never the user or password.  "" when not connected.
 */
void store_target(const store *st, char *buf, size_t len);
/* Deadlocks and serialization failures retried so far. */
uint64_t store_retries(const store *st);

/*
 * Up to LIMIT due items of either kind, oldest first, into KINDS and IDS
 * (capacity LIMIT each).  Takes no lock: in redis mode the caller locks
 * them in Redis and then claims them with store_claim(); in skip-locked
 * mode it tells which kinds are worth a claim at all.
 */
/* (The loop sends it and takes its answer: store_due_send(), below.) */

/*
 * Whether KIND was paused fleet-wide (billing-worker pause) at the last
 * due query: "" when not, else the reason, who paused it and since when.
 * The due query reads the pauses itself, so this costs nothing.  The
 * string lives until the next due query.
 */
const char *store_pause_note(const store *st, enum item_kind kind);

/*
 * Pauses (PAUSE true, with REASON and BY, e.g. "alice@host") or resumes the
 * kinds set in KINDS (indexed by enum item_kind) for the whole fleet.  A
 * pause of a kind already paused keeps its start and takes the new reason.
 * Resuming notifies the workers, which poll at once.  *RET_CHANGED: how
 * many kinds changed state.
 */
int store_set_pause(store *st, const bool kinds[ITEM_KIND_COUNT], bool pause,
    const char *reason, const char *by, int *ret_changed) __attribute__((warn_unused_result));

/*
 * Which failed items of KIND billing-worker requeue puts back: those of IDS
 * (NIDS of them), or, with IDS NULL, every failed one that failed at or
 * after SINCE (a timestamp as PostgreSQL reads it; NULL for any time) and
 * whose last_error matches ERROR_PATTERN (a POSIX regular expression, as
 * PostgreSQL's ~; NULL for any).  The strings are borrowed for the call.
 */
struct requeue_selection {
	enum item_kind kind;
	const int64_t *ids;
	size_t nids;
	const char *since;
	const char *error_pattern;
};

/*
 * Puts the selected failed items back for a new charge attempt, in one
 * transaction: each becomes pending and due now in its next generation
 * (so under a new idempotency key), with its counters and results reset as
 * a fresh row's and its fence bumped, so no completion of the old
 * generation can land; a row of requeues records REASON and BY (e.g.
 * "alice@host"), and the workers are woken.  Only failed items qualify:
 * with IDS, if any named item is missing or not failed, each is reported
 * to ERR, *RET_REFUSED says how many, and nothing changes.  Each item put
 * back (with DRY_RUN, each that would be) is listed on OUT with its new
 * key; DRY_RUN changes nothing.  *RET_REQUEUED: how many.  A SINCE or
 * ERROR_PATTERN PostgreSQL cannot read fails with store_failed_on_data().
 */
int store_requeue(store *st, const struct requeue_selection *sel, const char *reason,
    const char *by, bool dry_run, FILE *out, FILE *err, int *ret_requeued, int *ret_refused)
	__attribute__((warn_unused_result));

/*
 * Claims due items of KIND for LEASE_MS: bumps each one's fence, records
 * this worker as holder and hides it from other claims until the lease
 * ends.  With IDS, only those items (still due) are claimed; with IDS NULL,
 * up to LIMIT due items are chosen with FOR UPDATE SKIP LOCKED.  Filled
 * items go to ITEMS (capacity LIMIT); the caller owns them (item_clear).
 * A claim of an item whose previous lease ran out without a completion marks
 * it ambiguous: its holder may have called the API before it died.
 */
int store_claim(store *st, enum item_kind kind, const int64_t *ids, size_t nids,
    size_t limit, int lease_ms, struct item *items, size_t *ret_n)
	__attribute__((warn_unused_result));

/*
 * Extends the lease of every item of ITEMS (all of one kind) that this
 * claim still owns (same fence, still pending).  Items no longer owned get
 * lock_lost set.
 */
/* (The loop sends it and takes its answer: store_renew_send(), below.) */


/*
 * Records N completions (any mix of kinds) in one transaction.  Each item's
 * update is conditional and fenced: it applies only if the item is still
 * pending and its fence is still the one in the completion.  accepted[i]
 * tells which applied; a rejected one lost its claim to another worker and
 * must not be reported as recorded.  On -1 nothing was recorded.
 */
int store_complete(store *st, const struct completion *c, size_t n,
    bool *accepted) __attribute__((warn_unused_result));

/*
 * The due query above and store_claim() for the loop, asynchronous
 * (store_set_pipeline): sent now (the arguments are copied), answered at
 * a later turn.  The takes return 0 while the answer is not in, 1 with
 * the results as described above, -1 on failure
 * (store_errmsg(), store_connected(), store_failed_on_data()).  One due
 * query and one claim per kind in flight at a time (the _pending calls).
 */
int store_due_send(store *st, size_t limit) __attribute__((warn_unused_result));
bool store_due_pending(const store *st);
int store_due_take(store *st, enum item_kind *kinds, int64_t *ids, size_t *ret_n)
	__attribute__((warn_unused_result));
int store_claim_send(store *st, enum item_kind kind, const int64_t *ids, size_t nids,
    size_t limit, int lease_ms) __attribute__((warn_unused_result));
bool store_claim_pending(const store *st, enum item_kind kind);
int store_claim_take(store *st, enum item_kind kind, struct item *items, size_t *ret_n)
	__attribute__((warn_unused_result));

/*
 * The renewal above for the loop, asynchronous, one per kind in flight: the
 * take returns 1 with the ids and fences (*RET_NLOST of them, valid until
 * the next send) of the items sent whose lease is no longer theirs.  The
 * items themselves may be gone by then: the caller matches them.
 */
int store_renew_send(store *st, enum item_kind kind, struct item *const *items, size_t n,
    int lease_ms) __attribute__((warn_unused_result));
bool store_renew_pending(const store *st, enum item_kind kind);
int store_renew_take(store *st, enum item_kind kind, const int64_t **lost_ids,
    const int64_t **lost_fences, size_t *ret_nlost) __attribute__((warn_unused_result));

/*
 * store_complete() for the loop, asynchronous (store_set_pipeline): sends
 * the batch (its parameters are copied), and store_complete_take() takes
 * the answer once the connection has it: 0 while it has not, 1 with
 * accepted[i] as store_complete() fills it, -1 when nothing was recorded
 * (store_errmsg(), store_connected() and store_failed_on_data() say why).
 * One batch in flight at a time (store_complete_pending()).
 */
int store_complete_send(store *st, const struct completion *c, size_t n)
	__attribute__((warn_unused_result));
bool store_complete_pending(const store *st);
int store_complete_take(store *st, bool *accepted) __attribute__((warn_unused_result));

/*
 * The daemon's connection on the loop's poll (store_set_pipeline): poll
 * store_fd() for store_events(), then call store_drive() with what came
 * back (0 when nothing), which sends, reads answers and enforces
 * deadlines (store_deadline(): when it must run even if nothing came).
 * While connecting, the connect is driven by store_connect_drive() instead.
 * When the connection is lost (a missed deadline, the server gone),
 * store_connected() turns false and store_errmsg() says why; every
 * statement in flight fails.
 */
int store_fd(const store *st);
short store_events(const store *st);
int64_t store_deadline(const store *st);
void store_drive(store *st, short revents, int64_t now);

/*
 * True when the last failure came from the data (SQLSTATE classes 22, 23
 * and P0: a value out of range, a constraint, a trigger's exception), so
 * the same statement on the same rows fails again whatever the connection.
 */
bool store_failed_on_data(const store *st);

/*
 * For an item whose completion the database refuses: keeps it pending,
 * takes this claim off it (lease and holder cleared), sets last_error to
 * REASON and next_attempt_at to DELAY_MS from now, and marks it ambiguous
 * when C says an attempt may have taken effect.  Touches nothing else, so
 * it goes through where the full completion did not.  Fenced like a
 * completion: *ret_parked is false when the claim was no longer ours.
 * Never marks it failed: a charge may stand behind it.
 */
int store_park(store *st, const struct completion *c, int64_t delay_ms,
    const char *reason, bool *ret_parked) __attribute__((warn_unused_result));

/*
 * For an item whose claim the database refuses on its data (a fence that
 * cannot be bumped, a constraint, a producer's trigger): no claim exists,
 * so nothing is fenced.  If the item is still pending, due and under no
 * live lease, sets last_error to REASON and next_attempt_at to DELAY_MS
 * from now, so it is neither claimed again in a spin nor stuck without a
 * word, and logs one error line naming it.  Touches nothing else: never
 * marks it failed, since an earlier holder's call may have charged.
 * *ret_parked is false when it was no longer pending and due (finished or
 * claimed meanwhile).  REASON is borrowed for the call.
 */
int store_park_unclaimed(store *st, enum item_kind kind, int64_t id, int64_t delay_ms,
    const char *reason, bool *ret_parked) __attribute__((warn_unused_result));

enum reserve_result {
	RESERVE_HELD,           /* the hold is in the ledger (now or before) */
	RESERVE_INSUFFICIENT,   /* the subsidy's balance does not cover it */
	RESERVE_LOST,           /* the claim is no longer ours: do nothing */
	/*
	 * Another transaction holds the subsidy's row or the redemption's own
	 * (a producer's FOR UPDATE): nothing was written and nothing waited.
	 * Still ours; try again shortly, without a call.
	 */
	RESERVE_BUSY,
};

/*
 * Writes the hold of each redemption of ITEMS that has none, in one
 * transaction, if its subsidy's balance covers it (the escrow step: the
 * money is set aside before the API is called).  Serializes on each
 * subsidy's row, so concurrent workers can never overdraw; fenced, so a
 * stale claim writes nothing.  Never waits on a row lock: a redemption
 * whose row or subsidy row another transaction holds is RESERVE_BUSY
 * (schema version 8).  results[i] answers for items[i].
 */
/* (The loop sends it and takes its answer: store_reserve_send(), below.) */

/*
 * The reservation above for the loop, asynchronous, one in flight: the take
 * returns 0 while the answer is not in, 1 with results[i] for the i-th
 * item sent, -1 on failure (nothing was reserved).
 */
int store_reserve_send(store *st, struct item *const *items, size_t n)
	__attribute__((warn_unused_result));
bool store_reserve_pending(const store *st);
int store_reserve_take(store *st, enum reserve_result *results)
	__attribute__((warn_unused_result));

/* What store_audit() checks; a value the caller fills. */
struct store_audit_opts {
	/* A pending item whose lease ran out longer ago than this is stuck. */
	int stuck_after_s;
	/*
	 * Only the items finished since the newest clean run (schema version
	 * 9), and the pending ones; without a clean run on record, everything.
	 */
	bool since_last_clean;
	/*
	 * How far before its snapshot a run's coverage ends, for completions
	 * in sessions whose xact_start it cannot see (other roles): twice the
	 * statement timeout bounds a completion's transaction.
	 */
	int unseen_margin_ms;
};

/*
 * Checks, from the database alone, every invariant of the contract that
 * can be checked there, printing one line per violation to OUT, and
 * appends the run to audit_runs (clean or not), which the next
 * incremental run starts from.  Sets *violations to their number.
 */
int store_audit(store *st, FILE *out, const struct store_audit_opts *opts, int *violations)
	__attribute__((warn_unused_result));

/*
 * The LISTEN connection (a second, idle connection per worker): new rows
 * wake the worker through it within milliseconds; polling stays the
 * fallback.
 */
typedef struct store_listener store_listener;

int store_listener_new(const char *conninfo, store_listener **ret)
	__attribute__((warn_unused_result));
void store_listener_free(store_listener *sl);
/*
 * Starts connecting, without blocking: the loop polls store_listener_fd()
 * for store_listener_events() and calls store_listener_drive(), which
 * sends the LISTEN once connected.  -1 with store_listener_errmsg() set
 * when it could not even start.
 */
int store_listener_connect(store_listener *sl) __attribute__((warn_unused_result));
/*
 * Closes the LISTEN connection (the main connection moved to another host,
 * after a failover: this one must follow it, or it waits for notifications
 * on a server nobody inserts into any more).  The caller connects again.
 */
void store_listener_close(store_listener *sl);
/* True from store_listener_connect() until the connection fails or is closed. */
bool store_listener_active(const store_listener *sl);
/* The socket to poll, -1 when there is none; what to poll it for. */
int store_listener_fd(const store_listener *sl);
short store_listener_events(const store_listener *sl);
/* When store_listener_drive() must run even if nothing arrives (a deadline). */
int64_t store_listener_deadline(const store_listener *sl);
/*
 * Does what REVENTS (0: nothing arrived) and the clock allow: advances the
 * connect, sends the LISTEN, reads what arrived.  Returns the number of
 * notifications (0 or more), with *RET_LISTENING_NOW true at the turn the
 * LISTEN took effect; or -1 when the connect or the connection failed (it
 * is closed; connect again later), with store_listener_errmsg() set.
 */
int store_listener_drive(store_listener *sl, short revents, int64_t now,
    bool *ret_listening_now) __attribute__((warn_unused_result));
const char *store_listener_errmsg(const store_listener *sl);
/*
 * The backlog query of store_backlog(), sent on the LISTEN connection, so
 * that however long it runs no claim or completion waits behind it and
 * the loop does not wait at all.  0 when sent; 1 when it cannot be now
 * (not listening yet, or the last one still out); -1 when sending failed
 * (the connection is closed, as by store_listener_drive()), with
 * store_listener_errmsg() set.  A missed TIMEOUT_MS closes the connection.
 */
int store_listener_backlog_send(store_listener *sl, int timeout_ms, int64_t now)
	__attribute__((warn_unused_result));
/*
 * After store_listener_drive(): 1 with the answer in DUE and
 * OLDEST_PENDING_S (as store_backlog()) when it came in; 0 when none did;
 * -1 when the query failed (store_listener_errmsg() says why; the
 * connection stays up).
 */
int store_listener_backlog(store_listener *sl, int64_t due[ITEM_KIND_COUNT],
    double oldest_pending_s[ITEM_KIND_COUNT]) __attribute__((warn_unused_result));

/* What the registry says of a worker; the strings are the caller's. */
struct worker_info {
	const char *id;
	const char *host;
	const char *version;
	const char *lock_mode;
};

/*
 * Writes this worker's row in the fleet's registry (workers): at start,
 * every few seconds, and whenever the billing API starts or stops refusing
 * it.  REFUSED says why the API refuses it (a worker-level answer, with the
 * base URL, never the token), or NULL when it does not; the first refusal
 * keeps its start time.  `status` lists the rows.
 */
/*
 * In the daemon (store_set_pipeline) the write is sent and its answer read
 * at the next call, which returns -1 when that one failed.
 */
int store_worker_seen(store *st, const struct worker_info *wi, const char *refused)
	__attribute__((warn_unused_result));

/* Deletes this worker's row: it exits. */
int store_worker_gone(store *st, const char *worker_id) __attribute__((warn_unused_result));

/* Creates or upgrades the schema; safe from several hosts at once. */
int store_migrate(store *st) __attribute__((warn_unused_result));

/*
 * Fails with a clear message when the schema is missing or older than this
 * binary expects, so "run" refuses to start instead of failing per item.
 */
int store_check_schema(store *st) __attribute__((warn_unused_result));

/* Writes the status report to OUT. */
int store_status(store *st, FILE *out, int max_attempts)
	__attribute__((warn_unused_result));

#endif

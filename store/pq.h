#ifndef BW_PQ_H
#define BW_PQ_H

/*
 * One PostgreSQL connection that never blocks its caller (store/ only).
 *
 * The loop owns the wait: it polls pq_fd() for pq_events() and calls
 * pq_drive() with what came back.  The connection is opened with
 * PQconnectStartParams/PQconnectPoll, runs in libpq's pipeline mode and
 * non-blocking mode, and carries a FIFO of jobs.  A job is a few statements
 * followed by one sync: PostgreSQL runs them as one implicit transaction,
 * so they commit or roll back together, and a job costs one round trip
 * however many statements it holds.  Several jobs may be in flight at
 * once; their answers come back in order.
 *
 * Every job has a deadline.  When the head of the queue passes its
 * deadline the socket is shut down, as store/deadline.c did for the
 * blocking calls: the connection turns bad, every job in flight fails
 * with "connection lost", and the caller reconnects.  A frozen server or a
 * cut-off host thus costs one deadline, not a stalled loop.
 */

#include <stdbool.h>
#include <stdint.h>

#include <libpq-fe.h>

#define PQ_JOB_STMTS_MAX 4

typedef struct pq pq;

struct pq_stmt {
	const char *name;               /* a prepared statement, or NULL */
	const char *sql;                /* with name NULL: sent unnamed (one statement) */
	bool prepare;                   /* prepares SQL as NAME instead (no parameters) */
	int nparams;
	const char *const *params;      /* copied into libpq's buffer at pq_submit */
};

enum pq_job_state {
	PQ_JOB_IDLE,                    /* not submitted, or done and cleared */
	PQ_JOB_QUEUED,                  /* sent (maybe not all flushed), answers pending */
	PQ_JOB_DONE,                    /* every answer in, or the connection failed */
};

/*
 * Owned by the caller, who fills stmts/nstmts and submits it; it must stay
 * put until it is DONE (the queue links it).  After DONE: ok tells whether
 * every statement succeeded; res[i] is statement i's result (the last one
 * it returned; an error's when it failed), or NULL for statements skipped
 * after an error or lost with the connection.  pq_job_clear() frees them.
 */
struct pq_job {
	struct pq_stmt stmts[PQ_JOB_STMTS_MAX];
	int nstmts;

	enum pq_job_state state;
	bool ok;
	bool lost;                      /* the connection failed under it */
	PGresult *res[PQ_JOB_STMTS_MAX];

	/* the engine's */
	int64_t submitted_ms;
	int64_t deadline_ms;
	int answered;                   /* statements whose answers are complete */
	struct pq_job *next;
};

enum pq_state {
	PQ_DOWN,
	PQ_CONNECTING,
	PQ_READY,
};

int pq_new(pq **ret) __attribute__((warn_unused_result));
void pq_free(pq *c);

/*
 * Starts connecting with KEYWORDS/VALUES (as PQconnectStartParams, with
 * expand_dbname), giving each host TIMEOUT_MS, or the conninfo's own
 * connect_timeout when it sets one (as libpq's blocking connect would).  Any old connection is
 * closed first and its jobs fail.  -1 when it could not even start (the
 * message in pq_errmsg()); else 0, and pq_state() says PQ_CONNECTING.
 */
int pq_connect_start(pq *c, const char *const *keywords, const char *const *values,
    int timeout_ms) __attribute__((warn_unused_result));

enum pq_state pq_state(const pq *c);

/* The socket to poll, -1 when there is none. */
int pq_fd(const pq *c);

/* What to poll the socket for: POLLIN, POLLOUT or both; 0 when DOWN. */
short pq_events(const pq *c);

/* The earliest deadline of this connection (connect or head job), or INT64_MAX. */
int64_t pq_deadline(const pq *c);

/*
 * Does what REVENTS and the clock allow: advances a connect, flushes what
 * waits to be sent, reads answers and completes jobs, enforces deadlines.
 * Never blocks.  Call it after every poll, with 0 for REVENTS when the
 * socket was not ready (deadlines are still checked).
 */
void pq_drive(pq *c, short revents, int64_t now_ms);

/*
 * Sends JOB's statements and a sync, and queues JOB.  The connection must
 * be PQ_READY.  -1 when libpq refused to send (the connection is then
 * dropped: pq_state() is PQ_DOWN and JOB is DONE, lost); else 0.
 */
int pq_submit(pq *c, struct pq_job *job, int timeout_ms, int64_t now_ms)
    __attribute__((warn_unused_result));

/*
 * Waits for JOB (submitted on C) to be DONE, polling C's socket alone:
 * for the store's rare statements that a caller needs answered before it
 * goes on.  Bounded by the jobs' deadlines, so never longer than the
 * jobs queued before it and its own timeout.
 */
void pq_wait(pq *c, struct pq_job *job);

/* True when jobs are in flight on C. */
bool pq_busy(const pq *c);

/* Frees JOB's results; it may be reused. */
void pq_job_clear(struct pq_job *job);

/*
 * The connection whatever its state (connecting too), NULL when DOWN: for
 * settings that must be made before it is up (a notice receiver) and for
 * notifications (PQnotifies).  Never for sending.
 */
PGconn *pq_raw_conn(const pq *c);


/* Why the last connect or submit failed, or the connection was lost. */
const char *pq_errmsg(const pq *c);

/* Drops the connection now; every job in flight fails as lost. */
void pq_drop(pq *c, const char *why);

#endif

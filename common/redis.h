#ifndef BW_REDIS_H
#define BW_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * One connection to Redis, shared by the modules that keep state there
 * (the lock manager's locks, the fleet's rate budget): connect with
 * timeouts, AUTH, SELECT, the fleet's key prefix, Lua scripts run by
 * EVALSHA and loaded again when the server forgot them.  The loop creates
 * it and hands it to each user, which never frees it.
 *
 * Underneath is one hiredis asynchronous context that never blocks its
 * caller, driven as store/pq.c drives PostgreSQL: the owner polls
 * redis_conn_fd() for redis_conn_events() and calls redis_conn_drive()
 * with what came back, and at the latest by redis_conn_deadline().  A
 * connect is a sequence of steps (the sentinels, the TCP or unix connect,
 * AUTH, SELECT, ROLE, each script's SCRIPT LOAD), each with its own
 * deadline; script calls go in jobs (struct redis_job).  Every command is
 * bounded by the command timeout: a dead server costs a timeout, then the
 * connection is dropped and redis_conn_connected() says so until the next
 * connect.  The blocking calls below (redis_conn_connect, _eval, _eval_many,
 * _ping) are the same engine with a private poll() on its one socket, for
 * callers that may wait (start-up, the command line).
 */
typedef struct redis_conn redis_conn;

struct redis_options {
	const char *host;
	int port;
	const char *socket;         /* "" or NULL: TCP */
	const char *password;       /* NULL: no AUTH; copied, never logged */
	const char *username;       /* "" or NULL: AUTH password alone (the default user) */
	int db;                     /* SELECTed on every connection */
	/*
	 * Starts every key the users write: fleets with different prefixes
	 * share a server and never see each other.  Copied.
	 */
	const char *key_prefix;
	int connect_timeout_ms;
	int command_timeout_ms;
	/*
	 * "" or NULL: connect to host/port or socket.  Otherwise Sentinel
	 * entries "HOST:PORT" ("[::1]:26379" for IPv6) joined by commas,
	 * asked, without AUTH, where MASTER_NAME is; host, port and socket
	 * are then not used.  Both copied.
	 */
	const char *sentinels;
	const char *master_name;
};

/* Nothing is connected yet.  O's strings are copied. */
int redis_conn_new(const struct redis_options *o, redis_conn **ret)
	__attribute__((warn_unused_result));
void redis_conn_free(redis_conn *rc);

/*
 * Registers the Lua script SOURCE (static storage, never copied), loaded
 * at every connect from now on (and now, when connected); NAME says whose
 * it is in error messages ("lock", "rate").  *RET_ID is what
 * redis_conn_eval() takes.  Returns -1 when the table of scripts is full.
 */
int redis_conn_script(redis_conn *rc, const char *name, const char *source, int *ret_id)
	__attribute__((warn_unused_result));

/*
 * (Re)connects: AUTH when a password is set, SELECT the database, load
 * every registered script.  With sentinels, first asks each in turn
 * (SENTINEL get-master-addr-by-name, with the connect and command
 * timeouts) and keeps the first address named that says, with ROLE, it is
 * the master; so a connection dropped after a failover finds the new
 * master at the next connect.  Logs the connection once made (and the
 * master found, and by which sentinel).  Returns -1 with the reason in
 * redis_conn_errmsg().
 */
int redis_conn_connect(redis_conn *rc) __attribute__((warn_unused_result));
bool redis_conn_connected(const redis_conn *rc);
/* Why the last connect or command failed; never holds the password. */
const char *redis_conn_errmsg(const redis_conn *rc);
/* The fleet's key prefix ("billing-worker:" unless configured). */
const char *redis_conn_prefix(const redis_conn *rc);

/*
 * Where the handle connects, for a person: "\"HOST:PORT\"", the socket,
 * or with sentinels "master \"NAME\" at \"HOST:PORT\" (from sentinel
 * HOST:PORT)" once connected.  Written into BUF, LEN bytes.
 */
void redis_conn_describe(const redis_conn *rc, char *buf, size_t len);

/* One script call, for redis_conn_eval_many(). */
struct redis_eval {
	int id;                         /* from redis_conn_script() */
	const char *const *keys;
	size_t nkeys;
	const char *const *args;
	size_t nargs;
	long long *out;                 /* the script's array of NOUT integers */
	size_t nout;
};

#define REDIS_EVAL_MAX 4

enum redis_job_state {
	REDIS_JOB_IDLE,                 /* never submitted */
	REDIS_JOB_QUEUED,               /* sent, answers pending */
	REDIS_JOB_DONE,                 /* every answer in, or the connection failed */
};

/*
 * Up to REDIS_EVAL_MAX script calls sent in one round trip, in order.
 * Owned by the caller, who fills evals/nevals and submits it; the job, and
 * the keys, args and outs its evals point to, must stay put until it is
 * DONE.  Then ok tells whether every call succeeded (the outs of those
 * that did are filled all the same); lost that the connection failed
 * under it; the first failure is in redis_conn_errmsg().
 */
struct redis_job {
	struct redis_eval evals[REDIS_EVAL_MAX];
	size_t nevals;

	enum redis_job_state state;
	bool ok;
	bool lost;

	/* the engine's */
	int64_t submitted_ms;
	int64_t deadline_ms;
	size_t pending;                 /* calls whose answers are still to come */
	struct redis_job_call {
		struct redis_job *job;
		size_t k;
		bool retried;           /* NOSCRIPT: loaded and sent again once */
	} calls[REDIS_EVAL_MAX];
	struct redis_job *next;
};

/*
 * Runs N (at most REDIS_EVAL_MAX) script calls in one round trip, in order
 * (pipelined: every command is sent before any reply is read), and fills
 * each one's out.  -1 when any failed, with the first failure in
 * redis_conn_errmsg(); the outs of those that succeeded are filled all the
 * same.  A NOSCRIPT reply loads that script and runs its call again; a
 * broken connection, READONLY or MASTERDOWN drops the connection.
 */
int redis_conn_eval_many(redis_conn *rc, const struct redis_eval *ev, size_t n)
	__attribute__((warn_unused_result));

/*
 * EVALSHA script ID with the NKEYS KEYS and the NARGS ARGS.  The reply
 * must be an array of NOUT elements; each integer goes to OUT[i], anything
 * else as 0.  A NOSCRIPT answer (a restarted server) loads the script
 * again, once.  Returns -1 with the reason in redis_conn_errmsg(); a broken
 * connection is then dropped, and so is one to a server that answers
 * READONLY or MASTERDOWN (a master demoted by a failover).
 */
int redis_conn_eval(redis_conn *rc, int id, const char *const *keys, size_t nkeys,
    const char *const *args, size_t nargs, long long *out, size_t nout)
	__attribute__((warn_unused_result));

/*
 * Sends PING on a connected handle and copies the answer ("PONG") into
 * BUF.  Returns -1 with the reason in redis_conn_errmsg().  For
 * "check-config --connect".
 */
int redis_conn_ping(redis_conn *rc, char *buf, size_t len) __attribute__((warn_unused_result));

/*
 * Starts (re)connecting: any old connection is closed first and its jobs
 * fail.  The steps are those of redis_conn_connect(), each bounded (a TCP
 * connect by the connect timeout, each command by the command timeout).
 * -1 when it could not even start (the reason in redis_conn_errmsg());
 * else 0 and redis_conn_connecting() is true until the connect ended,
 * connected or failed, in a later redis_conn_drive().
 */
int redis_conn_connect_start(redis_conn *rc, int64_t now_ms) __attribute__((warn_unused_result));
bool redis_conn_connecting(const redis_conn *rc);

/* The socket to poll, -1 when there is none. */
int redis_conn_fd(const redis_conn *rc);
/* What to poll it for (POLLIN, POLLOUT or both); 0 when there is no socket. */
short redis_conn_events(const redis_conn *rc);
/* When redis_conn_drive() must run even if nothing arrives; INT64_MAX when never. */
int64_t redis_conn_deadline(const redis_conn *rc);

/*
 * Does what REVENTS (0 when the socket was not ready) and the clock
 * allow: reads and writes, advances a connect, completes jobs, enforces
 * every deadline (a missed one drops the connection; redis_conn_errmsg()
 * names the command and the server).  Never blocks.
 */
void redis_conn_drive(redis_conn *rc, short revents, int64_t now_ms);

/*
 * Sends JOB's calls (EVALSHA each) and queues it; the connection must be
 * up.  -1 when they could not be sent (JOB is then DONE, not ok, and lost
 * unless it was JOB itself that was wrong), else 0 and JOB is DONE after
 * a later redis_conn_drive(), or at once when the connection failed.
 */
int redis_conn_submit(redis_conn *rc, struct redis_job *job, int64_t now_ms)
	__attribute__((warn_unused_result));
bool redis_conn_job_done(const struct redis_job *job);
/* True while jobs are in flight on RC. */
bool redis_conn_busy(const redis_conn *rc);

#endif

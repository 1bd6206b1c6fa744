#ifndef BW_REDIS_H
#define BW_REDIS_H

#include <stdbool.h>
#include <stddef.h>

/*
 * One connection to Redis, shared by the modules that keep state there
 * (the lock manager's locks, the fleet's rate budget): connect with
 * timeouts, AUTH, SELECT, the fleet's key prefix, Lua scripts run by
 * EVALSHA and loaded again when the server forgot them.  The loop creates
 * it and hands it to each user, which never frees it; so it could become
 * an asynchronous context on the loop's poll set without its users
 * changing.  Every command is bounded by the command timeout: a dead
 * server costs a timeout, then the connection is dropped and
 * redis_conn_connected() says so until the next redis_conn_connect().
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
 * every registered script.  Logs the connection once made.  Returns -1
 * with the reason in redis_conn_errmsg().
 */
int redis_conn_connect(redis_conn *rc) __attribute__((warn_unused_result));
bool redis_conn_connected(const redis_conn *rc);
/* Why the last connect or command failed; never holds the password. */
const char *redis_conn_errmsg(const redis_conn *rc);
/* The fleet's key prefix ("billing-worker:" unless configured). */
const char *redis_conn_prefix(const redis_conn *rc);

/*
 * EVALSHA script ID with the NKEYS KEYS and the NARGS ARGS.  The reply
 * must be an array of NOUT elements; each integer goes to OUT[i], anything
 * else as 0.  A NOSCRIPT answer (a restarted server) loads the script
 * again, once.  Returns -1 with the reason in redis_conn_errmsg(); a broken
 * connection is then dropped.
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

#endif

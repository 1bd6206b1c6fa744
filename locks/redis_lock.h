#ifndef BW_REDIS_LOCK_H
#define BW_REDIS_LOCK_H

#include <stdbool.h>
#include <stddef.h>

/*
 * Per-item locks in Redis: SET key token NX PX ttl, renewed and released
 * only while the value is still our token.  Every operation takes a whole
 * batch of keys in one round trip (one Lua script call), so the cost per
 * poll or per renewal interval does not grow with the items in flight.
 */
typedef struct redis_lock redis_lock;

struct redis_options {
	const char *host;
	int port;
	const char *socket;         /* "" or NULL: TCP */
	const char *password;       /* NULL: no AUTH; copied, never logged */
	const char *username;       /* "" or NULL: AUTH password alone (the default user) */
	int db;                     /* SELECTed on every connection */
	/*
	 * Starts every key this module writes (rate bucket, 429 pause, worker
	 * registry): fleets with different prefixes share a server and never
	 * see each other.  Copied.  The lock keys the caller passes must carry
	 * it too.
	 */
	const char *key_prefix;
	int connect_timeout_ms;
	int command_timeout_ms;
};

int redis_lock_new(const struct redis_options *o, redis_lock **ret)
	__attribute__((warn_unused_result));
void redis_lock_free(redis_lock *rl);

int redis_lock_connect(redis_lock *rl) __attribute__((warn_unused_result));
bool redis_lock_connected(const redis_lock *rl);
const char *redis_lock_errmsg(const redis_lock *rl);

/*
 * Sends PING on a connected handle (redis_lock_connect has done AUTH when
 * a password is set) and copies the answer ("PONG") into BUF.  Returns -1
 * with the reason in redis_lock_errmsg().  For "check-config --connect".
 */
int redis_lock_ping(redis_lock *rl, char *buf, size_t len) __attribute__((warn_unused_result));

/* The fleet's shared rate budget, spent by redis_lock_acquire(). */
struct redis_rate {
	int rate;               /* API calls per second for the fleet; 0 = no limit */
	int burst;              /* calls the budget may bank */
	const char *member;     /* this worker's id, counted among the live workers */
	size_t max_keys;        /* lock at most this many of the keys offered */
};

struct redis_rate_answer {
	long long wait_ms;      /* before more calls may start (budget or 429 pause) */
	int workers;            /* workers that asked within the last 10 s */
};

/*
 * Sets got[i] when keys[i] was free and now holds tokens[i] for TTL_MS,
 * locking no more keys than the rate budget (and any 429 pause) allows.
 */
int redis_lock_acquire(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, const struct redis_rate *rate,
    bool *got, struct redis_rate_answer *ans)
	__attribute__((warn_unused_result));

/* Sets held[i] when keys[i] still held tokens[i] and now expires in TTL_MS. */
int redis_lock_renew(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, bool *held)
	__attribute__((warn_unused_result));

/* Deletes each key that still holds its token; others are left alone. */
int redis_lock_release(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n);

/* Stops every worker of the fleet from starting calls for PAUSE_MS (a 429). */
int redis_lock_pause(redis_lock *rl, int pause_ms);

#endif

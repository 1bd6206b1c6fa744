#ifndef BW_REDIS_LOCK_H
#define BW_REDIS_LOCK_H

#include <stdbool.h>
#include <stddef.h>

#include "common/redis.h"

/*
 * Per-item locks in Redis: SET key token NX PX ttl, renewed and released
 * only while the value is still our token.  Every operation takes a whole
 * batch of keys in one round trip (one Lua script call), so the cost per
 * poll or per renewal interval does not grow with the items in flight.
 * Locks only: the fleet's rate budget is billing's, on the same connection.
 */
typedef struct redis_lock redis_lock;

/*
 * Registers the lock scripts on CONN, which is borrowed and must outlive
 * the handle; connecting is the connection owner's business.
 */
int redis_lock_new(redis_conn *conn, redis_lock **ret)
	__attribute__((warn_unused_result));
void redis_lock_free(redis_lock *rl);

/*
 * Sets got[i] when keys[i] was free and now holds tokens[i] for TTL_MS,
 * trying the keys in order and locking no more than MAX of them.
 */
int redis_lock_acquire(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, size_t max, bool *got)
	__attribute__((warn_unused_result));

/* Sets held[i] when keys[i] still held tokens[i] and now expires in TTL_MS. */
int redis_lock_renew(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, bool *held)
	__attribute__((warn_unused_result));

/* Deletes each key that still holds its token; others are left alone. */
int redis_lock_release(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n);

#endif

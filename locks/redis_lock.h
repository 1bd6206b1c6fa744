#ifndef BW_REDIS_LOCK_H
#define BW_REDIS_LOCK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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
 * trying the keys in order and locking no more than MAX of them, in two
 * steps, for a caller that sends it as it sees fit, alone or in one round
 * trip with another script call (a job, redis_conn_eval_many): the call into EV, whose
 * buffers are RL's (and KEYS and TOKENS the caller's) until it ran; then
 * its answer into GOT.
 */
int redis_lock_acquire_call(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, size_t max, struct redis_eval *ev)
	__attribute__((warn_unused_result));
void redis_lock_acquire_done(const redis_lock *rl, size_t n, bool *got);

/*
 * Deletes each key that still holds its token, others left alone, without
 * waiting, on the connection's poll: the keys and tokens
 * are copied and the call sent; its answer comes in a later drive of the
 * connection.  Up to 1 024 releases may be in flight: send returns 1,
 * sending nothing, when that many are or memory ran out (the locks then
 * expire by their ttl, which costs only a little of other workers' time),
 * 0 when sent, -1 when the
 * connection failed.  redis_lock_reap() frees the answered ones and
 * returns -1 when one of them failed (redis_conn_errmsg() says why).
 */
int redis_lock_release_send(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int64_t now_ms);
int redis_lock_reap(redis_lock *rl);

/*
 * Sets held[i] when keys[i] still held tokens[i] and now expires in
 * TTL_MS, without waiting, one in flight at a time
 * (redis_lock_renew_pending()): the take returns 0 while the answer is
 * not in, 1 with held[i] for the i-th key sent (capacity N as sent), -1
 * when it failed.
 */
int redis_lock_renew_send(redis_lock *rl, const char *const *keys,
    const char *const *tokens, size_t n, int ttl_ms, int64_t now_ms);
bool redis_lock_renew_pending(const redis_lock *rl);
int redis_lock_renew_take(redis_lock *rl, bool *held);

#endif

#ifndef BW_LOOP_H
#define BW_LOOP_H

#include <stdbool.h>

#include "config/config.h"

/*
 * The worker: one thread, one event loop, up to worker.concurrency API
 * calls in flight.  Each turn it claims due items when there is room,
 * starts their calls, collects finished calls, records their outcomes in
 * one batched fenced transaction, and renews the claims of what is still in
 * flight.
 *
 * CFG is taken over by the loop (it replaces it on SIGHUP and frees it at
 * the end).  TOKEN is the API token, REDIS_PASSWORD the Redis password or
 * NULL; both are copied where needed and wiped by the caller.
 *
 * With ONCE the loop ends when nothing is due and nothing is in flight
 * (scheduled batch runs); otherwise at SIGTERM/SIGINT, after the calls in
 * flight finish or worker.shutdown_timeout_ms passes.  Returns the exit
 * status: 0, or 1 when it could not work (database unreachable in a once run).
 */
int loop_run(struct bw_config *cfg, const char *token, const char *redis_password,
    bool once);

#endif

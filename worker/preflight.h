#ifndef BW_PREFLIGHT_H
#define BW_PREFLIGHT_H

#include <stdbool.h>
#include <stddef.h>

#include "config/config.h"

/*
 * What a command refuses before it starts, beyond the file's own syntax
 * and ranges: the files the configuration names and the strings libpq
 * must parse.  "check-config" runs the same functions as "run", so a file
 * it passes is one "run" accepts (as "nginx -t" opens the files it names).
 * Every problem is logged, all of them rather than the first; a caller
 * that gets -1 exits 2, a configuration error that a restart cannot fix.
 */

/*
 * database.conninfo must parse, and a password in it makes the
 * configuration file a secret file (readable by its owner only).  For
 * every command that connects to the database.
 */
int preflight_database(const struct bw_config *cfg) __attribute__((warn_unused_result));

/*
 * What "run" and "once" need besides: billing_api.ca_file when set, the
 * API token (the systemd credential "api-token" when the unit passes it,
 * else billing_api.token_file) and, when the lock mode uses Redis, its
 * password (credential "redis-password", else redis.password_file).  The
 * secrets are read into TOKEN and REDIS_PASSWORD (SECRET_MAX bytes each,
 * the caller wipes them); *HAVE_REDIS_PASSWORD tells whether there is one.
 */
int preflight_worker(const struct bw_config *cfg, char *token, char *redis_password,
    bool *have_redis_password) __attribute__((warn_unused_result));

#endif

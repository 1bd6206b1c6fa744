#ifndef BW_PROBE_H
#define BW_PROBE_H

#include "config/config.h"

/*
 * "check-config --connect": asks each server the configuration names
 * whether it answers, the way "run" will reach it, and prints one line
 * per server on stdout ("database: ...", "redis: ...", "billing api:
 * ...").  The database must hold the schema this binary needs; Redis gets
 * AUTH (REDIS_PASSWORD, or NULL for none) and a PING; the API's host a
 * TCP connect or a verified TLS handshake, with no request and so no
 * token.  Blocking, with each server's configured timeouts.  Returns 0
 * when every server used answered, else -1.
 */
int probe_all(const struct bw_config *cfg, const char *redis_password)
	__attribute__((warn_unused_result));

#endif

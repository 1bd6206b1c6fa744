#ifndef BW_SECRET_H
#define BW_SECRET_H

#include <stdbool.h>
#include <stddef.h>

#include "config/config.h"

/*
 * Secret files: the API token and the Redis password.  Each is read whole
 * into a caller's buffer, trailing whitespace removed; every message names
 * the file, never what it holds.
 */

#define SECRET_MAX 4096

/*
 * Refuses (-1, logged) a secret file FD (named WHAT, at PATH) that group or
 * others may read, unless ALLOW, which only warns.
 */
int secret_check_mode(const char *what, const char *path, int fd, bool allow)
	__attribute__((warn_unused_result));

/* Reads the one-line secret at PATH into BUF (LEN bytes); -1, logged, on any fault. */
int secret_read(const char *what, const char *path, bool allow_readable, char *buf, size_t len)
	__attribute__((warn_unused_result));

/*
 * The path of systemd credential NAME ($CREDENTIALS_DIRECTORY/NAME, written
 * into BUF) when the unit passed one, else NULL.
 */
const char *secret_credential(const char *name, char *buf, size_t len);

/*
 * Reads the API token: the systemd credential "api-token" when the unit
 * passes one, else billing_api.token_file.  At start and on SIGHUP, so a
 * rotated token takes effect without a restart.
 */
int secret_api_token(const struct bw_config *cfg, char *buf, size_t len)
	__attribute__((warn_unused_result));

#endif
